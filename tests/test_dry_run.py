"""``analyze --dry-run`` counts the cache (issue 21): checkpoints whose statistics ``--out`` already holds
(under the run's own keys) take no compute in the estimate, and it says how many; the time per gradient
sequence is the median of several warm passes."""

from __future__ import annotations

import re

import pytest
import torch

from commute_cli.commands.analyze import AnalyzeOptions
from commute_cli.commands.preview import TIMED_PASSES, preview, time_gradient

from cli_runner import cli
from tiny_run import make_run

FAST = ["--samples", "24", "--blocks", "4"]


def estimate(stdout: str) -> float:
    m = re.search(r"estimated time: (\d+) s \(start-up (\d+) s", stdout)
    assert m is not None, stdout
    return float(m.group(1))


@pytest.mark.slow
def test_the_dry_run_counts_cached_checkpoints(tmp_path, capsys):
    run = make_run(tmp_path / "run", steps=(0, 10, 20))
    out = tmp_path / "out"
    code, cold, err = cli(["analyze", run, "--out", out, "--dry-run", *FAST], capsys)
    assert code == 0, err
    assert "cache: none of the 3 checkpoint(s)" in cold and not out.exists()
    code, _, err = cli(["analyze", run, "--out", out, "--steps", "10", "-q", *FAST], capsys)
    assert code == 0, err
    code, part, err = cli(["analyze", run, "--out", out, "--dry-run", *FAST], capsys)
    assert code == 0, err
    assert "cache: 1 of 3 checkpoint(s) already in" in part and "2 checkpoint(s) to load and compute" in part
    code, _, err = cli(["analyze", run, "--out", out, "-q", *FAST], capsys)
    assert code == 0, err
    code, full, err = cli(["analyze", run, "--out", out, "--dry-run", *FAST], capsys)
    assert code == 0, err
    assert "cache: 3 of 3 checkpoint(s) already in" in full and "nothing to compute" in full
    assert "0 checkpoint(s) to load and compute" in full
    # the real rerun agrees: every checkpoint came from the cache
    code, _, err = cli(["analyze", run, "--out", out, *FAST], capsys)
    assert "cache: 3 of 3 checkpoints read from" in err
    # what changes the statistics is another key: --blocks 2 is not cached; --no-cache ignores the cache
    other_key = ["--samples", "24", "--blocks", "2"]
    code, other, _ = cli(["analyze", run, "--out", out, "--dry-run", *other_key], capsys)
    assert "cache: none of the 3 checkpoint(s)" in other
    code, nocache, _ = cli(["analyze", run, "--out", out, "--dry-run", "--no-cache", *FAST], capsys)
    assert "--no-cache: every checkpoint is computed" in nocache


def test_preview_estimate_is_its_parts(tmp_path):
    """The estimate adds start-up, sampling, loads and compute; compute is the passes x the measured time
    per gradient sequence for the checkpoints not cached."""
    run = make_run(tmp_path / "run", steps=(0, 10))
    p = preview(AnalyzeOptions(ckpt_dir=run, samples=24, blocks=4, out=tmp_path / "out", device="cpu"))
    assert p["cached"] == [] and p["seconds_per_gradient_sequence"] > 0
    per_seq, per_hvp = p["seconds_per_gradient_sequence"], p["seconds_per_hvp_sequence"]
    assert per_hvp > 0
    assert p["compute_seconds"] == pytest.approx(
        p["gradient_sequences"] * per_seq + p["hvp_sequences"] * per_hvp
    )
    parts = p["startup_seconds"] + p["sampling_seconds"] + p["first_load_seconds"] + p["load_seconds"]
    assert p["estimated_seconds"] == pytest.approx(parts + p["compute_seconds"])


def test_time_gradient_is_a_median_of_warm_passes():
    from transformers import GPT2LMHeadModel

    from tiny_run import tiny_config

    model = GPT2LMHeadModel(tiny_config(50)).eval()
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    per_seq = time_gradient(model, ids, torch.device("cpu"))
    assert TIMED_PASSES >= 3 and 0 < per_seq < 1.0
    grad = model.transformer.wte.weight.grad
    assert grad is None or torch.isfinite(grad).all()
