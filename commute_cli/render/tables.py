"""Tables: the human layouts of every command's results (rich tables), built on
:mod:`commute_cli.render.formats`.

Commands compute a DataFrame and hand it here; nothing in this module does math or reads inputs.
:func:`analysis_tables` (``commute analyze``, sized for 80-120 column terminals), :func:`table1`
(``commute toy``); recommend's and validate's reports are ``render.recommend_table`` and
``render.validate_table``. Numbers and verdict words come from
:mod:`commute_cli.render.style`; the meaning and unit of every output column from
:mod:`commute_cli.render.columns`. The generic helpers are re-exported here, so a command needs one
import for its output.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.text import Text

from commute_cli.core.power import MAX_ADVICE_FACTOR, shown_factor
from commute_cli.render.formats import (
    OutputFormat,
    emit,
    emit_dataframe,
    format_interval,
    format_number,
    make_table,
    open_output,
    print_renderable,
    with_caption,
)
from commute_cli.render.style import (
    confidence_of,
    format_interval_scaled,
    format_sig,
    si_scale,
    verdict_style,
)

__all__ = [
    "OutputFormat",
    "analysis_tables",
    "emit",
    "emit_dataframe",
    "format_interval",
    "format_number",
    "interval_half_widths",
    "make_table",
    "open_output",
    "print_renderable",
    "run_summary",
    "table1",
    "with_caption",
]


# --------------------------------------------------------------------------------------------------
# command-specific layouts


def table1(df: pd.DataFrame, title: str | None = None, caption: str | None = None, digits: int = 4) -> Group:
    """The paper's Table 1 layout for :func:`commute_cli.commands.toy.run_table1`: rows t, columns dt, and a
    one-line caption below saying what the ratio is.

    Each cell is ``median [p10, p90]`` of the ratio observed / predicted excess loss.
    """
    missing = {"t", "dt", "median", "p10", "p90", "n"} - set(df.columns)
    if missing:
        raise ValueError(f"table1 needs columns t, dt, median, p10, p90, n; missing {sorted(missing)}")
    ts = sorted(df["t"].unique())
    dts = sorted(df["dt"].unique())
    by_key = {(float(r.t), float(r.dt)): r for r in df.itertuples(index=False)}
    rows = []
    for t in ts:
        cells: list[str] = [f"{t:g}"]
        for dt in dts:
            r = by_key.get((float(t), float(dt)))
            cells.append("" if r is None else format_interval(r.median, r.p10, r.p90, digits))
        rows.append(cells)
    n = int(df["n"].max()) if len(df) else 0
    if title is None:
        title = "Table 1: observed vs. predicted excess loss, quadratic domains"
    if caption is None:
        caption = (
            f"cell: median [p10, p90] over {n} samples of ratio = [L(theta_12) - L(theta_base)] / "
            f"[(1/2) dt^2 P(L1, L2; L)], L = (L1 + L2)/2; exact flows; -> 1 as dt -> 0"
        )
    return with_caption(make_table(title, ["t \\ dt", *[f"{dt:g}" for dt in dts]], rows), caption)


# --------------------------------------------------------------------------------------------------
# analyze

_SUPERSCRIPTS = "¹²³⁴⁵⁶⁷⁸⁹"


def _relative(path: str, base: str | None) -> str:
    """``path`` relative to ``base`` when it lies inside it (the run folder), else as given."""
    if base:
        with contextlib.suppress(ValueError):
            return str(Path(path).relative_to(base))
    return str(path)


def schedule_words(schedule: Any) -> str:
    """``run.json``'s schedule (``[{"step", "weights"}]``) in words: ``en 0.8, ru 0.2 (constant)``."""
    if not isinstance(schedule, list) or not schedule:
        return ""
    first = schedule[0].get("weights", {}) if isinstance(schedule[0], dict) else {}
    words = ", ".join(f"{n} {float(w):g}" for n, w in first.items())
    if len(schedule) == 1:
        return f"{words} (constant)"
    return f"piecewise ({len(schedule)} pieces), starting at {words}"


