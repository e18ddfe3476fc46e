"""What real interventions measured about the sizes of ``commute analyze``'s predictions, by optimizer
family and ``--metric`` (benchmarks/adamw_sizes.py; docs/MATH.md "Resummed prediction", "Measurements"):
the records, and the one-line note the output quotes for a run's optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "FOLLOWED_LOCAL_SWAPS",
    "KNOWN_SIZES",
    "FollowedAdvice",
    "SizeRecord",
    "known_size_error",
    "optimizer_family",
]


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
        """One line for the user: the measured range and which way the real effect probably lies.

        A correction factor ("real effects are likely ~Nx larger") is quoted only when it means something:
        at least 3 significant cases, every sign right, and all ratios within one decade of each other.
        Otherwise the sizes are "not calibrated", and the line gives the range and the median as measured.
        """
        calibrated = (
            self.cases >= 3
            and self.sign_agree == self.cases
            and math.isfinite(self.median)
            and 0.0 < self.low <= self.median <= self.high <= 10.0 * self.low
        )
        if not calibrated:
            median = f"median {self.median:.2g}; " if math.isfinite(self.median) else ""
            return (
                f"sizes of --metric {self.method} on {self.family} runs are not calibrated: against real "
                f"interventions its predictions were {self.low:.2g} to {self.high:.2g} times the observed "
                f"effect ({median}negative: wrong sign; {self.sign_agree}/{self.cases} signs right, "
                f"{self.source})"
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
    # three AdamW runs (b2 0.999 lr 1e-3 constant; b2 0.95 lr 2e-3 warmup + cosine; b2 0.98 weight decay 0.1
    # lr 1e-3 warmup + cosine, checkpoints 500 and 1000), n = 20 and 100 steps
    ("adam", "euclid"): SizeRecord("adam", "euclid", 10, 6, 0.0778, -0.760, 1.034, _SOURCE),
    ("adam", "adam"): SizeRecord("adam", "adam", 10, 5, -119.9, -10974.0, 5089.0, _SOURCE),
    # SGD lr 0.02 from two SGD checkpoints, n = 20 and 60: dt x curvature 1.5-35, the bracket is far off
    ("sgd", "euclid"): SizeRecord("sgd", "euclid", 13, 9, 163.7, -559.3, 10602.0, _SOURCE),
}
"""Predicted / observed ``EL`` of ``commute analyze``'s bracket on significant real interventions, by
optimizer family and ``--metric``: benchmarks/results/adamw_sizes.json ("summary", ``bracket-*``),
docs/MATH.md "Resummed prediction", "Measurements". A test checks these numbers against that file."""


@dataclass(frozen=True)
class FollowedAdvice:
    """What following a kind of advice end to end realised on a real run: the realised change of the
    target over the predicted one, from ``low`` to ``high`` (fractions; 0.05 = 5%), with ``late_phase``
    the realised / predicted ratio of the bracket summed over a late phase's displaced data (the best
    measured late phase, the same run), and where it was measured."""

    low: float
    high: float
    late_phase: float
    source: str


FOLLOWED_LOCAL_SWAPS = FollowedAdvice(
    low=0.04,
    high=0.07,
    late_phase=0.056,
    source="the shipped run, benchmarks/advice.py; docs/DECISIONS.md",
)
"""On the shipped run (AdamW, en/ru 0.8/0.2), ``recommend --kind local``'s swaps followed end to end moved
their target by 4-7% of the prediction (docs/DECISIONS.md "recommend proposes a measured late phase, not a
predicted local swap"), and the late phase ``ru late: 0.8 from 2000`` realised 0.056 of the bracket's
summed prediction (benchmarks/results/advice_shipped.json, ``realised_over_predicted`` of target ``ru``).
A test checks both against those files."""


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
