"""``commute validate``: the paper's intervention experiment (sections 4.2-4.3) on a user's checkpoint.

From one checkpoint (with its optimizer state when saved) three branches of ``2N`` steps are trained on the
same per-domain sample streams:

- ``base``: the run's own schedule ``w(t)``;
- ``12``: ``w + d`` for N steps, then ``w - d`` for N steps, ``d = +dw`` on the pair's first domain and
  ``-dw`` on its second (docs/MATH.md "Two domains": "12" means domain 1 up first);
- ``21``: the reverse.

Every domain's loss is then evaluated on the same held-out blocks, and the observed excess losses
``EL_k^12 = L_k(theta_12) - L_k(theta_base)`` and ``EL_k^21`` (mean and SE over ``R`` repeats that differ
only in the stream seed) are put next to the criterion's prediction at the checkpoint (``commute analyze``
with target k, ``--dw dw``, ``--horizon N``, ``dt = lr N``; ``EL^21 = -EL^12`` to second order).

Decisions (docs/DECISIONS.md, "commute validate"):

- Same data in every branch: each domain has its own stream (``engine.training.DomainStream``) and every
  branch takes exactly the same rows of every domain over the window (``core.mixing.realize_counts``).
- Repeats differ only in the stream seed (repeat r uses ``seed + r``; repeat 0 the checkpoint's own seed).
  Each finished repeat is cached in ``OUT/cache``: an interrupted or repeated run does not train it again.
- Without saved optimizer state the branches use plain SGD, the dynamics the criterion is derived for.
- Cost: ``3 x 2N x R`` training steps of ``B`` sequences, plus one analysis of the checkpoint for the
  prediction. The cost is said before starting, from a measured step; ``--quick`` trades precision for
  time (see :data:`~commute_cli.commands.validate_inputs.QUICK`).

This module is the use case (:func:`run_validate`, the prediction, the combined rows); its options and
checked inputs live in :mod:`commute_cli.commands.validate_inputs`, the branches and their cache in
:mod:`commute_cli.commands.validate_branches`, the result table in :mod:`commute_cli.render.validate_table`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from commute_cli import __started__, __version__
from commute_cli.commands.validate_branches import (
    cost_line,
    load_state,
    observe,
    pending_repeats,
    prediction_seconds,
    prepare_branches,
    run_branches,
    time_one_step,
)
from commute_cli.commands.validate_inputs import (
    QUICK,
    VALIDATE_FORMAT,
    Note,
    Setup,
    ValidateOptions,
    parse_pair,
    resolve_setup,
)
from commute_cli.core.mixing import BRANCHES, repeat_summary, signs_agree
from commute_cli.engine import training
from commute_cli.io import atomic, checkpoints

PREDICT_DIR = "validate-predict"
"""Sub-folder of ``--out`` where the on-the-fly ``analyze`` run (and its cache) lives, so that validate never
overwrites the ``results.csv`` of a user's own ``commute analyze``."""


# ------------------------------------------------------------------------------------------------ predictions


def _prediction_rows(
    stats: Any, setup: Setup, dw: float, horizon: int, lr: float, confidence: float
) -> dict[str, dict[str, Any]]:
    """The criterion's ``EL^12`` for every target domain from one checkpoint's statistics, through
    ``core.regime.predict_pair`` (the function that makes analyze's rows): ``+dw`` on the pair's first
    domain, ``dt = lr x horizon``."""
    from commute_cli.core.regime import Regime, predict_pair

    w = setup.schedule.weights_at(setup.step)
    wbar = np.array([w[n] for n in setup.names], dtype=np.float64)
    i, j = setup.pair
    found = {}
    for k, target in enumerate(setup.names):
        coefs = np.zeros(len(setup.names))
        coefs[k] = 1.0
        p = predict_pair(
            stats, wbar=wbar, coefs=coefs, i=i, j=j, dw=dw, dt=lr * horizon, confidence=confidence
        )
        found[target] = {
            "pred_el12": p.el.mean,
            "pred_el12_se": p.el.se,
            "pred_t": p.el.t,
            "pred_t_crit": p.el.t_crit,
            "pred_significant": p.el.significant,
            "in_regime": p.regime.regime not in (Regime.OUTSIDE, Regime.SATURATED),  # as analyze's
            "regime": str(p.regime.regime),
            "regime_ratio": p.regime.ratio,
            "pred_bracket": p.bracket.mean,
            "pred_verdict": str(p.verdict),
            "dt": p.dt,
        }
    return found