def run_summary(run: Mapping[str, Any], results: pd.DataFrame | None = None) -> str:
    """One paragraph saying what was analysed: checkpoints, schedule, data (and whether it is the
    manifest's held-out validation split), sample size. Reads only ``run.json``'s fields; missing fields
    are left out."""
    opts = run.get("options", {}) or {}
    parts = []
    ckpts = run.get("checkpoints") or []
    where = opts.get("ckpt_dir")
    steps = sorted({int(c["step"]) for c in ckpts if c.get("step") is not None})
    if ckpts:
        span = (
            f" (steps {steps[0]}-{steps[-1]})" if len(steps) > 1 else (f" (step {steps[0]})" if steps else "")
        )
        parts.append(f"{len(ckpts)} checkpoint{'s' if len(ckpts) != 1 else ''} of {where}{span}")
    elif where:
        parts.append(f"checkpoints of {where}")
    sched = schedule_words(run.get("schedule"))
    if sched:
        parts.append(f"schedule {sched}")
    doms = run.get("domains") or {}
    if doms:
        base = run.get("data_base_dir")
        data = ", ".join(f"{n} = {_relative(str(s), base)}" for n, s in doms.items())
        split = run.get("data_split")
        if split == "validation":
            data += " (the manifest's held-out validation split)"
        elif split == "train":
            data += " (the run's training data, not held out)"
        parts.append(f"data {data}")
    n_seq = run.get("samples_per_domain")
    n_blocks = opts.get("blocks")
    if n_blocks is None and results is not None and "n_blocks" in results:
        n_blocks = int(results["n_blocks"].iloc[0])
    if n_seq:
        seq = f"{n_seq} sequences per domain"
        if run.get("seq_len"):
            seq += f" of {run['seq_len']} tokens"
        if n_blocks:
            seq += f" in {n_blocks} sample blocks"
        parts.append(seq)
    if opts.get("metric") and opts.get("metric") != "euclid":
        parts.append(f"metric {opts['metric']}")
    return "analysed " + "; ".join(parts) + "." if parts else ""


def interval_half_widths(df: pd.DataFrame, value: str = "el_se") -> pd.Series:
    """The confidence-interval half-width of every row: ``t_crit x SE`` (the verdict's own test)."""
    if "t_crit" in df:
        return df["t_crit"].astype(float) * df[value].astype(float)
    from scipy import stats

    n = df["n_blocks"].astype(int) if "n_blocks" in df else pd.Series(8, index=df.index)
    return pd.Series(stats.t.ppf(0.975, n - 1), index=df.index) * df[value].astype(float)


def table_confidence(results: pd.DataFrame) -> float:
    """The confidence level of the intervals and of the verdicts' test (0.95 when the table lacks
    ``t_crit``/``n_blocks``)."""
    if "t_crit" in results and "n_blocks" in results and len(results):
        return round(confidence_of(float(results["t_crit"].iloc[0]), int(results["n_blocks"].iloc[0])), 4)
    return 0.95


def samples_advice(row: Any) -> str:
    """For a row that is not significant: ``"~35x samples"`` from its ``samples_needed`` (results.csv,
    34.08 there), rounded up to two significant digits (``core.power.shown_factor``), ``">128x samples"``
    beyond that; ``""`` when absent or not needed."""
    value = getattr(row, "samples_needed", None)
    try:
        factor = float(value)  # type: ignore[arg-type]  # None or text: the except below
    except (TypeError, ValueError):
        return ""
    shown = shown_factor(factor)
    if shown is None:
        return ""
    return f">{MAX_ADVICE_FACTOR:g}x samples" if factor > MAX_ADVICE_FACTOR else f"~{shown:g}x samples"


def regime_labels(df: pd.DataFrame) -> pd.Series | None:
    """Per row "inside" / "outside" / another label of the local-regime check (column ``regime`` when
    present, else from ``in_regime``), or None when the table has neither."""
    if "regime" in df and not (
        pd.api.types.is_bool_dtype(df["regime"]) or pd.api.types.is_numeric_dtype(df["regime"])
    ):
        return df["regime"].fillna("").astype(str)
    if "in_regime" in df:
        return df["in_regime"].map(lambda v: "inside" if _truthy(v) else "outside")
    return None


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in {"true", "1", "yes", "inside"}
    return bool(v) and not (isinstance(v, float) and math.isnan(v))


