"""The criterion figure (``commute plot`` and ``commute analyze --plot``): a PNG that shows what it claims.

The figure is checked as data (axes, the plotted values and intervals against the results table, the
shaded windows against the horizons, the loss-plane points against validate.csv, the words of titles and
legends) and as a file (PNG signature, size, non-blank pixels); both commands end to end on a real tiny
``commute analyze`` output, drawing the same picture; one-line errors with exit code 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from commute_cli.render import figures, style

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
                            "t": el / 0.004,
                            "t_crit": 2.3646,
                            "n_blocks": 8,
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


def error_bars(container) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y and the half-length of each vertical error bar of an errorbar container."""
    line, _, (bars,) = container.lines
    x = np.asarray(line.get_xdata(), dtype=float)
    y = np.asarray(line.get_ydata(), dtype=float)
    half = np.array([abs(seg[1][1] - seg[0][1]) / 2 for seg in bars.get_segments()])
    return x, y, half


def shaded_windows(ax) -> list[tuple[float, float, tuple]]:
    """(x0, x1, facecolor) of every axvspan of a panel."""
    out = []
    for p in ax.patches:
        x0 = p.get_x()
        out.append((x0, x0 + p.get_width(), tuple(np.round(p.get_facecolor()[:3], 3))))
    return sorted(out)


def all_text(fig) -> list[str]:
    texts = [t.get_text() for t in fig.findobj(match=lambda o: hasattr(o, "get_text"))]
    return [t for t in texts if t]


def close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_figure_shows_the_table_numbers_and_intervals():
    """One panel per target plus the loss panel. Each point is the table's el_ij as computed (no rescaling),
    its error bar is the table's interval t_crit x el_se (the verdict's 95% test), and each checkpoint's
    shaded window is [step - horizon, step + horizon] in the colour of its verdict, up to the last step."""
    from matplotlib.colors import to_rgb

    res, losses = results_table(), losses_table()
    fig = figures.criterion_figure(res, losses)
    try:
        assert len(fig.axes) == 4
        for ax, target in zip(fig.axes[:3], ["en", "ru", "mix"], strict=True):
            assert ax.get_title().startswith(f"Target {target}: predicted change of its loss")
            (container,) = ax.containers
            rows = res[res.target == target]
            x, y, half = error_bars(container)
            np.testing.assert_allclose(x, rows["step"])
            np.testing.assert_allclose(y, rows["el_ij"])
            np.testing.assert_allclose(half, rows["t_crit"] * rows["el_se"], rtol=1e-9)
            windows = shaded_windows(ax)
            expected = []
            for r in rows.itertuples(index=False):
                color = tuple(np.round(to_rgb(style.verdict_style(r.verdict).color), 3))
                # the last window ends at the last step drawn (no run.json: no later step known)
                expected.append((r.step - r.horizon, min(r.step + r.horizon, 2000), color))
            expected.sort()
            np.testing.assert_allclose([w[:2] for w in windows], [e[:2] for e in expected])
            assert [w[2] for w in windows] == [e[2] for e in expected]
            assert {t.get_text() for t in ax.texts} <= {"en earlier", "ru earlier"} and len(ax.texts) == 2
            assert ax.get_ylabel() == f"change of L_{target} (mnat)"
        assert "Mean loss per domain" in fig.axes[3].get_title() and "95% interval" in fig.axes[3].get_title()
        x, y, half = error_bars(fig.axes[3].containers[0])
        en = losses[losses.domain == "en"]
        np.testing.assert_allclose(half, en["loss_se"] * res["t_crit"].iloc[0])
        assert fig.axes[3].get_xlabel() == "training step"
    finally:
        close(fig)


def test_figure_words_are_plain():
    """Legends and titles in words: no rich markup, no TeX, the interval named, the outside-regime ring
    explained, and the run and schedule in the title when run.json is given."""
    res = results_table()
    run = {"options": {"ckpt_dir": "runs/mine"}, "schedule": [{"step": 0, "weights": {"en": 0.8, "ru": 0.2}}]}
    fig = figures.criterion_figure(res, losses_table(), run=run)
    try:
        texts = all_text(fig)
        assert not [t for t in texts if re.search(r"\[/?(bold|dim|red|yellow|green)|\$|\^\{", t)]
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert "predicted change EL (95% interval)" in legend
        assert "window (± horizon): suboptimal" in legend and "window (± horizon): not significant" in legend
        assert "outside the local regime (or saturated)" in legend
        assert any("runs/mine, schedule en 0.8, ru 0.2 (constant)" in t for t in texts)
        # the ring marks exactly the rows outside the regime
        rings = [ln for ln in fig.axes[0].get_lines() if ln.get_markeredgecolor() == "red"]
        outside = res[(res.target == "en") & ~res.in_regime]
        np.testing.assert_allclose(rings[0].get_xdata(), outside["step"])
    finally:
        close(fig)


