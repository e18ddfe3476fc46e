"""Cost of a whole ``commute analyze`` run against the floor the mathematics sets (issue 6).

Everything is measured in ONE run of this script, pinned to ``torch.set_num_threads(THREADS)`` (1 by
default) in every process, on synthetic checkpoints built in a temporary folder: random-init GPT-2s
saved with ``save_pretrained`` (cost does not depend on the weights' values), the sample data of
``sample_checkpoints/data`` cut into 8 domains (en and ru training shards, 4 each), and the sample
byte-level BPE tokenizer (4096 tokens). Configs: "tiny" (the sample model: 2 layers, d=64, seq 128) and
"small" (6 layers, d=384, 12.3M parameters, seq 256).

What is printed, each with its method:

(a) HVP cost: median over interleaved rounds of (HVP time / gradient time of the same round) on one
    part of a design block (the analysis's micro-batch), for ``rr`` with 1 and 2 vectors and ``fr`` with
    1 vector. (``benchmarks/bench_hvp.py`` has more vector counts and batch sizes.)
(b) Whole analysis, K = 2 domains, every target (en, ru, mix -> pair plan, one vector per HVP pass): the
    wall time of ``analysis.run_analysis`` per checkpoint (``--no-cache``, warm token cache; interpreter
    start and imports excluded and printed separately) against the floor
    ``B * K * (2 t_grad(part) + t_hvp(part))``, i.e. two gradient passes and one HVP pass per sample set,
    with ``t_grad``/``t_hvp`` measured in this process between the analysis runs. Also expressed in
    gradient passes over the same number of sequences per domain (the floor is ``(2 + r) / 3`` of them,
    r = HVP/grad ratio).
(c) K = 8 over K = 2 domains with one target, the same samples per domain: the plan follows
    ``criterion.choose_plan`` (MATH.md "Cost": target plan, 8 HVPs per block instead of the pair plan's
    56), so the ideal ratio is 4 (K=2 with one target costs the same as with every target: pair plan,
    2 HVPs, ties go to pair). K = 2 runs bracket each K = 8 run (before and after) to cancel drifts in load.
(d) Memory: peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after imports) of a
    whole analysis against that of one gradient pass at the same micro-batch (same imports, model load
    and data), each in a fresh process; absolute and above the post-import baseline. Independence of
    ``--samples``: the same analysis at twice the samples (twice the micro-batches per part).
(e) Data preparation: the number of tokenizations (``sampling.pack_blocks`` calls, counted in the child
    process) in a run over several checkpoints, with a cold and then a warm cache, and the time of
    ``sampling.cached_blocks`` cold versus warm.

GPU (``--device cuda``): every analysis and the floor run on the GPU, timings synchronize; memory in (d) is
``torch.cuda.max_memory_allocated`` of each fresh process (tensors on the GPU, counted from zero) instead of
the resident set. On an H200 the K=2 and K=8 analyses of a one-checkpoint run each took about one
second more than their floors' shares (2.5 s against 1.6 s, 7.8 s against 6.3 s), a fixed cost, most
likely a fresh process's first CUDA calls (context, cuBLAS handles, allocator growth), which the floor,
timed in a warm process, does not pay. So on the GPU compare the steady state (the second checkpoint of a
K=2 run) with the floor. The "medium" config (12 layers, d=768, seq 512, ~90M parameters with the
4096-token sample vocabulary, 2 checkpoints per K=2 run) is for the GPU.

Usage: ``python benchmarks/bench_analysis.py [--quick] [--threads 1] [--repeats 1] [--keep DIR]
[--device cuda]``.
``--quick`` (about 1.5 minutes, most of it starting the 6 analysis processes) runs the tiny config only, at
micro-batch 4; the full run (tiny + small) takes ~10 minutes on
a 2-core CPU. Timings on a shared machine are noisy: ratios are taken within one run, interleaved.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_checkpoints"
N_SHARDS = 4  # per language: 8 domains


@dataclass
class Case:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    seq: int
    micro_batch: int
    blocks: int  # design blocks B
    checkpoints: int  # checkpoints per analysis run

    @property
    def samples(self) -> int:
        """Per domain: B blocks x 3 parts x one micro-batch per part."""
        return 3 * self.blocks * self.micro_batch


CASES = {
    "tiny": Case("tiny", n_layer=2, n_embd=64, n_head=4, seq=128, micro_batch=8, blocks=2, checkpoints=2),
    "small": Case("small", n_layer=6, n_embd=384, n_head=6, seq=256, micro_batch=4, blocks=2, checkpoints=1),
    "medium": Case(
        "medium", n_layer=12, n_embd=768, n_head=12, seq=512, micro_batch=8, blocks=2, checkpoints=2
    ),
}


# ------------------------------------------------------------------------------------------- workspace


def domain_names() -> list[str]:
    return [f"{lang}{i}" for lang in ("en", "ru") for i in range(N_SHARDS)]


def build_data(root: Path) -> dict[str, Path]:
    """8 domains: the en and ru training shards of the sample data, each dealt round-robin into 4 files."""
    out: dict[str, Path] = {}
    for lang in ("en", "ru"):
        src = SAMPLE / "data" / lang / "train.jsonl"
        if not src.is_file():
            raise SystemExit(f"missing {src}: run from a checkout with sample_checkpoints/")
        lines = src.read_text(encoding="utf-8").splitlines()
        for i in range(N_SHARDS):
            path = root / "data" / f"{lang}{i}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines[i::N_SHARDS]) + "\n", encoding="utf-8")
            out[f"{lang}{i}"] = path
    return out


def build_checkpoints(root: Path, case: Case, vocab: int) -> Path:
    """``case.checkpoints`` random-init GPT-2 checkpoints (different seeds) in the HF Trainer layout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = root / f"ckpt-{case.name}"
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=case.seq,
        n_embd=case.n_embd,
        n_layer=case.n_layer,
        n_head=case.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    for c in range(case.checkpoints):
        torch.manual_seed(c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = GPT2LMHeadModel(config).eval()
        step = 100 * (c + 1)
        path = folder / f"checkpoint-{step}"
        model.save_pretrained(str(path), safe_serialization=True)
        state = {"global_step": step, "log_history": [{"step": step, "learning_rate": 1e-3, "loss": 0.0}]}
        (path / "trainer_state.json").write_text(json.dumps(state))
    return folder


# ------------------------------------------------------------------------------------------- children


def proc_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        match = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def child_imports() -> None:
    """The same imports in every child, so that baselines compare."""
    import datasets  # noqa: F401
    import pandas  # noqa: F401
    import transformers  # noqa: F401
    from transformers import GPT2LMHeadModel  # noqa: F401

    from commute_cli.commands import analyze as analysis  # noqa: F401


def analyze_options(spec: dict):
    from commute_cli.commands.analyze import AnalyzeOptions

    names = spec["domains"]
    return AnalyzeOptions(
        ckpt_dir=Path(spec["ckpt_dir"]),
        domains=[f"{n}={spec['data'][n]}" for n in names],
        tokenizer=str(SAMPLE / "tokenizer"),
        seq_len=spec["seq"],
        samples=spec["samples"],
        blocks=spec["blocks"],
        batch_size=spec["micro_batch"],
        weights=[f"{n}={1 / len(names)}" for n in names],
        targets=spec["targets"],
        lr=1e-3,
        hvp=spec.get("hvp", "rr"),
        hvp_batch_size=spec.get("hvp_batch_size"),
        device=spec.get("device", "cpu"),
        out=Path(spec["out"]),
        steps=spec.get("steps"),
        use_cache=False,  # statistics recomputed; the token cache in out/cache stays warm
    )


def child_analysis(spec: dict) -> dict:
    from commute_cli.commands import analyze as analysis
    from commute_cli.io import sampling

    calls = {"pack_blocks": 0, "prepare_seconds": 0.0}
    pack, prepare = sampling.pack_blocks, analysis.prepare_samples

    def counting_pack(*args, **kwargs):
        calls["pack_blocks"] += 1
        return pack(*args, **kwargs)

    def timed_prepare(*args, **kwargs):
        t = time.perf_counter()
        try:
            return prepare(*args, **kwargs)
        finally:
            calls["prepare_seconds"] += time.perf_counter() - t

    sampling.pack_blocks = counting_pack
    analysis.prepare_samples = timed_prepare
    opts = analyze_options(spec)
    base = proc_kib("VmRSS")
    exact = reset_peak()
    t0 = time.perf_counter()
    result = analysis.run_analysis(opts)
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "per_checkpoint": [c.get("seconds") for c in result.run["checkpoints"]],
        "n_checkpoints": len(result.run["checkpoints"]),
        "plan": result.run["plan"],
        "hvps_per_block": result.run["hvps_per_block"],
        "peak_kib": proc_kib("VmHWM"),
        "base_kib": base,
        "exact_peak": exact,
        **calls,
    } | gpu_peak(spec)  # on CUDA the GPU's peak replaces the RSS


