"""The meaning and unit of every column commute writes (``commute help columns``).

One entry per column of ``results.csv``, ``losses.csv``, ``baselines.csv`` and ``decomposition.csv``
(``commute analyze``), ``validate.csv`` (``commute validate``), ``schedule.csv`` and the rows of
``commute recommend --format csv``. Columns
that a newer writer adds and this list lacks are reported by :func:`undocumented`, which a test runs on a
real analysis output, so the documentation cannot silently fall behind.

Words: a *sequence* is one row of ``seq_len`` tokens of a domain's data; a *sample block* is one of the
``--blocks`` independent groups of sequences over which every estimate is repeated (the spread over
sample blocks gives the standard errors); a *checkpoint* is one saved model.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Group, RenderableType
from rich.text import Text

__all__ = ["COLUMNS", "FILES", "columns_help", "undocumented"]

#: file -> what one row is
FILES: dict[str, str] = {
    "results.csv": "commute analyze: one row per checkpoint step x target x pair of domains (i, j)",
    "losses.csv": "commute analyze: one row per checkpoint step x domain",
    "baselines.csv": (
        "commute analyze: first-order signals beside the bracket, one row per checkpoint step x target x "
        "unordered pair of domains"
    ),
    "decomposition.csv": (
        "commute analyze --decompose: one row per checkpoint step x target x pair x parameter group; the "
        "groups' values of one (step, target, pair) add up to its bracket"
    ),
    "validate.csv": "commute validate: one row per target domain k of the validated checkpoint",
    "recommend (--format csv)": "commute recommend: one row per shift x target",
    "schedule.csv": (
        "commute recommend: the proposed schedule (what commute train --schedule reads), one row per step "
        "where the weights change"
    ),
}

#: file -> column -> (unit, meaning). Units: nat (natural-log loss), step (optimizer steps), 1 (a plain
#: number), "" for names and flags.
COLUMNS: dict[str, dict[str, tuple[str, str]]] = {
    "results.csv": {
        "run_id": ("", "the run this row belongs to (a hash of checkpoints, domains, schedule and metric)"),
        "step": ("step", "the checkpoint's global training step"),
        "target": (
            "",
            "the loss the prediction is about: a domain, 'mix' (the schedule's mixture at this "
            "step) or custom weights such as en=0.3,ru=0.7",
        ),
        "domain_i": (
            "",
            "the pair's first domain: it gets +dw for `horizon` steps before the checkpoint, "
            "then -dw for as many after",
        ),
        "domain_j": ("", "the pair's second domain: -dw before the checkpoint, +dw after"),
        "w_i": ("1", "domain i's weight in the schedule at this step"),
        "w_j": ("1", "domain j's weight in the schedule at this step"),
        "target_loss": ("nat", "the target's mean loss at the checkpoint on the analysis sample"),
        "bracket": (
            "nat / time^2",
            "the Lie-bracket term P = < D g_L, H_j D g_i - H_i D g_j > (D = identity "
            "for --metric euclid), mean over sample blocks; with two domains el_ij = dt^2 x dw x P",
        ),
        "bracket_se": ("as bracket", "standard error of `bracket` over sample blocks"),
        "el_ij": (
            "nat",
            "EL^ij: predicted change of the target's loss from the intervention (i +dw, j -dw "
            "for `horizon` steps, then the reverse; same data in total) against the schedule; < 0: "
            "moving i earlier and j later helps",
        ),
        "el_se": ("nat", "standard error of `el_ij` over sample blocks"),
        "t": ("1", "t statistic el_ij / el_se (Student t, n_blocks - 1 degrees of freedom)"),
        "t_crit": (
            "1",
            "two-sided critical t at --confidence; the table's and the plot's interval is "
            "el_ij ± t_crit x el_se",
        ),
        "significant": ("", "True when |t| > t_crit (the interval excludes 0)"),
        "dw": ("1", "the weight shift of the intervention (default: half the smaller weight)"),
        "horizon": ("step", "steps of each half of the intervention (before and after the checkpoint)"),
        "horizon_reason": (
            "",
            "why this horizon: the default (half the checkpoint spacing), --horizon, or "
            "shortened to stay inside the local regime",
        ),
        "lr": ("time / step", "the learning rate at the checkpoint (its source: run.json lr_source)"),
        "dt": ("time", "dt = lr x horizon: the training time of one half of the intervention"),
        "first_order": (
            "nat",
            "training's own first-order progress on the mixture over the window, 2 dt <gbar, D gbar>",
        ),
        "regime_ratio": (
            "1",
            "|el_ij| / first_order: the second-order prediction against first-order "
            "progress; above the regime limit the prediction is outside the local regime",
        ),
        "in_regime": (
            "",
            "True unless the regime is outside or saturated: 'uncertain' (the regime ratio's interval "
            "straddles the limit 0.25) counts as in; the regime column says which",
        ),
        "regime": (
            "",
            "inside / outside / uncertain: the local-regime check with its uncertainty; saturated: dt x "
            "curvature along the directions involved is above 1 (see saturation)",
        ),
        "saturation": (
            "1",
            "dt x the other domains' curvature along each domain's gradient (a Rayleigh quotient from the "
            "analysis' own products; pair plan only): above 1 those directions settle within the window",
        ),
        "samples_needed": (
            "1",
            "for a row that is not significant: about how many times --samples would flag an effect of the "
            "estimated size (the run's test at its --confidence, 80% power; conservative); the table's "
            "'earlier' column shows it rounded up to two significant digits ('~35x samples' for 34.08), "
            "and '>128x samples' above 128",
        ),
        "regime_ratio_lo": ("1", "lower end of the regime ratio's interval at --confidence"),
        "regime_ratio_hi": (
            "1",
            "upper end of the regime ratio's interval; 'inside' needs it below the limit, 'outside' needs "
            "the lower end above it",
        ),
        "min_effect": (
            "nat",
            "the smallest effect worth reporting here: --min-effect x first_order (at least 1e-6 nat); "
            "rows below it (significant, or with the whole interval below it) are 'negligible'",
        ),
        "verdict": (
            "",
            "suboptimal (significant, both weights > 0: the schedule can be improved here), "
            "negligible (below the "
            "smallest effect worth reporting), insufficient signal (not significant; 'n.s.' in "
            "the table); a pair with a zero weight at a checkpoint has no row there (no data can move)",
        ),
        "direction": ("", "for a significant row, which way to reorder, e.g. 'move en earlier, ru later'"),
        "n_blocks": ("1", "number of independent sample blocks behind every mean and SE"),
    },
    "losses.csv": {
        "step": ("step", "the checkpoint's global training step"),
        "domain": ("", "the domain"),
        "loss": ("nat", "mean next-token cross-entropy per token of the domain's analysis sample"),
        "loss_se": ("nat", "standard error of `loss` over sample blocks"),
    },
    "baselines.csv": {
        "step": ("step", "the checkpoint's global training step"),
        "target": ("", "the loss the alignments are about (as in results.csv)"),
        "pair": ("", "the unordered pair, 'i|j'"),
        "domain_i": ("", "the pair's first domain"),
        "domain_j": ("", "the pair's second domain"),
        "cosine": ("1", "cosine of the two domains' gradients, unbiased (independent of the target)"),
        "cosine_se": ("1", "standard error of `cosine` over sample blocks"),
        "align_i": (
            "nat / time",
            "< g_i, D g_L >: the target's first-order decrease rate under training on domain i alone",
        ),
        "align_i_se": ("nat / time", "standard error of `align_i` over sample blocks"),
        "align_j": ("nat / time", "< g_j, D g_L >, the same for domain j"),
        "align_j_se": ("nat / time", "standard error of `align_j` over sample blocks"),
        "align_diff": (
            "nat / time",
            "align_i - align_j: the first-order gain rate of moving weight from j to i",
        ),
        "align_diff_se": ("nat / time", "standard error of `align_diff` over sample blocks"),
        "align_diff_significant": ("", "align_diff significant at --confidence"),
        "first_order_favours": (
            "",
            "the domain the first-order alignment favours (i when align_diff > 0, j when < 0); empty when "
            "not significant",
        ),
        "el_ij": ("nat", "the bracket's prediction EL^ij for the same step, target and pair (results.csv)"),
        "el_significant": ("", "el_ij significant at --confidence"),
        "second_order_favours": (
            "",
            "the domain the bracket says to move earlier (i when el_ij < 0, j when > 0); empty when not "
            "significant",
        ),
        "orders": (
            "",
            "agree, disagree (both significant), second order only, first order only (one significant), "
            "or neither",
        ),
    },
    "decomposition.csv": {
        "step": ("step", "the checkpoint's global training step"),
        "target": ("", "the loss the bracket is about (as in results.csv)"),
        "pair": ("", "the unordered pair, 'i|j'"),
        "domain_i": ("", "the pair's first domain"),
        "domain_j": ("", "the pair's second domain"),
        "group": ("", "the parameter group (--decompose kind|layer|module|NAME=REGEX;...)"),
        "value": (
            "as bracket",
            "the group's part of the bracket (results.csv's `bracket`); a pair's groups add up to it",
        ),
        "se": ("as bracket", "standard error of `value` over sample blocks"),
        "t": ("1", "value / se"),
        "significant": ("", "value significant at --confidence (Student t, blocks - 1 degrees of freedom)"),
        "share": ("1", "value / the pair's total bracket (nan when the total is 0)"),
        "el": (
            "nat",
            "the group's part of the predicted change EL^ij (results.csv's `el_ij`, the EL of analyze's "
            "table); a pair's groups add up to it (nan for a pair without an intervention)",
        ),
        "el_se": ("nat", "standard error of `el` over sample blocks"),
        "el_significant": ("", "el significant at --confidence (Student t, blocks - 1 degrees of freedom)"),
    },
    "validate.csv": {
        "step": ("step", "the validated checkpoint's step"),
        "target": ("", "the domain k whose loss is measured"),
        "domain_1": ("", "the pair's first domain: '12' raises it first"),
        "domain_2": ("", "the pair's second domain: '21' raises it first"),
        "dw": ("1", "the realized weight shift of the branches"),
        "horizon": ("step", "steps of each half of a branch"),
        "lr": ("time / step", "mean learning rate over the branches (12 significant digits)"),
        "dt": ("time", "lr x horizon (12 significant digits)"),
        "metric": ("", "the prediction's metric (euclid or adam)"),
        "repeats": ("1", "stream seeds the observed values are averaged over"),
        "loss_ckpt": ("nat", "L_k at the checkpoint (held-out sequences)"),
        "loss_base": ("nat", "L_k after the base branch (the schedule for 2 x horizon steps)"),
        "obs_el12": ("nat", "observed L_k('12') - L_k(base), mean over repeats"),
        "obs_el12_se": ("nat", "standard error of obs_el12 over repeats (empty with one repeat)"),
        "obs_el12_significant": ("", "obs_el12 significant at --confidence"),
        "obs_el21": ("nat", "observed L_k('21') - L_k(base), mean over repeats"),
        "obs_el21_se": ("nat", "standard error of obs_el21 over repeats"),
        "obs_el21_significant": ("", "obs_el21 significant at --confidence"),
        "obs_sym": ("nat", "(obs_el12 + obs_el21) / 2: the observed part the second-order theory says is 0"),
        "obs_sym_se": ("nat", "standard error of obs_sym"),
        "obs_antisym": (
            "nat",
            "(obs_el12 - obs_el21) / 2: the observed part that is odd in dw, the part the bracket predicts",
        ),
        "obs_antisym_se": ("nat", "standard error of obs_antisym (empty with one repeat)"),
        "obs_t_crit": (
            "1",
            "Student-t quantile of the observed intervals at --confidence (repeats - 1 degrees of freedom; "
            "empty with one repeat): the table's ± is obs_t_crit x SE",
        ),
        "pred_el12": ("nat", "predicted EL_k^12 at the checkpoint (the criterion)"),
        "pred_el12_se": ("nat", "standard error of pred_el12 over sample blocks"),
        "pred_t_crit": (
            "1",
            "Student-t quantile of the prediction's interval at --confidence (blocks - 1 degrees of freedom, "
            "as results.csv's t_crit): the table's ± is pred_t_crit x pred_el12_se",
        ),
        "pred_el21": ("nat", "predicted EL_k^21 = -pred_el12"),
        "pred_significant": ("", "the prediction is significant at --confidence"),
        "pred_bracket": ("as bracket", "the bracket term behind the prediction"),
        "sign_agree_12": ("", "prediction and observation of '12' agree in sign (empty: a zero)"),
        "sign_agree_21": ("", "the same for '21'"),
        "ratio_obs_pred": ("1", "obs_el12 / pred_el12 (the '12' direction alone)"),
        "ratio_antisym_pred": (
            "1",
            "obs_antisym / pred_el12: the observed antisymmetric part over the prediction (the table's "
            "'obs/pred (antisym.)')",
        ),
        "regime_ratio": ("1", "the prediction's regime ratio (see results.csv)"),
        "regime": ("", "inside, uncertain, outside or saturated, as in results.csv"),
        "in_regime": ("", "True unless the regime is outside or saturated (as in results.csv)"),
    },
    "recommend (--format csv)": {
        "step": ("step", "the checkpoint the shift is centred on"),
        "start": ("step", "first step of the raised half"),
        "end": ("step", "first step after the lowered half"),
        "earlier": ("", "the domain moved earlier (raised on [start, step), lowered on [step, end))"),
        "later": ("", "the domain moved later"),
        "shift": ("1", "the weight moved between the two domains"),
        "w_<domain>_before": ("1", "the domain's weight on [start, step) in the new schedule"),
        "w_<domain>_after": ("1", "the domain's weight on [step, end) in the new schedule"),
        "target": ("", "the loss the effect is about"),
        "predicted_change": ("nat", "predicted change of the target's loss at the end of the window"),
        "predicted_se": ("nat", "its standard error"),
        "in_regime": ("", "the scaled prediction is inside the local regime"),
        "significant": ("", "the analysed effect was significant"),
        "chosen_target": ("", "True for the --target the shifts were chosen for"),
    },
    "schedule.csv": {
        "step": ("step", "first step at which the row's weights apply (until the next row's step)"),
        "<domain>": ("1", "one column per domain: its weight in the mixture from this step on"),
    },
}


def undocumented(file: str, columns: Iterable[str]) -> list[str]:
    """Columns of ``file`` that :data:`COLUMNS` does not describe (``w_<domain>_...`` patterns count)."""
    known = COLUMNS.get(file, {})
    missing = []
    for col in columns:
        if col in known:
            continue
        pattern = f"w_<domain>_{col.rsplit('_', 1)[-1]}"
        if col.startswith("w_") and pattern in known:
            continue
        if "<domain>" in known:  # schedule.csv: every other column is a domain's weight
            continue
        missing.append(col)
    return missing


def columns_help(files: Iterable[str] | None = None) -> Group:
    """The ``commute help columns`` text: per file, what a row is, then each column's unit and meaning."""
    parts: list[RenderableType] = []
    for file in files if files is not None else COLUMNS:
        parts.append(Text(f"{file}: {FILES.get(file, '')}", style="bold"))
        for col, (unit, meaning) in COLUMNS[file].items():
            line = Text(f"  {col}", style="cyan")
            line.append(f" [{unit}]" if unit else "")
            line.append(f": {meaning}")
            parts.append(line)
        parts.append(Text(""))
    parts.append(
        Text(
            "Units: nat = natural-log cross-entropy per token (1 mnat = 0.001 nat); step = optimizer steps; "
            "time = learning rate x steps (the paper's dt); 1 = a plain number. A sequence is one row of "
            "seq_len tokens; a sample block is one of the --blocks independent groups of sequences that "
            "give the SEs."
        )
    )
    return Group(*parts)