def earlier_domain(row: Any) -> str:
    """The domain to move earlier for a row whose verdict is actionable: ``EL^{ij} < 0`` -> ``i``,
    ``> 0`` -> ``j`` (MATH.md sign)."""
    el = float(row.el_ij)
    if el < 0:
        return str(row.domain_i)
    if el > 0:
        return str(row.domain_j)
    return ""


def analysis_tables(
    results: pd.DataFrame,
    losses: pd.DataFrame | None = None,
    run: Mapping[str, Any] | None = None,
    out: Path | str | None = None,
) -> Group:
    """``commute analyze``'s table: one per target, sized for 80-120 column terminals.

    Columns (each shown only when the data has it): ``step``; the target's loss ``L_target`` (nats,
    column ``target_loss``, else ``losses.csv`` for a domain target); ``pair`` (only with 3+ domains);
    ``horizon`` (steps each way, with a footnote when ``horizon_reason`` explains it); ``EL (95%)``, the
    predicted change of the target ``EL^{ij}`` with its confidence interval ``± t_crit x SE`` in SI-prefixed
    nats; ``verdict`` (a short word, :data:`~commute_cli.render.style.VERDICTS`); ``earlier``, the domain
    to move earlier when the verdict is actionable; ``regime`` only when a row is not inside the local
    regime. A summary line (``run``) above and a legend below; every other column stays in results.csv.
    """
    parts: list[RenderableType] = []
    if run:
        summary = run_summary(run, results)
        if summary:
            parts.append(Text(summary))
    if results.empty:
        parts.append(Text("no results"))
        return Group(*parts)
    conf = table_confidence(results)
    conf_pct = f"{100 * conf:.3g}%"
    pairs = list(dict.fromkeys(zip(results["domain_i"], results["domain_j"], strict=True)))
    single = len(pairs) == 1
    dws = sorted(set(float(x) for x in results["dw"])) if "dw" in results else []
    loss_at: dict[tuple[Any, str], float] = {}
    if losses is not None and not losses.empty:
        loss_at = {(r.step, str(r.domain)): float(r.loss) for r in losses.itertuples(index=False)}
    regimes = regime_labels(results)
    show_regime = regimes is not None and bool((regimes != "inside").any())
    reasons: dict[str, str] = {}
    if "horizon_reason" in results:
        for reason in results["horizon_reason"].dropna().astype(str):
            if reason and reason not in reasons and len(reasons) < len(_SUPERSCRIPTS):
                reasons[reason] = _SUPERSCRIPTS[len(reasons)]
    half = interval_half_widths(results)
    seen: set[str] = set()
    built: list[tuple[str, list[str], list[list[Any]]]] = []
    for target, df in results.groupby("target", sort=False):
        target = str(target)
        cols = ["step", "L (nat)"]
        if not single:
            cols.append("pair")
        if len(dws) > 1:
            cols.append("dw")
        cols += ["horizon", f"EL ({conf_pct})", "verdict", "earlier"]
        if show_regime:
            cols.append("regime")
        rows = []
        # one SI prefix for the whole EL column of this target (no µnat row under mnat rows)
        factor, prefix, _ = si_scale([*df["el_ij"], *half.loc[df.index]])
        for idx, r in zip(df.index, df.itertuples(index=False), strict=True):
            style = verdict_style(r.verdict)
            seen.add(str(r.verdict))
            tl = getattr(r, "target_loss", None)
            if tl is None or (isinstance(tl, float) and math.isnan(tl)):
                tl = loss_at.get((r.step, target))
            cells: list[Any] = [str(r.step), "" if tl is None else format_sig(tl, 4)]
            if not single:
                cells.append(f"{r.domain_i}↔{r.domain_j}")
            if len(dws) > 1:
                cells.append(f"{float(r.dw):g}")
            horizon = f"{int(r.horizon)}"
            reason = getattr(r, "horizon_reason", None)
            if isinstance(reason, str) and reason in reasons:
                horizon += reasons[reason]
            cells.append(horizon)
            cells.append(format_interval_scaled(r.el_ij, half.loc[idx], factor, prefix))
            cells.append(Text(style.word, style=style.style))
            cells.append(earlier_domain(r) if style.actionable else samples_advice(r))
            if show_regime and regimes is not None:
                label = regimes.loc[idx]
                cells.append(Text(label, style="" if label == "inside" else "red"))
            rows.append(cells)
        if single:
            i, j = pairs[0]
            title = f"target: {target}, predicted change of L_{target} from reordering {i}↔{j}"
        else:
            title = f"target: {target}, predicted change of L_{target} from reordering each pair i↔j"
        if len(dws) == 1:
            title += f" (dw = {dws[0]:g})"
        built.append((title, cols, rows))
    justify = ["right", "right"] + (["left"] if not single else [])
    justify += (["right"] if len(dws) > 1 else []) + ["right", "right", "left", "left"]
    justify += ["left"] if show_regime else []
    # one width per column across the targets' tables, so they line up
    widths = [
        max(cell_len(str(c)) for _, cols, rows in built for c in [cols[k], *(row[k] for row in rows)])
        for k in range(len(built[0][1]))
    ]
    for title, cols, rows in built:
        # the title as its own line, wrapped to the terminal rather than to the table's width
        parts.append(Text(title, style="bold"))
        parts.append(make_table(None, cols, rows, justify=justify, compact=True, min_widths=widths))
    legend = analysis_legend(results, seen, conf_pct, reasons, show_regime, out, pairs[0] if single else None)
    parts.append(Text(legend, style="dim"))
    return Group(*parts)


