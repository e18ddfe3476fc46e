"""Data parallelism: 2 real gloo processes on CPU give the single-process numbers.

- ``torchrun --nproc_per_node=2 -m commute_cli analyze`` on the tiny run against the same command in one
  process (relative difference <= 1e-5 in float32; parts of 3 sequences, so the ranks hold 2 and 1);
- the ``reduce`` hook of ``curvature`` with two processes, one of which holds no sequence at all;
- a failure on rank 0 only (an output folder that is a file) ends both ranks, printed once;
- ``--dist-timeout``: a rank that stops taking part in a collective (sleeps past the timeout, or exits)
  ends the other rank's all-reduce with a one-line error, after the timeout or at once; 0 is refused.

Loopback only: torchrun ``--standalone``, a ``file://`` rendezvous, and ``env://`` on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from commute_cli.cli import main

from cli_runner import cli
from tiny_run import make_run

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo needed"
)

ARGS = ["--samples", "36", "--blocks", "4", "--quiet"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("drun") / "run", steps=(0, 20))


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "commute_cli", "analyze", *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def assert_same_numbers(a: pd.DataFrame, b: pd.DataFrame, rtol: float) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        x, y = a[col], b[col]
        if x.dtype.kind == "f":
            xv, yv = x.to_numpy(), y.to_numpy()
            assert np.array_equal(np.isnan(xv), np.isnan(yv)), col
            ok = ~np.isnan(xv)
            rel = np.abs(xv[ok] - yv[ok]) / np.maximum(np.abs(xv[ok]), 1e-30)
            assert rel.max(initial=0.0) <= rtol, (col, rel.max())
        else:
            assert x.fillna("").astype(str).tolist() == y.fillna("").astype(str).tolist(), col


def test_torchrun_two_ranks_equal_single_process(run_dir, tmp_path, capsys):
    single, multi = tmp_path / "single", tmp_path / "multi"
    try:
        main(["analyze", str(run_dir), "--out", str(single), *ARGS])
    except SystemExit as ex:  # pragma: no cover - only on failure
        assert not ex.code, capsys.readouterr().err
    capsys.readouterr()

    proc = torchrun([run_dir, "--out", multi, *ARGS], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone prints the table; the other rank stays quiet
    assert proc.stdout.count("target: en") == 1, proc.stdout[-2000:]
    assert proc.stderr.count("results in") == 1

    for name in ("results.csv", "losses.csv"):
        assert_same_numbers(pd.read_csv(single / name), pd.read_csv(multi / name), rtol=1e-5)
    run = json.loads((multi / "run.json").read_text())
    assert run["world_size"] == 2 and run["samples_per_domain"] == 36
    assert run["sample_digest"] == json.loads((single / "run.json").read_text())["sample_digest"]
    # the cache entries of a 2-process run are its own (other summation order)
    assert {p.name for p in (multi / "cache").glob("stats-*")}.isdisjoint(
        p.name for p in (single / "cache").glob("stats-*")
    )


def test_failure_on_rank_zero_ends_both_ranks(run_dir, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    proc = torchrun([run_dir, "--out", not_a_folder, *ARGS], cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("error: output folder") == 1, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------ curvature reduce


def _tiny_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).eval()


def _blocks() -> torch.Tensor:
    return torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))


def _reduce_worker(rank: int, init_file: str, out_dir: str) -> None:
    from commute_cli.engine import curvature as C
    from commute_cli.engine.distributed import DistContext
    from commute_cli.engine.hvp import hvp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ctx = DistContext(rank=rank, world=2)
        model = _tiny_model()
        blocks = _blocks()[:1]  # one sequence: rank 0 holds it, rank 1 holds none
        mine = ctx.shard(blocks)
        assert mine.shape[0] == (1 if rank == 0 else 0)
        vecs = torch.randn(2, C.num_params(model), generator=torch.Generator().manual_seed(2))
        loss, grad = C.loss_and_grad(model, mine, 2, reduce=ctx.reduce_fn())
        res = hvp(model, mine, vecs, 2, reduce=ctx.reduce_fn())
        # three sequences split 2 / 1
        part = ctx.shard(_blocks())
        loss3, grad3 = C.loss_and_grad(model, part, 1, reduce=ctx.reduce_fn())
        res3 = hvp(model, part, vecs, 1, reduce=ctx.reduce_fn())
        torch.save(
            {
                "loss": loss,
                "grad": grad,
                "hvps": res.hvps,
                "loss3": loss3,
                "grad3": grad3,
                "hvps3": res3.hvps,
                "hvp_loss3": res3.loss,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()  # both ranks finished: no traffic in flight when the group goes
    finally:
        dist.destroy_process_group()
    # a finished rank leaves without interpreter finalization, as the CLI's ranks do: gloo's threads can
    # abort it there ("terminate called without an active exception"; engine.distributed.ended_own_group)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a vector (entries of an HVP cancel, so entrywise tolerances mislead)."""
    return float((a - b).norm() / b.norm())


