"""commute as a library: measure a model once, answer many questions.

The command line computes the same two steps for every checkpoint (``commute analyze``) and for a live
model (``commute watch``); this module gives them to a notebook or a training script with typed arguments:

- :func:`measure` (the expensive step: gradients and HVPs) turns a causal LM and per-domain token blocks
  into a :class:`Measurement`: the unbiased inner products of the criterion with their per-block values
  (``core.checkpoint_stats.CheckpointStats``, a few kilobytes whatever the model size), measured with the
  pair plan, so that any target can be asked later;
- :func:`answer` (cheap: numpy) turns a measurement and a question (the domain weights in force, the
  learning rate, the horizon, the targets, the shift ``dw``, the confidence) into the rows that
  ``commute analyze`` writes to ``results.csv``: the predicted change ``el_ij`` of each target (nats), its
  standard error ``el_se``, its t statistic and the verdict.

Example (the README's, run as written by ``tests/test_api.py``)::

    from commute_cli import api

    model = api.load_model("sample_checkpoints/checkpoint-1000")
    samples = api.sample_run("sample_checkpoints", sequences=24)  # {"en": [24, 128], "ru": [24, 128]}
    m = api.measure(model, samples, blocks=4)
    columns = ["target", "domain_i", "domain_j", "el_ij", "el_se", "verdict"]
    for horizon in (125, 250):  # one measurement, two questions
        rows = api.answer(m, weights={"en": 0.8, "ru": 0.2}, lr=1e-3, horizon=horizon, targets=["ru"])
        print(f"horizon {horizon}:", rows[columns].to_string(index=False), sep="\n")

Signs, units and the estimator are those of ``docs/MATH.md``; the rows equal ``commute analyze``'s for the
same sample, plan and question (``tests/test_api.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from commute_cli.commands.options import AnalyzeOptions
from commute_cli.commands.outputs import RowTables
from commute_cli.commands.stats import domain_seed, estimate_model
from commute_cli.core.checkpoint_stats import CheckpointStats
from commute_cli.core.regime import MIN_EFFECT, parse_targets
from commute_cli.engine import distributed, live
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints, run_inputs, sampling

__all__ = ["Measurement", "answer", "load_model", "measure", "sample_run"]


@dataclass(frozen=True)
class Measurement:
    """One model measured: the statistics every answer is computed from, and what they were measured on.

    ``stats``: per design block (``[B, ...]``), the inner products of docs/MATH.md "Estimator" (pair plan);
    ``names``: the domains, in the order of ``stats``' ``K`` axes; ``sequences``: sequences per domain used
    (a multiple of ``3 * blocks``); ``blocks``: design blocks ``B``.
    """

    stats: CheckpointStats
    names: tuple[str, ...]
    sequences: int
    blocks: int


def load_model(checkpoint: str | Path, device: str = "cpu") -> torch.nn.Module:
    """A saved checkpoint (a transformers folder, a Trainer ``checkpoint-N/``, a nanoGPT ``ckpt.pt``) as
    :func:`measure` needs it: float32, eager attention, eval mode, through commute's one loader (pickles
    only with ``weights_only=True``). Raises ``CommuteError`` for what ``commute analyze`` refuses."""
    return checkpoints.load_model(Path(checkpoint), device=device)


def sample_run(run: str | Path, sequences: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per domain, ``sequences`` blocks ``[sequences, seq_len]`` (token ids) of the data ``commute analyze``
    measures on: the held-out domains of the run's ``commute.json`` when it names them, else its training
    domains; its tokenizer and sequence length; drawn exactly as ``commute analyze --samples N --seed S``
    draws them (``io.sampling.sample_domain`` with the domain's seed)."""
    inputs = run_inputs.resolve_run_inputs(Path(run))
    sources = inputs.analysis_sources
    if not sources:
        raise CommuteError(f"{run} names no training domains", hint="pass a run folder with its commute.json")
    tokenizer = inputs.load_tokenizer()
    seq_len = int(inputs.seq_len or run_inputs.DEFAULT_SEQ_LEN)
    return {
        name: sampling.sample_domain(
            source,
            tokenizer,
            seq_len,
            sequences,
            domain_seed(seed, name),
            domain=name,
            base_dir=inputs.base_dir,
        ).blocks
        for name, source in sources.items()
    }


