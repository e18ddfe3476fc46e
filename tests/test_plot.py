"""``commute plot``: a PNG that shows what it claims.

The figure is checked as data (axes, the plotted values against the results table, the loss-plane points
against validate.csv) and as a file (PNG signature, size, non-blank pixels); the command end to end on a
real tiny ``commute analyze`` output; one-line errors with exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from commute_cli.render import report

from cli_runner import cli
from tiny_run import make_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def results_table(names=("en", "ru"), steps=(500, 1000, 1500, 2000)) -> pd.DataFrame:
    """A results.csv-like table: horizons differ per checkpoint (as analyze's regime rule makes them)."""
    rng = np.random.default_rng(0)
    rows = []
    for k, s in enumerate(steps):
        horizon = [250, 250, 166, 49][k % 4]
        for target in [*names, "mix"]:
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    el = float(rng.normal(0, 0.02))
                    verdict = ["insufficient signal", "suboptimal", "consistent", "suboptimal"][k % 4]
                    rows.append(
                        {
                            "step": s,
                            "target": target,
                            "domain_i": names[a],
                            "domain_j": names[b],
                            "el_ij": el,
                            "el_se": 0.004,
                            "dw": 0.1,
                            "horizon": horizon,
                            "lr": 1e-3,
                            "dt": 1e-3 * horizon,
                            "in_regime": k != 2,
                            "verdict": verdict,
                        }
                    )
    return pd.DataFrame(rows)


def losses_table(names=("en", "ru"), steps=(500, 1000, 1500, 2000)) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"step": s, "domain": n, "loss": 5.0 + k - s / 1000, "loss_se": 0.05}
            for s in steps
            for k, n in enumerate(names)
        ]
    )


def validate_table(steps=(1000, 1500)) -> pd.DataFrame:
    """validate.csv rows (the columns ``commute validate`` writes that the loss plane reads)."""
    rows = []
    for s in steps:
        for k, n in enumerate(("en", "ru")):
            rows.append(
                {
                    "step": s,
                    "target": n,
                    "domain_1": "en",
                    "domain_2": "ru",
                    "loss_ckpt": 5.0 + k - s / 1000,
                    "loss_base": 4.98 + k - s / 1000,
                    "obs_el12": [0.004, -0.006][k],
                    "obs_el12_se": 0.001,
                    "obs_el21": [-0.001, 0.015][k],
                    "obs_el21_se": 0.001,
                    "pred_el12": [0.0006, -0.0002][k],
                    "pred_el21": [-0.0006, 0.0002][k],
                }
            )
    return pd.DataFrame(rows)


def check_png(path: Path, min_size: tuple[int, int]) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    with Image.open(path) as im:
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # drawn, not blank


def test_figure_panels_and_values():
    """One panel per target plus the loss panel; each plotted EL is the table's value rescaled to the
    common (dt, dw) (MATH.md: EL is linear in dw and quadratic in dt), with its SE scaled alike."""
    res, losses = results_table(), losses_table()
    fig = report.build_report_figure(res, losses)
    try:
        assert len(fig.axes) == 4
        dt_ref = res["dt"].median()
        for ax, target in zip(fig.axes[:3], ["en", "ru", "mix"], strict=True):
            assert ax.get_title().startswith(f"target {target}:")
            (container,) = ax.containers
            y = np.asarray(container.lines[0].get_ydata(), dtype=float)
            rows = res[res.target == target]
            np.testing.assert_allclose(y, rows["el_ij"] * (dt_ref / rows["dt"]) ** 2)
            assert len(ax.patches) == 3  # verdict bands: two suboptimal, one consistent
            assert {t.get_text() for t in ax.texts} <= {"en earlier", "ru earlier"} and len(ax.texts) == 2
        assert "per-domain loss" in fig.axes[3].get_title()
        assert len(fig.axes[3].containers) == 2  # L_en, L_ru
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_three_domains_have_a_line_per_pair(tmp_path):
    names = ("en", "ru", "de")
    res = results_table(names)
    fig = report.build_report_figure(res, losses_table(names))
    try:
        assert len(fig.axes) == 5 and all(len(ax.containers) == 3 for ax in fig.axes[:4])
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    check_png(report.plot_report(res, losses_table(names), tmp_path / "k3.png"), (800, 1000))


