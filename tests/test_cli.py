"""The command line as a user meets it, through the INSTALLED console script (``.venv/bin/commute``):
usage errors are one line and exit 2, every subcommand has a working ``--help``, and every example that a
``--help`` shows runs as written from the repository root (on the shipped ``sample_checkpoints/``)."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMUTE = Path(sys.executable).parent / "commute"
SUBCOMMANDS = ("toy", "analyze", "train", "validate", "recommend", "plot")
SHARDS = REPO / "sample_checkpoints" / "data"


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(
        PYTHONPATH=str(REPO),  # this checkout's package, even when another one is installed editable
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        COLUMNS="100",
    )
    out.update(extra)
    return out


def commute(
    *args: str, cwd: Path | None = None, timeout: float = 120, **extra: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(COMMUTE), *args], capture_output=True, text=True, env=env(**extra), cwd=cwd, timeout=timeout
    )


def test_the_console_script_is_installed():
    assert COMMUTE.is_file() and os.access(COMMUTE, os.X_OK), COMMUTE


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["analyze"], "Missing argument 'CKPT_DIR'"),
        (["validate"], "Missing argument 'CKPT'"),
        (["train"], "Missing argument 'OUT_DIR'"),
        (["toy", "--bogus"], "No such option: --bogus"),
        (["toy", "--dim", "abc"], "Invalid value for '--dim'"),
        (["toy", "--samples", "1.5"], "Invalid value for '--samples'"),
        (["analyse", "x"], "No such command 'analyse'"),
        (["analyze", "sample_checkpoints", "--domains", "en"], "domain spec 'en' has no '='"),
        (["train", "out", "--domains", "en"], "domain spec 'en' has no '='"),
        (["validate", "sample_checkpoints/checkpoint-500", "--domains", "ru"], "domain spec 'ru' has no '='"),
        (["toy", "--format", "xml"], "'xml' is not one of 'table', 'csv', 'json'"),
        (["analyze", "sample_checkpoints", "--metric", "fisher"], "'fisher' is not one of"),
        (["train", "out", "--optimizer", "lion"], "'lion' is not one of"),
        (["validate", "x", "--device", "tpu"], "'tpu' is not one of"),
        (["validate", "x", "--horizon", "3", "--steps", "3"], "--steps is the old name of --horizon"),
        ([], "no command given"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, fragment, tmp_path):
    res = commute(*args, cwd=REPO)
    assert res.returncode == 2, (args, res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert fragment in lines[0], lines[0]
    assert "(hint: " in lines[0]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_of_every_subcommand(sub):
    res = commute(sub, "--help")
    assert res.returncode == 0, res.stderr
    assert f"commute {sub}" in res.stdout and "--help" in res.stdout
    assert "Example: commute " + sub in " ".join(res.stdout.split()), f"{sub} --help shows no example"


def test_help_hides_the_old_flag_names_but_accepts_them():
    val, ana = commute("validate", "--help").stdout, commute("analyze", "--help").stdout
    assert "--horizon" in val and "--steps" not in val
    assert "--micro-batch" in ana and "--batch-size" not in ana


def stray_line_breaks(text: str, width: int) -> list[str]:
    """Lines of a rendered ``--help`` that end inside a sentence although the next word would have fit:
    a hard line break from the source, not the terminal's wrapping. A line ending without punctuation,
    followed by one that continues the same text (same indent, lowercase start)."""
    bad = []
    lines = [line.rstrip().rstrip("│").rstrip() for line in text.splitlines()]
    for prev, nxt in itertools.pairwise(lines):
        body, following = prev.lstrip("│ "), nxt.lstrip("│ ")
        if not body or not following or not following[0].islower():
            continue
        if len(prev) - len(prev.lstrip("│ ")) != len(nxt) - len(nxt.lstrip("│ ")):
            continue  # another column or paragraph, not the same text
        if body[-1] in ".:;!?)]" or len(prev) + 1 + len(following.split()[0]) > width - 3:
            continue
        bad.append(f"{prev.strip()!r} / {nxt.strip()!r}")
    return bad


@pytest.mark.parametrize("sub", ["", *SUBCOMMANDS, "help"])
def test_no_help_breaks_a_line_inside_a_sentence(sub):
    """Docstrings are paragraphs in --help (``cli.app.help_paragraphs``): at a wide terminal no line of
    prose ends early inside a sentence, in a command's help or in the top-level command list."""
    res = commute(*([sub] if sub else []), "--help", COLUMNS="200")
    assert res.returncode == 0, res.stderr
    assert not stray_line_breaks(res.stdout, 200), stray_line_breaks(res.stdout, 200)


def test_the_stray_line_break_check_finds_one():
    text = " Saves checkpoints, so an\n interrupted run resumes.\n"
    assert stray_line_breaks(text, 200) and not stray_line_breaks(text.replace("\n i", " i"), 200)


def help_examples(subs: tuple[str, ...] = (*SUBCOMMANDS, "help")) -> dict[str, list[str]]:
    """``Example: commute ...`` of each subcommand's --help, as a user sees it (wide terminal, panel
    borders removed)."""
    out = {}
    for sub in subs:
        text = commute(sub, "--help", COLUMNS="400").stdout
        lines = [line.strip().strip("│").strip() for line in text.splitlines()]
        out[sub] = [m.group(1).strip() for line in lines if (m := re.match(r"Example: (commute .*)$", line))]
    return out


@pytest.mark.slow
def test_every_help_example_runs_as_written(tmp_path):
    """The examples, literally, in the order a user would run them (train, analyze, validate, recommend,
    plot, toy, help) from the repository root: the working folder holds the repository's own
    ``sample_checkpoints/`` (linked), so every path resolves as at the root, and what the examples write
    (``commute_out/``, ``runs/example``, ``criterion.png``) lands in a temporary folder, not the checkout."""
    examples = help_examples()
    assert all(examples.values()), examples
    for example in (e for found in examples.values() for e in found):  # shipped inputs, no placeholders
        paths = [a for a in example.split() if "/" in a and not a.startswith("-")]
        assert all(a.startswith(("sample_checkpoints", "runs/")) for a in paths), example
    (tmp_path / "sample_checkpoints").symlink_to(REPO / "sample_checkpoints", target_is_directory=True)
    order = ["train", "analyze", "validate", "recommend", "plot", "toy", "help"]
    for sub in order:
        for example in examples[sub]:
            res = commute(*example.split()[1:], cwd=tmp_path, timeout=600)
            assert res.returncode == 0, (example, res.stderr[-2000:])
            assert "Traceback" not in res.stderr
    assert (tmp_path / "runs" / "example" / "commute.json").is_file()
    assert (tmp_path / "commute_out" / "results.csv").is_file()
    assert (tmp_path / "runs" / "h10" / "validate.csv").is_file() and (tmp_path / "criterion.png").is_file()
    assert not (tmp_path / "commute_out" / "validate.csv").exists()  # the tour's validation is left alone
    assert (tmp_path / "runs" / "advice" / "schedule.csv").is_file()  # recommend proposed a change
