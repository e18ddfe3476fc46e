"""Predicted vs observed sizes of the order effect on AdamW and SGD runs: euclid, adam and resummed.

Three stages, each resumable (every trained branch and every prediction is cached under ``--out``):

1. ``train``: the extra runs of the study, on the shipped data and tokenizer (tiny GPT-2, en/ru 0.8/0.2):
   ``adamw-cos``: AdamW, betas (0.9, 0.95), lr 2e-3 with 100 warmup steps and a cosine decay over 1500 steps;
   ``sgd``: plain SGD (no momentum), lr 0.2 constant, 1500 steps.
   (The shipped run ``sample_checkpoints/`` is AdamW, betas (0.9, 0.999), lr 1e-3 constant.)
2. ``observe``: ``commute validate`` (real branch trainings: base, "12", "21" on the same streams, R stream
   seeds) at the chosen checkpoints of each run, at two horizons n, with the euclid prediction; then the adam
   prediction on the same (cached) branches.
3. ``table``: the resummed prediction (commute_cli.resummed) at each checkpoint, and the per-method table:
   sign agreement on the cases whose observed effect is significant, median and range of predicted/observed
   there, and the cost of each prediction measured in one run. Written to
   ``benchmarks/results/adamw_sizes.json``.

Usage (each stage takes minutes to tens of minutes on one shared core):

    python benchmarks/adamw_sizes.py train
    python benchmarks/adamw_sizes.py observe [--quick]
    python benchmarks/adamw_sizes.py table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
RUNS = {
    "shipped": {"path": SAMPLES, "steps": [1000, 2000], "desc": "AdamW b2 0.999, lr 1e-3 constant"},
    "adamw-cos": {
        "path": None,
        "steps": [500, 1000],
        "desc": "AdamW b2 0.95, lr 2e-3, warmup 100, cosine to 1500",
    },
    "sgd": {"path": None, "steps": [500, 1000], "desc": "SGD (no momentum), lr 0.2 constant"},
}
HORIZONS = (20, 100)
"""n x batch 10 x dw 0.15 must be whole (the branches see the same rows): 20 and 100 steps."""


def run_dir(out: Path, name: str) -> Path:
    path = RUNS[name]["path"]
    return Path(path) if path is not None else out / "runs" / name


def stage_train(out: Path, threads: int) -> None:
    from commute_cli.train import TrainConfig, train

    common = dict(
        domains={"en": str(SAMPLES / "data/en/train.jsonl"), "ru": str(SAMPLES / "data/ru/train.jsonl")},
        eval_domains={
            "en": str(SAMPLES / "data/en/validation.jsonl"),
            "ru": str(SAMPLES / "data/ru/validation.jsonl"),
        },
        tokenizer=str(SAMPLES / "tokenizer"),
        weights={"en": 0.8, "ru": 0.2},
        steps=1500,
        save_every=500,
        batch_size=10,
        seq_len=128,
        seed=1,
        threads=threads,
        overwrite=True,
        quiet=True,
    )
    configs = {
        "adamw-cos": dict(
            optimizer="adamw", lr=2e-3, betas=(0.9, 0.95), lr_schedule="cosine", warmup=100
        ),
        "sgd": dict(optimizer="sgd", lr=0.2),
    }
    for name, extra in configs.items():
        folder = run_dir(out, name)
        if (folder / "checkpoint-1500").is_dir():
            print(f"{name}: already trained", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        train(TrainConfig(out_dir=folder, **common, **extra))
        print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def _cases(quick: bool, runs: list[str] | None = None) -> list[tuple[str, int, int]]:
    out = []
    for name, spec in RUNS.items():
        if runs and name not in runs:
            continue
        steps = spec["steps"][:1] if quick else spec["steps"]
        for step in steps:
            for n in HORIZONS:
                out.append((name, step, n))
    return out


def validate_out(out: Path, name: str, step: int, n: int, metric: str) -> Path:
    return out / "validate" / f"{name}-{step}-n{n}-{metric}"


def stage_observe(out: Path, quick: bool, repeats: int, dw: float, runs: list[str] | None) -> None:
    from commute_cli.validate import ValidateOptions, run_validate

    for name, step, n in _cases(quick, runs):
        for metric in ("euclid", "adam"):
            if metric == "adam" and name == "sgd":
                continue
            folder = validate_out(out, name, step, n, metric)
            if (folder / "validate.json").is_file():
                continue
            cache_from = validate_out(out, name, step, n, "euclid") / "cache"
            (folder / "cache").mkdir(parents=True, exist_ok=True)
            if metric != "euclid" and cache_from.is_dir():  # the trained branches do not depend on the metric
                for f in cache_from.iterdir():
                    target = folder / "cache" / f.name
                    if not target.exists():
                        target.write_bytes(f.read_bytes())
            t0 = time.perf_counter()
            opts = ValidateOptions(
                checkpoint=run_dir(out, name) / f"checkpoint-{step}",
                dw=dw,
                steps=n,
                repeats=repeats,
                metric=metric,
                out=folder,
            )
            run_validate(opts, note=lambda t: print(t, file=sys.stderr))
            print(
                f"{name} step {step} n {n} {metric}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True
            )


def environment(threads: int) -> dict:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "cpus_visible": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["train", "observe", "table"])
    parser.add_argument("--out", type=Path, default=ROOT / "commute_out" / "adamw_sizes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dw", type=float, default=0.15)
    parser.add_argument("--runs", nargs="*", default=None, help="subset of: " + ", ".join(RUNS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage == "train":
        stage_train(args.out, args.threads)
    elif args.stage == "observe":
        stage_observe(args.out, args.quick, args.repeats, args.dw, args.runs)
    else:
        stage_table(args.out, args.quick, args.threads)


def stage_table(out: Path, quick: bool, threads: int) -> None:  # filled in below
    raise SystemExit("table: not yet")


if __name__ == "__main__":
    main()
