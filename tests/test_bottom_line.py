"""analyze's bottom line (issue 21): the one change its rows support, or that none is, checked against the
results.csv that the same command wrote on a tiny real run, and the command it prints run as printed."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pandas as pd
import pytest

from commute_cli.core.bottom_line import bottom_line
from commute_cli.core.known_sizes import FOLLOWED_LOCAL_SWAPS
from commute_cli.render.bottom_line import act_command, bottom_line_lines

from cli_runner import cli
from tiny_run import make_run

FAST = ["--samples", "24", "--blocks", "4", "--quiet"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SGD run and the folder its analysis goes to."""
    root = tmp_path_factory.mktemp("bottom")
    run = make_run(root / "run", steps=(0, 10, 20))
    return run, root / "out"


def expected_choice(res: pd.DataFrame) -> pd.Series | None:
    """The reference: among 'suboptimal' rows not outside/saturated, the largest |el_ij| (pandas only)."""
    ok = res[(res["verdict"] == "suboptimal") & ~res["regime"].isin(["outside", "saturated"])]
    return None if ok.empty else ok.loc[ok["el_ij"].abs().idxmax()]


def test_the_printed_bottom_line_matches_results_csv(analysed, capsys):
    run, out = analysed
    code, stdout, stderr = cli(["analyze", run, "--out", out, *FAST], capsys)
    assert code == 0, stderr
    res = pd.read_csv(out / "results.csv")
    rows = res.to_dict("records")
    meta = json.loads((out / "run.json").read_text())
    line = bottom_line(rows, meta["optimizer"])
    lines = stdout.rstrip("\n").splitlines()
    block = lines[next(k for k, t in enumerate(lines) if t.startswith("bottom line:")) :]
    assert block == bottom_line_lines(line, str(out)) and len(block) <= 6
    assert line.rows == len(res) and line.significant == int((res["verdict"] == "suboptimal").sum())
    best = expected_choice(res)
    if best is None:
        assert line.change is None and "no change is supported" in block[0]
    else:
        assert line.change is not None and line.change.step == best["step"]
        earlier = best["domain_i"] if best["el_ij"] < 0 else best["domain_j"]
        assert line.change.earlier == earlier and f"move {earlier} earlier" in block[0]
        same = res[(res["step"] == best["step"]) & (res["domain_i"] == best["domain_i"])]
        sign = -1.0 if best["el_ij"] > 0 else 1.0
        assert {e.target: e.change for e in line.effects} == pytest.approx(
            dict(zip(same["target"], sign * same["el_ij"], strict=True))
        )
        assert {e.target: e.half_width for e in line.effects} == pytest.approx(
            dict(zip(same["target"], same["t_crit"] * same["el_se"], strict=True))
        )
    # the command it prints names the folder the results are in, and recommend reads it as printed
    act = next(t for t in block if "commute recommend" in t).split(": ", 1)[1].split("  (")[0]
    argv = shlex.split(act)
    assert argv[:2] == ["commute", "recommend"] and argv[argv.index("--from") + 1] == str(out)
    code, _, stderr = cli([*argv[1:], "--no-verify", "--out", out / "hyp"], capsys)
    assert code == 0, stderr


def test_choice_direction_and_left_out_rows(analysed, capsys):
    """Rows of the real results.csv, with verdicts set by hand: the largest usable |EL| wins, a positive EL
    moves j earlier and flips every target's sign, outside/saturated rows are left out and counted."""
    run, out = analysed
    if not (out / "results.csv").is_file():
        code, _, stderr = cli(["analyze", run, "--out", out, *FAST], capsys)
        assert code == 0, stderr
    res = pd.read_csv(out / "results.csv")
    res["verdict"] = "insufficient signal"
    res["regime"] = "inside"
    pos = res["el_ij"].abs().idxmax()
    res.loc[pos, "el_ij"] = abs(res.loc[pos, "el_ij"])  # moving j earlier helps this row's target
    res.loc[pos, "verdict"] = "suboptimal"
    big = res.index[res.index != pos][0]
    res.loc[big, ["el_ij", "verdict", "regime"]] = [10.0, "suboptimal", "outside"]
    line = bottom_line(res.to_dict("records"), "AdamW")
    r = res.loc[pos]
    assert line.change is not None and (line.change.earlier, line.change.later) == (r.domain_j, r.domain_i)
    assert (line.significant, line.unusable) == (2, 1)
    same = res[res["step"] == r.step]
    assert {e.target: e.change for e in line.effects} == pytest.approx(
        dict(zip(same["target"], -same["el_ij"], strict=True))
    )
    text = "\n".join(bottom_line_lines(line))
    assert "1 of them outside the local regime, left out" in text
    assert "right sign in 6 of 10 real interventions" in text  # the AdamW record of core.known_sizes
    sgd = "\n".join(bottom_line_lines(bottom_line(res.to_dict("records"), "SGD")))
    assert "plain-SGD run inside the local regime" in sgd and "9 of 13 signs right" in sgd
    unknown = "\n".join(bottom_line_lines(bottom_line(res.to_dict("records"), "Lion")))
    assert "not measured for this run's optimizer" in unknown
    # nothing usable: none supported, and the command still runs recommend on a target of the run
    res.loc[pos, "regime"] = "saturated"
    none = bottom_line(res.to_dict("records"), "SGD")
    assert none.change is None and none.effects == () and none.unusable == 2
    words = bottom_line_lines(none)
    assert len(words) == 2 and "no change is supported: 2 of the 2 significant rows" in words[0]
    assert "commute recommend --target mix" in words[1]


def test_act_command_quotes_and_names_the_folder():
    assert act_command("ru") == "commute recommend --target ru"
    assert act_command("ru", "commute_out/") == "commute recommend --target ru"
    quoted = "commute recommend --target en=0.3,ru=0.7 --from 'my out'"
    assert act_command("en=0.3,ru=0.7", "my out") == quoted


def test_followed_advice_is_the_committed_measurement():
    """The shipped-run numbers the bottom line quotes: the late phase's realised/predicted ratio from
    benchmarks/results/advice_shipped.json, the local swaps' 4-7% from docs/DECISIONS.md."""
    shipped = json.loads((REPO / "benchmarks" / "results" / "advice_shipped.json").read_text())
    ratio = shipped["targets"]["ru"]["result"]["realised_over_predicted"]
    assert FOLLOWED_LOCAL_SWAPS.late_phase == pytest.approx(ratio, abs=5e-4)
    low, high = round(100 * FOLLOWED_LOCAL_SWAPS.low), round(100 * FOLLOWED_LOCAL_SWAPS.high)
    assert f"local swaps moved their target by {low}-{high}% of the prediction" in " ".join(
        (REPO / "docs" / "DECISIONS.md").read_text().split()
    )
