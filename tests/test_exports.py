"""``commute recommend --export FORMAT``: a schedule as the files other trainers read, every one keeping the
rows per domain of the schedule exactly.

- ``core.stages``: over random piecewise schedules on a batch grid, the stages tile ``[0, T)`` and their rows
  per domain equal an independent count (step by step, ``B w`` as a Fraction of the numbers the schedule
  holds) and ``core.phases.window_rows``.
- Each format is read back by the trainer's own parser where it installs (Megatron-core's
  ``get_blend_from_list`` and its C++ blending indices; ``datasets.interleave_datasets`` on real
  ``Dataset`` objects), by PyYAML against nanotron's documented ``DatasetStageArgs`` otherwise, and by
  commute's own schedule parser (``csv-steps``); the rows each one draws per domain are the schedule's.
- The command: files beside schedule.json with their paths printed, "nothing exported" and why when nothing
  is proposed, one-line errors for torchtitan, an unknown format and a missing batch size.
"""

from __future__ import annotations

import itertools
import json
import shlex
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from commute_cli.core.phases import window_rows
from commute_cli.core.schedule import Schedule, parse_schedule_csv
from commute_cli.core.stages import schedule_stages, stage_totals
from commute_cli.errors import CommuteError
from commute_cli.io import exports

from analysis_folders import LOCAL, synthetic_results
from cli_runner import cli


def exact_rows(schedule: Schedule, last: int, batch: int) -> dict[str, int]:
    """Independent reference: step by step, ``B w`` of the number the schedule holds (an exact Fraction),
    which is a whole number of rows up to the float's last digits (the weights are on the batch's grid)."""
    out = dict.fromkeys(schedule.domains, 0)
    for s in range(last):
        for n, w in schedule.weights_at(s).items():
            x = batch * Fraction(repr(w))
            assert abs(x - round(x)) < Fraction(1, 10**9)
            out[n] += round(x)
    return out


@st.composite
def grid_schedules(draw):
    """A piecewise schedule whose weights are whole rows of a batch of B (K = 2..4), and a last step."""
    batch = draw(st.integers(1, 32))
    k = draw(st.integers(2, 4))
    n_entries = draw(st.integers(1, 5))
    steps = sorted(draw(st.sets(st.integers(1, 60), min_size=n_entries - 1, max_size=n_entries - 1)))
    entries = []
    for step in [0, *steps]:
        cuts = sorted(draw(st.lists(st.integers(0, batch), min_size=k - 1, max_size=k - 1)))
        rows = [b - a for a, b in zip([0, *cuts], [*cuts, batch], strict=True)]
        entries.append((step, {f"d{i}": r / batch for i, r in enumerate(rows)}))
    last = draw(st.integers(1, 80))
    return Schedule.from_entries(entries), last, batch


SCHEDULE = Schedule.from_entries(
    [
        (0, {"en": 0.75, "ru": 0.25, "de": 0.0}),
        (6, {"en": 0.5, "ru": 0.25, "de": 0.25}),
        (9, {"en": 0.0, "ru": 1.0, "de": 0.0}),
    ]
)
LAST, BATCH = 13, 8
TOTALS = exact_rows(SCHEDULE, LAST, BATCH)  # en 52, ru 44, de 8


# ------------------------------------------------------------------------------------------------ stages


@settings(max_examples=150, deadline=None)
@given(grid_schedules())
def test_stages_tile_the_run_and_keep_every_domains_rows(case):
    schedule, last, batch = case
    stages = schedule_stages(schedule, last, batch)
    assert stages[0].start == 0 and stages[-1].end == last
    assert all(a.end == b.start and a.rows != b.rows for a, b in itertools.pairwise(stages))
    assert all(sum(s.rows) == batch and s.steps > 0 for s in stages)
    assert stage_totals(stages) == exact_rows(schedule, last, batch) == window_rows(schedule, 0, last, batch)


