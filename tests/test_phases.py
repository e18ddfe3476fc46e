"""Late-phase schedules (core/phases.py) and the paired statistics of the measured advice
(commands/phase_advice.py): exact data per domain, the bracket's prediction against the rows it sums, and the
paired interval against an independent computation."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from commute_cli.commands import phase_advice
from commute_cli.core import phases
from commute_cli.core.mixing import batch_counts
from commute_cli.core.schedule import Schedule


def rows_per_step(schedule: Schedule, start: int, last: int, batch: int) -> np.ndarray:
    """Rows of each domain at every step, as ``commute train`` draws them (``batch_counts``): [steps, K]."""
    return np.array(
        [
            batch_counts([schedule.weights_at(t)[n] for n in schedule.domains], batch)
            for t in range(start, last)
        ]
    )


@pytest.mark.parametrize(
    ("weights", "batch", "start", "last"),
    [
        ({"en": 0.8, "ru": 0.2}, 10, 500, 2500),
        ({"en": 0.8, "ru": 0.2}, 10, 1500, 2500),
        ({"en": 0.5, "ru": 0.2, "code": 0.3}, 16, 1000, 2500),
        ({"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}, 8, 3, 37),
    ],
)
def test_every_candidate_keeps_every_domains_rows_exactly(weights, batch, start, last):
    """Counted step by step the way train draws batches: the rows of every domain over [start, last) are the
    run's, nothing before start changes, and the late domain is raised in the late phase."""
    original = Schedule.constant(weights)
    cands = phases.candidates(original, start, last, batch)
    assert {c.late for c in cands} == set(weights)  # every domain late, in some member
    before = rows_per_step(original, 0, last, batch)
    for c in cands:
        after = rows_per_step(c.schedule, 0, last, batch)
        assert (after.sum(axis=1) == batch).all()
        assert (after[:start] == before[:start]).all(), c.label
        assert (after.sum(axis=0) == before.sum(axis=0)).all(), c.label
        j = original.domains.index(c.late)
        assert (after[c.switch - 0 :, j] > before[c.switch :, j]).all(), c.label
        assert phases.window_rows(c.schedule, start, last, batch) == phases.window_rows(
            original, start, last, batch
        )