def gpu_peak(spec: dict) -> dict:
    """On CUDA, (d) compares tensors on the GPU: the process's peak allocation, counted from zero."""
    if spec.get("device", "cpu") != "cuda":
        return {}
    return {"peak_kib": torch.cuda.max_memory_allocated() / 1024, "base_kib": 0, "exact_peak": True}


def child_grad(spec: dict) -> dict:
    """One gradient pass over one micro-batch: model load + data + loss_and_grad, like the analysis."""
    from commute_cli.commands.analyze import resolve_inputs
    from commute_cli.engine import curvature
    from commute_cli.io import checkpoints, sampling

    opts = analyze_options(spec)
    base = proc_kib("VmRSS")
    exact = reset_peak()
    inputs = resolve_inputs(opts)  # after the reset, as inside run_analysis
    device = torch.device(spec.get("device", "cpu"))
    model = checkpoints.load_model(inputs.refs[0], device=device)
    name = inputs.names[0]
    blocks = sampling.cached_blocks(
        inputs.sources[name], inputs.tokenizer, inputs.seq_len, Path(spec["out"]) / "cache", domain=name
    )
    t0 = time.perf_counter()
    curvature.loss_and_grad(model, blocks[: spec["micro_batch"]], spec["micro_batch"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"wall": wall, "peak_kib": proc_kib("VmHWM"), "base_kib": base, "exact_peak": exact} | gpu_peak(
        spec
    )


def run_child(mode: str, spec: dict, threads: int) -> dict:
    payload = json.dumps({"mode": mode, "spec": spec, "threads": threads})
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--_child", payload], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def child_main(payload: str) -> None:
    job = json.loads(payload)
    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    child_imports()
    imports = time.perf_counter() - t0
    fn = child_analysis if job["mode"] == "analysis" else child_grad
    out = fn(job["spec"])
    out["import_seconds"] = imports
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------- parent


def time_ops(model, part: torch.Tensor, mb: int, rounds: int) -> dict[str, list[float]]:
    """Interleaved timings of grad / rr 1 / rr 2 / fr 1 on one part (after one warm-up each)."""
    from commute_cli.engine import curvature as C
    from commute_cli.engine.hvp import hvp

    n = C.num_params(model)
    device = C.model_device(model)
    vecs = torch.randn(2, n, generator=torch.Generator().manual_seed(1)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ops = {
        "grad": lambda: C.loss_and_grad(model, part, mb),
        "rr1": lambda: hvp(model, part, vecs[:1], mb, "rr"),
        "rr2": lambda: hvp(model, part, vecs[:2], mb, "rr"),
        "fr1": lambda: hvp(model, part, vecs[:1], mb, "fr"),
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    for fn in ops.values():
        fn()
    sync()
    for _ in range(rounds):
        for key, fn in ops.items():
            t = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t)
    return times


def mib(kib: float) -> str:
    return f"{kib / 1024:7.0f} MiB"


def bench(
    case: Case,
    root: Path,
    data: dict[str, Path],
    threads: int,
    repeats: int,
    quick: bool,
    device: str,
    hvp_batch: int | None = None,
) -> None:
    from commute_cli.core import criterion
    from commute_cli.engine import curvature
    from commute_cli.io import checkpoints, sampling

    tok_dir = SAMPLE / "tokenizer"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    ckpt_dir = build_checkpoints(root, case, len(tokenizer))
    names = domain_names()
    out = root / f"out-{case.name}"
    base_spec = {
        "ckpt_dir": str(ckpt_dir),
        "data": {k: str(v) for k, v in data.items()},
        "seq": case.seq,
        "samples": case.samples,
        "blocks": case.blocks,
        "micro_batch": case.micro_batch,
        "out": str(out),
        "device": device,
        "hvp_batch_size": hvp_batch,
    }
    k2 = {**base_spec, "domains": ["en0", "ru0"], "targets": []}  # every target: en0, ru0, mix
    first_step = [100]  # the long runs (K=8, twice the samples) on one checkpoint only
    k8 = {**base_spec, "domains": names, "targets": ["en0"], "steps": first_step}
    model = checkpoints.load_model(checkpoints.discover(ckpt_dir)[0], device=torch.device(device))
    n = curvature.num_params(model)
    hvp_mb = hvp_batch or max(1, case.micro_batch // 2)
    hvp_how = "--hvp-batch-size" if hvp_batch else "--hvp-batch-size default"
    print(
        f"\n== {case.name}: GPT-2 {case.n_layer} layers, d={case.n_embd}, vocab {len(tokenizer)}, "
        f"{n / 1e6:.2f}M params, seq {case.seq}, micro-batch {case.micro_batch}, {case.blocks} design blocks "
        f"x 3 parts of {case.micro_batch} -> --samples {case.samples} per domain, {case.checkpoints} "
        f"checkpoint(s) per run; the analysis runs its HVPs at micro-batch {hvp_mb} "
        f"({hvp_how}), the floor is measured at the full micro-batch",
        flush=True,
    )

    # (e) data preparation: cold and warm token cache, and tokenizations per run
    t = time.perf_counter()
    for name in names:
        sampling.cached_blocks(str(data[name]), tokenizer, case.seq, root / f"cold-{case.name}", domain=name)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    for name in names:
        sampling.cached_blocks(str(data[name]), tokenizer, case.seq, root / f"cold-{case.name}", domain=name)
    warm = time.perf_counter() - t
    first = run_child("analysis", {**k2, "out": str(out)}, threads)  # cold cache in out/cache
    second = run_child("analysis", {**k2, "out": str(out)}, threads)  # warm
    print(
        "(e) data preparation: sampling.cached_blocks for 8 domains "
        f"cold {cold:.2f} s, warm {warm:.2f} s ({cold / max(warm, 1e-9):.0f}x); "
        f"analysis over {first['n_checkpoints']} checkpoints: pack_blocks calls = {first['pack_blocks']} "
        f"(cold cache, K=2: once per domain per run, not per checkpoint), then {second['pack_blocks']} "
        f"(warm cache); prepare_samples {first['prepare_seconds']:.2f} s cold vs "
        f"{second['prepare_seconds']:.2f} s warm",
        flush=True,
    )

    # interleaved: floor timings in this process, analyses in fresh processes; K=2 runs bracket K=8 runs
    blocks = sampling.cached_blocks(str(data["en0"]), tokenizer, case.seq, out / "cache", domain="en0")
    part = blocks[: case.micro_batch]
    op_times: dict[str, list[float]] = {"grad": [], "rr1": [], "rr2": [], "fr1": []}
    k2_one = {**k2, "targets": ["en0"], "steps": first_step}
    runs: dict[str, list[dict]] = {"k2": [second], "k2_one": [], "k8": []}
    rounds = 2 if quick else 3

    def floor_round() -> None:
        for key, vals in time_ops(model, part, case.micro_batch, rounds).items():
            op_times[key] += vals

    floor_round()
    if not quick:  # quick: K=2 after each K=8 run only
        runs["k2_one"].append(run_child("analysis", k2_one, threads))
    for _ in range(repeats):
        runs["k8"].append(run_child("analysis", k8, threads))
        runs["k2_one"].append(run_child("analysis", k2_one, threads))
        floor_round()
    if not quick:
        runs["k2"].append(run_child("analysis", k2, threads))

    g = statistics.median(op_times["grad"])
    ratio = {
        k: statistics.median(t / gg for t, gg in zip(op_times[k], op_times["grad"], strict=True))
        for k in ("rr1", "rr2", "fr1")
    }
    print(
        f"(a) HVP / gradient over one part ({case.micro_batch} x {case.seq} tokens; median over "
        f"{len(op_times['grad'])} interleaved rounds of the per-round ratio; gradient {g:.3f} s):"
    )
    print(
        f"    rr 1 vector {ratio['rr1']:.2f}x | rr 2 vectors {ratio['rr2']:.2f}x "
        f"({ratio['rr2'] / 2:.2f}x per vector) | fr 1 vector {ratio['fr1']:.2f}x"
    )

    def per_ckpt(run: dict) -> float:
        return run["wall"] / run["n_checkpoints"]

    r = ratio["rr1"]
    t_h = statistics.median(op_times["rr1"])
    K2, K8 = 2, 8
    floor2 = case.blocks * K2 * (2 * g + t_h)
    floor8 = case.blocks * K8 * (2 * g + t_h)
    k2_times = [per_ckpt(x) for x in runs["k2"]]
    a2 = statistics.median(k2_times)
    inside = [x["per_checkpoint"] for x in runs["k2"]]
    steady = [s for secs in inside for s in (secs[1:] if len(secs) > 1 else secs)]
    grad_pass_all = K2 * 3 * case.blocks * g  # one gradient over every sampled sequence of each domain
    print(
        f"(b) K=2, every target ({second['plan']} plan, {second['hvps_per_block']} HVPs of 1 vector per "
        f"block), runs over {second['n_checkpoints']} checkpoints: whole run_analysis wall / checkpoints "
        f"{a2:.2f} s (median of {len(k2_times)} runs: "
        + ", ".join(f"{x:.2f}" for x in k2_times)
        + f"); floor B*K*(2 t_grad + t_hvp) = {floor2:.2f} s -> ratio to floor {a2 / floor2:.2f}x "
        "(goal <= 1.3)"
    )
    print(
        "    per checkpoint inside run_analysis (load + estimate; run.json 'seconds'): "
        + " | ".join(", ".join(f"{s:.2f}" for s in secs) for secs in inside)
        + f" -> steady state (after each run's first checkpoint) {statistics.median(steady):.2f} s = "
        f"{statistics.median(steady) / floor2:.2f}x the floor"
    )
    print(
        f"    in gradient passes over the {case.samples} sequences per domain: analysis "
        f"{a2 / grad_pass_all:.2f}, floor (2 + r)/3 = {(2 + r) / 3:.2f} (r = {r:.2f}); process start + "
        f"imports {statistics.median(x['import_seconds'] for x in runs['k2']):.1f} s per invocation "
        "(not counted)"
    )
    a2_one = statistics.median(per_ckpt(x) for x in runs["k2_one"])
    a8 = statistics.median(per_ckpt(x) for x in runs["k8"])
    in2 = statistics.median(x["per_checkpoint"][0] for x in runs["k2_one"])
    in8 = statistics.median(x["per_checkpoint"][0] for x in runs["k8"])
    print(
        f"(c) K=8 vs K=2 domains, one target (en0), {case.samples} samples per domain, one checkpoint per "
        f"run: K=8 uses the {runs['k8'][0]['plan']} plan ({runs['k8'][0]['hvps_per_block']} HVPs per block; "
        f"MATH.md cost model {criterion.plan_hvp_count(K8, 1)} -> {criterion.choose_plan(K8, 1)}), K=2 the "
        f"{runs['k2_one'][0]['plan']} plan ({runs['k2_one'][0]['hvps_per_block']} HVPs)"
    )
    print(
        f"    run_analysis wall {a8:.2f} s vs {a2_one:.2f} s -> K8/K2 = {a8 / a2_one:.2f} (goal <= 4.5; "
        f"linear 4.0); load + estimate only {in8:.2f} s vs {in2:.2f} s -> {in8 / in2:.2f}; K=8 wall / its "
        f"floor {a8 / floor8:.2f}x (K=2 runs: "
        + ", ".join(f"{per_ckpt(x):.2f}" for x in runs["k2_one"])
        + "; K=8: "
        + ", ".join(f"{per_ckpt(x):.2f}" for x in runs["k8"])
        + ")",
        flush=True,
    )

    # (d) memory: a gradient pass vs whole analyses at S and 2 S samples per domain (fresh processes)
    grad = run_child("grad", k2, threads)
    big = run_child("analysis", {**k2, "samples": 2 * case.samples, "steps": first_step}, threads)
    mem_k2 = max(x["peak_kib"] for x in runs["k2"] + runs["k2_one"])
    mem_k8 = max(x["peak_kib"] for x in runs["k8"])
    base = statistics.median([grad["base_kib"], *(x["base_kib"] for x in runs["k2"])])
    exact = grad["exact_peak"] and all(x["exact_peak"] for x in runs["k2"])
    mem_kind = "RSS (VmHWM)" if exact else "RSS (VmHWM, upper bound: not reset)"
    if device == "cuda":
        mem_kind = "CUDA memory (max_memory_allocated)"
    print(
        f"(d) peak {mem_kind}, each in a fresh process after "
        f"the same imports (baseline RSS {mib(base).strip()}): gradient pass at micro-batch "
        f"{case.micro_batch} {mib(grad['peak_kib'])}; analysis K=2 {mib(mem_k2)} -> "
        f"{mem_k2 / grad['peak_kib']:.2f}x (goal <= 2.5); K=8 {mib(mem_k8)} -> "
        f"{mem_k8 / grad['peak_kib']:.2f}x"
    )
    print(
        f"    above the baseline: gradient {mib(grad['peak_kib'] - grad['base_kib'])}, analysis K=2 "
        f"{mib(mem_k2 - base)} -> {(mem_k2 - base) / max(grad['peak_kib'] - grad['base_kib'], 1):.2f}x, "
        f"K=8 {mib(mem_k8 - base)}"
    )
    print(
        f"    --samples {case.samples} -> {mib(mem_k2)}; --samples {2 * case.samples} (2 micro-batches per "
        f"part) -> {mib(big['peak_kib'])} ({big['peak_kib'] / mem_k2:.3f}x; time per checkpoint "
        f"{per_ckpt(big):.2f} s = {per_ckpt(big) / a2:.2f}x)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1.5 minutes: the tiny config at micro-batch 4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="K=8 runs, each bracketed by K=2 runs")
    parser.add_argument("--configs", nargs="*", choices=sorted(CASES), default=None)
    parser.add_argument("--keep", type=Path, default=None, help="build the workspace here and keep it")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--hvp-full-batch",
        action="store_true",
        help="run the analysis's HVPs at the full micro-batch (--hvp-batch-size = --batch-size), not half",
    )
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child_main(args._child)
        return

    torch.set_num_threads(args.threads)
    from commute_cli.commands.analyze import quiet_libraries

    quiet_libraries()
    cpu_default = ["tiny"] if args.quick else ["tiny", "small"]
    names = args.configs or (cpu_default if args.device == "cpu" else ["tiny", "small", "medium"])
    print(
        f"bench_analysis: torch {torch.__version__}, torch.set_num_threads({args.threads}) in every "
        f"process, {args.device}, float32, eager attention; {'quick' if args.quick else 'full'} run. "
        "Timings on a "
        "shared machine are noisy: ratios are within this run, interleaved.",
        flush=True,
    )
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-analysis-"))
    root.mkdir(parents=True, exist_ok=True)
    used: list[Case] = []
    try:
        data = build_data(root)
        for name in names:
            case = CASES[name]
            if args.quick and name == "tiny":  # half the sequences: the same measurements in ~1.5 minutes
                case = Case(**{**asdict(case), "micro_batch": 4})
            used.append(case)
            hvp_batch = case.micro_batch if args.hvp_full_batch else None
            bench(case, root, data, args.threads, args.repeats, args.quick, args.device, hvp_batch)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print("\ncases: " + "; ".join(f"{c.name}: {asdict(c)}" for c in used))


if __name__ == "__main__":
    main()
