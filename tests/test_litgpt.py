"""LitGPT lit_model.pth folders: refused with one line naming the format and LitGPT's own converter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints as ck

from cli_runner import cli

CONFIG = """name: pythia-14m
hf_config:
  name: pythia-14m
  org: EleutherAI
block_size: 512
vocab_size: 50254
padded_vocab_size: 50304
n_layer: 6
n_head: 4
n_embd: 128
rotary_percentage: 0.25
parallel_residual: true
bias: true
norm_class_name: LayerNorm
mlp_class_name: GptNeoxMLP
"""


def write_litgpt_step(out: Path, step: int) -> Path:
    """A folder as `litgpt pretrain` saves it: lit_model.pth ({"model", "iter_num", ...}) and its config."""
    folder = out / f"step-{step:08d}"
    folder.mkdir(parents=True)
    sd = {"transformer.wte.weight": torch.zeros(8, 4), "transformer.h.0.attn.qkv.weight": torch.zeros(12, 4)}
    torch.save({"model": sd, "iter_num": step * 4, "step_count": step}, folder / "lit_model.pth")
    (folder / "model_config.yaml").write_text(CONFIG)
    (folder / "hyperparameters.yaml").write_text("model_name: pythia-14m\nout_dir: out/pretrain\n")
    return folder


def test_litgpt_run_refused_with_the_conversion_command(tmp_path, capsys):
    out = tmp_path / "out" / "pretrain"
    step = write_litgpt_step(out, 100)
    for path in (out, step, step / "lit_model.pth"):
        with pytest.raises(CommuteError) as err:
            ck.discover(path)
        line = err.value.one_line()
        assert "LitGPT checkpoint (lit_model.pth + model_config.yaml, pythia-14m, 6 layers" in line
        assert f"litgpt convert_from_litgpt {step} OUT" in line
    code, _, err = cli(["analyze", out, "--domains", f"a={tmp_path}/a.jsonl", "--weights", "a=1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "litgpt convert_from_litgpt" in err
