"""The GPU path, against the CPU path and dense references. Skipped where no CUDA device is visible (CI).

What runs on a GPU and could differ from the CPU: the loss, gradient and both HVP methods on a real GPT-2
(float32 kernels, eager attention), the estimator with its vector stacks on the GPU or offloaded to host
memory (``--offload``: chunks moved between devices inside the float64 dot products), bf16 weights upcast on
load, and the whole ``commute analyze`` command with ``--device cuda``. Each is compared with an
independent reference: dense float64 Hessians computed on the CPU, or the same computation on the CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from commute_cli.engine import curvature as C
from commute_cli.engine.hvp import hvp
from commute_cli.io import checkpoints as ck

from cli_runner import cli
from estimator_population import check_block_values_dense
from tiny_run import make_run, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
SAMPLE = Path(__file__).resolve().parents[1] / "sample_checkpoints"


@pytest.mark.parametrize("offload", [False, True])
def test_estimator_on_gpu_matches_dense_cpu_reference(offload: bool) -> None:
    """Every per-block product of both plans, model on the GPU in float64, stacks on the GPU or in host
    memory, against dense float64 Hessians on the CPU (1e-10 relative)."""
    check_block_values_dense(CUDA, offload)


def small_gpt2() -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel(tiny_config(512, n_positions=64, n_embd=64, n_layer=2)).eval()


@pytest.mark.parametrize("method", ["rr", "fr"])
def test_float32_curvature_gpu_matches_cpu(method: str) -> None:
    """Loss, gradient and H v for 2 vectors, float32, GPU against CPU. TF32 is off for the comparison
    (PyTorch's default for matrix products); what is left is float32 summation order."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = small_gpt2()
    gpu = small_gpt2().to(CUDA)
    blocks = torch.randint(0, 512, (6, 64), generator=torch.Generator().manual_seed(1))
    vecs = torch.randn(2, C.num_params(cpu), generator=torch.Generator().manual_seed(2))
    ref = hvp(cpu, blocks, vecs, micro_batch=3, method=method)  # type: ignore[arg-type]
    got = hvp(gpu, blocks, vecs, micro_batch=3, method=method)  # type: ignore[arg-type]
    assert got.hvps.device.type == "cuda"
    assert got.loss == pytest.approx(ref.loss, rel=1e-6)
    for a, b in ((got.grad, ref.grad), (got.hvps, ref.hvps)):
        err = float((a.cpu() - b).norm() / b.norm())
        assert err < 1e-5, err
    loss, grad = C.loss_and_grad(gpu, blocks, micro_batch=4)
    assert loss == pytest.approx(ref.loss, rel=1e-6)
    assert float((grad.cpu() - ref.grad).norm() / ref.grad.norm()) < 1e-5


def test_bf16_checkpoint_upcast_on_gpu(tmp_path: Path) -> None:
    """A bf16 checkpoint loads on the GPU as float32 with eager attention, and its HVPs match the same
    (upcast) weights on the CPU."""
    model = small_gpt2()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ref = ck.CheckpointRef(tmp_path / "bf16", None, "bf16")
    gpu = ck.load_model(ref, device=CUDA)
    cpu = ck.load_model(ref, device=torch.device("cpu"))
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in gpu.parameters())
    assert gpu.config._attn_implementation == "eager"
    blocks = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    v = torch.randn(C.num_params(cpu), generator=torch.Generator().manual_seed(4))
    a = hvp(gpu, blocks, v, micro_batch=4).hvps.cpu()
    b = hvp(cpu, blocks, v, micro_batch=4).hvps
    assert float((a - b).norm() / b.norm()) < 1e-5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run", steps=(0, 10))


FAST = ["--samples", "24", "--blocks", "4", "--quiet"]
NUMERIC = ["el_ij", "el_se", "bracket", "dt"]


def analyze(run: Path, out: Path, capsys, *extra: str) -> pd.DataFrame:
    code, _, stderr = cli(["analyze", run, "--out", out, *FAST, *extra], capsys)
    assert code == 0, stderr
    return pd.read_csv(out / "results.csv")


def test_analyze_cuda_matches_cpu_and_offload_changes_nothing(run_dir: Path, tmp_path: Path, capsys) -> None:
    """``commute analyze --device cuda`` gives the CPU's verdicts and numbers (float32 rounding apart), and
    ``--offload on`` gives the GPU run's numbers: offloading moves vectors, not arithmetic."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = analyze(run_dir, tmp_path / "cpu", capsys, "--device", "cpu")
    gpu = analyze(run_dir, tmp_path / "gpu", capsys, "--device", "cuda", "--offload", "off")
    off = analyze(run_dir, tmp_path / "off", capsys, "--device", "cuda", "--offload", "on")
    cols = [c for c in NUMERIC if c in cpu.columns]
    assert cols, cpu.columns
    for col in cols:
        scale = float(np.abs(cpu[col]).max()) or 1.0
        np.testing.assert_allclose(gpu[col], cpu[col], rtol=1e-3, atol=1e-4 * scale)
        np.testing.assert_allclose(off[col], gpu[col], rtol=1e-6, atol=1e-7 * scale)
    assert list(gpu["verdict"]) == list(cpu["verdict"])
    import json

    run = json.loads((tmp_path / "off" / "run.json").read_text())
    assert all(c.get("offload") is True for c in run["checkpoints"]), run["checkpoints"]


@pytest.mark.skipif(not (SAMPLE / "commute.json").is_file(), reason="needs sample_checkpoints/")
def test_sample_checkpoints_on_gpu(tmp_path: Path, capsys) -> None:
    """The README's command on the GPU: the shipped run, one checkpoint, same verdicts as the CPU."""
    common = ["--steps", "500", "--samples", "48", "--blocks", "4"]
    cpu = analyze(SAMPLE, tmp_path / "cpu", capsys, "--device", "cpu", *common)
    gpu = analyze(SAMPLE, tmp_path / "gpu", capsys, "--device", "cuda", *common)
    assert list(gpu["verdict"]) == list(cpu["verdict"])
    np.testing.assert_allclose(
        gpu["el_ij"], cpu["el_ij"], rtol=1e-3, atol=1e-4 * float(cpu["el_ij"].abs().max())
    )
