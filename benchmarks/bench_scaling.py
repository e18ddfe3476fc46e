"""Cost of one checkpoint's estimate against the number of domains K and the sequence length (issue 24).

The estimator's gradient and HVP passes grow linearly with K (``core.power.analysis_cost``: ``--dry-run``'s
gradient-sequence equivalents); the products between them (every unit vector against the ``B K`` free
factors) must not grow faster. Each configuration runs in its own child process (a fresh peak RSS), with
``torch.set_num_threads(THREADS)`` (1 by default), and reports, all measured in that child:

- ``t_grad``: one gradient pass over one sequence (median of 9 after a warm-up) and ``t_hvp``: one HVP pass
  over one sequence with the plan's vectors (1 in the target plan, ``K - 1`` in the pair plan);
- ``seconds``: :func:`~commute_cli.engine.estimator.estimate_products`, target plan (one target, the
  plan ``--plan auto`` picks for K >= 2 and one target; the pair plan at ``--pair-ks``), ``B = 8``
  blocks, one sequence per part (24 sequences per domain, as in the issue), random tokens (synthetic
  domains);
- ``floor_dry_run = gradient_equivalents x t_grad`` (what ``--dry-run`` counts) and ``floor_measured =
  gradient sequences x t_grad + HVP sequences x t_hvp`` (the passes as they run here), and ``seconds`` as a
  ratio to each;
- ``extra_rss_mb``: peak RSS (VmHWM) minus the RSS just before the estimate (the model and sample loaded),
  also in parameter-sized float32 vectors, beside the free stack's own ``B K`` vectors.

``new`` is this checkout's estimator; ``old`` is ``commute_cli/engine/estimator.py`` at ``--old-rev``
(default: the commit before the batched products), imported from ``git show`` (run where cheap: its
products convert the whole stack to float64 once per unit vector). Both paths' tables are compared in one
child (``max_rel_diff``). The new path at K = 2 and K = 8 runs ``--reps`` times (interleaved with the other
runs); the K = 8 / K = 2 ratio is that of the medians, in CPU seconds and in units of each child's own
gradient pass (``gradient_units``): single runs of a few seconds vary by ~15 % on a loaded machine.

Model: GPT-2, 1 layer, d = 128, 4 heads, vocabulary 1024, 512 positions, tied embeddings: 0.40M
parameters (the ratios are per parameter: passes and products are both linear in it; the 65k position
embeddings cost products but no pass FLOPs, so the products' share is if anything overstated).

Times are CPU seconds of the child process (``time.process_time``; one thread, so the work done, whatever
else loads a shared machine); ``wall_seconds`` beside them.

Usage: ``python benchmarks/bench_scaling.py [--threads 1] [--ks 2,8,16,32] [--lens 64,128,256,512]
[--old-ks 2,8] [--pair-ks 8] [--reps 3] [--quick]``; 3.5 CPU-minutes, 12 minutes of wall time on a loaded
shared 2-core CPU. Writes
``benchmarks/results/bench_scaling.json`` with the environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchenv import environment

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "bench_scaling.json"
BLOCKS, SEQS_PER_PART = 8, 1
OLD_REV = "3c0a33f"  # the estimator before engine/freestack.py
#: CPU time of this process: with one thread it is the work done, whatever else loads the shared cores
CLOCK = time.process_time


def model_and_parts(K: int, L: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=1024,
        n_positions=512,
        n_embd=128,
        n_layer=1,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    parts = [
        [[torch.randint(0, 1024, (SEQS_PER_PART, L), generator=gen) for _ in range(3)] for _ in range(BLOCKS)]
        for _ in range(K)
    ]
    return model, parts


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def old_estimator(rev: str):
    """The estimator module at ``rev`` (git show), imported under another name."""
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:commute_cli/engine/estimator.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_estimator.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_estimator", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_estimator"] = module
    spec.loader.exec_module(module)
    return module


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from commute_cli.core.power import analysis_cost
    from commute_cli.engine import curvature
    from commute_cli.engine.estimator import estimate_products
    from commute_cli.engine.hvp import hvp

    torch.set_num_threads(cfg["threads"])
    K, L = cfg["K"], cfg["L"]
    model, parts = model_and_parts(K, L)
    n = curvature.num_params(model)
    one = parts[0][0][0]
    curvature.loss_and_grad(model, one, 1)
    times = []
    for _ in range(9):
        t0 = CLOCK()
        curvature.loss_and_grad(model, one, 1)
        times.append(CLOCK() - t0)
    t_grad = float(np.median(times))
    plan = cfg.get("plan", "target")
    cost = analysis_cost(3 * BLOCKS * SEQS_PER_PART, BLOCKS, K, plan, n_targets=1)
    v = torch.randn(cost.vectors_per_hvp, n)
    hvp(model, one, v, 1)
    times = []
    for _ in range(3):
        t0 = CLOCK()
        hvp(model, one, v, 1)
        times.append(CLOCK() - t0)
    t_hvp = float(np.median(times))
    coefs = np.zeros((1, K))
    coefs[0, 0] = 1.0
    if plan == "pair":
        coefs = None
    fn = old_estimator(cfg["old_rev"]).estimate_products if cfg["path"] == "old" else estimate_products
    before = rss_kb("VmRSS")
    w0, t0 = time.perf_counter(), CLOCK()
    prod = fn(model, parts, plan=plan, target_coefs=coefs, micro_batch=1)
    seconds, wall = CLOCK() - t0, time.perf_counter() - w0
    peak = rss_kb("VmHWM")
    floor_dry = cost.gradient_equivalents * t_grad
    floor_meas = cost.gradient_sequences * t_grad + cost.hvp_sequences * t_hvp
    vec_mb = 4 * n / 2**20
    out = {
        **cfg,
        "plan": plan,
        "params": n,
        "t_grad": t_grad,
        "t_hvp": t_hvp,
        "gradient_units": seconds / t_grad,
        "hvp_over_grad": t_hvp / t_grad,
        "gradient_equivalents": cost.gradient_equivalents,
        "seconds": seconds,
        "wall_seconds": wall,
        "floor_dry_run": floor_dry,
        "floor_measured": floor_meas,
        "ratio_dry_run_floor": seconds / floor_dry,
        "ratio_measured_floor": seconds / floor_meas,
        "extra_rss_mb": (peak - before) / 1024,
        "extra_rss_vectors": (peak - before) / 1024 / vec_mb,
        "stack_vectors": BLOCKS * K,
        "W_sum": float(np.abs(prod.W).sum()),
    }
    if cfg.get("compare"):  # both paths' tables, in this child (after the measured run)
        other = old_estimator(cfg["old_rev"]).estimate_products(
            model, parts, plan="target", target_coefs=coefs, micro_batch=1
        )
        out["max_rel_diff"] = max(
            float(np.abs(a - b).max() / np.abs(b).max())
            for a, b in ((prod.W, other.W), (prod.first, other.first))
        )
    return out


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(cfg)], check=True, capture_output=True, text=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ks", default="2,8,16,32")
    ap.add_argument("--lens", default="64,128,256,512")
    ap.add_argument("--old-ks", default="2,8")
    ap.add_argument("--pair-ks", default="8", help="K of the pair-plan runs (old path too where in --old-ks)")
    ap.add_argument("--old-rev", default=OLD_REV)
    ap.add_argument("--len-k", type=int, default=4, help="K of the sequence-length sweep")
    ap.add_argument("--reps", type=int, default=3, help="runs of the new path at K = 2 and 8 (medians)")
    ap.add_argument("--quick", action="store_true", help="K = 2, 8 and lengths 64, 256 only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    ks = [2, 8] if args.quick else [int(x) for x in args.ks.split(",") if x]
    lens = [64, 256] if args.quick else [int(x) for x in args.lens.split(",") if x]
    old_ks = [int(x) for x in args.old_ks.split(",") if x]
    base = {"threads": args.threads, "old_rev": args.old_rev}
    t_start = time.perf_counter()
    by_k: list[dict[str, Any]] = []
    jobs = [
        (rep, K, path)
        for rep in range(max(1, args.reps))
        for K in ks
        for path in ["new", *(["old"] if K in old_ks else [])]
        if rep == 0 or (path == "new" and K in (2, 8))  # the K = 8 / K = 2 ratio: interleaved repeats
    ]
    for rep, K, path in jobs:
        compare = (rep, path, K) == (0, "new", 2)
        r = run_child({**base, "K": K, "L": 256, "path": path, "rep": rep, "compare": compare})
        by_k.append(r)
        print(
            f"K={K:3d} L=256 {path}: {r['seconds']:7.1f} s  /dry-run floor {r['ratio_dry_run_floor']:.2f}"
            f"  /measured floor {r['ratio_measured_floor']:.2f}  extra RSS {r['extra_rss_mb']:7.1f} MB "
            f"({r['extra_rss_vectors']:.0f} vectors; stack {r['stack_vectors']})",
            flush=True,
        )
    by_pair: list[dict[str, Any]] = []
    for K in [int(x) for x in args.pair_ks.split(",") if x] if not args.quick else []:
        for path in ["new", *(["old"] if K in old_ks else [])]:
            r = run_child({**base, "K": K, "L": 256, "path": path, "plan": "pair"})
            by_pair.append(r)
            print(
                f"K={K:3d} L=256 {path} pair plan: {r['seconds']:7.1f} s"
                f"  /dry-run floor {r['ratio_dry_run_floor']:.2f}"
                f"  /measured floor {r['ratio_measured_floor']:.2f}  extra RSS {r['extra_rss_mb']:7.1f} MB",
                flush=True,
            )
    by_len: list[dict[str, Any]] = []
    for L in lens:
        r = run_child({**base, "K": args.len_k, "L": L, "path": "new"})
        by_len.append(r)
        print(
            f"K={args.len_k:3d} L={L:3d} new: {r['seconds']:7.1f} s"
            f"  /dry-run floor {r['ratio_dry_run_floor']:.2f}"
            f"  /measured floor {r['ratio_measured_floor']:.2f}  extra RSS {r['extra_rss_mb']:7.1f} MB",
            flush=True,
        )
    new = {r["K"]: r for r in by_k if r["path"] == "new" and r["rep"] == 0}
    old = {r["K"]: r for r in by_k if r["path"] == "old"}
    summary: dict[str, Any] = {}
    if 2 in new and 8 in new:  # medians over the repeats; time in seconds and in the child's gradient passes
        med = {
            (K, key): statistics.median(r[key] for r in by_k if r["path"] == "new" and r["K"] == K)
            for K in (2, 8)
            for key in ("seconds", "gradient_units")
        }
        summary["reps"] = max(1, args.reps)
        summary["k8_over_k2_seconds"] = med[8, "seconds"] / med[2, "seconds"]
        summary["k8_over_k2_gradient_units"] = med[8, "gradient_units"] / med[2, "gradient_units"]
        summary["k8_over_k2_passes"] = new[8]["gradient_equivalents"] / new[2]["gradient_equivalents"]
        summary["k8_over_k2_target_met"] = (
            max(summary["k8_over_k2_seconds"], summary["k8_over_k2_gradient_units"]) <= 4.5
        )
    if 2 in old and 8 in old:
        summary["old_k8_over_k2_seconds"] = old[8]["seconds"] / old[2]["seconds"]
    if 32 in new:
        summary["k32_over_dry_run_floor"] = new[32]["ratio_dry_run_floor"]
        summary["k32_over_measured_floor"] = new[32]["ratio_measured_floor"]
        summary["k32_target_met"] = new[32]["ratio_dry_run_floor"] <= 1.3
    summary["old_over_new_seconds"] = {k: old[k]["seconds"] / new[k]["seconds"] for k in old if k in new}
    summary["max_rel_diff_new_vs_old"] = max(
        (r["max_rel_diff"] for r in by_k if "max_rel_diff" in r), default=None
    )
    print(json.dumps(summary, indent=1))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "environment": environment(args.threads, wall_seconds=time.perf_counter() - t_start),
                "model": "GPT-2 1 layer d=128 4 heads vocab 1024 512 positions (tied)",
                "clock": "process_time (CPU seconds of the child, one thread)",
                "design": {"blocks": BLOCKS, "seqs_per_part": SEQS_PER_PART, "plan": "target", "targets": 1},
                "by_k": by_k,
                "by_len": by_len,
                "by_k_pair_plan": by_pair,
                "summary": summary,
            },
            indent=1,
        )
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