def test_the_bang_bang_member_leaves_the_late_domain_out_until_it_switches():
    original = Schedule.constant({"en": 0.8, "ru": 0.2})
    ru = [c for c in phases.candidates(original, 1500, 2500, 10) if c.late == "ru"]
    bang = next(c for c in ru if c.switch == 2250 and c.late_share == 0.8)
    assert bang.schedule.entries[1:] == [(1500, {"en": 1.0, "ru": 0.0}), (2250, {"en": 0.2, "ru": 0.8})]
    half = next(c for c in ru if c.switch == 2250 and c.late_share == 0.5)
    assert half.schedule.entries[1:] == [(1500, {"en": 0.9, "ru": 0.1}), (2250, {"en": 0.5, "ru": 0.5})]
    # a late share the window's data cannot fill, or one that does not raise the domain: infeasible
    assert phases.late_phase(original, "ru", 1500, 2500, Fraction(1, 4), Fraction(9, 10), 10) is None
    assert phases.late_phase(original, "ru", 1500, 2500, Fraction(1, 4), Fraction(2, 10), 10) is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 400), min_size=2, max_size=5),
    st.integers(1, 60),
    st.integers(1, 16),
)
def test_phase_rows_fill_exactly_in_few_pieces(raw, steps, batch):
    """Any integer totals that fill ``steps`` batches: per step exactly ``batch`` rows, sums exactly the
    totals, at most K + m constant pieces (m the rows per step left after the floors)."""
    total = steps * batch
    weights = np.array(raw, dtype=float) + 1e-9
    totals = [int(x) for x in np.floor(weights / weights.sum() * total)]
    totals[0] += total - sum(totals)
    pieces = phases.phase_rows(totals, steps, batch)
    bounds = [o for o, _ in pieces] + [steps]
    counts = np.zeros(len(totals), dtype=int)
    for (o, rows), end in zip(pieces, bounds[1:], strict=True):
        assert sum(rows) == batch and min(rows) >= 0
        counts += np.array(rows) * (end - o)
    assert counts.tolist() == totals
    lanes = batch - sum(t // steps for t in totals)
    assert len(pieces) <= len(totals) + lanes + 1


def test_bracket_prediction_of_a_local_swap_is_the_rows_own_prediction():
    """A swap of dw for h steps each side of a checkpoint (the intervention analyze evaluates) summed by the
    displacement formula gives back the row's EL: the superposition reproduces the local criterion."""
    names = ("en", "ru")
    original = Schedule.constant({"en": 0.8, "ru": 0.2})
    dw, h, s = 0.1, 50, 500
    rows = [
        {
            "step": 500,
            "domain_i": "en",
            "domain_j": "ru",
            "el_ij": -0.03,
            "el_se": 0.01,
            "dw": dw,
            "horizon": h,
        },
        {
            "step": 1000,
            "domain_i": "en",
            "domain_j": "ru",
            "el_ij": 0.5,
            "el_se": 0.1,
            "dw": dw,
            "horizon": h,
        },
    ]
    swap = Schedule.from_entries(
        [(0, {"en": 0.8, "ru": 0.2}), (s - h, {"en": 0.9, "ru": 0.1}), (s, {"en": 0.7, "ru": 0.3}),
         (s + h, {"en": 0.8, "ru": 0.2})], names
    )  # fmt: skip
    ph = phases.Phase("ru", s - h, s, s + h, (), (7, 3), 10, names, swap)
    change, bound = phases.bracket_prediction(original, ph, rows)
    # the displacement is a tent of height dw h: sum_t D(t) = dw h^2 exactly on the step grid
    assert change == pytest.approx(-0.03, rel=1e-9) and bound == pytest.approx(0.01, rel=1e-9)
    # the reverse swap (ru earlier) predicts the opposite change
    rev = Schedule.from_entries(
        [(0, {"en": 0.8, "ru": 0.2}), (s - h, {"en": 0.7, "ru": 0.3}), (s, {"en": 0.9, "ru": 0.1}),
         (s + h, {"en": 0.8, "ru": 0.2})], names
    )  # fmt: skip
    ph_rev = phases.Phase("en", s - h, s, s + h, (), (9, 1), 10, names, rev)
    assert phases.bracket_prediction(original, ph_rev, rows)[0] == pytest.approx(0.03, rel=1e-9)


def test_displacement_is_zero_at_both_ends_for_every_candidate():
    original = Schedule.constant({"en": 0.5, "ru": 0.2, "code": 0.3})
    for c in phases.candidates(original, 100, 300, 16):
        d = phases.displacement(original, c.schedule, c.start, c.last, 16)
        for series in d.values():
            assert series[0] == 0.0 and abs(series[-1]) < 1e-9
        assert all(abs(sum(d[n][t] for n in d)) < 1e-9 for t in range(len(d["en"])))


def test_paired_gain_against_an_independent_t_interval():
    arm = {0: 4.10, 1: 4.13, 2: 4.09}
    base = {0: 4.12, 1: 4.14, 2: 4.12, 3: 9.0}  # seed 3 has no pair: left out
    g = phase_advice.paired_gain(arm, base, 0.95)
    d = np.array([-0.02, -0.01, -0.03])
    assert g.n == 3 and g.mean == pytest.approx(d.mean())
    assert g.se == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    assert g.half_width == pytest.approx(stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3))
    one = phase_advice.paired_gain({0: 1.0}, {0: 2.0}, 0.95)
    assert one.mean == -1.0 and one.n == 1 and math.isnan(one.half_width)
    assert phase_advice.paired_gain({1: 1.0}, {0: 1.0}, 0.95) is None


def test_mixture_weights_are_each_domains_share_of_the_data():
    s = Schedule.from_entries([(0, {"en": 0.9, "ru": 0.1}), (75, {"en": 0.5, "ru": 0.5})])
    w = phase_advice.mixture_weights(s, 100)
    assert w == pytest.approx({"en": (0.9 * 75 + 0.5 * 25) / 100, "ru": (0.1 * 75 + 0.5 * 25) / 100})
    assert phase_advice.mixture_weights(Schedule.constant({"en": 0.8, "ru": 0.2}), 2500) == pytest.approx(
        {"en": 0.8, "ru": 0.2}
    )


def test_the_heuristics_are_named_members_of_the_family():
    original = Schedule.constant({"en": 0.8, "ru": 0.2})
    cands = phases.candidates(original, 1500, 2500, 10)
    names = phase_advice.heuristic_names(cands, original, 1500)
    assert names == {
        "ru late: 0.5 from 2250": "low-resource late",
        "en late: 0.9 from 2250": "high-resource late",
    }
