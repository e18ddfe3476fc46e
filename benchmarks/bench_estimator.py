"""Standard error of the cross estimator against the per-block one, at equal compute (issue 13, part 1).

Both estimators reduce the same table of products (:func:`~commute_cli.engine.estimator.estimate_products`:
gradients and HVPs), so every comparison below is at exactly equal compute and on the same draws.
Everything is measured in ONE run of this script, with ``torch.set_num_threads(THREADS)`` (1 by default).

(a) Many seeds, the shipped run's GPT-2 (2 layers, d = 64; ``sample_checkpoints/checkpoint-1500``; the
    training shards as domains, ~2,100 sequences of 128 tokens each, so that ``--samples 96`` draws from a
    pool 20x larger and the seeds are nearly independent samples): for each of ``--seeds`` sample seeds, the
    analysis's rows (targets en, ru, mix; pair en-ru) for both estimators. Reported per target: the spread
    over seeds of ``el_ij`` (the estimator's actual standard error) for cross and block and its ratio, and
    the ratio of the RMS reported standard errors.
(b) The README command on the shipped run (``commute analyze sample_checkpoints/``: validation shards,
    ``--samples 96``, 8 blocks, seed 0, all 5 checkpoints, 15 rows): per row the reported SE ratio
    cross/block, and the number of significant rows of each.
(c) How the SE scales with samples (for commute_cli/power.py): (a) again at ``--samples 384`` (4x), same
    seeds; per target and estimator ``rho = Var_384 / Var_96`` (actual spreads over seeds, and RMS reported
    SEs) and the implied share of first-order variance ``phi = (16 rho - 1) / 3`` of the law
    ``SE(f)^2 = SE^2 (phi / f + (1 - phi) / f^2)`` (``phi = 1``: ``SE ~ 1/sqrt(samples)``).

Usage: ``python benchmarks/bench_estimator.py [--seeds 16] [--threads 1] [--quick]``; ``--quick`` (seeds 6,
no (c)) takes about 5 minutes; the default run about 20 minutes on a shared 2-core CPU. Writes
``benchmarks/results/bench_estimator.json`` with the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchenv import environment

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from commute_cli.commands import analyze as analysis  # noqa: E402
from commute_cli.engine.estimator import estimate_products  # noqa: E402
from commute_cli.io import checkpoints  # noqa: E402

RUN = ROOT / "sample_checkpoints"


def rows_for(opts: analysis.AnalyzeOptions, cache: Path, refs_wanted: list[str] | None = None) -> dict:
    """Per estimator, the analysis rows of every checkpoint (same sample, same products)."""
    inputs = analysis.resolve_inputs(opts)
    parts, _, _ = analysis.prepare_samples(inputs, opts)
    steps = [r.step for r in inputs.refs]
    out: dict[str, list] = {"cross": [], "block": []}
    for idx, ref in enumerate(inputs.refs):
        if refs_wanted is not None and ref.name not in refs_wanted:
            continue
        step = ref.step or 0
        wbar = np.array([inputs.schedule.weights_at(step)[n] for n in inputs.names], dtype=np.float64)
        lr = float(checkpoints.learning_rate(ref) or 1e-3)
        model = checkpoints.load_model(ref)
        prod = estimate_products(
            model,
            parts,
            plan="pair",
            micro_batch=opts.batch_size,
            hvp_micro_batch=analysis.hvp_micro_batch(opts),
        )
        for est in out:
            out[est] += analysis.summarize_checkpoint(
                prod.stats(est),
                step=ref.step,
                names=inputs.names,
                wbar=wbar,
                targets=inputs.targets,
                lr=lr,
                horizon=analysis.default_horizon(steps, idx),
                dw=opts.dw,
                confidence=opts.confidence,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seeds = 6
    torch.set_num_threads(args.threads)
    analysis.quiet_libraries()
    result: dict = {"environment": environment(args.threads), "args": vars(args)}
    t0 = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        # (a) many seeds, training shards, one checkpoint
        train = [f"en={RUN}/data/en/train.jsonl", f"ru={RUN}/data/ru/train.jsonl"]
        per_seed: dict[str, dict[str, list]] = {}
        for seed in range(args.seeds):
            opts = analysis.AnalyzeOptions(
                ckpt_dir=RUN, domains=train, weights=["en=0.8", "ru=0.2"], seed=seed
            )
            rows = rows_for(opts, cache, refs_wanted=["checkpoint-1500"])
            for est, rs in rows.items():
                for r in rs:
                    per_seed.setdefault(r["target"], {}).setdefault(est, []).append((r["el_ij"], r["el_se"]))
        a = {}
        print(
            f"(a) checkpoint-1500, training shards, --samples 96, {args.seeds} seeds: "
            "spread of el_ij over seeds"
        )
        for target, by in per_seed.items():
            sd = {e: float(np.std([v for v, _ in by[e]], ddof=1)) for e in by}
            rms = {e: float(math.sqrt(np.mean([s * s for _, s in by[e]]))) for e in by}
            a[target] = {
                "sd_cross": sd["cross"],
                "sd_block": sd["block"],
                "sd_ratio": sd["cross"] / sd["block"],
                "rms_se_cross": rms["cross"],
                "rms_se_block": rms["block"],
                "rms_se_ratio": rms["cross"] / rms["block"],
                "calibration_cross": rms["cross"] / sd["cross"],
                "calibration_block": rms["block"] / sd["block"],
            }
            print(
                f"  target {target:4s}: sd cross/block {a[target]['sd_ratio']:.3f}; reported SE cross/block "
                f"{a[target]['rms_se_ratio']:.3f}; RMS SE / sd: cross {a[target]['calibration_cross']:.2f}, "
                f"block {a[target]['calibration_block']:.2f}"
            )
        result["a_many_seeds"] = a

        # (b) the README command, all checkpoints
        opts = analysis.AnalyzeOptions(ckpt_dir=RUN)
        rows = rows_for(opts, cache)
        ratios = [c["el_se"] / b["el_se"] for c, b in zip(rows["cross"], rows["block"], strict=True)]
        sig = {e: int(sum(bool(r["significant"]) for r in rows[e])) for e in rows}
        print(
            f"(b) README command (validation shards, --samples 96, seed 0), {len(ratios)} rows: reported SE "
            f"cross/block median {np.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}); "
            f"significant rows cross {sig['cross']}/{len(ratios)}, block {sig['block']}/{len(ratios)}"
        )
        result["b_readme_command"] = {
            "se_ratio_median": float(np.median(ratios)),
            "se_ratio_min": float(min(ratios)),
            "se_ratio_max": float(max(ratios)),
            "significant": sig,
            "rows": len(ratios),
            "per_row": [
                {
                    "step": c["step"],
                    "target": c["target"],
                    "el_cross": c["el_ij"],
                    "se_cross": c["el_se"],
                    "el_block": b["el_ij"],
                    "se_block": b["el_se"],
                }
                for c, b in zip(rows["cross"], rows["block"], strict=True)
            ],
        }

        # (c) scaling with samples: the same seeds at 4x the samples, training shards
        if not args.quick:
            per_seed4: dict[str, dict[str, list]] = {}
            for seed in range(args.seeds):
                opts = analysis.AnalyzeOptions(
                    ckpt_dir=RUN, domains=train, weights=["en=0.8", "ru=0.2"], seed=seed, samples=384
                )
                rows4 = rows_for(opts, cache, refs_wanted=["checkpoint-1500"])
                for est, rs in rows4.items():
                    for r in rs:
                        per_seed4.setdefault(r["target"], {}).setdefault(est, []).append(
                            (r["el_ij"], r["el_se"])
                        )
            c = {}
            print(
                f"(c) the same at --samples 384 (4x), {args.seeds} seeds: "
                "Var(384) / Var(96) (1/sqrt law: 0.25)"
            )
            for target, by in per_seed4.items():
                c[target] = {}
                for est in ("cross", "block"):
                    sd4 = float(np.std([v for v, _ in by[est]], ddof=1))
                    rms4 = float(math.sqrt(np.mean([s * s for _, s in by[est]])))
                    rho = (sd4 / a[target][f"sd_{est}"]) ** 2
                    rho_rep = (rms4 / a[target][f"rms_se_{est}"]) ** 2
                    c[target][est] = {
                        "sd_384": sd4,
                        "rms_se_384": rms4,
                        "var_ratio": rho,
                        "reported_var_ratio": rho_rep,
                        "phi": (16 * rho - 1) / 3,
                        "phi_reported": (16 * rho_rep - 1) / 3,
                    }
                c[target]["sd_ratio_384"] = c[target]["cross"]["sd_384"] / c[target]["block"]["sd_384"]
                print(
                    f"  target {target:4s}: actual var ratio cross "
                    f"{c[target]['cross']['var_ratio']:.3f}, block "
                    f"{c[target]['block']['var_ratio']:.3f}; reported: cross "
                    f"{c[target]['cross']['reported_var_ratio']:.3f}, block "
                    f"{c[target]['block']['reported_var_ratio']:.3f}; implied phi (reported) cross "
                    f"{c[target]['cross']['phi_reported']:.2f}; sd cross/block at 384: "
                    f"{c[target]['sd_ratio_384']:.3f}"
                )
            result["c_scaling"] = c
    result["seconds"] = time.perf_counter() - t0
    out = ROOT / "benchmarks" / "results" / "bench_estimator.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
