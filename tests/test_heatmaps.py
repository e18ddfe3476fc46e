"""render/heatmaps.py: the matrices drawn are the analysis's numbers; the figures are written.

The pictures themselves were looked at (issue 16 part 3); here the data path: antisymmetry of the pair
matrix, significance marks from results.csv, and the decomposition pivot from a real (tiny) run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from commute_cli.commands import analyze as analysis
from commute_cli.render import heatmaps

from tiny_run import make_run


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("run") / "run", steps=(0, 10))
    out = tmp_path_factory.mktemp("out")
    opts = analysis.AnalyzeOptions(ckpt_dir=run, out=out, samples=24, blocks=4, decompose="kind")
    analysis.run_analysis(opts)
    return out


def test_pair_matrix_is_the_antisymmetric_criterion(analyzed: Path, tmp_path: Path) -> None:
    res = pd.read_csv(analyzed / "results.csv")
    names = ["en", "xx"]
    for (target, step), rows in res.groupby(["target", "step"]):
        values, sig = heatmaps.pair_matrices(res, target, step, names)
        row = rows.iloc[0]
        assert values[0, 1] == row["el_ij"] and values[1, 0] == -row["el_ij"]
        assert np.isnan(values[0, 0]) and sig[0, 1] == bool(row["significant"]) == sig[1, 0]
    png = heatmaps.plot_pair_heatmap(res, tmp_path / "pairs.png")
    assert png.stat().st_size > 10_000


def test_decomposition_heatmap_is_written(analyzed: Path, tmp_path: Path) -> None:
    dec = pd.read_csv(analyzed / "decomposition.csv")
    png = heatmaps.plot_decomposition_heatmap(dec, tmp_path / "dec.png", "en")
    assert png.stat().st_size > 10_000
    with pytest.raises(ValueError):
        heatmaps.plot_decomposition_heatmap(dec, tmp_path / "none.png", "nope")


def test_orders_figure_is_written(analyzed: Path, tmp_path: Path) -> None:
    res = pd.read_csv(analyzed / "results.csv")
    base = pd.read_csv(analyzed / "baselines.csv")
    png = heatmaps.plot_orders(res, base, tmp_path / "orders.png")
    assert png.stat().st_size > 10_000


def test_plot_kinds_through_the_cli(tmp_path, capsys):
    """`commute plot --kind pairs|decomposition|orders` writes each figure (a real PNG) from analyze's files,
    and says in one line what to run when decomposition.csv is missing."""
    from cli_runner import cli
    from tiny_run import make_run

    run = make_run(tmp_path / "run", steps=(0, 10))
    out = tmp_path / "out"
    code, _, err = cli(["analyze", run, "--out", out, "--samples", "24", "--blocks", "4", "-q"], capsys)
    assert code == 0, err
    code, _, err = cli(["plot", "--from", out, "--kind", "decomposition", "-o", tmp_path / "d.png"], capsys)
    assert code == 2 and "--decompose" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d.png").exists()
    for kind in ("pairs", "orders"):
        code, _, err = cli(["plot", "--from", out, "--kind", kind, "-o", tmp_path / f"{kind}.png"], capsys)
        assert code == 0, err
        assert (tmp_path / f"{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    args = ["analyze", run, "--out", out, "--samples", "24", "--blocks", "4", "-q", "--decompose", "kind"]
    code, _, err = cli(args, capsys)
    assert code == 0, err
    code, _, err = cli(["plot", "--from", out, "--kind", "decomposition", "-o", tmp_path / "d.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = cli(
        ["plot", "--from", out, "--kind", "decomposition", "--target", "zz", "-o", tmp_path / "z.png"], capsys
    )
    assert code == 2 and "no decomposition rows for target 'zz'" in err


def test_decomposition_is_drawn_in_the_tables_unit_and_adds_up_to_its_el(analyzed, tmp_path, monkeypatch):
    """`plot --kind decomposition` draws the groups' parts of EL^ij (nats with the table's SI prefix, named
    on the colour bar): each column's total is results.csv's el_ij of the same (step, target, pair) row, as
    decomposition.csv's `el` column sums to it."""
    import re

    from matplotlib.figure import Figure

    res = pd.read_csv(analyzed / "results.csv")
    dec = pd.read_csv(analyzed / "decomposition.csv")
    res["pair"] = res["domain_i"] + "|" + res["domain_j"]
    keys = ["step", "target", "pair"]
    sums = dec.groupby(keys, as_index=False)["el"].sum().merge(res, on=keys)
    assert len(sums) == len(res)
    np.testing.assert_allclose(sums["el"], sums["el_ij"], rtol=1e-9, atol=1e-12 * res["el_ij"].abs().max())

    drawn: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k))[1])
    factors = {"": 1.0, "m": 1e-3, "µ": 1e-6, "n": 1e-9, "p": 1e-12}
    for target in dict.fromkeys(res["target"]):
        heatmaps.plot_decomposition_heatmap(dec, tmp_path / "dec.png", target)
        ax, bar = drawn[-1].axes[:2]
        unit = re.search(r"\((\S?)nat\)", bar.get_ylabel())
        assert unit is not None, bar.get_ylabel()
        totals = [float(re.search(r"total (\S+)\)", t.get_text()).group(1)) for t in ax.get_xticklabels()]
        rows = res[res["target"] == target].sort_values("step")
        np.testing.assert_allclose(np.array(totals) * factors[unit.group(1)], rows["el_ij"], rtol=5e-3)


def test_orders_rows_share_one_unit_and_one_sign_and_say_what_disagree_means(analyzed, tmp_path, monkeypatch):
    """`plot --kind orders`: both rows are changes of the target in the same SI-prefixed nat, both read
    "< 0: i earlier helps" (the bottom row is -dt dw (a_i - a_j), the first-order change over the first
    half of the table's intervention), and the figure explains the red "disagree" marks."""
    import re

    from matplotlib.figure import Figure

    res = pd.read_csv(analyzed / "results.csv")
    base = pd.read_csv(analyzed / "baselines.csv")
    drawn: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k))[1])
    heatmaps.plot_orders(res, base, tmp_path / "orders.png")
    fig = drawn[-1]
    targets = list(dict.fromkeys(res["target"]))
    top, bottom = fig.axes[0], fig.axes[len(targets)]
    units = {re.search(r"\((\S?nat)\)", ax.get_ylabel()).group(1) for ax in (top, bottom)}
    assert len(units) == 1, [top.get_ylabel(), bottom.get_ylabel()]
    factor = {"nat": 1.0, "mnat": 1e-3, "µnat": 1e-6, "nnat": 1e-9}[units.pop()]
    assert "< 0: en earlier helps" in top.get_ylabel() and "< 0: en earlier helps" in bottom.get_ylabel()
    b = base[base["target"] == targets[0]].sort_values("step")
    r = res[res["target"] == targets[0]].sort_values("step")
    expected = -r["dt"].to_numpy() * r["dw"].to_numpy() * b["align_diff"].to_numpy() / factor
    np.testing.assert_allclose(np.asarray(bottom.lines[0].get_ydata(), float), expected, rtol=1e-9)
    np.testing.assert_allclose(
        np.asarray(top.lines[0].get_ydata(), float), r["el_ij"].to_numpy() / factor, rtol=1e-9
    )
    words = " ".join(t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text")))
    assert "'disagree'" in words and "favour different domains" in words
