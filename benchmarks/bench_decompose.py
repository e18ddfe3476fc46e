"""Overhead of ``--decompose`` (issue 16, part 1): per-group products cost no gradient or HVP pass.

The decomposition sums the same elementwise products as the totals over each parameter group's entries
(:func:`commute_cli.engine.groups.segment_gram`), so it adds dot products only. Measured in ONE run of this
script, with ``torch.set_num_threads(THREADS)`` (1 by default), on the shipped run's GPT-2 (2 layers,
d = 64, ``sample_checkpoints/checkpoint-1500``) and the README's sample (validation shards, ``--samples 96``,
8 blocks, K = 2, pair plan: the estimator work of one checkpoint of ``commute analyze``):

(a) end to end: :func:`~commute_cli.engine.estimator.estimate_products` without groups, with ``kind``
    (4 groups) and with ``module`` (8 groups), interleaved ``--reps`` times (A B C A B C ...) so that load
    drifts on a shared machine hit all three alike; reported: median time per mode and the ratios to the
    plain run;
(b) isolated: the extra work alone. With groups the estimator's products run segment by segment and are
    summed; modelled here with the per-call products of the estimator before issue 24's batching
    (``freestack.gram``, ``B K`` calls of ``[B K, n] x [K-1, n]`` per checkpoint) against per-group products
    (:func:`segment_gram`); the difference of the two, timed by themselves with the shapes one checkpoint
    used (interleaved), as a fraction of the plain estimate -- less noisy than the difference of two
    end-to-end times. (Today's estimator forms the products in batches, ``engine.freestack.FreeStack``.)

Usage: ``python benchmarks/bench_decompose.py [--reps 5] [--threads 1]`` (about 2 minutes). Writes
``benchmarks/results/bench_decompose.json`` with the environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchenv import environment

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from commute_cli.commands import analyze as analysis  # noqa: E402
from commute_cli.engine import curvature  # noqa: E402
from commute_cli.engine.estimator import estimate_products  # noqa: E402
from commute_cli.engine.freestack import gram  # noqa: E402
from commute_cli.engine.groups import param_groups, segment_gram  # noqa: E402
from commute_cli.io import checkpoints  # noqa: E402

RUN = ROOT / "sample_checkpoints"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    analysis.quiet_libraries()

    with tempfile.TemporaryDirectory() as tmp:
        opts = analysis.AnalyzeOptions(ckpt_dir=RUN, out=Path(tmp), steps=[1500])
        inputs = analysis.resolve_inputs(opts)
        parts, _digest, _prov = analysis.prepare_samples(inputs, opts)
    ref = inputs.refs[0]
    model = checkpoints.load_model(ref, device=torch.device("cpu"))
    K, B = len(parts), len(parts[0])
    specs: list[str | None] = [None, "kind", "module"]
    groups = {s: (None if s is None else param_groups(model, s)) for s in specs}
    kw = {"plan": "pair", "micro_batch": opts.batch_size, "hvp_micro_batch": analysis.hvp_micro_batch(opts)}

    estimate_products(model, parts, **kw)  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {str(s): [] for s in specs}
    for _ in range(args.reps):
        for s in specs:
            t0 = time.perf_counter()
            estimate_products(model, parts, groups=groups[s], **kw)
            times[str(s)].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    # (b) the extra dot products alone, with the shapes one checkpoint uses
    n = curvature.num_params(model)
    gen = torch.Generator().manual_seed(0)
    free = torch.randn(B * K, n, generator=gen)
    hv = torch.randn(K - 1, n, generator=gen)
    gram_times: dict[str, list[float]] = {"None": [], "kind": [], "module": []}
    for _ in range(args.reps):
        for s in specs:
            g = groups[s]
            t0 = time.perf_counter()
            for _call in range(B * K):
                if g is None:
                    gram(free, hv)
                else:
                    segment_gram(free, hv, g).sum(axis=0)
            gram_times[str(s)].append(time.perf_counter() - t0)
    gram_med = {k: statistics.median(v) for k, v in gram_times.items()}
    isolated = {s: gram_med[s] - gram_med["None"] for s in ("kind", "module")}

    result = {
        "benchmark": "bench_decompose",
        "checkpoint": ref.name,
        "params": n,
        "domains": K,
        "blocks": B,
        "seqs_per_part": int(parts[0][0][0].shape[0]),
        "seq_len": inputs.seq_len,
        "groups": {s: len(groups[s].labels) for s in ("kind", "module")},  # type: ignore[union-attr]
        "reps": args.reps,
        "seconds": times,
        "median_seconds": med,
        "end_to_end_ratio": {s: med[s] / med["None"] for s in ("kind", "module")},
        "products_seconds": gram_times,
        "products_median_seconds": gram_med,
        "isolated_extra_seconds": isolated,
        "isolated_extra_fraction": {s: isolated[s] / med["None"] for s in ("kind", "module")},
        "environment": environment(args.threads),
    }
    out = ROOT / "benchmarks" / "results" / "bench_decompose.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({k: result[k] for k in ("median_seconds", "end_to_end_ratio", "isolated_extra_fraction")})
    )


if __name__ == "__main__":
    main()
