"""Sign agreement between predicted and observed excess losses over the shipped sample checkpoints.

For every checkpoint of ``sample_checkpoints/`` (AdamW, lr 1e-3, en/ru 0.8/0.2) this runs ``commute validate``
(``validate.run_validate``: base, "12" = en +dw for N steps then -dw, "21" the reverse, on the same
per-domain streams, R stream seeds) and compares, for both target domains and both orders,
``sign(predicted EL_k^12)`` with ``sign(observed EL_k^12)`` (and ``EL_k^21``, predicted ``-EL_k^12``).

Printed: one line per (checkpoint, target), then the agreement counts

- over all cases (checkpoint x target x order),
- over the cases whose observed effect is significant (t test over the R repeats at 95%),
- over the cases whose observed effect is significant and whose prediction is significant and in regime,

and per checkpoint (the paper's count, "3 of 4 checkpoints"): a checkpoint counts as right when every
significant observed sign there is predicted (and as "all right" when all four signs are).

Each checkpoint's results land in ``OUT/<checkpoint>/`` (validate.csv, validate.json, the cache of the
trained branches), so a rerun, or ``benchmarks/metric_study.py`` with the same settings, trains nothing.

Usage: ``python benchmarks/validate_signs.py [--quick] [--steps 100] [--repeats 3] [--dw 0.15]
[--metric euclid] [--out commute_out/bench_validate] [--threads 1]``.
Full: 5 checkpoints x 3 repeats x 3 branches x 200 steps (about 20-30 min on one shared core).
``--quick``: checkpoints 1000 and 2500, 2 repeats (about 5-8 min).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from commute_cli.commands.validate import ValidateOptions, run_validate
from commute_cli.io import checkpoints

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"


def run_all(
    steps_list: list[int],
    *,
    n: int,
    repeats: int,
    dw: float,
    metric: str,
    out: Path,
    quiet: bool = False,
) -> pd.DataFrame:
    """``run_validate`` at each checkpoint step; all rows concatenated."""
    refs = {r.step: r for r in checkpoints.discover(SAMPLES)}
    frames = []
    for step in steps_list:
        t0 = time.perf_counter()
        opts = ValidateOptions(
            checkpoint=refs[step].path,
            dw=dw,
            steps=n,
            repeats=repeats,
            metric=metric,
            out=out / refs[step].name,
        )
        result = run_validate(
            opts, note=(lambda _t: None) if quiet else (lambda t: print(t, file=sys.stderr))
        )
        if not quiet:
            print(f"  {refs[step].name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        frames.append(result.table)
    return pd.concat(frames, ignore_index=True)


def cases(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (step, target, order) with the observed and predicted values and flags."""
    rows = []
    for r in df.itertuples(index=False):
        for order in ("12", "21"):
            rows.append(
                {
                    "step": r.step,
                    "target": r.target,
                    "order": order,
                    "obs": getattr(r, f"obs_el{order}"),
                    "obs_se": getattr(r, f"obs_el{order}_se"),
                    "obs_sig": bool(getattr(r, f"obs_el{order}_significant")),
                    "pred": getattr(r, f"pred_el{order}"),
                    "pred_sig": bool(r.pred_significant),
                    "in_regime": bool(r.in_regime),
                    "agree": bool(getattr(r, f"sign_agree_{order}")),
                }
            )
    return pd.DataFrame(rows)


def summarize(c: pd.DataFrame) -> list[str]:
    def count(mask: pd.Series, label: str) -> str:
        sub = c[mask]
        return f"{label}: {int(sub['agree'].sum())} of {len(sub)} signs agree"

    lines = [
        count(pd.Series(True, index=c.index), "all cases (checkpoint x target x order)"),
        count(c["obs_sig"], "observed effect significant"),
        count(c["obs_sig"] & c["pred_sig"] & c["in_regime"], "observed and predicted significant, in regime"),
    ]
    per = []
    for step, g in c.groupby("step"):
        sig = g[g["obs_sig"]]
        per.append((step, bool(sig["agree"].all()) if len(sig) else None, bool(g["agree"].all()), len(sig)))
    right = sum(1 for _, ok, _, k in per if ok and k > 0)
    with_sig = sum(1 for _, _, _, k in per if k > 0)
    all_right = sum(1 for _, _, a, _ in per if a)
    lines.append(
        f"per checkpoint: {right} of {with_sig} checkpoints with a significant observed effect have every "
        f"significant sign right; {all_right} of {len(per)} have all four signs right (paper: 3 of 4)"
    )
    for step, ok, a, k in per:
        lines.append(
            f"  step {step}: significant observed signs {k}, all of them right: {ok}; all four right: {a}"
        )
    return lines


def _pm(x: float, se: float, sig: bool) -> str:
    return f"{x:>+10.4f} ± {se:.4f}{'*' if sig else ' '}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="checkpoints 1000 and 2500, 2 repeats")
    parser.add_argument("--steps", type=int, default=100, help="N, steps of each half")
    parser.add_argument("--repeats", type=int, default=None, help="stream seeds (3; 2 with --quick)")
    parser.add_argument("--dw", type=float, default=0.15)
    parser.add_argument("--metric", default="euclid", choices=["euclid", "adam"])
    parser.add_argument("--checkpoints", default=None, help="comma-separated steps (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "commute_out" / "bench_validate")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    all_steps = [r.step for r in checkpoints.discover(SAMPLES)]
    if args.checkpoints:
        steps = [int(s) for s in args.checkpoints.split(",")]
    else:
        steps = [1000, 2500] if args.quick else all_steps
    repeats = args.repeats or (2 if args.quick else 3)
    t0 = time.perf_counter()
    df = run_all(steps, n=args.steps, repeats=repeats, dw=args.dw, metric=args.metric, out=args.out)
    c = cases(df)
    print(
        f"sample_checkpoints (AdamW lr 1e-3, en/ru 0.8/0.2): dw {args.dw:g}, N {args.steps}, "
        f"{repeats} stream seeds, metric {args.metric}, dt = lr N = {df['dt'].iloc[0]:g}"
    )
    header = ["step", "k", "obs EL^12", "pred EL^12", "obs EL^21", "sym"]
    print(
        f"{header[0]:>5} {header[1]:>3} {header[2]:>20} {header[3]:>20} {header[4]:>20} {header[5]:>9}  agree"
    )
    for r in df.itertuples(index=False):
        print(
            f"{r.step:>5} {r.target:>3} {_pm(r.obs_el12, r.obs_el12_se, r.obs_el12_significant)}"
            f" {_pm(r.pred_el12, r.pred_el12_se, r.pred_significant)}"
            f" {_pm(r.obs_el21, r.obs_el21_se, r.obs_el21_significant)} {r.obs_sym:>+9.4f}"
            f"  {'y' if r.sign_agree_12 else 'n'}/{'y' if r.sign_agree_21 else 'n'}"
            f"  regime {'in' if r.in_regime else 'OUT'} ({r.regime_ratio:.2g})"
        )
    for line in summarize(c):
        print(line)
    print(f"(* significant at 95%; sym = (EL^12 + EL^21)/2; {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
