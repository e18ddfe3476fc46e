"""What every rendering shares: the number formats (with units) and the verdict vocabulary.

One place decides how a number of nats is written and what a verdict is called, so the table, the
figure and the recommend report cannot drift apart. Pure Python (no rich, no matplotlib).

Numbers are written in SI style: a mantissa in ``[1, 1000)`` with a fixed number of significant
digits and a metric prefix on the unit (``-18.2 mnat``, ``412 µnat``, ``4.437 nat``). Every cell of a
column therefore has the same form, no cell loses its exponent, and no column mixes fixed-point and
scientific notation. ``1 mnat = 1e-3 nat``; a nat is the unit of a natural-log cross-entropy loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "VERDICTS",
    "VerdictStyle",
    "confidence_of",
    "format_interval_scaled",
    "format_si",
    "format_si_interval",
    "format_sig",
    "format_sig_fixed",
    "interval_half_width",
    "si_prefix",
    "si_scale",
    "verdict_style",
]

#: metric prefixes from pico to giga: (factor, prefix)
_PREFIXES: tuple[tuple[float, str], ...] = (
    (1e-12, "p"),
    (1e-9, "n"),
    (1e-6, "µ"),
    (1e-3, "m"),
    (1.0, ""),
    (1e3, "k"),
    (1e6, "M"),
    (1e9, "G"),
)


def si_prefix(x: float) -> tuple[float, str]:
    """``(factor, prefix)`` such that ``|x| / factor`` lies in ``[1, 1000)`` (clamped to pico..giga).

    Zero and non-finite values get ``(1.0, "")``.
    """
    ax = abs(float(x))
    if ax == 0.0 or not math.isfinite(ax):
        return 1.0, ""
    chosen = _PREFIXES[0]
    for factor, prefix in _PREFIXES:
        if ax >= factor * (1.0 - 1e-12):
            chosen = (factor, prefix)
    return chosen


def _decimals(mantissa: float, digits: int) -> int:
    """Decimals that give ``digits`` significant digits to a mantissa in ``[1, 1000)``."""
    if mantissa == 0.0:
        return max(digits - 1, 0)
    return max(digits - 1 - math.floor(math.log10(abs(mantissa))), 0)


def _scaled(values: tuple[float, ...], digits: int) -> tuple[list[str], str]:
    """Format ``values`` with one shared prefix, chosen from the largest magnitude (re-chosen when
    rounding carries the mantissa to 1000)."""
    big = max(abs(v) for v in values)
    factor, prefix = si_prefix(big)
    dec = _decimals(big / factor, digits)
    if big > 0 and round(big / factor, dec) >= 1000.0:  # 999.96 -> 1000: next prefix up
        factor, prefix = si_prefix(big * 1.001)
        dec = _decimals(max(big / factor, 1.0), digits)  # the rounded mantissa is 1.0
    out = []
    for v in values:
        s = f"{v / factor:.{dec}f}"
        if float(s) == 0.0:
            s = s.lstrip("-")  # no "-0.00"
        out.append(s)
    return out, prefix


def si_scale(
    values: Iterable[float], digits: int = 3, smallest: int = 2, extra: int = 3
) -> tuple[float, str, int]:
    """One prefix and one decimal count for a whole table of numbers, so no column mixes units or precisions.

    Returns ``(factor, prefix, decimals)``: the prefix is chosen from the largest ``|value|`` (its mantissa
    in ``[1, 1000)``, ``digits`` significant digits there, as :func:`format_si`); the decimals grow until
    the smallest nonzero ``|value|`` shows ``smallest`` significant digits, by at most ``extra``. Write a
    value as ``f"{v / factor:.{decimals}f}"`` with the unit ``prefix + "nat"``. Zero, nan and inf are
    ignored; with none left, ``(1.0, "", digits - 1)``.
    """
    finite = [abs(float(v)) for v in values if math.isfinite(float(v)) and float(v) != 0.0]
    if not finite:
        return 1.0, "", max(digits - 1, 0)
    big = max(finite)
    factor, prefix = si_prefix(big)
    dec = _decimals(big / factor, digits)
    if round(big / factor, dec) >= 1000.0:  # 999.96 -> 1000: next prefix up
        factor, prefix = si_prefix(big * 1.001)
        dec = _decimals(max(big / factor, 1.0), digits)
    need = smallest - 1 - math.floor(math.log10(min(finite) / factor))
    return factor, prefix, max(dec, min(need, dec + extra))


def format_sig_fixed(x: float, digits: int = 2) -> str:
    """``x`` rounded to ``digits`` significant digits and written without an exponent: ``1.7633`` ->
    ``"1.8"``, ``0.4463`` -> ``"0.45"``, ``176.3`` -> ``"180"``, ``0.01462`` -> ``"0.015"`` (ratios and
    other plain numbers, where a column must read the same in every row); nan/inf as such."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0.0:
        return "0"
    rounded = float(f"{x:.{digits}g}")
    return f"{rounded:.{max(digits - 1 - math.floor(math.log10(abs(rounded))), 0)}f}"


