"""toy.py (exact flows of quadratic domains) and the `commute toy` command.

Flows are checked against references that do not use the augmented matrix exponential: the closed form
of a single domain (paper section 3.1) and a high-accuracy ODE integration.
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.integrate import solve_ivp
from typer.testing import CliRunner

from commute_cli.cli import main
from commute_cli.cli.app import app
from commute_cli.commands import toy
from commute_cli.core import criterion
from commute_cli.render import tables

F64 = torch.float64


@pytest.fixture(scope="module")
def dom() -> toy.QuadraticDomains:
    return toy.QuadraticDomains.random(K=3, dim=12, generator=torch.Generator().manual_seed(0))


def test_random_domains_follow_appendix_B() -> None:
    d = toy.QuadraticDomains.random(K=2, dim=20, generator=torch.Generator().manual_seed(1))
    assert d.A.shape == (2, 20, 20) and d.b.shape == (2, 20) and d.A.dtype == F64
    torch.testing.assert_close(d.A, d.A.transpose(1, 2), rtol=0, atol=0)
    lam = torch.linalg.eigvalsh(d.A[0]).flip(0)
    torch.testing.assert_close(lam, 0.7 ** torch.arange(20, dtype=F64), rtol=0, atol=1e-13)
    assert not torch.allclose(d.A[0], d.A[1])
    C = toy.random_orthogonal(8, torch.Generator().manual_seed(2))
    torch.testing.assert_close(C.T @ C, torch.eye(8, dtype=F64))


def test_loss_grad_hess(dom: toy.QuadraticDomains) -> None:
    theta = torch.randn(dom.dim, dtype=F64, requires_grad=True)
    c = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    (g_auto,) = torch.autograd.grad(dom.loss(theta, c), theta)
    torch.testing.assert_close(c @ dom.grad(theta.detach()), g_auto)
    assert dom.losses(theta.detach()).shape == (3,)
    H = torch.autograd.functional.hessian(lambda x: dom.losses(x)[1], theta.detach())
    torch.testing.assert_close(H, dom.hess()[1])
    # loss_difference is the plain difference, without its cancellation
    x, y = torch.randn(2, dom.dim, dtype=F64)
    assert float(dom.loss_difference(x, y, c)) == pytest.approx(
        float(dom.loss(x, c) - dom.loss(y, c)), rel=1e-12
    )


def test_single_domain_flow_closed_form(dom: toy.QuadraticDomains) -> None:
    """Paper section 3.1: Phi_k(t, theta) = b_k + exp(-t A_k) (theta - b_k)."""
    theta = torch.randn(dom.dim, dtype=F64)
    lam, V = torch.linalg.eigh(dom.A[1])
    expected = dom.b[1] + V @ (torch.exp(-2.0 * lam) * (V.T @ (theta - dom.b[1])))
    torch.testing.assert_close(dom.flow(theta, [0.0, 1.0, 0.0], 2.0), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use_D", [False, True], ids=["D=I", "D=diag"])
def test_flow_matches_ode_integration(dom: toy.QuadraticDomains, use_D: bool) -> None:
    theta = torch.randn(dom.dim, dtype=F64)
    w = np.array([0.5, 0.3, 0.2])
    D = torch.rand(dom.dim, dtype=F64) + 0.5 if use_D else None
    A, b = dom.A.numpy(), dom.b.numpy()
    Dv = np.ones(dom.dim) if D is None else D.numpy()

    def rhs(_t: float, x: np.ndarray) -> np.ndarray:
        return -Dv * sum(w[k] * A[k] @ (x - b[k]) for k in range(3))

    sol = solve_ivp(rhs, (0.0, 1.5), theta.numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dom.flow(theta, w, 1.5, D).numpy(), sol.y[:, -1], rtol=1e-8, atol=1e-9)


def test_flow_semigroup_and_batching(dom: toy.QuadraticDomains) -> None:
    theta = torch.randn(4, dom.dim, dtype=F64)
    w = [0.6, 0.1, 0.3]
    ts = torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=F64)
    batched = dom.flow(theta, w, ts)
    for i in range(4):
        torch.testing.assert_close(batched[i], dom.flow(theta[i], w, float(ts[i])))
    torch.testing.assert_close(dom.flow(dom.flow(theta, w, 0.4), w, 0.6), dom.flow(theta, w, 1.0))
    # times [J, 1] against points [T, n] give [J, T, n]
    assert dom.flow(theta, w, ts[:3, None]).shape == (3, 4, dom.dim)


@pytest.mark.parametrize("use_D", [False, True], ids=["D=I", "D=diag"])
def test_run_intervention_ratio_tends_to_one(dom: toy.QuadraticDomains, use_D: bool) -> None:
    theta = dom.flow(torch.randn(dom.dim, dtype=F64), [0.4, 0.4, 0.2], 0.5)
    D = torch.rand(dom.dim, dtype=F64) + 0.5 if use_D else None
    wbar, d = [0.4, 0.4, 0.2], [0.1, -0.2, 0.1]
    errs = [
        abs(toy.run_intervention(dom, theta, wbar, d, dt, c=[0, 1, 0], D=D).ratio - 1) for dt in (1e-2, 1e-3)
    ]
    assert errs[1] < 0.01
    assert 5 < errs[0] / errs[1] < 20  # O(dt) relative remainder


def test_run_table1_small() -> None:
    df = toy.run_table1(dim=15, samples=6, seed=3, ts=(0.1, 1.0), dts=(1e-3, 1e-2, 1e-1))
    assert list(df.columns) == ["t", "dt", "median", "p10", "p90", "n"]
    assert len(df) == 6 and (df["n"] == 6).all()
    assert (df["p10"] <= df["median"]).all() and (df["median"] <= df["p90"]).all()
    for _, g in df.groupby("t"):
        med = g.sort_values("dt")["median"].to_numpy()
        assert abs(med[0] - 1) < 0.01
        assert med[0] > med[1] > med[2]
    # same seed, same numbers
    pd.testing.assert_frame_equal(df, toy.run_table1(dim=15, samples=6, seed=3, ts=(0.1, 1.0)))


def test_run_table1_uses_criterion_constant() -> None:
    """The denominator is criterion.predicted_change for the full swap = (1/2) dt^2 P(L1, L2; L)."""
    d = toy.QuadraticDomains.random(K=2, dim=10, generator=torch.Generator().manual_seed(4))
    theta = torch.randn(10, dtype=F64)
    g = d.grad(theta)
    gL = 0.5 * (g[0] + g[1])
    P = float(gL @ (d.A[1] @ g[0] - d.A[0] @ g[1]))
    M = d.interaction(theta, [0.5, 0.5])
    assert float(criterion.predicted_change(M, [0.5, 0.5], [0.5, -0.5], 0.01)) == pytest.approx(
        0.5e-4 * P, rel=1e-10
    )


# --------------------------------------------------------------------------------------------------
# report helpers


def test_report_emitters() -> None:
    df = pd.DataFrame({"a": [1.0, float("nan")], "b": ["x", "y"]})
    buf = io.StringIO()
    tables.emit_dataframe(df, "json", buf)
    assert json.loads(buf.getvalue()) == [{"a": 1.0, "b": "x"}, {"a": None, "b": "y"}]
    buf = io.StringIO()
    tables.emit_dataframe(df, tables.OutputFormat.csv, buf)
    assert buf.getvalue().splitlines()[0] == "a,b"
    assert tables.format_interval(0.99871, 0.9, 1.2) == "0.9987 [0.9000, 1.2000]"
    buf = io.StringIO()
    tables.print_renderable(tables.make_table("T", ["k", "v"], [["[red]x", "[0.1, 0.2]"]]), buf)
    assert "[red]x" in buf.getvalue() and "[0.1, 0.2]" in buf.getvalue()  # cells are not markup


# --------------------------------------------------------------------------------------------------
# the command

SMALL = ["toy", "--dim", "20", "--samples", "8"]
runner = CliRunner()


def test_cli_toy_table() -> None:
    res = runner.invoke(app, SMALL)
    assert res.exit_code == 0, res.output
    assert "Table 1" in res.output
    for col in ("0.001", "0.01", "0.1"):
        assert col in res.output
    assert "median [p10, p90]" in res.output


def test_cli_toy_csv_and_json(tmp_path) -> None:
    res = runner.invoke(app, [*SMALL, "--format", "csv"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(io.StringIO(res.stdout))
    assert list(df.columns) == ["t", "dt", "median", "p10", "p90", "n"]
    for _, g in df.groupby("t"):
        med = g.sort_values("dt")["median"].to_numpy()
        assert abs(med[0] - 1) < 0.01
        assert np.all(np.diff(med) < 0)
    out = tmp_path / "t1.json"
    res = runner.invoke(app, [*SMALL, "--format", "json", "--out", str(out)])
    assert res.exit_code == 0 and res.stdout == ""
    rows = json.loads(out.read_text())
    assert len(rows) == 12
    np.testing.assert_allclose(pd.DataFrame(rows)["median"], df["median"], rtol=1e-12)


def test_cli_toy_help() -> None:
    res = runner.invoke(app, ["toy", "--help"])
    assert res.exit_code == 0
    assert "--samples" in res.output and "--format" in res.output


@pytest.mark.parametrize(
    "args", [["--dim", "1"], ["--samples", "0"], ["--format", "xml"]], ids=["dim", "samples", "format"]
)
def test_cli_toy_bad_options_one_line_exit_2(monkeypatch, capsys, args: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["commute", "toy", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert captured.out == ""
