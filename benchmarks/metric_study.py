"""Which metric predicts real AdamW interventions better: Euclidean (D = I) or Adam's (issue 4, ``--metric``)?

On ``sample_checkpoints/`` (an AdamW run, lr 1e-3, en/ru 0.8/0.2), for several checkpoints and both target
domains, the *observed* excess losses come from real AdamW interventions continuing each checkpoint's
optimizer state (``commute validate``: base, "12" = en +dw for N steps then -dw, "21" the reverse, same
per-domain streams, R stream seeds). The *predicted* ``EL_k^12`` (and ``EL_k^21 = -EL_k^12``) come from the
criterion at the checkpoint under five metrics, all on the same analysis samples:

- ``euclid``: D = I, dt = lr N (the paper's choice; ``--metric euclid``);
- ``adam``: D = 1/(sqrt(v_hat)+eps) from the checkpoint's second moments, clipped at 100x its median (the
  shipped ``--metric adam``);
- ``adam-clip10``: the same clipped at 10x the median;
- ``adam-raw``: unclipped (what MATH.md found 3-5 orders of magnitude too large);
- ``adam-shape``: the shipped clipped D divided by its median: Adam's *shape* of metric at the Euclidean
  scale (does the direction weighting help the signs, apart from the size?).

Scores per metric, over the cases (checkpoint x target x order 12/21):

- sign agreement, over all cases and over the cases whose observed effect is significant (t test over the
  repeats at 95%);
- ``|log10(|pred| / |obs|)|`` (median; 0 = right size, 1 = a factor 10 off) on the significant cases, for each
  order and for the antisymmetric part ``(EL^12 - EL^21)/2`` that the second-order theory predicts.

The winner is the metric with the most significant signs right, ties broken by the median size error.

The observed branches are read from the cache that ``benchmarks/validate_signs.py`` leaves in
``OUT/<checkpoint>/cache`` with the same settings (or trained now). The ``euclid`` and ``adam`` rows are
``commute validate``'s own predictions (cross-checked here against the direct computation); the others
need one extra estimate per checkpoint each.

Usage: ``python benchmarks/metric_study.py [--quick] [--steps 100] [--repeats 3] [--dw 0.15]
[--out commute_out/bench_validate] [--threads 1]``; ``--quick``: checkpoints 1000 and 2500, 2 repeats.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from commute_cli.commands import analyze as analysis
from commute_cli.commands.validate import PREDICT_DIR, ValidateOptions, run_validate
from commute_cli.core import criterion
from commute_cli.engine import metric as engine_metric
from commute_cli.engine.curvature import param_list
from commute_cli.engine.estimator import estimate_checkpoint
from commute_cli.io import checkpoints

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
METRICS = ("euclid", "adam", "adam-clip10", "adam-raw", "adam-shape")


def extra_predictions(ckpt: Path, run: dict, n: int, dw: float, out: Path) -> dict[str, dict[str, float]]:
    """Predicted EL^12 per target under each metric, computed directly (same samples as validate's)."""
    names = run["pair"]
    aopts = analysis.AnalyzeOptions(
        ckpt_dir=ckpt,
        domains=[f"{k}={s}" for k, s in run["eval_domains"].items()],
        weights=[f"{k}={w!r}" for k, w in run["schedules"]["base"][0]["weights"].items()],
        targets=list(run["eval_domains"]),
        metric="adam",
        dw=dw,
        horizon=n,
        lr=run["lr_mean"],
        seed=0,
        out=out / PREDICT_DIR,
        **({} if run["options"]["samples"] is None else {"samples": run["options"]["samples"]}),
    )
    inputs = analysis.resolve_inputs(aopts)
    parts, _, _ = analysis.prepare_samples(inputs, aopts, out / PREDICT_DIR / "cache")
    ref = inputs.refs[0]
    model = checkpoints.load_model(ref)
    state = checkpoints.load_adam_state(ref, model)
    v = checkpoints.flat_exp_avg_sq(state, [p for p, _ in param_list(model)])
    D = engine_metric.adam_preconditioner(v, state.step or 1, state.betas[1], state.eps)
    med = float(D.median())
    variants = {
        "euclid": None,
        "adam": engine_metric.clip_metric(D)[0],  # the shipped policy (engine.metric.ADAM_CLIP)
        "adam-clip10": D.clamp(max=10 * med),
        "adam-raw": D,
        "adam-shape": D.clamp(max=100 * med) / med,
    }
    wbar = np.array([inputs.schedule.weights_at(ref.step or 0)[k] for k in inputs.names])
    out_rows: dict[str, dict[str, float]] = {}
    for metric, Dm in variants.items():
        stats = estimate_checkpoint(model, parts, plan="pair", D=Dm, method="rr", micro_batch=8)
        rows = analysis.summarize_checkpoint(
            stats,
            step=ref.step,
            names=inputs.names,
            wbar=wbar,
            targets=inputs.targets,
            lr=run["lr_mean"],
            horizon=n,
            dw=dw,
            confidence=0.95,
        )
        sign = 1.0 if inputs.names.index(names[0]) < inputs.names.index(names[1]) else -1.0
        out_rows[metric] = {r["target"]: sign * r["el_ij"] for r in rows}
        out_rows[metric + ":sig"] = {r["target"]: float(r["significant"]) for r in rows}
    out_rows["_D"] = {
        "median": med,
        "max": float(D.max()),
        "frac_above_100x": float((100 * med < D).double().mean()),
        "frac_above_10x": float((10 * med < D).double().mean()),
    }
    return out_rows


def study(
    steps: list[int], n: int, repeats: int, dw: float, out_root: Path
) -> tuple[pd.DataFrame, list[str]]:
    refs = {r.step: r for r in checkpoints.discover(SAMPLES)}
    rows, notes = [], []
    for step in steps:
        ref = refs[step]
        out = out_root / ref.name
        t0 = time.perf_counter()
        kw = {"checkpoint": ref.path, "dw": dw, "steps": n, "repeats": repeats, "out": out}
        silent = lambda _t: None  # noqa: E731
        eu = run_validate(ValidateOptions(metric="euclid", **kw), note=silent)
        ad = run_validate(ValidateOptions(metric="adam", **kw), note=silent)
        direct = extra_predictions(ref.path, eu.run, n, eu.run["dw_realized"], out)
        Dinfo = direct["_D"]
        notes.append(
            f"step {step}: D median {Dinfo['median']:.3g}, max {Dinfo['max']:.3g} "
            f"({Dinfo['max'] / Dinfo['median']:.3g}x median); {100 * Dinfo['frac_above_100x']:.3f}% of "
            f"coordinates above 100x median, {100 * Dinfo['frac_above_10x']:.2f}% above 10x"
        )
        for metric, res in (("euclid", eu), ("adam", ad)):  # validate's own numbers = the direct ones
            for r in res.table.itertuples(index=False):
                d = direct[metric][r.target]
                if not math.isclose(d, r.pred_el12, rel_tol=1e-6, abs_tol=1e-12):
                    notes.append(f"MISMATCH step {step} {metric} {r.target}: validate {r.pred_el12} vs {d}")
        for r in eu.table.itertuples(index=False):
            anti = [(a["losses"]["12"][r.target] - a["losses"]["21"][r.target]) / 2 for a in eu.repeats]
            anti_s = criterion.summarize_blocks(anti) if len(anti) > 1 else None
            for metric in METRICS:
                pred = direct[metric][r.target]
                for order, obs, sig in (
                    ("12", r.obs_el12, r.obs_el12_significant),
                    ("21", r.obs_el21, r.obs_el21_significant),
                    ("anti", anti_s.mean if anti_s else anti[0], anti_s.significant if anti_s else False),
                ):
                    p = pred if order != "21" else -pred
                    rows.append(
                        {
                            "step": step,
                            "target": r.target,
                            "metric": metric,
                            "order": order,
                            "obs": obs,
                            "obs_sig": bool(sig),
                            "pred": p,
                            "pred_sig": bool(direct[metric + ":sig"][r.target]),
                            "agree": (p > 0) == (obs > 0),
                            "log10_err": abs(math.log10(abs(p) / abs(obs))) if p and obs else math.inf,
                        }
                    )
        print(f"  {ref.name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return pd.DataFrame(rows), notes


def scores(df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for metric in METRICS:
        m = df[df["metric"] == metric]
        signs = m[m["order"] != "anti"]
        sig = signs[signs["obs_sig"]]
        anti = m[(m["order"] == "anti") & m["obs_sig"]]
        out.append(
            {
                "metric": metric,
                "signs_all": f"{int(signs['agree'].sum())}/{len(signs)}",
                "signs_sig": f"{int(sig['agree'].sum())}/{len(sig)}",
                "n_sig_right": int(sig["agree"].sum()),
                "anti_signs_sig": f"{int(anti['agree'].sum())}/{len(anti)}",
                "med_log10_err_sig": float(sig["log10_err"].median()) if len(sig) else math.nan,
                "med_log10_err_anti": float(anti["log10_err"].median()) if len(anti) else math.nan,
                "med_log10_err_all": float(signs["log10_err"].median()),
                "within_3x_sig": f"{int((sig['log10_err'] < math.log10(3)).sum())}/{len(sig)}",
                "median_|pred|": float(m["pred"].abs().median()),
            }
        )
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="checkpoints 1000 and 2500, 2 repeats")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=None, help="stream seeds (3; 2 with --quick)")
    parser.add_argument("--dw", type=float, default=0.15)
    parser.add_argument("--checkpoints", default=None, help="comma-separated steps (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "commute_out" / "bench_validate")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    analysis.quiet_libraries()
    if args.checkpoints:
        steps = [int(s) for s in args.checkpoints.split(",")]
    else:
        steps = [1000, 2500] if args.quick else [r.step for r in checkpoints.discover(SAMPLES)]
    repeats = args.repeats or (2 if args.quick else 3)
    t0 = time.perf_counter()
    df, notes = study(steps, args.steps, repeats, args.dw, args.out)
    print(
        f"metric study on sample_checkpoints (AdamW lr 1e-3): checkpoints {steps}, dw {args.dw:g}, "
        f"N {args.steps}, {repeats} stream seeds; observed = real AdamW branches from each checkpoint's state"
    )
    for line in notes:
        print(line)
    wide = df[df["order"] == "12"].pivot_table(index=["step", "target"], columns="metric", values="pred")
    obs = df[(df["order"] == "12") & (df["metric"] == "euclid")].set_index(["step", "target"])
    wide.insert(0, "obs_EL12", obs["obs"])
    wide.insert(1, "obs_sig", obs["obs_sig"])
    anti = df[(df["order"] == "anti") & (df["metric"] == "euclid")].set_index(["step", "target"])
    wide.insert(2, "obs_anti", anti["obs"])
    with pd.option_context("display.width", 160, "display.float_format", "{:.3g}".format):
        print(
            "\npredicted EL^12 by metric, beside the observed EL^12 and antisymmetric part (EL^12 - EL^21)/2:"
        )
        print(wide[["obs_EL12", "obs_sig", "obs_anti", *METRICS]].to_string())
        s = scores(df)
        print("\nscores (sig = observed effect significant at 95% over stream seeds):")
        print(s.drop(columns=["n_sig_right"]).to_string(index=False))
    best = s.sort_values(["n_sig_right", "med_log10_err_sig"], ascending=[False, True]).iloc[0]
    euclid = s.set_index("metric").loc["euclid"]
    adam = s.set_index("metric").loc["adam"]
    adam_better = (adam["n_sig_right"], -adam["med_log10_err_sig"]) > (
        euclid["n_sig_right"],
        -euclid["med_log10_err_sig"],
    )
    print(
        f"\nwinner: {best['metric']} (most significant signs right, then smallest size error). "
        f"The shipped --metric adam (clip 100x median) "
        + ("BEATS" if adam_better else "does NOT beat")
        + f" euclid here: signs {adam['signs_sig']} vs {euclid['signs_sig']}, median |log10(pred/obs)| "
        f"{adam['med_log10_err_sig']:.2f} vs {euclid['med_log10_err_sig']:.2f}."
    )
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