def format_si(x: float, unit: str = "nat", digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits and an SI prefix on ``unit``: ``format_si(-0.01816)``
    is ``"-18.2 mnat"``; ``format_si(4.4369, digits=4)`` is ``"4.437 nat"``; nan/inf as ``"nan"``/``"inf"``.
    """
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    (text,), prefix = _scaled((x,), digits)
    return f"{text} {prefix}{unit}".rstrip()


def format_sig(x: float, digits: int = 4) -> str:
    """Fixed-point with ``digits`` significant digits for values of order 1 to 1000 (losses in nats:
    ``4.41269`` -> ``"4.413"``, ``12.3456`` -> ``"12.35"``); other magnitudes go through :func:`format_si`
    without a unit, so the exponent is never lost (``4e-5`` -> ``"40.00 µ"``)."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0.0 or 0.1 <= abs(x) < 1000.0:
        return f"{x:.{_decimals(abs(x) if x else 1.0, digits)}f}"
    return format_si(x, "", digits)


def format_si_interval(center: float, half_width: float, unit: str = "nat", digits: int = 3) -> str:
    """``"center ± half_width unit"`` with one shared prefix and decimal count, set by the larger of the
    two (``digits`` significant digits there): ``format_si_interval(-0.01816, 0.01507)`` is
    ``"-18.2 ± 15.1 mnat"``; a tiny centre keeps its value in the unit of its interval
    (``format_si_interval(4e-8, 1e-6)`` is ``"0.04 ± 1.00 µnat"``).
    """
    center, half_width = float(center), float(half_width)
    if not math.isfinite(center):
        return str(center)
    if not math.isfinite(half_width):
        return f"{format_si(center, unit, digits)} ± {half_width}"
    (c, h), prefix = _scaled((center, abs(half_width)), digits)
    return f"{c} ± {h} {prefix}{unit}"


def format_interval_scaled(
    center: float, half_width: float, factor: float, prefix: str, unit: str = "nat", digits: int = 3
) -> str:
    """``"center ± half_width prefix+unit"`` in a prefix chosen for a whole column (``si_scale``), with
    ``digits`` significant digits on the larger of the two: a column never mixes µnat and mnat rows, and a
    small row keeps its precision (``format_interval_scaled(-4.31e-4, 2.96e-4, 1e-3, "m")`` is
    ``"-0.431 ± 0.296 mnat"``)."""
    center, half_width = float(center), float(half_width)
    if not (math.isfinite(center) and math.isfinite(half_width)):
        return format_si_interval(center, half_width, unit, digits)
    dec = _decimals(max(abs(center), abs(half_width)) / factor, digits)
    c = f"{center / factor:.{dec}f}"
    if float(c) == 0.0:
        c = c.lstrip("-")
    return f"{c} ± {abs(half_width) / factor:.{dec}f} {prefix}{unit}"


def interval_half_width(se: float, t_crit: float) -> float:
    """Half-width of the two-sided confidence interval of a block mean: ``t_crit x SE``.

    ``t_crit`` is the Student-t quantile ``t_{B-1}(1/2 + confidence/2)`` that ``commute analyze`` stores
    beside every estimate (column ``t_crit``), so the interval excludes 0 exactly when the verdict's test
    calls the estimate significant.
    """
    return float(t_crit) * float(se)


def confidence_of(t_crit: float, n_blocks: int) -> float:
    """The confidence level whose two-sided Student-t quantile with ``n_blocks - 1`` degrees of freedom is
    ``t_crit`` (inverts the test's threshold; e.g. ``t_crit = 2.3646``, 8 blocks -> 0.95)."""
    from scipy import stats

    return float(2.0 * stats.t.cdf(float(t_crit), int(n_blocks) - 1) - 1.0)


# --------------------------------------------------------------------------------------------------
# verdicts


@dataclass(frozen=True)
class VerdictStyle:
    """How one verdict is shown.

    Attributes:
        word: the short word in tables (at most 10 characters, so a verdict never wraps).
        legend: one plain sentence for the legend under the table and the figure.
        style: rich style of the word in a terminal.
        color: matplotlib colour of the shaded window in the figure.
        rank: when pairs disagree at one checkpoint, the figure shades the highest rank.
        actionable: the table names which domain to move earlier.
        phrase: the verdict in words for the figure's legend (default: ``word``).
    """

    word: str
    legend: str
    style: str = ""
    color: str = "0.85"
    rank: int = 0
    actionable: bool = False
    phrase: str = ""

    @property
    def words(self) -> str:
        """The verdict in plain words (``phrase``, else ``word``)."""
        return self.phrase or self.word


#: Every verdict ``commute analyze`` writes, keyed by its name in ``results.csv`` (column ``verdict``).
#: Add a verdict here and the table, its legend and the figure pick it up.
VERDICTS: dict[str, VerdictStyle] = {
    "suboptimal": VerdictStyle(
        word="suboptimal",
        legend="the interval excludes 0 and both weights are > 0: moving the 'earlier' domain earlier "
        "(and the other later) around this checkpoint lowers the target (Corollary 3.2(b))",
        style="bold yellow",
        color="tab:orange",
        rank=3,
        actionable=True,
    ),
    "consistent": VerdictStyle(
        word="consistent",
        legend="the interval excludes 0, but a weight is 0, so no reordering is possible",
        style="green",
        color="tab:green",
        rank=2,
    ),
    "negligible": VerdictStyle(
        word="negligible",
        legend="below the smallest effect worth reporting (--min-effect of the window's own progress): "
        "significant but smaller than that, or an interval that lies entirely below it",
        style="dim",
        color="0.65",
        rank=1,
    ),
    "insufficient signal": VerdictStyle(
        word="n.s.",
        legend="not significant: the interval includes 0 (more sample blocks or sequences may resolve it)",
        style="dim",
        color="0.88",
        rank=0,
        phrase="not significant",
    ),
}


def verdict_style(verdict: object, table: Mapping[str, VerdictStyle] = VERDICTS) -> VerdictStyle:
    """The style of ``verdict`` (a name from ``results.csv``); an unknown name is shown as written."""
    name = str(verdict)
    known = table.get(name)
    if known is not None:
        return known
    return VerdictStyle(word=name, legend=name)
