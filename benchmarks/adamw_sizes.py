"""Predicted vs observed sizes of the order effect on AdamW and SGD runs: euclid, adam and resummed.

Stages (and ``mconv``, convergence in m at the shipped checkpoint), each resumable (every trained branch
and every prediction is cached under ``--out``):

1. ``train``: the extra runs of the study, on the shipped data and tokenizer (tiny GPT-2, en/ru 0.8/0.2):
   ``adamw-cos``: AdamW, betas (0.9, 0.95), lr 2e-3 with 100 warmup steps and a cosine decay over 1500 steps;
   ``adamw-wd``: AdamW, betas (0.9, 0.98), weight decay 0.1, lr 1e-3 with 100 warmup steps and a cosine decay
   over 1500 steps (the usual LLM recipe: beta2 < 0.999, decoupled weight decay, warmup + cosine);
   ``sgd``: plain SGD (no momentum), lr 0.2 constant, 1500 steps.
   (The shipped run ``sample_checkpoints/`` is AdamW, betas (0.9, 0.999), lr 1e-3 constant.)
2. ``observe``: ``commute validate`` (real branch trainings: base, "12", "21" on the same streams, R stream
   seeds) at the chosen checkpoints of each run, at two horizons n, with the euclid prediction; then the adam
   prediction on the same (cached) branches.
3. ``project``: the resummed projections (Krylov basis from HVPs) of each checkpoint, cached.
4. ``table``: the resummed prediction (commute_cli.resummed) at each checkpoint, and the per-method tables
   (per optimizer family, ``summary``, and per run, ``summary_by_run``): sign agreement on the cases whose
   observed effect is significant, median and range of predicted/observed there, and the cost of each
   prediction measured in one run. Written to ``benchmarks/results/adamw_sizes.json``. The cases of runs
   whose cache folders are absent (or that ``--runs`` leaves out) are kept from the previous file, and the
   JSON's ``merged`` says which were kept and which recomputed.

Usage (each stage takes minutes to tens of minutes on one shared core; ``--runs`` restricts every stage to
some runs, e.g. ``--runs adamw-wd`` to add one run to the stored table):

    python benchmarks/adamw_sizes.py train [--runs ...]
    python benchmarks/adamw_sizes.py observe [--quick] [--runs ...]
    python benchmarks/adamw_sizes.py project [--runs ...]
    python benchmarks/adamw_sizes.py table [--runs ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchenv import environment

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
RUNS = {
    "shipped": {"path": SAMPLES, "steps": [1000, 2000], "desc": "AdamW b2 0.999, lr 1e-3 constant"},
    "adamw-cos": {
        "path": None,
        "steps": [1000],
        "desc": "AdamW b2 0.95, lr 2e-3, warmup 100, cosine to 1500",
    },
    "adamw-wd": {
        "path": None,
        "steps": [500, 1000],
        "desc": "AdamW b2 0.98, weight decay 0.1, lr 1e-3, warmup 100, cosine to 1500",
    },
    "sgd": {"path": None, "steps": [1000], "desc": "SGD (no momentum), lr 0.2 constant", "horizons": (20,)},
    "sgd-lr0.02": {
        "path": None,
        "run": "sgd",
        "lr": 0.02,
        "steps": [500, 1000],
        "horizons": (20, 60),
        "desc": "the SGD run's checkpoint, branches trained with SGD at lr 0.02 (validate --lr)",
    },
}
HORIZONS = (20, 100)
"""n x batch 10 x dw 0.15 must be whole (the branches see the same rows): 20 and 100 steps."""


def run_dir(out: Path, name: str) -> Path:
    path = RUNS[name]["path"]
    return Path(path) if path is not None else out / "runs" / RUNS[name].get("run", name)


def horizons(name: str) -> tuple[int, ...]:
    return tuple(RUNS[name].get("horizons", HORIZONS))


def stage_train(out: Path, threads: int, runs: list[str] | None = None) -> None:
    from commute_cli.commands.train import TrainConfig, train

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
        "adamw-cos": dict(optimizer="adamw", lr=2e-3, betas=(0.9, 0.95), lr_schedule="cosine", warmup=100),
        "adamw-wd": dict(
            optimizer="adamw",
            lr=1e-3,
            betas=(0.9, 0.98),
            weight_decay=0.1,
            lr_schedule="cosine",
            warmup=100,
        ),
        "sgd": dict(optimizer="sgd", lr=0.2),
    }
    for name, extra in configs.items():
        if runs and name not in runs:
            continue
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
            for n in horizons(name):
                out.append((name, step, n))
    return out


def _sources(name: str) -> dict[str, object]:
    """The study's runs keep absolute data paths out of their manifests: name the data explicitly (and the
    learning rate of the branches where the study overrides it)."""
    if name == "shipped":
        return {}
    extra: dict[str, object] = {"lr": RUNS[name]["lr"]} if "lr" in RUNS[name] else {}
    return extra | {
        "domains": [f"{k}={SAMPLES / 'data' / k / 'train.jsonl'}" for k in ("en", "ru")],
        "eval_domains": [f"{k}={SAMPLES / 'data' / k / 'validation.jsonl'}" for k in ("en", "ru")],
    }


def validate_out(out: Path, name: str, step: int, n: int, metric: str) -> Path:
    return out / "validate" / f"{name}-{step}-n{n}-{metric}"


def stage_observe(out: Path, quick: bool, repeats: int, dw: float, runs: list[str] | None) -> None:
    from commute_cli.commands.validate import ValidateOptions, run_validate

    for name, step, n in _cases(quick, runs):
        for metric in ("euclid", "adam"):
            if metric == "adam" and name.startswith("sgd"):
                continue
            folder = validate_out(out, name, step, n, metric)
            if (folder / "validate.json").is_file() or (folder / "running").is_file():
                continue  # done, or another observe process is on it
            if (
                metric != "euclid"
                and not (validate_out(out, name, step, n, "euclid") / "validate.json").is_file()
            ):
                continue  # the branches are trained (and cached) by the euclid pass first
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
                **_sources(name),
            )
            (folder / "running").write_text(str(os.getpid()))
            try:
                run_validate(opts, note=lambda t: print(t, file=sys.stderr))
            finally:
                (folder / "running").unlink()
            print(
                f"{name} step {step} n {n} {metric}: {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=["train", "observe", "project", "mconv", "table"])
    parser.add_argument("--out", type=Path, default=ROOT / "commute_out" / "adamw_sizes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dw", type=float, default=0.15)
    parser.add_argument("--m", type=int, default=24, help="Krylov basis size of the resummed prediction")
    parser.add_argument("--runs", nargs="*", default=None, help="subset of: " + ", ".join(RUNS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage == "train":
        stage_train(args.out, args.threads, args.runs)
    elif args.stage == "project":  # the resummed statistics only (no observations needed)
        for name, step, _n in _cases(args.quick, args.runs):
            if (run_dir(args.out, name) / f"checkpoint-{step}").is_dir():
                for kind in ("euclid",) if name.startswith("sgd") else D_KINDS:
                    projections(args.out, name, step, kind, args.m)
    elif args.stage == "mconv":
        stage_mconv(args.out)
    elif args.stage == "observe":
        stage_observe(args.out, args.quick, args.repeats, args.dw, args.runs)
    else:
        stage_table(args.out, args.quick, args.threads, args.m, args.runs)


# ------------------------------------------------------------------------------------------------ table

D_KINDS = ("euclid", "adam")
"""Metrics of the resummed prediction: D = I; Adam's frozen 1/(sqrt(v_hat)+eps); the same clipped at 100x its
median (analyze's --metric adam)."""


VARIANTS = {
    "exact": {},
    "clamp": {"negative": "clamp"},
    "abs": {"negative": "abs"},
    "clamp-q": {"negative": "clamp", "quadratic_target": True},
}
"""Variants of the resummed prediction (all from the same projection): negative-curvature rule
(resummed_math.NEGATIVE) and a linear or quadratic ("-q") target."""


def _setup(out: Path, name: str, step: int, n: int):
    from commute_cli.commands.validate import ValidateOptions, resolve_setup

    opts = ValidateOptions(
        checkpoint=run_dir(out, name) / f"checkpoint-{step}", dw=0.15, steps=n, **_sources(name)
    )
    return resolve_setup(opts, note=lambda _t: None)


def _samples(setup, cache_dir: Path):
    """The same design blocks as validate's prediction (analysis.prepare_samples with validate's options)."""
    from commute_cli.commands.analyze import AnalyzeOptions, prepare_samples, resolve_inputs

    w = setup.schedule.weights_at(setup.step)
    aopts = AnalyzeOptions(
        ckpt_dir=setup.checkpoint,
        domains=[f"{k}={s}" for k, s in setup.eval_sources.items()],
        tokenizer=setup.tokenizer_path,
        seq_len=setup.seq_len,
        weights=[f"{k}={w[k]!r}" for k in setup.names],
        targets=list(setup.names),
        seed=0,
        out=cache_dir,
    )
    inputs = resolve_inputs(aopts)
    parts, _digest, _provenance = prepare_samples(inputs, aopts)
    wbar = np.array([w[k] for k in setup.names])
    return inputs, parts, wbar


def _metric(ref, model, kind: str):
    from commute_cli.engine import curvature
    from commute_cli.engine.metric import adam_preconditioner
    from commute_cli.io import checkpoints

    if kind == "euclid":
        return None
    state = checkpoints.load_adam_state(ref, model)
    names = [n for n, _ in curvature.param_list(model)]
    v = checkpoints.flat_exp_avg_sq(state, names)
    D = adam_preconditioner(v, state.step or 1, state.betas[1], state.eps)
    if kind == "adam-clip":
        D = D.clamp(max=100.0 * float(D.median()))
    return D


def projections(out: Path, name: str, step: int, kind: str, m: int) -> tuple[object, dict]:
    """Resummed statistics of one checkpoint (cached in OUT/resummed/*.npz) and their cost."""
    from commute_cli.engine.resummed import Projection, ResummedStats, estimate_resummed
    from commute_cli.io import checkpoints

    file = out / "resummed" / f"{RUNS[name].get('run', name)}-{step}-{kind}-m{m}.npz"
    setup = _setup(out, name, step, horizons(name)[0])
    coefs = np.eye(len(setup.names))
    if file.is_file():
        z = np.load(file)
        blocks = [
            Projection(T=z[f"T{b}"], c=z[f"c{b}"], e=z[f"e{b}"], norms=z[f"n{b}"], hvps=int(z["hvps"]))
            for b in range(int(z["B"]))
        ]
        return ResummedStats(blocks, coefs, z["wbar"]), json.loads(str(z["meta"]))
    _inputs, parts, wbar = _samples(setup, out / "resummed" / "samples")
    ref = checkpoints.discover(setup.checkpoint)[0]
    model = checkpoints.load_model(ref)
    D = _metric(ref, model, kind)
    t0 = time.perf_counter()
    stats = estimate_resummed(model, parts, wbar=wbar, target_coefs=coefs, D=D, m=m, micro_batch=8)
    seconds = time.perf_counter() - t0
    meta = {"seconds": seconds, "hvps_per_block": stats.blocks[0].hvps, "m": m, "kind": kind}
    if kind == "euclid":  # today's analysis on the same samples, in the same process: the cost ratio
        from commute_cli.engine.estimator import estimate_checkpoint

        t0 = time.perf_counter()
        estimate_checkpoint(model, parts, plan="pair", micro_batch=8, hvp_micro_batch=4)
        meta["analysis_seconds"] = time.perf_counter() - t0
    file.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"B": np.array(len(stats.blocks)), "wbar": wbar, "hvps": np.array(stats.blocks[0].hvps)}
    for b, p in enumerate(stats.blocks):
        arrays |= {f"T{b}": p.T, f"c{b}": p.c, f"e{b}": p.e, f"n{b}": p.norms}
    np.savez(file, meta=np.array(json.dumps(meta)), **arrays)
    return stats, meta