def analysis_legend(
    results: pd.DataFrame,
    verdicts: set[str],
    conf_pct: str,
    reasons: Mapping[str, str],
    show_regime: bool,
    out: Path | str | None,
    pair: tuple[str, str] | None = None,
) -> str:
    """The text under the analysis tables: what EL and the interval are, the verdicts present, the
    footnotes, and where the details are. ``pair``: the only pair of domains, named in the text."""
    n_blocks = int(results["n_blocks"].iloc[0]) if "n_blocks" in results else None
    blocks = f"over {n_blocks} independent sample blocks " if n_blocks else ""
    i, j = pair if pair is not None else ("domain i", "domain j")
    lines = [
        f"L: the target's mean loss at the checkpoint. EL: predicted change of the target's loss if "
        f"{i} gets +dw and {j} -dw for `horizon` steps before the checkpoint, then the reverse for as "
        f"many steps after (the same data in total), against the schedule; EL < 0: moving {i} earlier "
        "helps ('earlier' names the domain to move).",
        f"±: {conf_pct} confidence interval {blocks}(Student t: the verdict's test). "
        "Units: 1 mnat = 0.001 nat, 1 µnat = 1e-6 nat, 1 nnat = 1e-9 nat.",
    ]
    order = sorted(verdicts, key=lambda v: -verdict_style(v).rank)
    lines += [f"{verdict_style(v).word}: {verdict_style(v).legend}." for v in order]
    for reason, mark in reasons.items():
        lines.append(f"{mark} horizon: {reason}")
    if show_regime:
        lines.append(
            "regime outside: the second-order prediction is not small against training's first-order "
            "progress over the window, so its nats are unreliable; its sign is a weaker hint. uncertain: the "
            "interval of that ratio straddles the limit. saturated: dt x curvature along the directions "
            "involved is above 1, so they settle within the window and the size is not to be trusted."
        )
    if "samples_needed" in results and (pd.to_numeric(results["samples_needed"], errors="coerce") > 1).any():
        lines.append(
            "~Nx samples (n.s. rows): about N times --samples would flag an effect of the estimated size "
            "(the same test, 80% power); N is samples_needed rounded up to two significant digits."
        )
    where = f"{out}/results.csv" if out is not None else "results.csv"
    lines.append(
        f"Every number with its SE, t, bracket and regime ratio: {where} (columns: commute help columns)."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# recommend
