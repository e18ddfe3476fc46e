"""Heatmaps of ``commute analyze`` outputs: the criterion between every pair of domains, and its parts.

- :func:`plot_pair_heatmap`: for each checkpoint (columns) and target (rows), a domains x domains matrix of
  the predicted change ``EL^{ij}`` (nats; ``results.csv``) of "``i`` earlier, ``j`` later"; antisymmetric
  (``EL^{ji} = -EL^{ij}``), blank diagonal. Most useful for K > 2 domains.
- :func:`plot_decomposition_heatmap`: parameter groups (rows) x checkpoints (columns) of one (target, pair)'s
  predicted change ``EL^{ij}`` split by group (``decomposition.csv``'s ``el``, ``commute analyze
  --decompose``), in the unit of analyze's table; a column's total is its ``el_ij``.
- :func:`plot_orders`: the first-order signal (``baselines.csv``) beside the bracket's prediction over steps,
  both as changes of the target in nats with one sign convention.

Heatmaps: a diverging colour scale centred at 0 (blue: the reordering lowers the target / negative part; red:
raises it), symmetric limits; cells whose value is not significant at the analysis's confidence are drawn
pale and without a mark; significant cells carry ``*`` and their value. Reads data frames only (no autograd).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from commute_cli.render.style import si_scale
from commute_cli.render.tables import table_confidence

MUTED_ALPHA = 0.35


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _cells(ax, values: np.ndarray, significant: np.ndarray, vmax: float, fmt: str = "{:.2g}") -> object:
    """Draw ``values`` with significant cells at full colour (value and ``*``), others pale and unlabelled."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    cmap = colormaps["RdBu_r"]
    norm = Normalize(-vmax, vmax)
    rgba = cmap(norm(np.nan_to_num(values)))
    rgba[..., 3] = np.where(significant, 1.0, MUTED_ALPHA)
    rgba[~np.isfinite(values)] = (1.0, 1.0, 1.0, 0.0)
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v) and significant[r, c]:
            dark = abs(norm(v) - 0.5) > 0.3
            ax.text(c, r, fmt.format(v) + "*", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")  # fmt: skip
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=norm, cmap=cmap)