CAL_WINDOW = 200
"""Steps of the run's own log before the checkpoint used for its observed rate of progress."""


def observed_slope(checkpoint: Path, window: int = CAL_WINDOW) -> tuple[float, float]:
    """Slope of the logged training loss (mixture) against time (sum of lrs) over the last ``window`` steps
    before the checkpoint: only what the run logged before the checkpoint (trainer_state.json)."""
    from commute_cli.core import resummed_math as rm

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step = int(state["global_step"])
    log = [e for e in state["log_history"] if "loss" in e and "learning_rate" in e]
    log = [e for e in log if step - window <= e["step"] <= step]
    times, t, prev = [], 0.0, None
    for e in log:
        if prev is not None:
            t += (e["step"] - prev) * float(e["learning_rate"])
        times.append(t)
        prev = e["step"]
    return rm.loss_slope(times, [float(e["loss"]) for e in log])


def stage_mconv(out: Path) -> None:
    """Convergence in the basis size m of the resummed prediction at the shipped checkpoint 1000."""
    from commute_cli.engine.resummed import predict

    res: dict[str, object] = {}
    for m in (12, 24):
        for kind in ("euclid", "adam"):
            stats, meta = projections(out, "shipped", 1000, kind, m)
            for n in (20, 100):
                for t, name in enumerate(["en", "ru"]):
                    for neg in ("exact", "clamp"):
                        p = predict(stats, t, np.array([0.15, -0.15]), 1e-3 * n, negative=neg).summary()
                        res[f"{kind}-{neg}-m{m}-n{n}-{name}"] = [p["el12"], p["el12_se"], p["bracket12"]]
            res[f"{kind}-m{m}-seconds"] = meta["seconds"]
    path = ROOT / "benchmarks" / "results" / "adamw_sizes_mconv.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")