def predict(setup: Setup, opts: ValidateOptions, dw: float, note: Note) -> tuple[dict[str, dict], str]:
    """The criterion's predicted ``EL_k^12`` for every target k at validate's own ``(dw, --steps, lr)``.

    The checkpoint's statistics come from the shared content-addressed cache (``io.store``) when a
    ``commute analyze`` of the same checkpoint, data and sample settings left them there (``OUT/cache``, or
    ``FROM/cache`` with ``--from``); only otherwise are they computed (and cached for next time). The
    sample is analyze's: the held-out data, ``seq_len`` and ``--samples``/``--blocks`` with seed 0, so the
    defaults of both commands meet in the same cache entry. No nested analysis, no float matching.
    """
    from commute_cli.commands.options import AnalyzeOptions, Inputs
    from commute_cli.commands.stats import checkpoint_stats, prepare_samples
    from commute_cli.core.criterion import choose_plan

    out = Path(opts.out)
    dirs = [out / "cache"]
    if opts.from_dir is not None:
        dirs += [Path(opts.from_dir) / "cache", Path(opts.from_dir).parent / "cache"]
    sized: dict[str, Any] = {} if opts.samples is None else {"samples": opts.samples}
    aopts = AnalyzeOptions(
        ckpt_dir=setup.checkpoint,
        blocks=opts.blocks,
        metric=opts.metric,
        seed=0,
        confidence=opts.confidence,
        use_cache=opts.use_cache,
        device=str(getattr(opts, "device", "auto")),
        **sized,
    )
    aopts.validate()
    ref = checkpoints.discover(setup.checkpoint)[0]
    tokenizer = checkpoints.load_tokenizer(Path(setup.tokenizer_path))
    seq_len = setup.seq_len
    if seq_len is None:  # analyze's default
        config = checkpoints.read_config(ref)
        seq_len = min(
            256, int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 256))
        )
    inputs = Inputs(
        [ref], list(setup.names), dict(setup.eval_sources), None, tokenizer, setup.tokenizer_path,
        int(seq_len), setup.schedule, [], None,
    )  # fmt: skip
    parts, digest, _provenance = prepare_samples(inputs, aopts)
    K = len(setup.names)
    entry = checkpoint_stats(
        ref, aopts, parts=parts, sample_digest=digest, plan=choose_plan(K, K), coefs=None,
        device=training.resolve_device(aopts.device), cache_dirs=dirs,
    )  # fmt: skip
    found = _prediction_rows(entry.stats, setup, dw, opts.steps, setup.lr_mean, opts.confidence)
    how = "read from the statistics cache" if entry.cached else "computed now and cached"
    if opts.from_dir is not None and not entry.cached:
        note(f"note: no cached statistics for {setup.checkpoint} in {opts.from_dir}/: computing them now")
    return found, f"{how} ({entry.file})"


# ------------------------------------------------------------------------------------------------ table


def _sig12(x: float) -> float:
    return float(f"{x:.12g}")