def test_stages_refuse_an_empty_run_or_batch():
    with pytest.raises(CommuteError, match="last step is 0"):
        schedule_stages(SCHEDULE, 0, 8)
    with pytest.raises(CommuteError, match="batch size must be positive"):
        schedule_stages(SCHEDULE, 10, 0)


# ------------------------------------------------------------------------------------------------ formats


def test_csv_steps_is_one_line_per_step_that_commute_reads_back(tmp_path):
    (file,) = exports.write_exports(SCHEDULE, ["csv-steps"], tmp_path, last=LAST, batch_size=BATCH)
    text = file.read_text()
    assert file.name == "schedule_steps.csv" and len(text.splitlines()) == LAST + 1
    back = parse_schedule_csv(text, SCHEDULE.domains)
    assert back.steps == tuple(range(LAST))
    assert all(back.weights_at(s) == SCHEDULE.weights_at(s) for s in range(LAST))
    assert exact_rows(back, LAST, BATCH) == TOTALS


def test_hf_interleave_draws_each_domains_rows_exactly_with_real_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    (file,) = exports.write_exports(
        SCHEDULE, ["hf-interleave"], tmp_path, last=LAST, batch_size=BATCH, seed=3
    )
    spec = json.loads(file.read_text())
    assert spec["domains"] == ["en", "ru", "de"] and spec["totals"] == TOTALS and spec["seed"] == 3
    # one Dataset per domain, longer than the run needs; an id column says which row was drawn
    ds = {
        d: datasets.Dataset.from_dict({"domain": [d] * 100, "id": list(range(100))}) for d in spec["domains"]
    }
    drawn: Counter[str] = Counter()
    ids: dict[str, list[int]] = {d: [] for d in spec["domains"]}
    for phase in spec["phases"]:
        assert sum(phase["probabilities"]) == pytest.approx(1.0) and 0 not in phase["probabilities"]
        parts = [
            ds[d].select(range(phase["offsets"][d], phase["offsets"][d] + phase["rows"][d]))
            for d in phase["domains"]
        ]
        mixed = datasets.interleave_datasets(
            parts,
            probabilities=phase["probabilities"],
            seed=spec["seed"],
            stopping_strategy=spec["stopping_strategy"],
        )
        assert len(mixed) == phase["max_steps"] * spec["batch_size"] == phase["examples"]
        counts = Counter(mixed["domain"])
        assert dict(counts) == phase["rows"]
        drawn.update(counts)
        for d, i in zip(mixed["domain"], mixed["id"], strict=True):
            ids[d].append(i)
    assert dict(drawn) == TOTALS
    assert all(sorted(ids[d]) == list(range(TOTALS[d])) for d in ids)  # every row once, none twice


def megatron_rows(text: str) -> tuple[dict[str, int], int]:
    """What Megatron reads from the ``megatron`` export: each line's ``--data-path`` through Megatron-core's
    own ``get_blend_from_list`` and ``normalize``, its blend of ``--train-iters x --global-batch-size``
    samples built by Megatron's C++ ``build_blending_indices``, the phase reading samples
    ``[start * B, end * B)`` (a resumed run skips what the earlier phases consumed). Returns the samples per
    domain and the last step."""
    utils = pytest.importorskip("megatron.core.datasets.utils")
    helpers = pytest.importorskip("megatron.core.datasets.helpers_cpp")
    lines = [shlex.split(x) for x in text.splitlines() if not x.startswith("#")]
    drawn: Counter[str] = Counter()
    start = 0
    for args in lines:
        i = args.index("--data-path")
        j = next(k for k in range(i + 1, len(args)) if args[k].startswith("--"))
        prefixes, weights = utils.get_blend_from_list(args[i + 1 : j])
        batch = int(args[args.index("--global-batch-size") + 1])
        end = int(args[args.index("--train-iters") + 1])
        assert weights is not None
        # Megatron's own blend over the run's samples; the phase reads samples [start * B, end * B)
        index = np.zeros(end * batch, dtype=np.int16)
        sample = np.zeros(end * batch, dtype=np.int64)
        helpers.build_blending_indices(
            index, sample, np.array(utils.normalize(weights)), len(weights), end * batch, False
        )
        counts = np.bincount(index[start * batch :], minlength=len(prefixes))
        drawn.update({p.strip("{}"): int(c) for p, c in zip(prefixes, counts, strict=True)})
        start = end
    return dict(drawn), start


