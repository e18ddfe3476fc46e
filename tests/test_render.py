"""The render layer: number formats, the analysis table at 80-120 columns, the column documentation, the
progress bars and their ETA, and the layer's import rule.

The table is checked on a real ``commute analyze`` output (a tiny run whose manifest has a validation
split) and on tables with the columns other branches add (``horizon_reason``, ``regime``, ``negligible``).
"""

from __future__ import annotations

import ast
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from commute_cli.render import analysis_progress, columns, progress, style, tables

from cli_runner import cli
from tiny_run import make_run

RENDER = Path(tables.__file__).parent
SI = {"p": 1e-12, "n": 1e-9, "µ": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


def parse_si(text: str, unit: str = "nat") -> list[float]:
    """Numbers of ``"a ± b <prefix>unit"`` or ``"a <prefix>unit"`` back as floats."""
    m = re.fullmatch(rf"(-?[\d.]+)(?: ± ([\d.]+))? (\S?){unit}", text)
    assert m, text
    factor = SI[m.group(3)]
    return [float(g) * factor for g in m.groups()[:2] if g is not None]


# --------------------------------------------------------------------------------------------------
# number formats


def test_format_si_examples():
    assert style.format_si(-0.018159) == "-18.2 mnat"
    assert style.format_si(4.41269, digits=4) == "4.413 nat"
    assert style.format_si(4e-8) == "40.0 nnat"
    assert style.format_si(0.0) == "0.00 nat"
    assert style.format_si(float("nan")) == "nan"
    assert style.format_si(0.9999) == "1.00 nat"  # rounding carries to the next prefix, not "1000 mnat"
    assert style.format_si_interval(-0.018159, 0.01507) == "-18.2 ± 15.1 mnat"
    assert style.format_si_interval(4e-8, 1e-6) == "0.04 ± 1.00 µnat"
    assert style.format_si_interval(-1e-9, 1e-12) == "-1.00 ± 0.00 nnat"


def test_format_si_round_trips_to_its_digits():
    """Every magnitude from 1e-12 to 1e9 comes back to 3 significant digits with its exponent kept, in the
    same layout (mantissa in [1, 1000), one prefix) for every cell."""
    rng = np.random.default_rng(0)
    for x in rng.choice([-1, 1], 400) * 10 ** rng.uniform(-12, 9.5, 400):
        text = style.format_si(x)
        (back,) = parse_si(text)
        assert back == pytest.approx(x, rel=5e-3), (x, text)
        mantissa = abs(float(text.split()[0]))
        assert 1.0 <= mantissa < 1000.0
        c, h = rng.normal(), abs(rng.normal()) * 10 ** rng.uniform(-3, 3)
        c *= 10 ** rng.uniform(-9, 0)
        back_c, back_h = parse_si(style.format_si_interval(c, h))
        scale = max(abs(c), h)
        assert back_c == pytest.approx(c, abs=6e-3 * scale) and back_h == pytest.approx(h, abs=6e-3 * scale)


def test_confidence_of_inverts_the_t_quantile():
    from scipy import stats

    for conf, n in [(0.95, 8), (0.9, 4), (0.99, 30)]:
        t_crit = stats.t.ppf(0.5 + conf / 2, n - 1)
        assert style.confidence_of(t_crit, n) == pytest.approx(conf, abs=1e-12)


def test_verdict_mapping_is_short_and_extensible():
    for name, vs in style.VERDICTS.items():
        assert len(vs.word) <= 10 and "[" not in vs.legend, name
    assert style.verdict_style("insufficient signal").word == "n.s."
    unknown = style.verdict_style("surprising")
    assert unknown.word == "surprising" and unknown.rank == 0 and not unknown.actionable


# --------------------------------------------------------------------------------------------------
# the analysis table on a real analyze output


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory) -> Path:
    """A real ``commute analyze`` output of a tiny run whose manifest names a validation split."""
    from commute_cli.commands.analyze import AnalyzeOptions, run_analysis

    root = tmp_path_factory.mktemp("render")
    run = make_run(root / "run", steps=(0, 10, 20))
    for name in ("en", "xx"):
        shutil.copy(run / "data" / f"{name}.jsonl", run / "data" / f"{name}-validation.jsonl")
    manifest = json.loads((run / "commute.json").read_text())
    manifest["eval_domains"] = {n: f"data/{n}-validation.jsonl" for n in ("en", "xx")}
    (run / "commute.json").write_text(json.dumps(manifest))
    run_analysis(AnalyzeOptions(ckpt_dir=run, samples=24, blocks=4, out=root / "out", device="cpu"))
    return root / "out"