def combine(
    setup: Setup,
    opts: ValidateOptions,
    repeats: Sequence[Mapping[str, Any]],
    predicted: Mapping[str, Mapping[str, Any]],
    loss0: Mapping[str, float],
    dw: float,
) -> pd.DataFrame:
    """One row per target domain k: observed EL^12, EL^21 (mean, SE over repeats) beside the prediction.

    ``obs_sym = (EL^12 + EL^21) / 2`` is the part of the observed effect that the second-order theory says
    is zero (``EL^21 = -EL^12``): large against ``obs_el12`` means higher-order terms or noise dominate;
    ``obs_antisym = (EL^12 - EL^21) / 2`` is the part the bracket predicts (``ratio_antisym_pred``). ``lr``
    and ``dt`` are written to 12 significant digits (a mean of equal rates is 0.001, not
    0.0010000000000000002).
    """
    from scipy import stats as _stats

    i, j = (setup.names[k] for k in setup.pair)
    # the observed intervals' Student-t quantile (repeats - 1 degrees of freedom; none with one repeat)
    n_rep = len(repeats)
    obs_t_crit = float(_stats.t.ppf(0.5 + opts.confidence / 2.0, n_rep - 1)) if n_rep >= 2 else math.nan
    rows = []
    for k in setup.names:
        el12 = [r["losses"]["12"][k] - r["losses"]["base"][k] for r in repeats]
        el21 = [r["losses"]["21"][k] - r["losses"]["base"][k] for r in repeats]
        m12, se12, sig12 = repeat_summary(el12, opts.confidence)
        m21, se21, sig21 = repeat_summary(el21, opts.confidence)
        msym, sesym, _ = repeat_summary(
            [(a + b) / 2 for a, b in zip(el12, el21, strict=True)], opts.confidence
        )
        manti, seanti, _ = repeat_summary(
            [(a - b) / 2 for a, b in zip(el12, el21, strict=True)], opts.confidence
        )
        p = predicted[k]
        pred12 = float(p["pred_el12"])
        rows.append(
            {
                "step": setup.step,
                "target": k,
                "domain_1": i,
                "domain_2": j,
                "dw": dw,
                "horizon": opts.steps,
                "lr": _sig12(setup.lr_mean),
                "dt": _sig12(float(p["dt"])),
                "metric": opts.metric,
                "repeats": len(repeats),
                "loss_ckpt": float(loss0[k]),
                "loss_base": float(np.mean([r["losses"]["base"][k] for r in repeats])),
                "obs_el12": m12,
                "obs_el12_se": se12,
                "obs_el12_significant": sig12,
                "obs_el21": m21,
                "obs_el21_se": se21,
                "obs_el21_significant": sig21,
                "obs_sym": msym,
                "obs_sym_se": sesym,
                "obs_antisym": manti,
                "obs_antisym_se": seanti,
                "obs_t_crit": obs_t_crit,
                "pred_el12": pred12,
                "pred_el12_se": float(p["pred_el12_se"]),
                "pred_t_crit": float(p["pred_t_crit"]),
                "pred_el21": -pred12,
                "pred_significant": bool(p["pred_significant"]),
                "pred_bracket": float(p["pred_bracket"]),
                "sign_agree_12": signs_agree(pred12, m12),
                "sign_agree_21": signs_agree(-pred12, m21),
                "ratio_obs_pred": m12 / pred12 if pred12 != 0.0 else math.nan,
                "ratio_antisym_pred": manti / pred12 if pred12 != 0.0 else math.nan,
                "regime_ratio": float(p["regime_ratio"]),
                "regime": str(p["regime"]),
                "in_regime": bool(p["in_regime"]),
            }
        )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ run


@dataclass
class ValidateResult:
    table: pd.DataFrame
    run: dict[str, Any]
    repeats: list[dict[str, Any]]
    out: Path


def _stderr_note(text: str) -> None:
    print(text, file=sys.stderr)