def test_megatron_lines_parse_with_megatron_core_and_its_blend_reads_the_rows(tmp_path):
    (file,) = exports.write_exports(SCHEDULE, ["megatron"], tmp_path, last=LAST, batch_size=BATCH)
    drawn, end = megatron_rows(file.read_text())
    assert end == LAST and drawn == {d: n for d, n in TOTALS.items() if n}


@settings(max_examples=60, deadline=None)
@given(grid_schedules())
def test_megatrons_blend_reads_every_domains_rows_on_random_schedules(case):
    schedule, last, batch = case
    drawn, end = megatron_rows(exports.megatron_text(schedule_stages(schedule, last, batch)))
    want = exact_rows(schedule, last, batch)
    assert end == last and drawn == {d: n for d, n in want.items() if n}


def test_nanotron_data_stages_have_nanotrons_structure_and_keep_the_rows(tmp_path):
    (file,) = exports.write_exports(SCHEDULE, ["nanotron"], tmp_path, last=LAST, batch_size=BATCH, seed=5)
    stages = yaml.safe_load(file.read_text())["data_stages"]
    # nanotron's Config checks (config.py): a stage at step 1, unique names and steps, in increasing order
    starts = [s["start_training_step"] for s in stages]
    assert (
        starts[0] == 1 and starts == sorted(set(starts)) and len({s["name"] for s in stages}) == len(stages)
    )
    drawn: Counter[str] = Counter()
    for stage, end in zip(stages, [*starts[1:], LAST + 1], strict=True):
        assert set(stage) == {"name", "start_training_step", "data"}  # DatasetStageArgs' fields
        assert set(stage["data"]) <= {"dataset", "seed", "num_loading_workers"} and stage["data"]["seed"] == 5
        ds = stage["data"]["dataset"]  # NanosetDatasetsArgs
        assert set(ds) == {"dataset_folder", "dataset_weights"} and len(ds["dataset_folder"]) == len(
            ds["dataset_weights"]
        )
        assert sum(ds["dataset_weights"]) == pytest.approx(1.0)
        for folder, w in zip(ds["dataset_folder"], ds["dataset_weights"], strict=True):
            drawn[folder.strip("{}")] += int(Fraction(repr(w)) * BATCH * (end - stage["start_training_step"]))
    assert dict(drawn) == TOTALS


def test_torchtitan_and_unknown_formats_are_refused_with_the_list():
    with pytest.raises(CommuteError, match="torchtitan has no data stages") as err:
        exports.check_formats(["torchtitan"])
    assert "csv-steps, hf-interleave, megatron, nanotron" in (err.value.hint or "")
    with pytest.raises(CommuteError, match="unknown export format 'deepspeed'"):
        exports.check_formats(["deepspeed"])
    assert exports.check_formats(["Megatron", "megatron", "csv-steps"]) == ["megatron", "csv-steps"]


# ------------------------------------------------------------------------------------------------ command


