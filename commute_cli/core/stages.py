"""A schedule as the stages a trainer runs: constant rows per domain per step over a range of steps (pure).

Trainers other than commute's own take a data mixture per *stage* (nanotron's ``data_stages``, one Megatron
invocation per blend, one ``datasets.interleave_datasets`` call per phase), not a function of the step. A
stage here is a half-open range of optimizer steps ``[start, end)`` (0-based: step ``s`` is the ``s+1``-th
update) in which every batch of ``B`` rows holds the same whole number of rows of each domain.

Rows, not weights: the rows per step are ``core.mixing.batch_counts(weights, B)``, the rounding that
``commute train`` realises, so the data per domain of the stages is what the schedule trains on:
``sum over stages of rows_k * (end - start) == core.phases.window_rows(schedule, 0, T, B)[k]`` for every
domain ``k`` (the conservation every export format is tested for). The weights a stage reports are
``rows / B``: exact in every trainer that normalises weights or draws rows in proportion to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from commute_cli.core.mixing import batch_counts
from commute_cli.core.schedule import Schedule
from commute_cli.errors import CommuteError


@dataclass(frozen=True)
class Stage:
    """Steps ``[start, end)`` with ``rows[k]`` rows of ``domains[k]`` in each batch of ``batch_size`` rows."""

    start: int
    end: int
    rows: tuple[int, ...]
    domains: tuple[str, ...]
    batch_size: int

    @property
    def steps(self) -> int:
        """Optimizer steps in the stage (``end - start``)."""
        return self.end - self.start

    @property
    def weights(self) -> tuple[float, ...]:
        """Share of each domain in a batch: ``rows / batch_size`` (sums to 1 up to float rounding)."""
        return tuple(r / self.batch_size for r in self.rows)

    @property
    def total_rows(self) -> tuple[int, ...]:
        """Rows (sequences) of each domain the stage trains on: ``rows * steps``."""
        return tuple(r * self.steps for r in self.rows)

    def rows_by_domain(self) -> dict[str, int]:
        return dict(zip(self.domains, self.total_rows, strict=True))


def schedule_stages(schedule: Schedule, last: int, batch_size: int) -> list[Stage]:
    """The stages of ``schedule`` over steps ``[0, last)`` with batches of ``batch_size`` rows.

    One stage per run of steps with the same rows per domain: entries whose rounded rows are equal are
    merged, entries at or after ``last`` are dropped (the run never reaches them).

    Args:
        schedule: piecewise-constant weights (``core.schedule.Schedule``).
        last: the run's last step ``T`` (updates ``0 .. T-1``).
        batch_size: rows per optimizer step ``B``.

    Raises ``CommuteError`` for ``last < 1`` or ``batch_size < 1``.
    """
    if last < 1:
        raise CommuteError(f"the run's last step is {last}", hint="a schedule needs at least one step")
    if batch_size < 1:
        raise CommuteError(f"batch size must be positive, got {batch_size}", hint="pass --batch-size B")
    bounds = [*schedule.steps[1:], last]
    stages: list[Stage] = []
    for step, end, values in zip(schedule.steps, bounds, schedule.values, strict=True):
        lo, hi = step, min(end, last)
        if hi <= lo:
            continue
        rows = tuple(batch_counts(values, batch_size))
        if stages and stages[-1].rows == rows and stages[-1].end == lo:
            prev = stages.pop()
            lo = prev.start
        stages.append(Stage(lo, hi, rows, schedule.domains, batch_size))
    return stages


def stage_totals(stages: Sequence[Stage]) -> dict[str, int]:
    """Rows of each domain over all ``stages`` (what conservation is checked against)."""
    if not stages:
        return {}
    out = dict.fromkeys(stages[0].domains, 0)
    for st in stages:
        for name, n in st.rows_by_domain().items():
            out[name] += n
    return out


def stage_offsets(stages: Sequence[Stage]) -> list[dict[str, int]]:
    """Rows of each domain read before each stage: where stage ``i`` starts in every domain's stream (so
    each domain's rows are read once, in order, across the stages)."""
    if not stages:
        return []
    seen = dict.fromkeys(stages[0].domains, 0)
    out = []
    for st in stages:
        out.append(dict(seen))
        for name, n in st.rows_by_domain().items():
            seen[name] += n
    return out