def run_validate(
    opts: ValidateOptions,
    *,
    note: Note = _stderr_note,
    on_step: Callable[[], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ValidateResult:
    """The whole ``validate`` job: resolve, train the branches (cached), predict, combine, write files.

    ``on_start(total_steps)`` is called once with the number of training steps still to run.
    """
    from commute_cli.commands.stats import quiet_libraries
    from commute_cli.io.store import check_writable as _check_writable

    t0 = time.perf_counter()
    quiet_libraries()
    setup = resolve_setup(opts, note)
    out = Path(opts.out)
    _check_writable(out)
    prepared = prepare_branches(setup, opts)
    dw = prepared.realized_dw
    if abs(dw - opts.dw) > 1e-9:
        note(
            f"note: with batch size {prepared.state.batch_size} and {opts.steps} steps the shift realized is "
            f"dw = {dw:.6g} (asked {opts.dw:g}); predicting for the realized one"
        )
    pending = pending_repeats(setup, opts, prepared)
    steps_left = pending * len(BRANCHES) * 2 * opts.steps
    per_step = time_one_step(prepared, setup.lrs[0]) if steps_left else 0.0
    predicting = prediction_seconds(opts, len(setup.names), per_step, prepared.state.batch_size)
    spent = time.perf_counter() - __started__  # start-up and set-up so far: part of the command's time
    note(cost_line(opts, prepared, pending, steps_left, per_step, setup.seq_len, spent, predicting))
    if on_start is not None:
        on_start(steps_left)
    try:
        repeats = observe(setup, opts, prepared, on_step=on_step)
    except KeyboardInterrupt:
        done = opts.repeats - pending_repeats(setup, opts, prepared)
        raise KeyboardInterrupt(
            f"interrupted: {done} of {opts.repeats} repeats finished and are cached in {out}/cache; "
            "run the same command again to resume (finished repeats are not trained again)"
        ) from None
    predicted, source = predict(setup, opts, dw, note)
    table = combine(setup, opts, repeats, predicted, prepared.loss_at_checkpoint, dw)
    run = {
        "command": "validate",
        "format": VALIDATE_FORMAT,
        "commute_version": __version__,
        "argv": sys.argv,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "checkpoint": str(setup.checkpoint),
        "step": setup.step,
        "domains": setup.train_sources,
        "eval_domains": setup.eval_sources,
        "eval_held_out": setup.eval_held_out,
        "eval_blocks": {n: int(b.shape[0]) for n, b in prepared.eval_blocks.items()},
        "pair": [setup.names[k] for k in setup.pair],
        "dw_asked": opts.dw,
        "dw_realized": dw,
        "batch_size": prepared.state.batch_size,
        "optimizer": type(prepared.state.optimizer).__name__
        + ("" if setup.has_optimizer_state else " (no saved state)"),
        "lr_source": setup.lr_source,
        "lr_mean": setup.lr_mean,
        "lr_first_last": [setup.lrs[0], setup.lrs[-1]],
        "stream_seeds": [r["seed"] for r in repeats],
        "schedules": {b: s.to_records() for b, s in prepared.schedules.items()},
        "prediction": source,
        "cache_key": prepared.key,
        "device": str(training.model_device(prepared.state.model)),
        "quick": opts.quick,
        "seconds_per_step": per_step or None,
        "elapsed_seconds": time.perf_counter() - t0,
    }
    payload = {"run": run, "rows": json.loads(table.to_json(orient="records")), "repeats": repeats}
    replaced = replaced_validation(out / "validate.json", run)
    if replaced:
        note(f"note: {out}/validate.csv held {replaced}; it now holds this one (plot draws the latest)")
    atomic.write_text(out / "validate.csv", table.to_csv(index=False))
    atomic.write_text(out / "validate.json", json.dumps(payload, indent=2, default=str) + "\n")
    return ValidateResult(table, run, list(repeats), out)


def _question(run: Mapping[str, Any]) -> str:
    o = run.get("options", {})
    return (
        f"{Path(str(run.get('checkpoint', '?'))).name}, pair {'/'.join(run.get('pair', []))}, "
        f"dw {run.get('dw_realized')}, horizon {o.get('steps')}, metric {o.get('metric')}"
    )


def replaced_validation(previous: Path, run: Mapping[str, Any]) -> str | None:
    """What an earlier ``validate.json`` in the same folder was about, when it asked another question
    (checkpoint, pair, dw, horizon or metric) than ``run``; None when there is none, or it asked the same."""
    try:
        old = json.loads(previous.read_text())["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if _question(old) == _question(run) else f"the validation of {_question(old)}"


__all__ = [
    "BRANCHES",
    "QUICK",
    "Setup",
    "ValidateOptions",
    "ValidateResult",
    "combine",
    "load_state",
    "observe",
    "parse_pair",
    "predict",
    "resolve_setup",
    "run_branches",
    "run_validate",
]
