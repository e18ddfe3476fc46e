"""Domain-weight schedules: parse, validate, look up, save.

A schedule is piecewise constant in the training step: a list of (step, weights) entries, the first at
step 0, steps strictly increasing; the weights at step ``s`` are those of the last entry with
``step <= s``. Weights are non-negative and sum to 1 (tolerance ``SUM_TOL``), with the same domains in
every entry. File forms (docs/CONVENTIONS.md): JSON, a list of ``{"step", "weights"}`` objects (or an
object whose ``"schedule"`` key holds that list, such as a ``commute.json`` manifest), and CSV with the
header ``step,<domain1>,<domain2>,...``.

Everything a user can get wrong here raises ``CommuteError`` with a hint, so the CLI prints one line and
exits with code 2.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from commute_cli.errors import CommuteError

SUM_TOL = 1e-6
"""How far from 1 the weights of one entry may sum (absolute)."""

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _where(context: str) -> str:
    return f" in {context}" if context else ""


def _parse_number(text: str, what: str, context: str = "") -> float:
    """A decimal number from text; NaN, Inf and anything float() accepts beyond plain decimals refused."""
    s = text.strip()
    if s.lower().lstrip("+-") in {"nan", "inf", "infinity"}:
        raise CommuteError(f"{what} is {s}{_where(context)}", "weights must be finite numbers")
    if not _NUMBER.fullmatch(s):
        raise CommuteError(f"{what} is not a number: {text!r}{_where(context)}", "write e.g. en=0.8 ru=0.2")
    return float(s)


def _check_number(value: Any, what: str, context: str = "") -> float:
    """A weight from JSON: a real number (not a bool, not a string), finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CommuteError(
            f"{what} is not a number: {value!r}{_where(context)}",
            'write numbers, e.g. {"en": 0.8, "ru": 0.2}',
        )
    x = float(value)
    if not math.isfinite(x):
        raise CommuteError(f"{what} is {x}{_where(context)}", "weights must be finite numbers")
    return x


def check_weights(
    weights: Mapping[str, float], domains: Sequence[str] | None = None, context: str = "", joiner: str = " "
) -> dict[str, float]:
    """Validate one weight vector; return it as a dict in ``domains`` order (or its own order).

    Checks: at least one domain; every weight finite and >= 0; the sum within ``SUM_TOL`` of 1; with
    ``domains`` given, exactly those names (no unknown, none missing).
    """
    if not weights:
        raise CommuteError(f"no domain weights{_where(context)}", "give weights such as en=0.8 ru=0.2")
    out: dict[str, float] = {}
    for name, w in weights.items():
        x = _check_number(w, f"weight of {name!r}", context)
        if x < 0:
            raise CommuteError(
                f"negative weight {name}={x:g}{_where(context)}", "domain weights must be non-negative"
            )
        out[str(name)] = x
    if domains is not None:
        unknown = [d for d in out if d not in domains]
        missing = [d for d in domains if d not in out]
        if unknown:
            raise CommuteError(
                f"unknown domain{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{_where(context)}",
                f"the domains are {', '.join(domains)}",
            )
        if missing:
            raise CommuteError(
                f"no weight for domain{'s' * (len(missing) > 1)} {', '.join(missing)}{_where(context)}",
                "give every domain a weight (0 is allowed)",
            )
        out = {d: out[d] for d in domains}
    total = math.fsum(out.values())
    if abs(total - 1.0) > SUM_TOL:
        fixed = joiner.join(f"{d}={w / total:.6g}" for d, w in out.items()) if total > 0 else "en=0.5 ru=0.5"
        raise CommuteError(
            f"weights sum to {total:.9g}, not 1{_where(context)}", f"normalize them, e.g. {fixed}"
        )
    return out


