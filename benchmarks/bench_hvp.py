"""Cost of exact Hessian-vector products relative to one gradient over the same batch.

For each model config: time of ``curvature.hvp`` (reverse-on-reverse "rr" and forward-over-reverse
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

Usage: ``python benchmarks/bench_hvp.py [--quick] [--threads 1] [--repeats N] [--no-memory]``.
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

import torch

from commute_cli import curvature as C

CONFIGS: dict[str, dict[str, int]] = {
    # the tiny model of the sample checkpoints
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 4096, "seq": 128, "batch": 8},
    # ~14M parameters (FACTS.md "Cost" measured batch 8)
    "small": {"n_layer": 6, "n_embd": 384, "n_head": 6, "vocab_size": 8192, "seq": 256, "batch": 4},
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


def build(case: Case, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=case.n_layer,
        n_embd=case.n_embd,
        n_head=case.n_head,
        vocab_size=case.vocab_size,
        n_positions=max(case.seq, 128),
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(config).eval()
    blocks = torch.randint(0, case.vocab_size, (case.batch, case.seq))
    return model, blocks


def run_op(model: torch.nn.Module, blocks: torch.Tensor, op: str, vectors: torch.Tensor | None) -> None:
    if op == "grad":
        C.loss_and_grad(model, blocks, micro_batch=blocks.shape[0])
    else:
        assert vectors is not None
        C.hvp(model, blocks, vectors, micro_batch=blocks.shape[0], method=op)  # type: ignore[arg-type]


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


def bench_case(case: Case, repeats: int, threads: int, memory_counts: tuple[int, ...]) -> None:
    model, blocks = build(case)
    n = C.num_params(model)
    del model
    print(
        f"\n== {case.name}: GPT-2 n_layer={case.n_layer} n_embd={case.n_embd} n_head={case.n_head} "
        f"vocab={case.vocab_size}, {n / 1e6:.2f}M params, batch {case.batch} x {case.seq} tokens, "
        "one micro-batch, float32, eager attention",
        flush=True,
    )
    if memory_counts:
        print("peak memory above baseline (VmHWM after minus VmRSS before, a fresh process per call):")
        print(f"  gradient         : {measure_memory(case, 'grad', 0, threads)}", flush=True)
        for method in ("rr", "fr"):
            for m in memory_counts:
                print(f"  {method} {m} vector(s)   : {measure_memory(case, method, m, threads)}", flush=True)

    model, blocks = build(case)
    vectors = torch.randn(max(VECTOR_COUNTS), n, generator=torch.Generator().manual_seed(1))
    ops = [("grad", 0)] + [(method, m) for method in ("rr", "fr") for m in VECTOR_COUNTS]
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
    print(f"{'method':6} {'vectors':>7} {'time s':>8} {'/ grad':>7} {'per vector / grad':>18}")
    for op in ops[1:]:
        ratio = statistics.median(t / g for t, g in zip(times[op], grad_times, strict=True))
        method, m = op
        t = statistics.median(times[op])
        print(f"{method:6} {m:7d} {t:8.3f} {ratio:7.2f} {ratio / m:18.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: tiny config only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (3; 5 for tiny unless quick)")
    parser.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--small-batch", type=int, default=None, help="batch of the small config (4)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--_memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._memory_child:
        spec, op, m, threads = args._memory_child
        memory_child(Case(**json.loads(spec)), op, int(m), int(threads))
        return

    torch.set_num_threads(args.threads)
    names = args.configs or (["tiny"] if args.quick else list(CONFIGS))
    print(
        f"bench_hvp: torch {torch.__version__}, torch.set_num_threads({args.threads}) "
        f"(timings on a shared CPU are noisy), {'quick' if args.quick else 'full'} run",
    )
    for name in names:
        spec = dict(CONFIGS[name])
        if name == "small" and args.small_batch:
            spec["batch"] = args.small_batch
        repeats = args.repeats or (3 if args.quick or name != "tiny" else 5)
        memory_counts: tuple[int, ...] = () if args.no_memory else ((1,) if args.quick else (1, 4))
        bench_case(Case(name=name, **spec), repeats, args.threads, memory_counts)


if __name__ == "__main__":
    main()
