"""Cost of exact Hessian-vector products relative to one gradient over the same batch.

For each model config: time of ``engine.hvp.hvp`` (reverse-on-reverse "rr" and forward-over-reverse
"fr", with 1, 2 and 4 vectors through the same batch; "fr" batches the tangents with ``vmap``) divided
by the time of ``curvature.loss_and_grad`` on that batch. All in one process pinned to a fixed number
of threads (1 by default; torch's default of 2 on a shared 2-core machine is 2-2.5x slower whenever
another process holds a core). Every operation is warmed up once, then timed in interleaved rounds
(gradient, rr 1, rr 2, ..., fr 4; repeat), so that a burst of load from other processes hits all of them
alike; the ratio reported is the median over rounds of (op time / gradient time of the same round).

Peak memory: each of gradient / HVP runs once in a fresh child process (so that no memory the
allocator keeps from earlier calls is reused), started before any timing so that the parent is small.
The child resets its high-water mark (``VmHWM``, by writing 5 to ``/proc/self/clear_refs``) just
before the call and reports ``VmHWM`` after it minus ``VmRSS`` before it: the peak resident-set growth
of the call, counting everything it allocates (autograd graph, activations, outputs), not only torch
tensors. (``ru_maxrss`` is no use here: it survives fork/exec, so a child reports its parent's peak.)

Arithmetic floor: the matrix-multiply FLOPs of each call (``torch.utils.flop_counter.FlopCounterMode``,
one untimed call each) over those of the gradient. For a network made of matrix products the exact HVP
needs 3x a gradient's FLOPs for one vector and ``(1 + 2m) / m`` per vector for m vectors sharing the
forward pass (gradient: 1 forward + 2 backward products per weight matrix; the second-order pass adds 2
tangent-forward and 4 tangent-backward products; see docs/DECISIONS.md), so the "/ flops" column says how
close the time ratio is to what any exact method must do.

Peers, in the same interleaved rounds on the same model and batch (one vector unless said):
``curvlinops`` -- ``curvlinops.HessianLinearOperator`` of ``curvlinops-for-pytorch`` (the ``bench`` extra;
forward-over-reverse through ``torch.func``, its matrix product vmapped over columns; also with 4 columns),
built over the model's logits and ``CrossEntropyLoss(reduction="mean")`` on the shifted tokens, with
``check_deterministic=False`` (the model is in eval mode); ``torch.func`` -- ``jvp`` over ``grad`` of the
same loss through ``functional_call`` with the de-duplicated (tied) parameters. Each peer's result is
checked against ``engine.hvp.hvp`` on the same vector (relative error printed) before it is timed; a peer
that is not installed is skipped with a note. The 4-column curvlinops product runs on the tiny config only.

Finding (torch 2.13 CPU, curvlinops-for-pytorch 3.0.1): curvlinops' product differs from the exact HVP by
~1.5e-3 relative *in float64* on GPT-2, all of it in the LayerNorm weights' block (``ln_1``, ``ln_2``,
``ln_f``); ``torch.func.jvp`` over ``jacrev`` -- what curvlinops runs -- reproduces it without curvlinops,
while ``jvp`` over ``grad``, reverse-on-reverse and a float64 central finite difference agree with each
other (1e-16 and 1e-6). So its time is that of a slightly wrong product on this stack.

Results, with the environment (torch/transformers/curvlinops versions, threads, CPU), are written as JSON to
``benchmarks/results/bench_hvp.json`` (``--out``).

GPU (``--device cuda``): timings with ``torch.cuda.synchronize`` around every call; peak memory is
``torch.cuda.max_memory_allocated`` during the call minus the memory allocated before it (in-process, after
``reset_peak_memory_stats``), i.e. tensors only. The "gpt2" config (124M parameters, seq 1024, the
published curvlinops comparison point) is for the GPU.

Usage: ``python benchmarks/bench_hvp.py [--quick] [--threads 1] [--repeats N] [--no-memory] [--device cuda]``.
``--quick`` (about a minute on 1 thread) runs only the tiny config, memory for 1 vector only.
The "small" config runs at batch 4 by default, not 8: forward-over-reverse with 4 vmapped tangents
at batch 8 peaks above 10 GB, which this shared machine cannot spare (``--small-batch 8`` to try).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from commute_cli.engine import curvature as C
from commute_cli.engine.hvp import hvp

import benchenv

ROOT = Path(__file__).resolve().parent.parent
PEERS = (("curvlinops", 1), ("curvlinops", 4), ("torch.func", 1))

CONFIGS: dict[str, dict[str, int]] = {
    # the tiny model of the sample checkpoints
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 4096, "seq": 128, "batch": 8},
    # ~14M parameters (FACTS.md "Cost" measured batch 8)
    "small": {"n_layer": 6, "n_embd": 384, "n_head": 6, "vocab_size": 8192, "seq": 256, "batch": 4},
    # GPT-2 124M (GPU only: curvlinops' nanoGPT comparison point)
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "seq": 1024, "batch": 4},
}
VECTOR_COUNTS = (1, 2, 4)


@dataclass
class Case:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    seq: int
    batch: int


def build(case: Case, seed: int = 0, device: str = "cpu") -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=case.n_layer,
        n_embd=case.n_embd,
        n_head=case.n_head,
        vocab_size=case.vocab_size,
        n_positions=max(case.seq, 128),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(config).eval().to(device)
    blocks = torch.randint(0, case.vocab_size, (case.batch, case.seq))
    return model, blocks


def make_peers(model: torch.nn.Module, blocks: torch.Tensor) -> dict[str, object]:
    """HVP callables ``f(vectors [m, n]) -> [m, n]`` of the peers installed here (module docstring)."""
    from torch.func import functional_call, grad, jvp

    plist = C.param_list(model)
    names = [name for name, _ in plist]
    shapes = [p.shape for _, p in plist]
    sizes = [p.numel() for _, p in plist]
    device = C.model_device(model)
    ids = blocks.to(device)
    labels = ids[:, 1:].reshape(-1)

    class Logits(torch.nn.Module):
        def __init__(self, lm: torch.nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.lm(x, use_cache=False).logits
            return logits[:, :-1].reshape(-1, logits.shape[-1])

    def split(v: torch.Tensor) -> list[torch.Tensor]:
        return [piece.view(shape) for piece, shape in zip(v.split(sizes), shapes, strict=True)]

    peers: dict[str, object] = {}

    def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(model, params, (ids,), {"use_cache": False}).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels)

    primals = {name: p.detach() for name, p in plist}
    grad_fn = grad(loss_of)

    def torch_func(vectors: torch.Tensor) -> torch.Tensor:
        out = []
        for v in vectors:
            tangents = dict(zip(names, split(v), strict=True))
            _, hv = jvp(grad_fn, (primals,), (tangents,))
            out.append(torch.cat([hv[name].reshape(-1) for name in names]))
        return torch.stack(out)

    peers["torch.func"] = torch_func
    try:
        from curvlinops import HessianLinearOperator
    except ImportError:
        print("  (curvlinops not installed: pip install -e .[bench])")
    else:
        op = HessianLinearOperator(
            Logits(model),
            torch.nn.CrossEntropyLoss(reduction="mean"),
            [p for _, p in plist],
            [(ids, labels)],
            check_deterministic=False,
            num_data=ids.shape[0],
        )

        def curvlinops_hvp(vectors: torch.Tensor) -> torch.Tensor:
            return (op @ vectors.T).T

        peers["curvlinops"] = curvlinops_hvp
    return peers


_PEERS: dict[str, object] = {}


def run_op(model: torch.nn.Module, blocks: torch.Tensor, op: str, vectors: torch.Tensor | None) -> None:
    if op == "grad":
        C.loss_and_grad(model, blocks, micro_batch=blocks.shape[0])
    elif op in _PEERS:
        assert vectors is not None
        _PEERS[op](vectors)  # type: ignore[operator]
    else:
        assert vectors is not None
        hvp(model, blocks, vectors, micro_batch=blocks.shape[0], method=op)  # type: ignore[arg-type]
    if C.model_device(model).type == "cuda":  # blocks stay on the CPU; hvp moves each micro-batch
        torch.cuda.synchronize()


def flop_ratios(model: torch.nn.Module, blocks: torch.Tensor, vectors: torch.Tensor, ops) -> dict:
    """Matrix-multiply FLOPs of each op over the gradient's (one untimed call each)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for op in ops:
        with FlopCounterMode(display=False) as counter:
            run_op(model, blocks, op[0], vectors[: op[1]] if op[1] else None)
        flops[op] = counter.get_total_flops()
    return {op: flops[op] / flops[("grad", 0)] for op in ops}