def parse_weights(
    items: Sequence[str] | str, domains: Sequence[str] | None = None, joiner: str = " "
) -> dict[str, float]:
    """Parse ``name=weight`` pairs: ``"en=0.8 ru=0.2"``, ``"en=0.8,ru=0.2"`` or ``["en=0.8", "ru=0.2"]``.

    Returns a validated dict (see ``check_weights``), ordered like ``domains`` when given. ``joiner``
    separates the pairs of the normalized weights a hint suggests (``","`` where one argument holds them all,
    as ``--target en=0.5,ru=0.5``).
    """
    if isinstance(items, str):
        items = [items]
    pairs = [tok for item in items for tok in re.split(r"[,\s]+", item) if tok]
    weights: dict[str, float] = {}
    for tok in pairs:
        name, sep, value = tok.partition("=")
        name = name.strip()
        if not sep or not name or not _NAME.fullmatch(name):
            raise CommuteError(f"cannot read weight {tok!r}", "write name=weight pairs, e.g. en=0.8 ru=0.2")
        if name in weights:
            raise CommuteError(f"domain {name!r} given twice in the weights", "give each domain once")
        weights[name] = _parse_number(value, f"weight of {name!r}")
    return check_weights(weights, domains, joiner=joiner)


@dataclass(frozen=True)
class Schedule:
    """Piecewise-constant domain weights over training steps (immutable, validated on construction).

    ``values[i][k]`` is the weight of ``domains[k]`` from step ``steps[i]`` until the next entry.
    """

    domains: tuple[str, ...]
    steps: tuple[int, ...]
    values: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise CommuteError("empty schedule", "give at least one entry, at step 0")
        if len(self.steps) != len(self.values):
            raise ValueError("steps and values differ in length")
        if self.steps[0] != 0:
            raise CommuteError(
                f"schedule starts at step {self.steps[0]}, not 0", "the first entry must be at step 0"
            )
        for prev, cur in pairwise(self.steps):
            if cur == prev:
                raise CommuteError(f"step {cur} appears twice in the schedule", "give each step once")
            if cur < prev:
                raise CommuteError(
                    f"schedule steps not increasing ({prev} then {cur})", "sort the entries by step"
                )
        for step, vals in zip(self.steps, self.values, strict=True):
            if len(vals) != len(self.domains):
                raise ValueError("an entry has the wrong number of weights")
            check_weights(
                dict(zip(self.domains, vals, strict=True)), self.domains, f"the entry at step {step}"
            )

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_entries(
        cls, entries: Iterable[tuple[int, Mapping[str, float]]], domains: Sequence[str] | None = None
    ) -> Schedule:
        """From (step, weights) pairs; the domain order is ``domains`` or that of the first entry."""
        entries = list(entries)
        if not entries:
            raise CommuteError("empty schedule", "give at least one entry, at step 0")
        order = tuple(domains) if domains is not None else tuple(entries[0][1])
        steps: list[int] = []
        values: list[tuple[float, ...]] = []
        for step, weights in entries:
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise CommuteError(f"bad schedule step {step!r}", "steps are non-negative integers")
            w = check_weights(weights, order, f"the entry at step {step}")
            steps.append(int(step))
            values.append(tuple(w[d] for d in order))
        return cls(order, tuple(steps), tuple(values))

    @classmethod
    def constant(cls, weights: Mapping[str, float], domains: Sequence[str] | None = None) -> Schedule:
        """The same weights at every step."""
        return cls.from_entries([(0, weights)], domains)

    @classmethod
    def from_records(cls, records: Any, domains: Sequence[str] | None = None, context: str = "") -> Schedule:
        """From the JSON form: a list of ``{"step": int, "weights": {...}}`` or ``{"schedule": [...]}``."""
        if isinstance(records, Mapping):
            if "schedule" not in records:
                raise CommuteError(
                    f"no 'schedule' key{_where(context)}",
                    'write a list of {"step": 0, "weights": {...}} entries, or {"schedule": [...]}',
                )
            records = records["schedule"]
        if not isinstance(records, list):
            raise CommuteError(
                f"a schedule must be a list of entries{_where(context)}",
                'write [{"step": 0, "weights": {"en": 0.8, "ru": 0.2}}, ...]',
            )
        entries = []
        for i, rec in enumerate(records):
            where = f"entry {i}" + (f" of {context}" if context else "")
            if not isinstance(rec, Mapping) or "step" not in rec or "weights" not in rec:
                raise CommuteError(
                    f"{where} is not a {{'step', 'weights'}} object", 'write {"step": 0, "weights": {...}}'
                )
            step, weights = rec["step"], rec["weights"]
            if isinstance(step, float) and step.is_integer():
                step = int(step)
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise CommuteError(f"bad step {step!r} in {where}", "steps are non-negative integers")
            if not isinstance(weights, Mapping):
                raise CommuteError(
                    f"the weights of {where} are not an object", 'write {"en": 0.8, "ru": 0.2}'
                )
            entries.append((step, check_weights({str(k): v for k, v in weights.items()}, domains, where)))
        return cls.from_entries(entries, domains)

    # -- lookup -------------------------------------------------------------------------------------
    def index_at(self, step: int) -> int:
        """Index of the entry in force at ``step`` (the last one with ``steps[i] <= step``)."""
        if step < 0:
            raise ValueError(f"negative step {step}")
        return bisect.bisect_right(self.steps, step) - 1

    def weights_at(self, step: int) -> dict[str, float]:
        """The domain weights in force at ``step``."""
        return dict(zip(self.domains, self.values[self.index_at(step)], strict=True))

    @property
    def entries(self) -> list[tuple[int, dict[str, float]]]:
        return [
            (s, dict(zip(self.domains, v, strict=True))) for s, v in zip(self.steps, self.values, strict=True)
        ]

    @property
    def is_constant(self) -> bool:
        return len(set(self.values)) == 1

    # -- output -------------------------------------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        """The JSON form used in manifests: ``[{"step": 0, "weights": {...}}, ...]``."""
        return [{"step": s, "weights": w} for s, w in self.entries]

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_records(), indent=indent) + "\n"

    def to_csv(self) -> str:
        """CSV with header ``step,<domains...>``; floats written with ``repr`` so they read back exactly."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["step", *self.domains])
        for s, vals in zip(self.steps, self.values, strict=True):
            writer.writerow([s, *(repr(v) for v in vals)])
        return buf.getvalue()


def parse_schedule_csv(text: str, domains: Sequence[str] | None = None, context: str = "") -> Schedule:
    """The CSV form: header ``step,<domain1>,...``, one row per entry."""
    rows = [[c.strip() for c in row] for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    if not rows:
        raise CommuteError(f"empty schedule{_where(context)}", "write a header step,<domains...> and rows")
    header, body = rows[0], rows[1:]
    if not header or header[0].lower() != "step" or len(header) < 2:
        raise CommuteError(
            f"the CSV header must be step,<domain1>,<domain2>,...{_where(context)}",
            "e.g. a first line 'step,en,ru'",
        )
    names = header[1:]
    if len(set(names)) != len(names) or not all(names):
        raise CommuteError(
            f"empty or repeated domain names in the CSV header{_where(context)}", "name each domain once"
        )
    entries = []
    for lineno, row in enumerate(body, start=2):
        where = f"line {lineno}" + (f" of {context}" if context else "")
        if len(row) != len(header):
            raise CommuteError(
                f"{where} has {len(row)} fields, the header {len(header)}",
                "one weight per domain on each line",
            )
        if not re.fullmatch(r"\d+", row[0]):
            raise CommuteError(f"bad step {row[0]!r} on {where}", "steps are non-negative integers")
        weights = {
            n: _parse_number(v, f"weight of {n!r}", where) for n, v in zip(names, row[1:], strict=True)
        }
        entries.append((int(row[0]), check_weights(weights, domains, where)))
    if not entries:
        raise CommuteError(f"empty schedule{_where(context)}", "add at least one row, for step 0")
    return Schedule.from_entries(entries, domains)


def parse_schedule_text(text: str, domains: Sequence[str] | None = None, context: str = "") -> Schedule:
    """JSON if the text starts with ``[`` or ``{``, CSV otherwise."""
    stripped = text.lstrip()
    if stripped[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CommuteError(
                f"not valid JSON{_where(context)}: {err}", "fix the file or write CSV"
            ) from err
        return Schedule.from_records(data, domains, context)
    return parse_schedule_csv(text, domains, context)