def measure(
    model: torch.nn.Module,
    samples: Mapping[str, torch.Tensor],
    *,
    blocks: int = 8,
    micro_batch: int = 8,
    hvp: str = "rr",
) -> Measurement:
    """Measure ``model`` on ``samples`` (per domain ``[n, seq_len]`` token ids; at least two domains).

    Each domain's ``n`` is cut to a multiple of ``3 * blocks`` and split in order into ``blocks`` design
    blocks of three parts (pass shuffled samples, e.g. :func:`sample_run`). Cost per block: ``2K`` gradient
    passes and ``K`` HVP passes of ``K - 1`` vectors (docs/MATH.md "Cost"). The model is borrowed
    (``engine.live.borrowed``): eval mode and eager attention during the measurement; its mode, attention,
    ``.grad`` and the random generators are restored afterwards, so a training loop can call this.

    Args:
        blocks: design blocks ``B`` (the error bars' degrees of freedom are ``B - 1``).
        micro_batch: sequences per forward pass.
        hvp: "rr" (reverse-on-reverse) or "fr" (forward-over-reverse) HVPs.
    Raises:
        CommuteError: fewer than two domains, or fewer than ``3 * blocks`` sequences in a domain.
    """
    names = tuple(samples)
    if len(names) < 2:
        raise CommuteError(f"need at least two domains, got {list(names)}")
    n = min(int(s.shape[0]) for s in samples.values())
    used = (n // (3 * blocks)) * 3 * blocks
    if used == 0:
        raise CommuteError(
            f"{n} sequences per domain are fewer than 3 x {blocks} blocks",
            hint="pass more sequences or fewer blocks",
        )
    opts = AnalyzeOptions(ckpt_dir=Path("."), samples=used, blocks=blocks, batch_size=micro_batch, hvp=hvp)
    parts = [sampling.split_parts(samples[name][:used], blocks, 3) for name in names]
    with live.borrowed(model):
        stats, _offloaded = estimate_model(
            model, opts, parts=parts, plan="pair", coefs=None, D=None, ctx=distributed.DistContext()
        )
    return Measurement(stats=stats, names=names, sequences=used, blocks=blocks)


def answer(
    measurement: Measurement,
    *,
    weights: Mapping[str, float],
    lr: float,
    horizon: int,
    targets: Sequence[str] = (),
    dw: float | None = None,
    confidence: float = 0.95,
    min_effect: float = MIN_EFFECT,
    step: int | None = None,
) -> pd.DataFrame:
    """The rows of ``results.csv`` for one question about a measurement (no gradients: numpy only).

    Args:
        weights: the domain weights in force (summing to 1), e.g. ``{"en": 0.8, "ru": 0.2}``.
        lr: the learning rate in force (the intervention lasts ``dt = lr * horizon`` of flow time).
        horizon: optimizer steps of each half of the intervention.
        targets: domains, ``mix`` or ``en=0.3,ru=0.7`` (default: every domain and ``mix``).
        dw: the weight moved (default: analyze's, from the weights).
        confidence: of the intervals and verdicts.
        min_effect: the smallest effect called significant, as a fraction of the window's progress.
        step: the step written in the rows (None for a model that is not a checkpoint).
    Returns:
        One row per (target, pair of domains ``domain_i``, ``domain_j``): ``el_ij`` (nats, the predicted
        change of the target when ``domain_i`` moves earlier and ``domain_j`` later by ``dw`` for
        ``horizon`` steps each), ``el_se``, ``t``, ``significant``, ``verdict``, ``direction`` and the regime
        columns: the columns of ``results.csv`` (docs/CONVENTIONS.md).
    """
    names = list(measurement.names)
    missing = [n for n in names if n not in weights]
    if missing:
        raise CommuteError(f"weights name no {', '.join(missing)}", hint=f"give a weight for each of {names}")
    wbar = np.array([float(weights[n]) for n in names], dtype=np.float64)
    opts = AnalyzeOptions(
        ckpt_dir=Path("."), targets=list(targets), dw=dw, confidence=confidence, min_effect=min_effect
    )
    rows = RowTables().add(
        measurement.stats, opts, step=step, names=names, wbar=wbar,
        targets=parse_targets(list(targets), names), lr=float(lr), horizon=int(horizon),
        horizon_reason="given",
    )  # fmt: skip
    return pd.DataFrame(rows)