def gpu_memory(model: torch.nn.Module, blocks: torch.Tensor, op: str, vectors: torch.Tensor | None) -> str:
    """Peak CUDA memory allocated during one call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_op(model, blocks, op, vectors)
    return f"{(torch.cuda.max_memory_allocated() - before) / 2**20:8.0f} MiB"


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return int(match.group(1))


def memory_child(case: Case, op: str, m: int, threads: int) -> None:
    """Runs in a fresh process: one call of ``op``, prints the peak RSS growth as JSON."""
    torch.set_num_threads(threads)
    model, blocks = build(case)
    vectors = torch.randn(m, C.num_params(model)) if op != "grad" else None
    before = proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before_peak = proc_status_kib("VmHWM")
    run_op(model, blocks, op, vectors)
    after_peak = proc_status_kib("VmHWM")
    exact = reset or after_peak > before_peak
    print(json.dumps({"growth": (after_peak - before) * 1024, "exact": exact}))


def measure_memory(case: Case, op: str, m: int, threads: int) -> str:
    cmd = [sys.executable, __file__, "--_memory-child", json.dumps(case.__dict__), op, str(m), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        return f"failed ({err[-1] if err else f'exit code {proc.returncode}'})"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    text = f"{out['growth'] / 2**20:8.0f} MiB"
    return text if out["exact"] else text + " (upper bound: VmHWM could not be reset)"


def bench_case(
    case: Case, repeats: int, threads: int, memory_counts: tuple[int, ...], device: str = "cpu"
) -> dict:
    model, blocks = build(case)
    n = C.num_params(model)
    del model
    print(
        f"\n== {case.name}: GPT-2 n_layer={case.n_layer} n_embd={case.n_embd} n_head={case.n_head} "
        f"vocab={case.vocab_size}, {n / 1e6:.2f}M params, batch {case.batch} x {case.seq} tokens, "
        f"one micro-batch, float32, eager attention, {device}",
        flush=True,
    )
    if memory_counts and device == "cuda":
        model, blocks = build(case, device=device)
        vectors = torch.randn(max(memory_counts), n, device=device)
        print("peak CUDA memory above what was allocated before the call (max_memory_allocated):")
        print(f"  gradient         : {gpu_memory(model, blocks, 'grad', None)}", flush=True)
        for method in ("rr", "fr"):
            for m in memory_counts:
                print(
                    f"  {method} {m} vector(s)   : {gpu_memory(model, blocks, method, vectors[:m])}",
                    flush=True,
                )
        del model, vectors
    elif memory_counts:
        print("peak memory above baseline (VmHWM after minus VmRSS before, a fresh process per call):")
        print(f"  gradient         : {measure_memory(case, 'grad', 0, threads)}", flush=True)
        for method in ("rr", "fr"):
            for m in memory_counts:
                print(f"  {method} {m} vector(s)   : {measure_memory(case, method, m, threads)}", flush=True)

    model, blocks = build(case, device=device)
    vectors = torch.randn(max(VECTOR_COUNTS), n, generator=torch.Generator().manual_seed(1)).to(device)
    ops = [("grad", 0)] + [(method, m) for method in ("rr", "fr") for m in VECTOR_COUNTS]
    _PEERS.clear()
    _PEERS.update(make_peers(model, blocks))
    reference = hvp(model, blocks, vectors[:4], micro_batch=blocks.shape[0], method="rr").hvps
    agreement: dict[str, float] = {}
    for peer, m in PEERS:
        if m > 1 and case.name != "tiny":  # 4 vmapped columns: fr-like memory (~7 GB on "small")
            continue
        if peer in _PEERS:
            got = _PEERS[peer](vectors[:m])  # type: ignore[operator]
            err = float((got - reference[:m]).norm() / reference[:m].norm())
            agreement[f"{peer} {m}"] = err
            print(f"  {peer} ({m} vector(s)) vs curvature.hvp rr: relative difference {err:.1e}", flush=True)
            ops.append((peer, m))
    floor = flop_ratios(model, blocks, vectors, ops)
    times: dict[tuple[str, int], list[float]] = {op: [] for op in ops}
    for op in ops:  # warm-up
        run_op(model, blocks, op[0], vectors[: op[1]] if op[1] else None)
    for _ in range(repeats):
        for op in ops:
            t0 = time.perf_counter()
            run_op(model, blocks, op[0], vectors[: op[1]] if op[1] else None)
            times[op].append(time.perf_counter() - t0)
    grad_times = times[("grad", 0)]
    print(f"timing: median over {repeats} interleaved rounds after 1 warm-up each")
    print(f"gradient: {statistics.median(grad_times):.3f} s (min {min(grad_times):.3f})")
    print(
        f"{'method':10} {'vec':>3} {'time s':>8} {'/ grad':>7} {'per vector / grad':>18} "
        f"{'flops / grad per vector':>24} {'time / flops':>13}"
    )
    rows = []
    for op in ops[1:]:
        ratio = statistics.median(t / g for t, g in zip(times[op], grad_times, strict=True))
        method, m = op
        t = statistics.median(times[op])
        print(
            f"{method:10} {m:3d} {t:8.3f} {ratio:7.2f} {ratio / m:18.2f} {floor[op] / m:24.2f} "
            f"{ratio / floor[op]:13.2f}",
            flush=True,
        )
        rows.append(
            {
                "method": method,
                "vectors": m,
                "seconds": t,
                "time_over_grad": ratio,
                "time_over_grad_per_vector": ratio / m,
                "flops_over_grad_per_vector": floor[op] / m,
                "time_over_flops": ratio / floor[op],
            }
        )
    return {
        "case": case.__dict__,
        "params": n,
        "device": device,
        "repeats": repeats,
        "grad_seconds": statistics.median(grad_times),
        "agreement_with_curvature_hvp": agreement,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: tiny config only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (3; 5 for tiny unless quick)")
    parser.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--small-batch", type=int, default=None, help="batch of the small config (4)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_hvp.json"))
    parser.add_argument("--_memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._memory_child:
        spec, op, m, threads = args._memory_child
        memory_child(Case(**json.loads(spec)), op, int(m), int(threads))
        return

    torch.set_num_threads(args.threads)
    cpu_default = ["tiny"] if args.quick else ["tiny", "small"]
    names = args.configs or (cpu_default if args.device == "cpu" else ["tiny", "small", "gpt2"])
    print(
        f"bench_hvp: torch {torch.__version__}, torch.set_num_threads({args.threads}) "
        f"(timings on a shared CPU are noisy), {'quick' if args.quick else 'full'} run, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
    )
    results = []
    for name in names:
        spec = dict(CONFIGS[name])
        if name == "small" and args.small_batch:
            spec["batch"] = args.small_batch
        repeats = args.repeats or (3 if args.quick or name != "tiny" else 5)
        memory_counts: tuple[int, ...] = () if args.no_memory else ((1,) if args.quick else (1, 4))
        results.append(bench_case(Case(name=name, **spec), repeats, args.threads, memory_counts, args.device))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"environment": environment(args.threads, args.device), "cases": results}, indent=2)
    )
    print(f"wrote {out}")


def environment(threads: int, device: str) -> dict:
    try:
        from importlib.metadata import version

        curvlinops = version("curvlinops-for-pytorch")
    except Exception:
        curvlinops = None
    return benchenv.environment(
        threads,
        **{"curvlinops-for-pytorch": curvlinops},
        device=device,
        gpu=torch.cuda.get_device_name() if device == "cuda" else None,
    )


if __name__ == "__main__":
    main()
