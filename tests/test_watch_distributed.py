"""``commute watch`` under data parallelism: 2 real gloo processes measure the live model with the same reduce
as ``analyze`` and give the single-process rows (float32 summation order: relative difference <= 1e-5);
rank 0 alone writes the folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from commute_cli.io import store

from tiny_run import make_run

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo needed"
)


def _watch(run: Path, out: Path) -> None:
    """Measure checkpoint-0 of the tiny run, loaded as a live model in train mode, at steps 0 and 4."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from commute_cli.commands.options import AnalyzeOptions
    from commute_cli.commands.watch import Watcher

    model = GPT2LMHeadModel.from_pretrained(str(run / "checkpoint-0")).train()
    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    domains = {d: str(run / "data" / f"{d}.jsonl") for d in ("en", "xx")}
    opts = AnalyzeOptions(ckpt_dir=run, samples=12, blocks=2, batch_size=2)
    w = Watcher(domains, tok, {"en": 0.7, "xx": 0.3}, seq_len=16, out=out, every=4, options=opts)
    w.begin(8, model=model)
    for step in (0, 4):
        w.measure(model, step, 0.05)
    assert model.training  # handed back in train mode


def _worker(rank: int, init_file: str, run: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        _watch(Path(run), Path(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/test_distributed.py: gloo's threads can abort a finalizing interpreter


def test_two_gloo_ranks_give_the_single_process_rows(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", steps=(0,))
    _watch(run, tmp_path / "single")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(run), str(tmp_path / "multi")), nprocs=2, join=True)
    single, multi = store.load_analysis(tmp_path / "single"), store.load_analysis(tmp_path / "multi")
    assert multi.run["world_size"] == 2 and single.run["world_size"] == 1
    assert multi.run["sample_digest"] == single.run["sample_digest"]
    assert len(multi.results) == len(single.results) == 2 * 3  # steps 0, 4 x targets en, xx, mix
    for column in ("el_ij", "el_se", "bracket", "first_order"):
        a, b = multi.results[column].to_numpy(float), single.results[column].to_numpy(float)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12, err_msg=column)
    np.testing.assert_allclose(multi.losses["loss"], single.losses["loss"], rtol=1e-6)