def test_recommend_exports_beside_the_schedule_and_prints_the_paths(tmp_path, capsys):
    res = synthetic_results(tmp_path / "res")
    argv = [*LOCAL, "--target", "xx", "--from", res, "--batch-size", "10"]
    code, _, err = cli(
        [*argv, "--export", "nanotron", "--export", "csv-steps", "--export", "megatron"], capsys
    )
    assert code == 0, err
    schedule = Schedule.from_records(json.loads((res / "schedule.json").read_text()))
    last = json.loads((res / "recommend.json").read_text())["last_step"]
    for name in ("schedule_nanotron.yaml", "schedule_steps.csv", "schedule_megatron.txt"):
        assert str(res / name) in err
    steps = parse_schedule_csv((res / "schedule_steps.csv").read_text(), schedule.domains)
    assert exact_rows(steps, last, 10) == exact_rows(schedule, last, 10)
    assert not (res / "schedule_hf_interleave.json").exists()


def test_recommend_says_nothing_was_exported_and_why(tmp_path, capsys):
    res = synthetic_results(tmp_path / "res", verdict="insufficient signal")
    code, _, err = cli(
        [*LOCAL, "--target", "xx", "--from", res, "--batch-size", "10", "--export", "megatron"], capsys
    )
    assert code == 0, err
    assert "nothing exported (megatron): no schedule proposed; nothing significant for target xx" in err
    assert not (res / "schedule_megatron.txt").exists()


def test_recommend_export_errors_are_one_line(tmp_path, capsys):
    res = synthetic_results(tmp_path / "res")
    code, _, err = cli([*LOCAL, "--target", "xx", "--from", res, "--export", "torchtitan"], capsys)
    assert code == 2 and "torchtitan has no data stages" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli([*LOCAL, "--target", "xx", "--from", res, "--export", "megatron"], capsys)
    assert code == 2 and "--export needs the run's batch size" in err and "--batch-size" in err
    assert not (Path(res) / "schedule.json").exists()  # refused before anything was written


def test_recommend_phases_exports_the_run_data_per_domain(tmp_path, capsys):
    """The default kind (a late phase, here unverified: no training) exports its schedule; the late phase
    moves data, it does not add any: the totals are those of the run's own schedule."""
    res = synthetic_results(tmp_path / "res")
    argv = [
        "recommend",
        "--target",
        "xx",
        "--from",
        res,
        "--no-verify",
        "--batch-size",
        "10",
        "--until",
        "400",
    ]
    code, _, err = cli([*argv, "--export", "hf-interleave", "-q"], capsys)
    assert code == 0, err
    assert f"exported {res / 'schedule_hf_interleave.json'}" in err
    spec = json.loads((res / "schedule_hf_interleave.json").read_text())
    chosen = Schedule.from_records(json.loads((res / "schedule.json").read_text()))
    assert len(spec["phases"]) == len(schedule_stages(chosen, 400, 10)) >= 2
    assert (
        spec["totals"]
        == exact_rows(chosen, 400, 10)
        == exact_rows(Schedule.constant({"en": 0.7, "xx": 0.3}), 400, 10)
    )


def test_without_a_proposal_the_exports_of_an_earlier_answer_are_removed(tmp_path, capsys):
    """recommend --kind phases removes the schedule files of an earlier answer when it proposes nothing
    (a schedule of another answer must not be taken for this one), and their exports with them."""
    res = synthetic_results(tmp_path / "res")
    argv = [
        "recommend",
        "--target",
        "xx",
        "--from",
        res,
        "--no-verify",
        "--batch-size",
        "10",
        "--until",
        "400",
    ]
    assert cli([*argv, "--export", "csv-steps", "--export", "nanotron", "-q"], capsys)[0] == 0
    assert (res / "schedule_steps.csv").is_file() and (res / "schedule_nanotron.yaml").is_file()
    flat = pd.read_csv(res / "results.csv").assign(el_ij=0.0)  # the bracket favours no late phase now
    flat.to_csv(res / "results.csv", index=False)
    code, _, err = cli([*argv, "--export", "csv-steps", "-q"], capsys)
    assert code == 0, err
    assert "nothing exported (csv-steps): no schedule proposed;" in err
    assert not any(
        (res / f).exists() for f in ("schedule.json", "schedule_steps.csv", "schedule_nanotron.yaml")
    )