def test_loss_plane_from_validate_results(tmp_path):
    """With validate results: the loss plane (base trajectory and branch end points) and one zoomed panel
    per validated checkpoint whose points are base + observed EL (and base + predicted EL, hollow)."""
    val = validate_table()
    fig = report.build_report_figure(results_table(), losses_table(), val)
    try:
        assert len(fig.axes) == 4 + 1 + 2
        overview, zooms = fig.axes[4], fig.axes[5:]
        assert "loss plane" in overview.get_title()
        for ax, step in zip(zooms, (1000, 1500), strict=True):
            assert ax.get_title() == f"validate at step {step} (zoom)"
            base = val[val.step == step].set_index("target")
            bx, by = base.loc["en", "loss_base"], base.loc["ru", "loss_base"]
            obs12 = ax.containers[0].lines[0]
            np.testing.assert_allclose(np.asarray(obs12.get_xdata(), dtype=float), [bx + 0.004])
            np.testing.assert_allclose(np.asarray(obs12.get_ydata(), dtype=float), [by - 0.006])
            hollow = [ln for ln in ax.get_lines() if ln.get_label() == "'12' predicted"]
            np.testing.assert_allclose(hollow[0].get_xydata(), [[bx + 0.0006, by - 0.0002]])
            x0, x1 = ax.get_xlim()
            assert x0 < bx + 0.004 < x1 and x1 - x0 < 0.1  # zoomed onto the intervention, not the run
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory) -> Path:
    """A real ``commute analyze`` output folder (tiny run, 3 checkpoints)."""
    from commute_cli.commands.analyze import AnalyzeOptions, run_analysis

    root = tmp_path_factory.mktemp("plot")
    run = make_run(root / "run", steps=(0, 10, 20))
    run_analysis(AnalyzeOptions(ckpt_dir=run, samples=24, blocks=4, out=root / "out", device="cpu"))
    return root / "out"


def test_cli_plot_on_real_analyze_output(analyzed, tmp_path, capsys):
    out = tmp_path / "fig.png"
    code, _, err = cli(["plot", "--from", analyzed, "-o", out], capsys)
    assert code == 0, err
    check_png(out, (800, 1000))
    # validate.csv next to the results is picked up: the figure gains the loss-plane column
    val = validate_table(steps=(10,)).replace({"ru": "xx"})
    val.to_csv(analyzed / "validate.csv", index=False)
    try:
        wide = tmp_path / "wide.png"
        code, _, err = cli(["plot", "--from", analyzed, "-o", wide], capsys)
        assert code == 0, err
        check_png(wide, (1500, 1000))
        with Image.open(out) as a, Image.open(wide) as b:
            assert b.size[0] > a.size[0]
    finally:
        (analyzed / "validate.csv").unlink()


def test_plot_analysis_still_draws_the_analyze_figure(analyzed, tmp_path):
    res = pd.read_csv(analyzed / "results.csv")
    losses = pd.read_csv(analyzed / "losses.csv")
    check_png(report.plot_analysis(res, losses, tmp_path / "a.png"), (800, 1000))


def test_cli_plot_errors(tmp_path, capsys, analyzed):
    code, _, err = cli(["plot", "--from", tmp_path / "none", "-o", tmp_path / "x.png"], capsys)
    assert code == 2 and err.startswith("error: no analyze results") and "commute analyze" in err
    assert not (tmp_path / "x.png").exists()
    code, _, err = cli(
        ["plot", "--from", analyzed, "--validate", tmp_path / "v.csv", "-o", tmp_path / "x.png"], capsys
    )
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("step,target\n10,en\n")
    code, _, err = cli(["plot", "--from", analyzed, "--validate", bad, "-o", tmp_path / "x.png"], capsys)
    assert code == 2 and "lacks columns" in err and "loss_base" in err
    json.dumps(err)  # one line, printable
    assert len(err.strip().splitlines()) == 1
