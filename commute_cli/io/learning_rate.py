"""The learning rate at a checkpoint, read from every place a trainer records it, and where it came from.

The learning rate is the time scale of every prediction (``dt = lr * horizon``, docs/MATH.md). The rate
wanted is the one of the update that *starts* from the saved weights. Sources, in order of preference:

1. ``--lr`` (``override``): the user's word replaces every record.
2. ``scheduler.pt`` ``_last_lr`` (HF Trainer, accelerate): the rate the scheduler set after its last step,
   i.e. exactly the rate of the next update. Read with ``torch.load(weights_only=True)``.
3. ``trainer_state.json`` ``log_history`` (through ``transformers.TrainerState``), the entry logged at the
   checkpoint's own step. transformers 4.x and ``commute train`` log the rate of the next update there;
   transformers 5 logs the rate of the update just made, one scheduler step earlier (the two differ by one
   step of the schedule, ``~lr/max_steps`` for a linear or cosine decay).
4. ``optimizer.pt`` ``param_groups[0]["lr"]`` (``weights_only``, memory-mapped): the rate last written into
   the optimizer (the HF Trainer's scheduler writes the next update's rate there); for a torch distributed
   checkpoint (torchtitan's ``step-N/``, FSDP's ``optimizer_0/``), the ``lr`` of its saved param groups
   (:func:`commute_cli.io.dcp_checkpoints.learning_rate`).
5. ``trainer_state.json``, the nearest entry *before* the step (logging less often than saving), then the
   nearest after it; the result carries the step it was logged at, so a stale rate is visible.
6. nanoGPT ``ckpt.pt``: its optimizer's ``param_groups`` (nanoGPT sets ``get_lr(iter_num)`` before it
   saves: the next update's rate), else its ``config`` (:func:`commute_cli.io.nanogpt.learning_rate`).
7. Megatron-LM ``iter_N``: its optimizer's param group (set for the next update after each step), else its
   ``opt_param_scheduler`` through Megatron's formula, else a constant ``args.lr``
   (:func:`commute_cli.io.megatron.learning_rate`).
8. LitGPT ``lit_model.pth``: its optimizer's param group (:func:`commute_cli.io.litgpt.learning_rate`).

**A rate that changes inside the prediction window** (warmup, cosine): the prediction uses the rate at the
checkpoint, the one of the update that starts from these weights, for the whole horizon: ``dt = lr * N``.
Why: the criterion is a first-order statement at these weights (its error is already ``O(dt^2)``), the
horizon is kept inside the local regime, and the rate at the checkpoint is the one number every trainer
records exactly; the future of an arbitrary schedule (a ``LambdaLR`` closure) is not in any file. The relative
error of ``dt`` is about half the relative change of the rate over the window: for a cosine decay to 0 over
``T`` steps the rate changes by ``(pi / T) * tan(pi s / (2T))`` of itself per step, i.e. ``pi N / T`` over
``N`` steps mid-run and ``2 N / (T - s)`` near the end; for a linear warmup from 0 at step ``s < w``, ``dt``
is low by a factor ``1 + N / (2 s)``. Where that matters,
pass ``--lr`` with the window's mean rate (``run.json`` records which rate each checkpoint used and why).

An lr of exactly 0 (the end of a decay to 0, the first step of a warmup from 0) is returned as it is, with its
source: no update follows such a checkpoint, so the predicted change is 0 by construction and the criterion
says nothing. Callers must not report it as an ordinary row (``analyze`` skips it with a note). A negative or
non-finite recorded rate is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commute_cli.errors import CommuteError
from commute_cli.io import litgpt, megatron, nanogpt
from commute_cli.io.discovery import CheckpointRef, trainer_state
from commute_cli.io.safefiles import torch_load
from commute_cli.io.saved_optimizer import saved_optimizer


@dataclass(frozen=True)
class LearningRate:
    """A checkpoint's learning rate: ``value`` (None when no source has one), ``source`` (file and field, or
    ``--lr``), ``step`` (the training step it was recorded at; None when given by hand or unknown)."""

    value: float | None
    source: str
    step: int | None = None

    @property
    def is_zero(self) -> bool:
        return self.value == 0.0

    def describe(self) -> str:
        """``1e-3 (scheduler.pt _last_lr, step 500)``."""
        if self.value is None:
            return "unknown"
        at = f", step {self.step}" if self.step is not None else ""
        return f"{self.value:.6g} ({self.source}{at})"

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "logged_at_step": self.step}


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:  # a 0-d tensor
        return float(value.item())
    return None


def _from_scheduler(folder: Path) -> float | None:
    file = folder / "scheduler.pt"
    if not file.is_file():
        return None
    try:
        saved = torch_load(file, "scheduler state")
    except CommuteError:
        return None  # a scheduler pickled with objects weights_only refuses: fall back to the other records
    last = saved.get("_last_lr") if isinstance(saved, dict) else None
    if isinstance(last, (list, tuple)) and last:
        return _number(last[0])
    return None


def _from_optimizer(folder: Path) -> float | None:
    from commute_cli.io import dcp_checkpoints

    layout = dcp_checkpoints.find(folder)
    if layout is not None:  # a torch distributed checkpoint: the lr of its saved param groups
        return dcp_checkpoints.learning_rate(layout)
    saved = saved_optimizer(folder) if folder.is_dir() else None
    groups = saved.get("param_groups") if saved is not None else None
    if isinstance(groups, list) and groups and isinstance(groups[0], dict):
        return _number(groups[0].get("lr"))
    return None


def _logged(folder: Path) -> list[tuple[int, float]]:
    state = trainer_state(folder)
    if state is None:
        return []
    out = []
    for entry in state.log_history or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        lr = entry.get("learning_rate")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool):
            out.append((int(entry["step"]), float(lr)))
    return out


def _checked(lr: LearningRate, ref: CheckpointRef) -> LearningRate:
    if lr.value is not None and not (math.isfinite(lr.value) and lr.value >= 0.0):
        raise CommuteError(
            f"the learning rate recorded for {ref.name} is {lr.value} ({lr.source})",
            hint="pass --lr with the rate the run used around this checkpoint",
        )
    return lr


def find_learning_rate(ref: CheckpointRef, override: float | None = None) -> LearningRate:
    """The lr of ``ref`` from the first source that has one (order in the module docstring)."""
    if override is not None:
        return LearningRate(float(override), "--lr")
    path = Path(ref.path)
    if path.is_file():
        value, source = nanogpt.learning_rate(nanogpt.read(path))
        return _checked(LearningRate(value, source, ref.step if value is not None else None), ref)
    if megatron.is_megatron_dir(path) or litgpt.is_litgpt_dir(path):
        value, source = (megatron if megatron.is_megatron_dir(path) else litgpt).learning_rate(path)
        return _checked(LearningRate(value, source, ref.step if value is not None else None), ref)
    value = _from_scheduler(path)
    if value is not None:
        return _checked(LearningRate(value, "scheduler.pt _last_lr", ref.step), ref)
    entries = _logged(path)
    at = [lr for s, lr in entries if s == ref.step]
    if at:
        return _checked(LearningRate(at[-1], "trainer_state.json log_history", ref.step), ref)
    value = _from_optimizer(path)
    if value is not None:
        from commute_cli.io.discovery import dcp_layout

        layout = dcp_layout(path)
        where = f"{layout.optimizer.name}/ param_groups (torch DCP)" if layout and layout.optimizer else ""
        return _checked(LearningRate(value, where or "optimizer.pt param_groups", ref.step), ref)
    if entries:
        target = ref.step
        if target is None:
            step, value = entries[-1]
        else:
            before = [e for e in entries if e[0] <= target]
            after = [e for e in entries if e[0] > target]
            step, value = before[-1] if before else after[0]  # log_history is in step order
        return _checked(LearningRate(value, "trainer_state.json log_history", step), ref)
    return LearningRate(None, "")