def observed(out: Path, name: str, step: int, n: int) -> list[dict]:
    """validate.json rows of both metrics, each with the observed antisymmetric part
    ``(EL^12 - EL^21)/2`` (mean, SE and t test over the stream seeds), the part the bracket predicts."""
    from commute_cli.core.criterion import summarize_blocks

    rows = []
    for metric in ("euclid", "adam"):
        file = validate_out(out, name, step, n, metric) / "validate.json"
        if not file.is_file():
            continue
        data = json.loads(file.read_text())
        for r in data["rows"]:
            k = r["target"]
            anti = [0.5 * (rep["losses"]["12"][k] - rep["losses"]["21"][k]) for rep in data["repeats"]]
            s = summarize_blocks(anti, 0.95)
            rows.append(
                {
                    "metric": metric,
                    **r,
                    "obs_anti": s.mean,
                    "obs_anti_se": s.se,
                    "obs_anti_significant": s.significant,
                }
            )
    return rows


def stage_table(out: Path, quick: bool, threads: int, m: int = 24, runs: list[str] | None = None) -> None:
    from commute_cli.core import resummed_math as rm
    from commute_cli.engine.resummed import Prediction, predict

    cases = []
    costs = []
    for name, step, n in _cases(quick, runs):
        obs = observed(out, name, step, n)
        if not obs:
            print(f"{name} {step} n{n}: not observed yet", file=sys.stderr)
            continue
        setup = _setup(out, name, step, n)
        lrs = setup.lrs
        dt = (float(sum(lrs[:n])), float(sum(lrs[n:])))
        kinds = ("euclid",) if name.startswith("sgd") else D_KINDS
        preds: dict[str, dict] = {}
        slope, slope_se = observed_slope(setup.checkpoint)
        calib = {}
        for kind in kinds:
            stats, meta = projections(out, name, step, kind, m)
            rate = float(np.mean([rm.progress_rate(p.c, p.e, stats.wbar) for p in stats.blocks]))
            kappa = rm.time_factor(slope, rate)
            calib[kind] = {
                "observed_slope": slope,
                "observed_slope_se": slope_se,
                "predicted_rate": rate,
                "kappa": kappa,
            }
            if n == horizons(name)[0]:
                costs.append({"run": name, "step": step, **meta})
            for t, target in enumerate(setup.names):
                d = np.zeros(len(setup.names))
                d[setup.pair[0]], d[setup.pair[1]] = 0.15, -0.15
                for variant, kw in VARIANTS.items():
                    p = predict(stats, t, d, dt, **kw).summary()
                    preds.setdefault(target, {})[f"resummed-{kind}-{variant}"] = p
                if math.isfinite(kappa):  # the run's own observed progress sets the time scale
                    dt_eff = (kappa * dt[0], kappa * dt[1])
                    p = predict(stats, t, d, dt_eff, negative="clamp").summary()
                    preds[target][f"resummed-{kind}-clamp-cal"] = p
                    br = predict(stats, t, d, dt_eff, negative="clamp")
                    preds[target][f"bracket-{kind}-cal"] = {
                        "el12": float(br.bracket12.mean()),
                        "el21": -float(br.bracket12.mean()),
                        "el12_se": Prediction._se(br.bracket12),
                        "bracket12": float(br.bracket12.mean()),
                        "saturation": float(np.median(br.saturation)),
                    }
        for r in obs:
            if r["metric"] != "euclid" and r["metric"] != "adam":
                continue
            target = r["target"]
            entry = next(
                (
                    c
                    for c in cases
                    if c["run"] == name and c["step"] == step and c["n"] == n and c["target"] == target
                ),
                None,
            )
            if entry is None:
                entry = {
                    "run": name,
                    "step": step,
                    "n": n,
                    "target": target,
                    "dt": dt,
                    "obs_el12": r["obs_el12"],
                    "obs_el12_se": r["obs_el12_se"],
                    "obs_el12_significant": r["obs_el12_significant"],
                    "obs_el21": r["obs_el21"],
                    "obs_el21_se": r["obs_el21_se"],
                    "obs_el21_significant": r["obs_el21_significant"],
                    "obs_anti": r["obs_anti"],
                    "obs_anti_se": r["obs_anti_se"],
                    "obs_anti_significant": r["obs_anti_significant"],
                    "calibration": calib,
                    "pred": {
                        k: {
                            "el12": v["el12"],
                            "el21": v["el21"],
                            "el12_se": v["el12_se"],
                            "bracket12": v["bracket12"],
                            "saturation": v["saturation"],
                        }
                        for k, v in preds.get(target, {}).items()
                    },
                }
                cases.append(entry)
            entry["pred"][f"bracket-{r['metric']}"] = {
                "el12": r["pred_el12"],
                "el21": -r["pred_el12"],
                "el12_se": r["pred_el12_se"],
                "regime_ratio": r["regime_ratio"],
            }
    path = ROOT / "benchmarks" / "results" / "adamw_sizes.json"
    merged = merge_stored(path, cases, costs)
    summary = summarize(cases)
    by_run = summarize(cases, by_run=True)
    print_table(summary)
    print()
    print_table(by_run)
    print()
    print(markdown_table(summary))
    print()
    print(markdown_table(by_run, first="run"))
    result = {
        "benchmark": "adamw_sizes",
        "environment": environment(threads),
        "merged": merged,
        "runs": {k: v["desc"] for k, v in RUNS.items()},
        "settings": {
            "dw": 0.15,
            "horizons": HORIZONS,
            "m": m,
            "repeats": 3,
            "eval": "held-out validation shards",
        },
        "costs": costs,
        "summary": summary,
        "summary_by_run": by_run,
        "cases": cases,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def _case_key(c: dict) -> str:
    return f"{c['run']}-{c['step']}-n{c['n']}"


def merge_stored(path: Path, cases: list[dict], costs: list[dict]) -> dict:
    """Add to ``cases`` and ``costs`` (this call's, recomputed from the cache folders) the ones of the
    previous ``path`` whose (run, step, n) this call did not recompute (their cache folders are absent, or
    ``--runs`` left them out), so that a table of one new run keeps every run measured before. Says on
    stderr what it kept; returns the record of it for the JSON."""
    done = {_case_key(c) for c in cases}
    recomputed = sorted(done)
    kept: list[str] = []
    previous_environment = None
    if path.is_file():
        old = json.loads(path.read_text())
        previous_environment = old.get("environment")
        for c in old.get("cases", []):
            if _case_key(c) not in done:
                cases.append(c)
                if _case_key(c) not in kept:
                    kept.append(_case_key(c))
        have = {(c["run"], c["step"], c["kind"]) for c in costs}
        costs.extend(c for c in old.get("costs", []) if (c["run"], c["step"], c["kind"]) not in have)
    order = {name: i for i, name in enumerate(RUNS)}

    def rank(c: dict) -> tuple[int, int, int]:
        return (order.get(c["run"], len(order)), int(c["step"]), int(c.get("n", 0)))

    cases.sort(key=rank)  # stable: the targets keep their order
    costs.sort(key=rank)
    if kept:
        print(
            f"kept {len(kept)} (run, step, n) of the previous {path.name} whose cache is absent or not "
            f"selected (not recomputed): {', '.join(kept)}",
            file=sys.stderr,
        )
    print(f"recomputed from the cache: {', '.join(recomputed) or 'nothing'}", file=sys.stderr)
    return {
        "recomputed_from_cache": recomputed,
        "kept_from_previous_file": kept,
        "previous_environment": previous_environment if kept else None,
    }


def summarize(cases: list[dict], by_run: bool = False) -> dict:
    """Per method and optimizer family (``by_run``: per run): sign agreement on significant observed effects
    (both orders), and predicted/observed there (median, range)."""
    out: dict[str, dict] = {}
    if by_run:
        groups = {r: [c for c in cases if c["run"] == r] for r in dict.fromkeys(c["run"] for c in cases)}
    else:
        groups = {
            f: [c for c in cases if c["run"].startswith("sgd") == (f == "sgd")] for f in ("adamw", "sgd")
        }
    for family, sel in groups.items():
        methods = sorted({k for c in sel for k in c["pred"]})
        for method in methods:
            agree, ratios, where = 0, [], []
            for c in sel:
                p = c["pred"].get(method)
                if p is None:
                    continue
                for order in ("12", "21"):
                    if not c[f"obs_el{order}_significant"]:
                        continue
                    obs, pred = c[f"obs_el{order}"], p[f"el{order}"]
                    if not (math.isfinite(pred) and obs != 0.0):
                        continue
                    agree += int((pred > 0) == (obs > 0))
                    ratios.append(pred / obs)
                    where.append(f"{c['run']}-{c['step']}-n{c['n']}-{c['target']}-{order}")
            anti_agree, anti_ratios = 0, []
            for c in sel:
                p = c["pred"].get(method)
                if p is None or not c["obs_anti_significant"]:
                    continue
                pa = 0.5 * (p["el12"] - p["el21"])
                if math.isfinite(pa):
                    anti_agree += int((pa > 0) == (c["obs_anti"] > 0))
                    anti_ratios.append(pa / c["obs_anti"])
            growth = []  # antisymmetric part at the long horizon over the short one: predicted vs observed
            for c in sel:
                hs = horizons(c["run"])
                if len(hs) < 2 or c["n"] != hs[1]:
                    continue
                short = next(
                    (
                        x
                        for x in sel
                        if (x["run"], x["step"], x["target"], x["n"])
                        == (c["run"], c["step"], c["target"], hs[0])
                    ),
                    None,
                )
                if short is None or method not in c["pred"] or method not in short["pred"]:
                    continue
                pl, ps = c["pred"][method], short["pred"][method]
                growth.append(
                    {
                        "case": f"{c['run']}-{c['step']}-{c['target']}",
                        "pred": (pl["el12"] - pl["el21"]) / (ps["el12"] - ps["el21"]),
                        "obs": c["obs_anti"] / short["obs_anti"],
                        "obs_both_significant": bool(
                            c["obs_anti_significant"] and short["obs_anti_significant"]
                        ),
                    }
                )
            if not ratios:
                continue
            r = np.array(ratios)
            out[f"{family}/{method}"] = {
                "significant_cases": len(r),
                "sign_agree": agree,
                "median_pred_over_obs": float(np.median(r)),
                "min": float(r.min()),
                "max": float(r.max()),
                "median_abs_log10_error": float(np.median(np.abs(np.log10(np.abs(r))))),
                "cases": where,
                "ratios": r.tolist(),
                "antisym_significant": len(anti_ratios),
                "antisym_sign_agree": anti_agree,
                "antisym_median_pred_over_obs": float(np.median(anti_ratios)) if anti_ratios else math.nan,
                "antisym_min": float(np.min(anti_ratios)) if anti_ratios else math.nan,
                "antisym_max": float(np.max(anti_ratios)) if anti_ratios else math.nan,
                "growth_long_over_short": growth,
            }
    return out


LABELS = {
    "bracket-euclid": "bracket, D = I (`analyze --metric euclid`)",
    "bracket-adam": "bracket, Adam D (`--metric adam`)",
    "resummed-euclid-clamp": "**resummed**, D = I, clamp",
    "resummed-euclid-exact": "resummed, D = I, exact",
    "resummed-adam-clamp": "**resummed**, Adam D, clamp",
    "resummed-adam-exact": "resummed, Adam D, exact",
    "bracket-euclid-cal": "bracket, D = I, time kappa dt",
    "resummed-euclid-clamp-cal": "resummed, D = I, clamp, time kappa dt",
    "bracket-adam-cal": "bracket, Adam D, time kappa dt",
    "resummed-adam-clamp-cal": "resummed, Adam D, clamp, time kappa dt",
}
"""The methods of the docs' tables, in their order (the other variants are in the JSON only)."""


def markdown_table(summary: dict, first: str = "family") -> str:
    """The per-method table of docs/MATH.md "Resummed prediction", "Measurements" (``first``: what the keys'
    first part is, the optimizer family or the run)."""
    lines = [
        f"| {first} | method | signs, EL^12/EL^21 | median pred/obs | range | median abs(log10) | "
        "signs, antisym. | median pred/obs, antisym. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = list(dict.fromkeys(key.split("/")[0] for key in summary))
    for group in groups:
        for method, label in LABELS.items():
            s = summary.get(f"{group}/{method}")
            if s is None:
                continue
            lines.append(
                f"| {group} | {label} | {s['sign_agree']}/{s['significant_cases']} | "
                f"{s['median_pred_over_obs']:.3g} | {s['min']:.3g} .. {s['max']:.3g} | "
                f"{s['median_abs_log10_error']:.2f} | {s['antisym_sign_agree']}/{s['antisym_significant']} | "
                f"{s['antisym_median_pred_over_obs']:.3g} |"
            )
    return "\n".join(lines)


def print_table(summary: dict) -> None:
    print(
        f"{'method':34s} {'signs':>7s} {'median p/o':>10s} {'range':>21s} {'|log10|':>7s}"
        f" | {'anti signs':>10s} {'median':>8s} {'range':>19s}"
    )
    for key, s in summary.items():
        print(
            f"{key:34s} {s['sign_agree']:>3d}/{s['significant_cases']:<3d} {s['median_pred_over_obs']:10.3g} "
            f"{s['min']:10.3g}..{s['max']:<9.3g} {s['median_abs_log10_error']:7.2f}"
            f" | {s['antisym_sign_agree']:>5d}/{s['antisym_significant']:<4d}"
            f" {s['antisym_median_pred_over_obs']:8.3g} {s['antisym_min']:9.3g}..{s['antisym_max']:<8.3g}"
        )


if __name__ == "__main__":
    main()
