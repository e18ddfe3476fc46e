"""recommend and plot read the top-level analysis of ``--from``; when other analyses sit beside it in
``run-<id>/`` folders (another ``--target`` or ``--steps``), they say so in one line and name the flag that
picks one (issue 21), and the line's ``--from`` runs as printed."""

from __future__ import annotations

import re
import shlex

from commute_cli.io import store

from cli_runner import cli
from tiny_run import make_run

FAST = ["--samples", "12", "--blocks", "2", "--quiet"]


def test_plot_and_recommend_name_the_other_runs(tmp_path, capsys):
    run = make_run(tmp_path / "run", steps=(0, 10, 20))
    out = tmp_path / "out"
    code, _, err = cli(["analyze", run, "--out", out, *FAST], capsys)
    assert code == 0, err
    code, _, err = cli(["plot", "-o", tmp_path / "a.png", "--from", out], capsys)
    assert code == 0 and "also holds" not in err  # one analysis: nothing to say
    code, _, err = cli(["analyze", run, "--out", out, "--steps", "10", *FAST], capsys)
    assert code == 0, err
    others = [p for p in out.iterdir() if p.name.startswith("run-")]
    assert len(others) == 1 and (others[0] / "run.json").is_file()
    assert store.other_analyses(out)[0][0] == others[0]
    for argv in (["plot", "-o", tmp_path / "b.png"], ["recommend", "--target", "en", "--kind", "local"]):
        code, _, err = cli([*argv, "--from", out], capsys)
        assert code == 0, err
        notes = [line for line in err.splitlines() if "also holds" in line]
        assert len(notes) == 1, err
        assert f"{others[0]}/" in notes[0] and "selected steps" in notes[0]  # what differs, in words
        flag = re.search(r"choose one with (--from \S+)$", notes[0])
        assert flag is not None, notes[0]
    picked = shlex.split(flag.group(1))
    code, _, err = cli(["recommend", "--target", "en", "--kind", "local", *picked], capsys)
    assert code == 0, err
    assert "recommendation for run " + others[0].name[4:] in err  # the picked run is the one read
    assert not store.other_analyses(others[0])