def test_reduce_hook_with_an_empty_rank(tmp_path):
    from commute_cli.engine import curvature as C
    from commute_cli.engine.hvp import hvp

    mp.spawn(_reduce_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model = _tiny_model()
    vecs = torch.randn(2, C.num_params(model), generator=torch.Generator().manual_seed(2))
    loss, grad = C.loss_and_grad(model, _blocks()[:1], 2)
    hv = hvp(model, _blocks()[:1], vecs, 2).hvps
    loss3, grad3 = C.loss_and_grad(model, _blocks(), 3)
    hv3 = hvp(model, _blocks(), vecs, 3)
    for rank in (0, 1):  # every rank ends with the same global means
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["loss"] == pytest.approx(loss, rel=1e-6)
        assert rel_err(got["grad"], grad) < 1e-6
        assert rel_err(got["hvps"], hv) < 1e-6
        assert got["loss3"] == pytest.approx(loss3, rel=1e-6)
        assert got["hvp_loss3"] == pytest.approx(loss3, rel=1e-6)
        assert rel_err(got["grad3"], grad3) < 1e-6
        assert rel_err(got["hvps3"], hv3.hvps) < 1e-6


# ------------------------------------------------------------------------------------ --dist-timeout

TIMEOUT_S = 5.0


def _wait_for(path: Path, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _timeout_worker(rank: int, port: int, out_dir: str, mode: str) -> None:
    """Rank 1 takes part in one all-reduce, then sleeps through the next (``sleeps``) or exits (``exits``)."""
    from commute_cli.engine import distributed
    from commute_cli.errors import CommuteError

    torch.set_num_threads(1)
    out = Path(out_dir)
    # start the rendezvous together: a slow import on a loaded machine must not eat the short timeout
    (out / f"ready{rank}").touch()
    _wait_for(out / f"ready{1 - rank}")
    os.environ.update(
        {"WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    ctx, _device = distributed.setup(torch.device("cpu"), timeout_s=TIMEOUT_S)
    try:
        assert ctx.owns_group and ctx.timeout_s == TIMEOUT_S
        reduce = ctx.reduce_fn()
        assert reduce is not None
        assert reduce(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]  # both ranks take part once
        if rank == 1:
            _wait_for(out / "entering")
            if mode == "exits":
                os._exit(0)  # gone without a word, like a killed process
            _wait_for(out / "rank0.json")  # asleep until rank 0 has given up
            return
        (out / "entering").touch()
        result: dict = {}
        t0 = time.perf_counter()
        try:
            reduce(torch.ones(3))
        except CommuteError as err:
            result = {
                "line": err.one_line(),
                "exit_code": err.exit_code,
                "cause": type(err.__cause__).__name__,
                "seconds": time.perf_counter() - t0,
            }
            try:  # the other collectives say the same
                ctx.broadcast(1)
            except CommuteError as err2:
                result["broadcast"] = err2.message
        tmp = out / "rank0.tmp"
        tmp.write_text(json.dumps(result))
        tmp.replace(out / "rank0.json")
    finally:
        ctx.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn_bounded(fn, args: tuple, limit_s: float) -> None:
    """``mp.spawn`` of 2 ranks that fails the test (and kills them) instead of hanging past ``limit_s``."""
    procs = mp.spawn(fn, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + limit_s
    try:
        while not procs.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {limit_s} s")
    finally:
        for proc in procs.processes:
            if proc.is_alive():
                proc.kill()


@pytest.mark.parametrize("mode", ["sleeps", "exits"])
def test_lost_rank_ends_all_reduce_with_one_line(tmp_path, mode):
    _spawn_bounded(_timeout_worker, (_free_port(), str(tmp_path), mode), limit_s=60.0)
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got, "rank 0's all-reduce returned although rank 1 never took part"
    line = got["line"]
    assert line.startswith(
        "error: rank 0: another rank did not join a collective within 5 s or left the run ("
    )
    assert "raise --dist-timeout" in line and "\n" not in line
    assert got["exit_code"] == 1
    assert got["cause"] in {"RuntimeError", "DistError", "DistBackendError", "DistNetworkError"}
    assert got["broadcast"].startswith("rank 0: another rank did not join a collective within 5 s")
    if mode == "sleeps":  # the short timeout was applied: not before it, and not torch's 30 minutes
        assert TIMEOUT_S - 0.5 <= got["seconds"] < 30.0, got
    else:  # a peer that has gone is noticed at once, without waiting for the timeout
        assert got["seconds"] < TIMEOUT_S, got


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_dist_timeout_must_be_positive(run_dir, tmp_path, capsys, value):
    out = tmp_path / "out"
    code, stdout, err = cli(["analyze", run_dir, "--out", out, *ARGS, "--dist-timeout", value], capsys)
    assert code == 2, err
    assert err.startswith("error: --dist-timeout must be a positive number of seconds") and "hint:" in err
    assert err.count("\n") == 1 and stdout == ""
    assert not out.exists()
