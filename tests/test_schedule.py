"""Schedules: parsing, every validation error, round trips through JSON and CSV, and lookups."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from commute_cli.core.schedule import (
    Schedule,
    check_weights,
    parse_schedule_csv,
    parse_schedule_text,
    parse_weights,
)
from commute_cli.errors import CommuteError
from commute_cli.io.schedules import load_schedule, save_schedule

# ----------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "items",
    [
        "en=0.8 ru=0.2",
        "en=0.8,ru=0.2",
        ["en=0.8", "ru=0.2"],
        ["en=0.8,ru=0.2"],
        " en=0.8 , ru=0.2 ",
        "en=.8 ru=2e-1",
    ],
)
def test_parse_weights_forms(items):
    assert parse_weights(items) == {"en": 0.8, "ru": 0.2}


def test_parse_weights_orders_by_domains():
    w = parse_weights("ru=0.2 en=0.8", domains=["en", "ru"])
    assert list(w) == ["en", "ru"]


def test_zero_weight_allowed():
    assert parse_weights("en=1 ru=0", ["en", "ru"]) == {"en": 1.0, "ru": 0.0}


def test_sum_tolerance():
    parse_weights("a=0.3333333 b=0.3333333 c=0.3333334")
    with pytest.raises(CommuteError, match="sum to"):
        parse_weights("a=0.333333 b=0.333333 c=0.333333")


@pytest.mark.parametrize(
    ("items", "domains", "pattern"),
    [
        ("en=-0.2 ru=1.2", None, "negative weight"),
        ("en=0.5 ru=0.4", None, "sum to 0.9"),
        ("en=0.5 ru=0.6", None, "sum to 1.1"),
        ("en=0.8 de=0.2", ["en", "ru"], "unknown domain de"),
        ("en=1.0", ["en", "ru"], "no weight for domain ru"),
        ("en=nan ru=0.2", None, "is nan"),
        ("en=inf ru=0", None, "is inf"),
        ("en=0.8 ru=abc", None, "not a number"),
        ("en=0.8 ru=1_0", None, "not a number"),
        ("en=0.8 ru=", None, "not a number"),
        ("en0.8 ru=0.2", None, "cannot read weight"),
        ("=0.8", None, "cannot read weight"),
        ("en=0.5 en=0.5", None, "given twice"),
        ("", None, "no domain weights"),
        ([], None, "no domain weights"),
    ],
)
def test_parse_weights_errors(items, domains, pattern):
    with pytest.raises(CommuteError, match=pattern) as info:
        parse_weights(items, domains)
    assert info.value.hint  # every error says what to do
    assert info.value.exit_code == 2


def test_sum_error_suggests_normalized_weights():
    with pytest.raises(CommuteError) as info:
        parse_weights("en=4 ru=1")
    assert "en=0.8 ru=0.2" in info.value.hint


@pytest.mark.parametrize("bad", [True, "0.5", None, [0.5]])
def test_check_weights_rejects_non_numbers(bad):
    with pytest.raises(CommuteError, match="not a number"):
        check_weights({"en": bad, "ru": 0.5})


# ----------------------------------------------------------------------------------------------- schedule


def piecewise() -> Schedule:
    return Schedule.from_entries(
        [(0, {"en": 0.8, "ru": 0.2}), (100, {"en": 0.5, "ru": 0.5}), (250, {"en": 1, "ru": 0})]
    )


def test_weights_at_is_piecewise_constant():
    s = piecewise()
    assert s.weights_at(0) == {"en": 0.8, "ru": 0.2}
    assert s.weights_at(99) == {"en": 0.8, "ru": 0.2}
    assert s.weights_at(100) == {"en": 0.5, "ru": 0.5}
    assert s.weights_at(249) == {"en": 0.5, "ru": 0.5}
    assert s.weights_at(250) == {"en": 1.0, "ru": 0.0}
    assert s.weights_at(10**9) == {"en": 1.0, "ru": 0.0}
    assert s.domains == ("en", "ru")
    assert not s.is_constant
    with pytest.raises(ValueError):
        s.weights_at(-1)


def test_constant():
    s = Schedule.constant({"en": 0.8, "ru": 0.2})
    assert s.steps == (0,)
    assert s.is_constant
    assert s.weights_at(12345) == {"en": 0.8, "ru": 0.2}
    assert s.to_records() == [{"step": 0, "weights": {"en": 0.8, "ru": 0.2}}]


def test_domain_order_from_argument():
    s = Schedule.constant({"ru": 0.2, "en": 0.8}, domains=["en", "ru"])
    assert s.domains == ("en", "ru")
    assert s.to_csv().splitlines()[0] == "step,en,ru"


@pytest.mark.parametrize(
    ("entries", "pattern"),
    [
        ([], "empty schedule"),
        ([(5, {"en": 1.0})], "starts at step 5"),
        ([(0, {"en": 1.0}), (10, {"en": 1.0}), (10, {"en": 1.0})], "appears twice"),
        ([(0, {"en": 1.0}), (20, {"en": 1.0}), (10, {"en": 1.0})], "not increasing"),
        ([(-1, {"en": 1.0})], "bad schedule step"),
        ([(1.5, {"en": 1.0})], "bad schedule step"),
        ([(0, {"en": 0.5, "ru": 0.5}), (10, {"en": 1.0})], "no weight for domain ru"),
        ([(0, {"en": 1.0}), (10, {"en": 0.5, "de": 0.5})], "unknown domain de"),
        ([(0, {"en": 1.2, "ru": -0.2})], "negative weight"),
        ([(0, {"en": 0.7, "ru": 0.2})], "sum to"),
        ([(0, {"en": math.nan, "ru": 0.2})], "is nan"),
        ([(0, {"en": math.inf, "ru": 0.2})], "is inf"),
    ],
)
def test_schedule_errors(entries, pattern):
    with pytest.raises(CommuteError, match=pattern):
        Schedule.from_entries(entries)


# ----------------------------------------------------------------------------------------------- files


def test_json_forms(tmp_path):
    records = piecewise().to_records()
    for name, content in [("list.json", records), ("wrapped.json", {"schedule": records, "other": 1})]:
        (tmp_path / name).write_text(json.dumps(content))
        assert load_schedule(tmp_path / name) == piecewise()


def test_manifest_is_a_schedule_file(tmp_path):
    manifest = {"format": "commute-manifest/1", "schedule": [{"step": 0, "weights": {"en": 0.8, "ru": 0.2}}]}
    (tmp_path / "commute.json").write_text(json.dumps(manifest))
    assert load_schedule(tmp_path / "commute.json", ["en", "ru"]).weights_at(7) == {"en": 0.8, "ru": 0.2}


def test_csv_form(tmp_path):
    text = "step,en,ru\n0,0.8,0.2\n100, 0.5 , 0.5\n\n250,1,0\n"
    (tmp_path / "s.csv").write_text(text)
    assert load_schedule(tmp_path / "s.csv") == piecewise()
    # any extension: the content decides
    (tmp_path / "s.txt").write_text(text)
    assert load_schedule(tmp_path / "s.txt") == piecewise()


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_save_load_round_trip(tmp_path, suffix):
    s = Schedule.from_entries(
        [(0, {"a": 0.1, "b": 0.2, "c": 0.7}), (7, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})]
    )
    path = save_schedule(s, tmp_path / "sub" / f"sched{suffix}")
    assert load_schedule(path) == s
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_save_is_atomic_replace(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("old")
    save_schedule(piecewise(), path)
    assert load_schedule(path) == piecewise()


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", "empty schedule"),
        ("step,en,ru\n", "empty schedule"),
        ("en,ru\n0.8,0.2\n", "header must be step"),
        ("step\n0\n", "header must be step"),
        ("step,en,en\n0,0.5,0.5\n", "repeated domain"),
        ("step,en,ru\n0,0.8\n", "has 2 fields"),
        ("step,en,ru\n0.5,0.8,0.2\n", "bad step"),
        ("step,en,ru\nx,0.8,0.2\n", "bad step"),
        ("step,en,ru\n0,0.8,zero\n", "not a number"),
        ("step,en,ru\n0,0.8,NaN\n", "is NaN"),
        ("step,en,ru\n0,1.2,-0.2\n", "negative weight"),
        ("step,en,ru\n0,0.8,0.3\n", "sum to 1.1"),
        ("step,en,ru\n10,0.8,0.2\n", "starts at step 10"),
        ("step,en,ru\n0,0.8,0.2\n0,0.5,0.5\n", "appears twice"),
        ("step,en,ru\n0,0.8,0.2\n50,0.5,0.5\n20,0.5,0.5\n", "not increasing"),
        ("[", "not valid JSON"),
        ("{}", "no 'schedule' key"),
        ('{"schedule": 3}', "must be a list"),
        ("[]", "empty schedule"),
        ('[{"step": 0}]', "not a {'step', 'weights'} object"),
        ('[{"step": -1, "weights": {"en": 1}}]', "bad step"),
        ('[{"step": "0", "weights": {"en": 1}}]', "bad step"),
        ('[{"step": 0, "weights": [1]}]', "not an object"),
        ('[{"step": 0, "weights": {"en": "1"}}]', "not a number"),
        ('[{"step": 0, "weights": {"en": NaN, "ru": 1}}]', "is nan"),
        ('[{"step": 0, "weights": {"en": 0.5, "ru": 0.4}}]', "sum to 0.9"),
    ],
)
def test_file_errors(tmp_path, text, pattern):
    path = tmp_path / "bad"
    path.write_text(text)
    with pytest.raises(CommuteError, match=pattern) as info:
        load_schedule(path)
    assert info.value.hint


def test_file_checked_against_domains(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("step,en,de\n0,0.8,0.2\n")
    with pytest.raises(CommuteError, match="unknown domain de"):
        load_schedule(path, ["en", "ru"])
    path.write_text("step,en\n0,1\n")
    with pytest.raises(CommuteError, match="no weight for domain ru"):
        load_schedule(path, ["en", "ru"])


def test_missing_file(tmp_path):
    with pytest.raises(CommuteError, match="not found"):
        load_schedule(tmp_path / "nope.csv")


def test_error_names_the_line(tmp_path):
    with pytest.raises(CommuteError, match="line 3"):
        parse_schedule_csv("step,en,ru\n0,0.8,0.2\n10,0.9,0.2\n")


# ----------------------------------------------------------------------------------------------- properties

_names = st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), min_size=1, max_size=5, unique=True)


@st.composite
def schedules(draw):
    names = draw(_names)
    n = draw(st.integers(1, 6))
    gaps = draw(st.lists(st.integers(1, 10_000), min_size=n - 1, max_size=n - 1))
    steps = [0]
    for g in gaps:
        steps.append(steps[-1] + g)
    entries = []
    for s in steps:
        raw = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=len(names), max_size=len(names)))
        if sum(raw) == 0:
            raw = [1.0] + [0.0] * (len(names) - 1)
        total = math.fsum(raw)
        entries.append((s, dict(zip(names, [x / total for x in raw], strict=True))))
    return Schedule.from_entries(entries)


@settings(max_examples=60, deadline=None)
@given(schedules())
def test_round_trip_property(s):
    assert parse_schedule_text(s.to_json()) == s
    assert parse_schedule_text(s.to_csv()) == s
    assert Schedule.from_records(s.to_records()) == s


@settings(max_examples=60, deadline=None)
@given(schedules(), st.integers(0, 100_000))
def test_weights_at_property(s, step):
    w = s.weights_at(step)
    i = max(k for k, start in enumerate(s.steps) if start <= step)
    assert w == s.entries[i][1]
    assert abs(math.fsum(w.values()) - 1) <= 1e-6


@settings(max_examples=80, deadline=None)
@given(schedules(), st.sampled_from([" ", ",", ", "]))
def test_parse_weights_property(s, sep):
    w = s.entries[0][1]
    text = sep.join(f"{k}={v!r}" for k, v in w.items())
    assert parse_weights(text) == w
    assert parse_weights(text, list(reversed(w))) == dict(reversed(list(w.items())))


def test_the_normalized_weights_a_hint_suggests_parse_as_given():
    """The hint for weights that do not sum to 1 is pasted back where it came from: ``--weights`` takes
    space-separated pairs, ``--target`` one comma-separated argument."""
    import re

    from commute_cli.core.regime import parse_targets
    from commute_cli.core.schedule import parse_weights

    for call, joiner in (
        (lambda s: parse_targets([s], ["en", "ru"]), ","),
        (lambda s: parse_weights(s), " "),
    ):
        text = "en=0.5,ru=0.6" if joiner == "," else "en=0.5 ru=0.6"
        with pytest.raises(CommuteError) as err:
            call(text)
        hint = re.search(r"e\.g\. (\S+(?: \S+)*)", str(err.value.hint)).group(1)
        assert hint == f"en=0.454545{joiner}ru=0.545455"
        call(hint)  # no error
