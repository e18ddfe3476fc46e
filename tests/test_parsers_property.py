"""Property-based tests (hypothesis) for the input parsers: domain specs, weights, target specs and the
multi-value option rewriting.
Valid inputs round-trip; every invalid input is a CommuteError, never a crash."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from commute_cli.cli.entry import expand_multi_value
from commute_cli.core.regime import parse_targets
from commute_cli.core.schedule import parse_weights
from commute_cli.errors import CommuteError
from commute_cli.io.data import parse_domain_specs

names = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,8}", fullmatch=True)
sources = st.from_regex(r"[A-Za-z0-9_./-]{1,20}", fullmatch=True)


@given(st.dictionaries(names, sources, min_size=1, max_size=6))
def test_domain_specs_round_trip(mapping):
    specs = [f"{n}={s}" for n, s in mapping.items()]
    assert parse_domain_specs(specs) == mapping
    assert list(parse_domain_specs(specs)) == list(mapping)  # order kept


@given(st.lists(st.text(max_size=20), min_size=1, max_size=5))
@settings(max_examples=300)
def test_domain_specs_never_crash(specs):
    try:
        out = parse_domain_specs(specs)
    except CommuteError as err:
        assert err.exit_code == 2 and err.message
    else:
        assert len(out) == len(specs)
        assert all("=" in s for s in specs)


@given(names, sources)
def test_duplicate_domain_is_rejected(name, source):
    with pytest.raises(CommuteError, match=r"twice|duplicate"):
        parse_domain_specs([f"{name}={source}", f"{name}={source}"])


@st.composite
def weight_vectors(draw):
    k = draw(st.integers(2, 6))
    raw = draw(st.lists(st.integers(0, 1000), min_size=k, max_size=k).filter(lambda xs: sum(xs) > 0))
    total = sum(raw)
    ds = draw(st.lists(names, min_size=k, max_size=k, unique=True))
    return {d: r / total for d, r in zip(ds, raw, strict=True)}


@given(weight_vectors(), st.sampled_from([" ", ",", ", "]))
def test_weights_round_trip(weights, sep):
    text = sep.join(f"{d}={w!r}" for d, w in weights.items())
    parsed = parse_weights(text, list(weights))
    assert parsed == weights
    assert math.isclose(sum(parsed.values()), 1.0, abs_tol=1e-9)


@given(weight_vectors(), st.floats(allow_nan=True, allow_infinity=True))
@settings(max_examples=300)
def test_weights_with_any_bad_value_are_rejected_cleanly(weights, bad):
    first = next(iter(weights))
    text = " ".join(f"{d}={bad if d == first else w}" for d, w in weights.items())
    try:
        out = parse_weights(text, list(weights))
    except CommuteError as err:
        assert err.exit_code == 2
    else:  # only a value that keeps the vector valid can pass
        assert math.isfinite(bad) and bad >= 0 and abs(sum(out.values()) - 1.0) <= 1e-6


@given(weight_vectors())
def test_targets_domain_mix_and_custom(weights):
    ds = list(weights)
    custom = ",".join(f"{d}={w!r}" for d, w in weights.items())
    targets = parse_targets([ds[0], "mix", custom], ds)
    assert [t.kind for t in targets] == ["domain", "mix", "custom"]
    assert targets[0].coefs.tolist() == [1.0] + [0.0] * (len(ds) - 1)
    np.testing.assert_allclose(targets[2].coefs, [weights[d] for d in ds])
    wbar = np.full(len(ds), 1 / len(ds))
    assert targets[1].coefs_at(wbar) is wbar


@given(st.lists(names, min_size=2, max_size=5, unique=True), st.text(min_size=1, max_size=10))
def test_unknown_target_is_an_error(ds, junk):
    if junk in ds or junk == "mix" or "=" in junk:
        return
    with pytest.raises(CommuteError):
        parse_targets([junk], ds)


@given(st.lists(st.tuples(names, sources), min_size=1, max_size=5))
def test_expand_multi_value(pairs):
    values = [f"{n}={s}" for n, s in pairs]
    argv = ["analyze", "ckpts/", "--domains", *values, "--lr", "0.1"]
    out = expand_multi_value(argv)
    expected = ["analyze", "ckpts/"]
    for v in values:
        expected += ["--domains", v]
    assert out == [*expected, "--lr", "0.1"]
    # a positional path after the values is not swallowed
    assert expand_multi_value(["analyze", "--domains", *values, "ckpts/"])[-1] == "ckpts/"