def pair_matrices(
    results: pd.DataFrame, target: str, step: int, names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """``[K, K]`` ``EL^{ij}`` (antisymmetric, NaN diagonal) and significance for one target and checkpoint."""
    K = len(names)
    values = np.full((K, K), np.nan)
    sig = np.zeros((K, K), dtype=bool)
    rows = results[(results["target"] == target) & (results["step"] == step)]
    index = {n: k for k, n in enumerate(names)}
    for _, r in rows.iterrows():
        i, j = index[r["domain_i"]], index[r["domain_j"]]
        values[i, j], values[j, i] = r["el_ij"], -r["el_ij"]
        sig[i, j] = sig[j, i] = bool(r["significant"])
    return values, sig


def _domain_names(results: pd.DataFrame) -> list[str]:
    names: list[str] = []
    for col in ("domain_i", "domain_j"):
        for n in results[col]:
            if n not in names:
                names.append(n)
    return names


def plot_pair_heatmap(results: pd.DataFrame, path: Path | str, targets: list[str] | None = None) -> Path:
    """Domains x domains heatmaps of ``EL^{ij}`` (rows: targets; columns: checkpoints) to a PNG.

    Cell (i, j) is the predicted change of the target (nats) when domain ``i`` (row) is moved earlier and
    ``j`` (column) later; blue = that reordering helps. One colour scale per target (centred at 0).
    """
    plt = _pyplot()
    names = _domain_names(results)
    targets = targets or list(dict.fromkeys(results["target"]))
    steps = sorted(results["step"].unique())
    fig, axes = plt.subplots(
        len(targets), len(steps), squeeze=False, constrained_layout=True,
        figsize=(1.6 + 0.75 * len(names) * len(steps), 1.0 + 0.7 * len(names) * len(targets)),
    )  # fmt: skip
    for r, target in enumerate(targets):
        mats = [pair_matrices(results, target, s, names) for s in steps]
        vmax = _limit(np.stack([m[0] for m in mats]))
        mappable = None
        for c, (step, (values, sig)) in enumerate(zip(steps, mats, strict=True)):
            ax = axes[r, c]
            mappable = _cells(ax, values, sig, vmax, fmt="{:.1e}" if vmax < 0.01 else "{:.2g}")
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
            ax.set_yticks(range(len(names)), names if c == 0 else [], fontsize=7)
            ax.set_title(f"step {step}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"target {target}\ni earlier (row)", fontsize=8)
        fig.colorbar(mappable, ax=axes[r, :].tolist(), shrink=0.8, label="EL^ij (nats)")
    fig.suptitle("Predicted change of each target if row domain goes earlier, column domain later\n"
                 "(* and value: significant; pale: within noise)", fontsize=9)  # fmt: skip
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def decomposition_figure(decomposition: pd.DataFrame, target: str, pair: str | None = None):
    """Groups x checkpoints heatmap of one (target, pair)'s predicted change ``EL^{ij}`` split by parameter
    group (``decomposition.csv``'s ``el``: the unit of analyze's table, nats with one SI prefix), returned.

    A column's cells add up to its total, written under its step: results.csv's ``el_ij`` for that row
    (the EL column of analyze's table). ``pair`` defaults to the first pair in the file. A
    ``decomposition.csv`` written before the ``el`` column existed is refused (rerun analyze).
    """
    plt = _pyplot()
    d = decomposition[decomposition["target"] == target]
    if d.empty:
        raise ValueError(f"no decomposition rows for target {target!r}")
    if "el" not in d:
        raise ValueError("decomposition.csv has no el column (written by an older commute)")
    pair = pair or str(d["pair"].iloc[0])
    d = d[d["pair"] == pair]
    groups = list(dict.fromkeys(d["group"]))
    steps = sorted(d["step"].unique())
    values = d.pivot(index="group", columns="step", values="el").loc[groups, steps].to_numpy(float)
    sig = d.pivot(index="group", columns="step", values="el_significant").loc[groups, steps]
    sig = sig.fillna(False).to_numpy(bool)
    totals = values.sum(axis=0)
    factor, prefix, _ = si_scale([*values.ravel(), *totals])
    values, totals = values / factor, totals / factor
    fig, ax = plt.subplots(
        figsize=(2.0 + 0.9 * len(steps), max(3.0, 1.2 + 0.32 * len(groups))), constrained_layout=True
    )
    mappable = _cells(ax, values, sig, _limit(values))
    ax.set_xticks(range(len(steps)), [f"{s}\n(total {t:.3g})" for s, t in zip(steps, totals, strict=True)],
                  fontsize=7)  # fmt: skip
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    ax.set_xlabel("checkpoint step (total: the EL of analyze's table)", fontsize=8)
    i, j = pair.split("|", 1) if "|" in pair else (pair, "")
    fig.colorbar(mappable, ax=ax, shrink=0.8, label=f"group's part of EL^ij ({prefix}nat)")
    ax.set_title(
        f"Predicted change EL^ij of L_{target} from moving {i} earlier, {j} later, by parameter group "
        f"({prefix}nat)\n(* and value: significant; pale: within noise)",
        fontsize=8,
    )
    return fig


def plot_decomposition_heatmap(
    decomposition: pd.DataFrame, path: Path | str, target: str, pair: str | None = None
) -> Path:
    """:func:`decomposition_figure` to a PNG."""
    plt = _pyplot()
    fig = decomposition_figure(decomposition, target, pair)
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def first_order_change(baselines: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """baselines.csv's rows with the first-order signal as a change of the target in nats, for the
    intervention of results.csv's row of the same (step, target, pair): ``first = -dt dw (a_i - a_j)``, the
    target's first-order change over the intervention's first half alone (``+dw`` on ``i``, ``-dw`` on
    ``j``), with its half-width ``first_half = t_crit x dt dw x align_diff_se``. Below 0, like ``EL^{ij}``:
    the signal favours moving ``i`` earlier. (Over the whole intervention the first-order terms cancel:
    ``EL^{ij}`` is what is left.)"""
    keys = ["step", "target", "domain_i", "domain_j"]
    cols = [*keys, "dt", "dw", "t_crit"]
    merged = baselines.drop(columns=[c for c in ("dt", "dw", "t_crit") if c in baselines]).merge(
        results[cols], on=keys, how="inner"
    )
    scale = merged["dt"].astype(float) * merged["dw"].astype(float)
    merged["first"] = -scale * merged["align_diff"].astype(float)
    merged["first_half"] = merged["t_crit"].astype(float) * scale * merged["align_diff_se"].astype(float)
    return merged


def plot_orders(
    results: pd.DataFrame, baselines: pd.DataFrame, path: Path | str, pair: str | None = None
) -> Path:
    """:func:`orders_figure` to a PNG."""
    plt = _pyplot()
    fig = orders_figure(results, baselines, pair)
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def orders_figure(results: pd.DataFrame, baselines: pd.DataFrame, pair: str | None = None):
    """First-order signal beside the bracket over steps, per target (columns), for one pair, returned.

    Both rows are changes of the target in nats with one SI prefix for the whole figure, with their
    confidence intervals (``t_crit x SE``, the table's), and one sign: below zero, moving ``i`` earlier
    helps. Top row: ``EL^{ij}`` (results.csv, the table's EL). Bottom row: the first-order change over the
    intervention's first half (:func:`first_order_change`), what a greedy first-order rule goes by. Where
    both are significant and they favour different domains the step is marked "disagree" (baselines.csv
    ``orders``), in red, explained under the figure.
    """
    plt = _pyplot()
    pair = pair or str(baselines["pair"].iloc[0])
    i, j = pair.split("|", 1)
    res = results[(results["domain_i"] == i) & (results["domain_j"] == j)]
    base = first_order_change(baselines[baselines["pair"] == pair], res)
    targets = list(dict.fromkeys(res["target"]))
    top_half = res["t_crit"].astype(float) * res["el_se"].astype(float)
    factor, prefix, _ = si_scale([*res["el_ij"], *top_half, *base["first"], *base["first_half"]])
    unit = f"{prefix}nat"
    conf_pct = f"{100 * table_confidence(res):.3g}%"
    fig, axes = plt.subplots(
        2, len(targets), figsize=(1.0 + 3.0 * len(targets), 5.0), squeeze=False, sharex=True,
        constrained_layout=True,
    )  # fmt: skip
    for c, target in enumerate(targets):
        r = res[res["target"] == target].sort_values("step")
        b = base[base["target"] == target].sort_values("step")
        top, bottom = axes[0, c], axes[1, c]
        top.errorbar(r["step"], r["el_ij"] / factor, yerr=r["t_crit"] * r["el_se"] / factor, fmt="o-",
                     color="C0", capsize=3)  # fmt: skip
        bottom.errorbar(b["step"], b["first"] / factor, yerr=b["first_half"] / factor, fmt="s-", color="C1",
                        capsize=3)  # fmt: skip
        for ax in (top, bottom):
            ax.axhline(0.0, color="grey", lw=0.8)
            ax.tick_params(labelsize=7)
        for _, row in b[b["orders"] == "disagree"].iterrows():
            top.annotate("disagree", (row["step"], 0.0), fontsize=7, color="C3", ha="center",
                         xytext=(0, 8), textcoords="offset points")  # fmt: skip
        top.set_title(f"target {target}", fontsize=9)
        bottom.set_xlabel("checkpoint step", fontsize=8)
        if c == 0:
            top.set_ylabel(f"second order: EL^ij ({unit})\n< 0: {i} earlier helps", fontsize=8)
            bottom.set_ylabel(f"first order, first half ({unit})\n< 0: {i} earlier helps", fontsize=8)
    fig.suptitle(f"Second order (the table's EL^ij, top) against first order (bottom), {i} vs {j}; both: "
                 f"change of the target in {unit}, below 0 moving {i} earlier helps", fontsize=9)  # fmt: skip
    fig.supxlabel(
        f"Bars: {conf_pct} intervals. Bottom: -dt dw <g_{i} - g_{j}, D g_L>, the target's first-order change "
        f"while {i} has +dw and {j} -dw (the first half of the table's intervention; over both halves it "
        "cancels).\nRed 'disagree': both rows significant and they favour different domains (baselines.csv's "
        "orders column).",
        fontsize=7,
    )
    return fig