def test_windows_end_with_training_one_prefix_per_axis_and_the_plane_says_what_its_bars_are():
    """No window is shaded past the run's last step (run.json's last_step; 2500 with a horizon of 250
    drew to 2750); every EL axis has one SI prefix, named in its label, and no tick of its own unit (no
    "0 nat" among "20 mnat"); a loss plane from one repeat (no SE) says it has no interval instead of
    claiming "± 1 SE"."""
    steps = (500, 1000, 1500, 2000, 2500)
    res = results_table(steps=steps)
    res["horizon"] = 250
    val = validate_table(steps=(1000,))
    val["obs_el12_se"] = val["obs_el21_se"] = np.nan  # one repeat
    val["obs_t_crit"] = np.nan
    fig = figures.criterion_figure(res, losses_table(steps=steps), val, run={"last_step": 2500})
    try:
        fig.canvas.draw()
        for ax, target in zip(fig.axes[:3], ["en", "ru", "mix"], strict=True):
            assert max(w[1] for w in shaded_windows(ax)) == 2500
            assert max(ln.get_xdata()[0] for ln in ax.get_lines() if len(ln.get_xdata()) == 2) <= 2500
            assert ax.get_ylabel() == f"change of L_{target} (mnat)"
            ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
            assert "0" in ticks and not [t for t in ticks if "nat" in t], ticks
        zoom = fig.axes[-1]
        legend = [t.get_text() for t in zoom.get_legend().get_texts()]
        assert "'12' observed (one repeat: no SE, no interval)" in legend
        assert not [t for t in legend if "SE" in t and "no SE" not in t]
    finally:
        close(fig)
    three = validate_table(steps=(1000,)).assign(obs_t_crit=4.303)  # three repeats: validate's interval
    fig = figures.criterion_figure(res, losses_table(steps=steps), three, run={"last_step": 2500})
    try:
        zoom = fig.axes[-1]
        assert "'12' observed ± confidence interval" in [t.get_text() for t in zoom.get_legend().get_texts()]
        _, _, (_, ybars) = zoom.containers[0].lines  # x and y bars
        (seg,) = ybars.get_segments()
        np.testing.assert_allclose(abs(seg[1][1] - seg[0][1]) / 2, 4.303 * 0.001, rtol=1e-6)
    finally:
        close(fig)


def test_three_domains_have_a_line_per_pair(tmp_path):
    names = ("en", "ru", "de")
    res = results_table(names)
    fig = figures.criterion_figure(res, losses_table(names))
    try:
        assert len(fig.axes) == 5 and all(len(ax.containers) == 3 for ax in fig.axes[:4])
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert "en before ru: predicted change EL (95% interval)" in legend
    finally:
        close(fig)
    out = tmp_path / "k3.png"
    out.write_bytes(figures.png_bytes(figures.criterion_figure(res, losses_table(names))))
    check_png(out, (800, 1000))


def test_loss_plane_from_validate_results(tmp_path):
    """With validate results: the loss plane (base trajectory and branch end points) and one zoomed panel
    per validated checkpoint whose points are base + observed EL (± 1 SE from a validate.csv without
    obs_t_crit, said so; else validate's table's interval) and base +
    predicted EL (hollow)."""
    val = validate_table()
    fig = figures.criterion_figure(results_table(), losses_table(), val)
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
            assert "'12' observed ± 1 SE" in [t.get_text() for t in ax.get_legend().get_texts()]
            x0, x1 = ax.get_xlim()
            assert x0 < bx + 0.004 < x1 and x1 - x0 < 0.1  # zoomed onto the intervention, not the run
    finally:
        close(fig)


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
        assert f"loss plane from {analyzed / 'validate.csv'}" in err  # which validation it drew
        (analyzed / "validate.json").write_text(
            '{"run": {"checkpoint": "/r/checkpoint-10", "options": {"steps": 5}}}', encoding="utf-8"
        )
        code, _, err = cli(["plot", "--from", analyzed, "-o", wide], capsys)
        assert code == 0 and "validate.csv (checkpoint-10, horizon 5))" in err, err
    finally:
        (analyzed / "validate.csv").unlink()
        (analyzed / "validate.json").unlink(missing_ok=True)


def test_analyze_plot_and_plot_draw_the_same_figure(analyzed, tmp_path, capsys):
    """`analyze --plot` (from the results in memory) and `plot` (from the files) give the same pixels:
    there is one criterion figure."""
    run = json.loads((analyzed / "run.json").read_text())
    a, b = tmp_path / "analyze.png", tmp_path / "plot.png"
    argv = ["analyze", run["options"]["ckpt_dir"], "--samples", "24", "--blocks", "4", "--out", analyzed]
    code, _, err = cli([*argv, "--plot", a], capsys)
    assert code == 0, err
    code, _, err = cli(["plot", "--from", analyzed, "-o", b], capsys)
    assert code == 0, err
    with Image.open(a) as ia, Image.open(b) as ib:
        assert ia.size == ib.size
        assert np.array_equal(np.asarray(ia), np.asarray(ib))
    check_png(a, (800, 1000))


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
