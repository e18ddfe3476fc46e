"""What real interventions measured about the sizes of ``commute analyze``'s predictions, by optimizer
family and ``--metric`` (benchmarks/adamw_sizes.py; docs/MATH.md "Resummed prediction", "Measurements"):
the records, and the one-line note the output quotes for a run's optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["KNOWN_SIZES", "SizeRecord", "known_size_error", "optimizer_family"]


@dataclass(frozen=True)
class SizeRecord:
    """How far a method's predicted sizes were from real interventions on one optimizer family.

    ``median``, ``low``, ``high``: predicted / observed ``EL`` over the cases whose observed effect was
    significant (signs included: a negative ratio is a wrong sign); ``cases`` and ``sign_agree`` count them.
    """

    family: str
    method: str
    cases: int
    sign_agree: int
    median: float
    low: float
    high: float
    source: str

    def note(self) -> str:
        """One line for the user: the measured range and which way the real effect probably lies."""
        if (
            self.cases == 0
            or not math.isfinite(self.median)
            or self.median <= 0.0
            or 2 * self.sign_agree <= self.cases
        ):
            return (
                f"sizes of --metric {self.method} on {self.family} runs are not calibrated: against real "
                f"interventions its predictions were {self.low:.2g} to {self.high:.2g} times the observed "
                f"effect "
                f"(negative: wrong sign; {self.sign_agree}/{self.cases} signs right, {self.source})"
            )
        way = "smaller" if self.median > 1.0 else "larger"
        factor = self.median if self.median > 1.0 else 1.0 / self.median
        return (
            f"on {self.family} runs, --metric {self.method} predicted {self.low:.2g} to {self.high:.2g} "
            f"times the observed effect (median {self.median:.2g}, "
            f"{self.sign_agree}/{self.cases} signs right, {self.source}): "
            f"real effects are likely ~{factor:.2g}x {way} than printed"
        )


_SOURCE = "benchmarks/adamw_sizes.py: tiny GPT-2 en/ru, dw 0.15, 3 stream seeds"
KNOWN_SIZES: dict[tuple[str, str], SizeRecord] = {
    # two AdamW runs (b2 0.999 lr 1e-3 constant; b2 0.95 lr 2e-3 warmup + cosine), n = 20 and 100 steps
    ("adam", "euclid"): SizeRecord("adam", "euclid", 6, 3, 0.0706, -0.760, 0.806, _SOURCE),
    ("adam", "adam"): SizeRecord("adam", "adam", 6, 4, 221.0, -10974.0, 4737.0, _SOURCE),
    # SGD lr 0.02 from two SGD checkpoints, n = 20 and 60: dt x curvature 1.5-35, the bracket is far off
    ("sgd", "euclid"): SizeRecord("sgd", "euclid", 13, 9, 163.7, -559.3, 10602.0, _SOURCE),
}
"""Predicted / observed ``EL`` of ``commute analyze``'s bracket on significant real interventions, by
optimizer family and ``--metric``: benchmarks/results/adamw_sizes.json ("summary", ``bracket-*``),
docs/MATH.md "Resummed prediction", "Measurements". A test checks these numbers against that file."""


def optimizer_family(name: str | None) -> str | None:
    """``"adam"`` for Adam-family optimizer names (Adam, AdamW, ...), ``"sgd"`` for SGD, else None."""
    if not name:
        return None
    low = name.lower()
    if "adam" in low:
        return "adam"
    if "sgd" in low:
        return "sgd"
    return None


def known_size_error(optimizer: str | None, method: str = "euclid") -> SizeRecord | None:
    """What real interventions measured about this method's sizes on this optimizer family (None: unknown).

    ``optimizer``: a name such as ``"AdamW"``, ``"adamw"`` (a manifest's) or ``"SGD"``; ``method``:
    ``"euclid"`` or ``"adam"`` (``commute analyze --metric``).
    """
    family = optimizer_family(optimizer)
    if family is None:
        return None
    return KNOWN_SIZES.get((family, method))