def load(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    return (
        pd.read_csv(folder / "results.csv"),
        pd.read_csv(folder / "losses.csv"),
        json.loads((folder / "run.json").read_text()),
    )


def render(renderable, width: int) -> str:
    buf = io.StringIO()
    tables.print_renderable(renderable, buf, width=width)
    return buf.getvalue()


def data_rows(text: str, steps) -> list[str]:
    return [ln for ln in text.splitlines() if re.match(rf"\s*({'|'.join(map(str, steps))})\s{{2,}}", ln)]


@pytest.mark.parametrize("width", [80, 100, 120])
def test_table_fits_and_shows_the_csv_numbers(analyzed, width):
    """At 80, 100 and 120 columns: no line wider than the terminal, one line per result row (nothing
    wrapped), verdicts as whole words, and every EL cell equal to results.csv's el_ij ± t_crit x el_se."""
    res, losses, run = load(analyzed)
    text = render(tables.analysis_tables(res, losses, run=run, out=analyzed), width)
    assert max(len(ln) for ln in text.splitlines()) <= width
    rows = data_rows(text, sorted(set(res["step"])))
    assert len(rows) == len(res)
    in_order = pd.concat([g for _, g in res.groupby("target", sort=False)])  # one table per target
    for line, r in zip(rows, in_order.itertuples(index=False), strict=True):
        cell = re.search(r"-?[\d.]+ ± [\d.]+ \S?nat", line).group(0)
        el, half = parse_si(cell)
        scale = max(abs(r.el_ij), r.t_crit * r.el_se)
        assert el == pytest.approx(r.el_ij, abs=6e-3 * scale)
        assert half == pytest.approx(r.t_crit * r.el_se, abs=6e-3 * scale)
        word = style.verdict_style(r.verdict).word
        assert re.search(rf"\s{re.escape(word)}(\s|$)", line), line
        loss = line.split()[1]
        assert float(loss) == pytest.approx(r.target_loss, abs=6e-4)
    assert "95% confidence interval over 4 independent sample blocks" in " ".join(text.split())
    flat = " ".join(text.split())  # the summary wraps with the terminal (and the temporary path's length)
    assert "held-out validation split" in flat and "en-validation.jsonl" in flat


def test_piped_output_is_not_hard_wrapped(analyzed):
    """To a file or a pipe (not a terminal, no width given): every legend line is printed whole, however
    long, not cut mid-phrase at a fixed width."""
    from commute_cli.render.formats import NON_TTY_WIDTH

    res, losses, run = load(analyzed)
    group = tables.analysis_tables(res, losses, run=run, out=analyzed)
    buf = io.StringIO()
    tables.print_renderable(group, buf)
    printed = [ln.rstrip() for ln in buf.getvalue().splitlines()]
    legend = group.renderables[-1].plain.splitlines()
    assert max(len(ln) for ln in legend) > NON_TTY_WIDTH  # the case: longer than the default
    for line in legend:
        assert line.rstrip() in printed, line


def test_the_data_split_is_recorded(analyzed):
    _, _, run = load(analyzed)
    assert run["data_split"] == "validation"


def test_table_with_three_domains_fits_80_columns():
    """K = 3: a pair column appears and the table still fits 80 columns with every row on one line."""
    names = ("english", "russian", "code")
    rows = []
    for s in (1000, 2000, 30000):
        for t in [*names, "mix"]:
            for a in range(3):
                for b in range(a + 1, 3):
                    verdict = ["suboptimal", "insufficient signal"][b % 2]
                    rows.append(
                        dict(step=s, target=t, domain_i=names[a], domain_j=names[b], target_loss=3.21,
                             el_ij=-0.0123 * (a + 1), el_se=0.004, t_crit=2.36, n_blocks=8, dw=0.05,
                             horizon=250, in_regime=True, verdict=verdict)
                    )  # fmt: skip
    res = pd.DataFrame(rows)
    text = render(tables.analysis_tables(res), 80)
    assert max(len(ln) for ln in text.splitlines()) <= 80
    assert len(data_rows(text, (1000, 2000, 30000))) == len(res)
    assert "english↔russian" in text and "pair" in text


def test_one_si_prefix_per_el_column_and_small_rows_keep_their_digits():
    """A target's EL column uses one prefix (the largest value's), so a µnat-sized row stands in mnat
    beside the others, with three significant digits of its own; other targets choose their own prefix."""
    rows = [
        dict(step=s, target=t, domain_i="en", domain_j="ru", target_loss=3.21, el_ij=el, el_se=se,
             t_crit=2.0, n_blocks=8, dw=0.1, horizon=250, in_regime=True, verdict="insufficient signal")
        for s, t, el, se in [(1000, "en", 2.2e-3, 6.85e-4), (2000, "en", -4.31e-4, 1.48e-4),
                             (1000, "ru", 3.0e-7, 2.0e-7), (2000, "ru", -5.0e-7, 1.0e-7)]
    ]  # fmt: skip
    text = render(tables.analysis_tables(pd.DataFrame(rows)), 120)
    cells = re.findall(r"-?[\d.]+ ± [\d.]+ \S?nat", text)
    assert cells == ["2.20 ± 1.37 mnat", "-0.431 ± 0.296 mnat", "300 ± 400 nnat", "-500 ± 200 nnat"]
    assert style.format_interval_scaled(-0.0, 1e-3, 1e-3, "m") == "0.00 ± 1.00 mnat"  # no "-0.00"


def test_table_is_tolerant_of_new_columns_and_verdicts(analyzed):
    """Columns another branch adds render when present: a horizon footnote from ``horizon_reason``, a
    regime column when a row is not inside (``regime`` with 'uncertain'), the 'negligible' verdict and an
    unknown one (shown as written)."""
    res, losses, run = load(analyzed)
    res["horizon_reason"] = ["shortened to stay in the local regime"] * (len(res) - 1) + ["--horizon"]
    res["regime"] = ["inside"] * (len(res) - 1) + ["uncertain"]
    res.loc[0, "verdict"] = "negligible"
    res.loc[1, "verdict"] = "surprising"
    text = render(tables.analysis_tables(res, losses, run=run), 120)
    flat = " ".join(text.split())
    assert "¹ horizon: shortened to stay in the local regime" in flat and "² horizon: --horizon" in flat
    assert re.search(r"\s\d+¹\s", text) and re.search(r"\s\d+²\s", text)
    assert "regime" in text and "uncertain" in text
    assert "negligible: below the smallest effect worth reporting" in flat
    assert "surprising" in text
    inside = load(analyzed)[0].assign(regime="inside")
    plain = render(tables.analysis_tables(inside, losses), 120)
    assert "regime" not in plain.splitlines()[1]  # all inside: no regime column


def test_analyze_cli_prints_the_table_and_the_data_split(analyzed, capsys):
    run = json.loads((analyzed / "run.json").read_text())
    ckpts = run["options"]["ckpt_dir"]
    code, out, err = cli(["analyze", ckpts, "--samples", "24", "--blocks", "4", "--out", analyzed], capsys)
    assert code == 0, err
    assert (
        "held-out validation split" in " ".join(out.split()) and "EL (95%)" in out and "sample blocks" in out
    )


# --------------------------------------------------------------------------------------------------
# column documentation


def test_every_written_column_is_documented(analyzed, capsys):
    res, losses, _ = load(analyzed)
    assert columns.undocumented("results.csv", res.columns) == []
    assert columns.undocumented("losses.csv", losses.columns) == []
    assert columns.undocumented("results.csv", ["no_such_column"]) == ["no_such_column"]
    assert columns.undocumented("recommend (--format csv)", ["w_en_before", "w_xx_after"]) == []
    code, out, err = cli(["help", "columns"], capsys)
    assert code == 0, err
    for col in [*res.columns, *losses.columns]:
        assert f"  {col}" in out
    code, _, err = cli(["help", "nothing"], capsys)
    assert code == 2 and "unknown help topic" in err and len(err.strip().splitlines()) == 1


def test_validate_columns_are_documented():
    """The columns ``commute validate`` writes (read from its source, not typed here again)."""
    src = (RENDER.parent / "commands" / "validate.py").read_text()
    body = src[src.index("def combine(") :]
    body = body[: body.index("\n    return ")]
    keys = re.findall(r'^\s+"([a-z0-9_]+)": ', body, flags=re.M)
    assert len(keys) > 20
    assert columns.undocumented("validate.csv", keys) == []


# --------------------------------------------------------------------------------------------------
# progress


class Clock:
    """A clock the test advances (the ETA's input, not a replacement of the code under test)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_analysis_eta_from_measured_times():
    """5 checkpoints x 4 blocks, 3 s model load then 2 s per block: no estimate until a block interval is
    measured; from then on it is exact, and it does not change while the work runs at the measured pace."""
    clock = Clock()
    eta = analysis_progress.AnalysisEta(5, clock)
    eta.checkpoint(0, 4, cached=False)
    assert eta.remaining() is None  # nothing measured yet
    clock.now += 5.0  # load 3 s + block 2 s
    eta.block()
    assert eta.remaining() is None  # one block mixes load and block time: no estimate yet
    deadlines = []
    for _ in range(3):
        clock.now += 2.0
        eta.block()
        deadlines.append(eta.deadline())
    # exact from here: 0 blocks left in checkpoint 0, 4 checkpoints x (3 s + 4 x 2 s)
    assert eta.remaining() == pytest.approx(4 * (3.0 + 8.0))
    for k in range(1, 5):
        eta.checkpoint(k, 4, cached=False)
        deadlines.append(eta.deadline())
        clock.now += 3.0 + 2.0
        eta.block()
        deadlines.append(eta.deadline())
        for _ in range(3):
            clock.now += 2.0
            eta.block()
            deadlines.append(eta.deadline())
    assert eta.remaining() == pytest.approx(0.0)
    finish = clock.now
    assert max(deadlines[2:]) - min(deadlines[2:]) < 1e-9 and deadlines[-1] == pytest.approx(finish)


def test_analysis_eta_leaves_out_the_warm_up():
    """The first computed checkpoint pays a one-time 10 s warm-up on top of a 3 s load: once the second
    checkpoint's first two blocks are measured, the estimate is exact again (the warm-up is not repeated
    for the checkpoints left)."""
    clock = Clock()
    eta = analysis_progress.AnalysisEta(4, clock)
    eta.checkpoint(0, 4, cached=False)
    clock.now += 10.0 + 3.0 + 2.0
    eta.block()
    for _ in range(3):
        clock.now += 2.0
        eta.block()
    assert eta.remaining() == pytest.approx(3 * (13.0 + 8.0))  # one checkpoint measured: warm-up assumed
    assert eta.upper_bound()  # ... so the display says "ETA ≤"
    eta.checkpoint(1, 4, cached=False)
    clock.now += 3.0 + 2.0
    eta.block()
    clock.now += 2.0
    eta.block()
    start = clock.now
    assert eta.remaining() == pytest.approx(2 * 2.0 + 2 * (3.0 + 8.0))
    assert eta.deadline() == pytest.approx(start + 26.0)
    assert not eta.upper_bound()


def test_analysis_eta_with_cached_checkpoints():
    clock = Clock()
    eta = analysis_progress.AnalysisEta(3, clock)
    eta.checkpoint(0, 8, cached=True)
    assert eta.remaining() is None  # the two left are unmeasured
    eta.checkpoint(1, 8, cached=True)
    eta.checkpoint(2, 8, cached=True)
    assert eta.remaining() == 0.0


def test_step_progress_eta_is_the_mean_pace():
    clock = Clock()
    p = progress.StepProgress("validate: branches", enabled=False, clock=clock)
    with p:
        p.start(10)
        clock.now += 30.0  # start-up: not a step
        p.step()
        for _ in range(4):
            clock.now += 2.0
            p.step()
        assert p._done == 5
        task = p.bars._progress.tasks[0]
        assert task.fields["deadline"] == pytest.approx(clock.now + 5 * 2.0)


def test_step_progress_eta_of_chunks_is_the_pace_since_the_start():
    """Continuations finish in worker processes, 2000 steps at a time and two nearly together: the pace is
    the time since the start per step, not the few seconds between the first two chunks."""
    clock = Clock()
    p = progress.StepProgress("recommend: continuations", enabled=False, clock=clock)
    with p:
        p.start(10_000)
        clock.now += 600.0
        p.step(2000)
        clock.now += 5.0
        p.step(2000)
        task = p.bars._progress.tasks[0]
        assert task.fields["deadline"] == pytest.approx(clock.now + 6000 * 605.0 / 4000)


def test_analysis_bars_show_the_real_total(analyzed, tmp_path):
    """Drawn on a (recording) terminal through a real analysis: the checkpoint bar counts to the real
    number of checkpoints (never '?'), the block bar to --blocks, and an ETA is shown."""
    from commute_cli.commands.analyze import AnalyzeOptions, run_analysis

    run = json.loads((analyzed / "run.json").read_text())
    console = Console(file=io.StringIO(), force_terminal=True, width=120, record=True)
    frames: list[str] = []
    with analysis_progress.AnalysisProgress(enabled=True, console=console) as bars:

        def on_block(b: int) -> None:
            bars.block(b)
            frames.append(_text(bars.bars.renderable()))

        run_analysis(
            AnalyzeOptions(ckpt_dir=Path(run["options"]["ckpt_dir"]), samples=24, blocks=4, out=tmp_path),
            on_checkpoint_start=bars.checkpoint,
            on_block=on_block,
        )
    assert len(frames) == 3 * 4
    assert "checkpoints" in frames[0] and "0/3" in frames[0] and "1/4" in frames[0]
    assert "2/3" in frames[-1] and "4/4" in frames[-1]
    assert all("?" not in f for f in frames)
    assert all("ETA" in f for f in frames) and "ETA estimating" not in frames[-1]


def _text(renderable) -> str:
    console = Console(file=io.StringIO(), width=120, record=True)
    console.print(renderable)
    return console.export_text()


def test_format_duration():
    assert progress.format_duration(75.4) == "1:16"
    assert progress.format_duration(3725) == "1:02:05"
    assert progress.format_duration(-3) == "0:00"


# --------------------------------------------------------------------------------------------------
# the layer's import rule


FORBIDDEN = ("torch", "commute_cli.engine", "commute_cli.io", "commute_cli.commands", "commute_cli.cli")


def test_render_imports_no_engine_io_commands_or_torch():
    """render imports core (types) and errors only: read from the source, and checked at run time (no
    torch in a fresh interpreter after importing every render module)."""
    for file in RENDER.glob("*.py"):
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                assert not name.startswith(FORBIDDEN), (file.name, name)
    code = (
        "import sys; import commute_cli.render.tables, commute_cli.render.figures, "
        "commute_cli.render.progress, commute_cli.render.columns, commute_cli.render.style; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
