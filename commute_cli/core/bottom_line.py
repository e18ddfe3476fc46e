"""The bottom line of an analysis: the one change its rows support (or that none is), that change's
predicted effect on every target, and what real interventions measured about such predictions.

Pure: it reads ``results.csv``'s rows (as mappings) and the records of :mod:`commute_cli.core.known_sizes`;
``render.bottom_line`` words it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from commute_cli.core.criterion import Verdict
from commute_cli.core.known_sizes import (
    FOLLOWED_LOCAL_SWAPS,
    FollowedAdvice,
    SizeRecord,
    known_size_error,
)
from commute_cli.core.regime import Regime

__all__ = ["BottomLine", "Change", "Effect", "bottom_line"]

UNUSABLE_REGIMES = frozenset({str(Regime.OUTSIDE), str(Regime.SATURATED)})
"""Regimes whose sizes cannot be trusted (and that ``recommend --kind local`` leaves out): a row there is
not chosen as the bottom line's change."""


@dataclass(frozen=True)
class Effect:
    """The chosen change's predicted effect on one target: ``change`` in nats (negative: the target's loss
    goes down), ``half_width`` of its confidence interval (``t_crit x SE``, nats), ``significant`` whether
    that interval excludes 0 (results.csv's ``significant``)."""

    target: str
    change: float
    half_width: float
    significant: bool


@dataclass(frozen=True)
class Change:
    """One local reorder: ``earlier`` gets ``+dw`` for ``horizon`` steps before ``step`` and ``-dw`` for as
    many after, ``later`` the reverse (the intervention of docs/MATH.md "Notation"); chosen for
    ``target``, whose predicted gain is the largest of the supported rows."""

    step: int
    earlier: str
    later: str
    dw: float
    horizon: int
    regime: str
    target: str


@dataclass(frozen=True)
class BottomLine:
    """``change`` is None when no row supports one; ``effects`` then is empty. ``rows``: rows read;
    ``significant``: rows whose verdict is ``suboptimal``; ``unusable``: those left out because their
    regime is outside or saturated. ``sizes``: what real interventions measured about the sizes on this
    run's optimizer family (None: not measured); ``followed``: what following such local swaps realised on
    the shipped run."""

    change: Change | None
    effects: tuple[Effect, ...]
    rows: int
    significant: int
    unusable: int
    sizes: SizeRecord | None
    followed: FollowedAdvice
    targets: tuple[str, ...]


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1", "yes"}
    return bool(value) and not (isinstance(value, float) and math.isnan(value))


def _half_width(row: Mapping[str, Any]) -> float:
    return _float(row.get("t_crit")) * _float(row.get("el_se"))


def bottom_line(
    rows: Sequence[Mapping[str, Any]], optimizer: str | None = None, metric: str = "euclid"
) -> BottomLine:
    """Choose the one change the analysis supports and collect its effect on every target.

    ``rows``: results.csv's rows (keys ``step``, ``target``, ``domain_i``, ``domain_j``, ``el_ij``,
    ``el_se``, ``t_crit``, ``significant``, ``verdict``, ``regime``, ``dw``, ``horizon``); ``optimizer``:
    the run's optimizer name (run.json's ``optimizer``), ``metric``: analyze's ``--metric``.

    The change is the row with verdict ``suboptimal`` (Corollary 3.2(b), docs/MATH.md: significant, both
    weights > 0, not negligible) whose regime is neither outside nor saturated and whose ``|EL^{ij}|``
    (nats) is the largest; the domain it moves earlier is ``i`` when ``EL^{ij} < 0``, else ``j``. Its effect
    on each target is that target's row at the same step and pair, signed for that direction (``EL^{ji} =
    -EL^{ij}``, docs/MATH.md "Notation"), with the row's own interval. Ties keep the first row.
    """
    targets = tuple(dict.fromkeys(str(r["target"]) for r in rows))
    actionable = [r for r in rows if str(r.get("verdict")) == str(Verdict.SUBOPTIMAL)]
    usable = [r for r in actionable if str(r.get("regime", "")) not in UNUSABLE_REGIMES]
    sizes = known_size_error(optimizer, metric)

    def made(change: Change | None, effects: tuple[Effect, ...]) -> BottomLine:
        return BottomLine(
            change=change,
            effects=effects,
            rows=len(rows),
            significant=len(actionable),
            unusable=len(actionable) - len(usable),
            sizes=sizes,
            followed=FOLLOWED_LOCAL_SWAPS,
            targets=targets,
        )

    if not usable:
        return made(None, ())
    best = max(usable, key=lambda r: abs(_float(r["el_ij"])))
    i, j = str(best["domain_i"]), str(best["domain_j"])
    forward = _float(best["el_ij"]) < 0  # moving i earlier lowers the chosen target
    change = Change(
        step=int(best["step"]),
        earlier=i if forward else j,
        later=j if forward else i,
        dw=_float(best["dw"]),
        horizon=int(best["horizon"]),
        regime=str(best.get("regime", "")),
        target=str(best["target"]),
    )
    sign = 1.0 if forward else -1.0
    effects = []
    for target in targets:
        same = [
            r
            for r in rows
            if str(r["target"]) == target
            and int(r["step"]) == change.step
            and (str(r["domain_i"]), str(r["domain_j"])) == (i, j)
        ]
        if same:
            r = same[0]
            effects.append(
                Effect(target, sign * _float(r["el_ij"]), _half_width(r), _truthy(r.get("significant")))
            )
    return made(change, tuple(effects))
