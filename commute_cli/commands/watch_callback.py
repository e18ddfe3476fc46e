"""``CommuteCallback``: the criterion live inside a Hugging Face ``Trainer`` run, in the trainer's own logs.

    from commute_cli.commands.watch_callback import CommuteCallback

    watch = CommuteCallback({"en": "data/en.jsonl", "xx": "data/xx.jsonl"}, tokenizer,
                            weights={"en": 0.7, "xx": 0.3}, seq_len=128, out="commute_watch")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    watch.attach(trainer)   # one of the trainer's callbacks, ahead of the reporting ones
    trainer.train()
    # then: commute recommend commute_watch --kind local

At each measurement step (``every``, or from the cost target: ``commands.watch``) the callback measures the
live model with the trainer's current learning rate (the rate of the update that follows the step, as the
Trainer logs it) and

- asks the Trainer to log at that step and adds the ``commute/...`` scalars (``Watcher.measure``) to that
  log: they go wherever the Trainer reports (TensorBoard, W&B, Trackio, ...) and into
  ``trainer_state.json``'s ``log_history``; the domain weights go with them (``commute/weight/<domain>``);
- writes the rows ``commute analyze`` writes (``results.csv``, ``losses.csv``, ``run.json`` with the
  checkpoint folder ``args.output_dir``, the statistics cache) to ``out``.

Why :meth:`CommuteCallback.attach`: the Trainer hands one ``logs`` dict to its callbacks in order, and puts
the reporting callbacks (``report_to``) before those given in ``callbacks=[...]``; a callback placed after
them adds its values too late for them (they would reach ``log_history`` and ``results.csv`` only).
``attach`` puts this callback right after the flow callback, ahead of every reporter. The measurement never
touches the optimizer and restores the model's modes, gradients and random generators exactly
(``engine.live``): watching changes no weight of the run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from commute_cli.commands.options import AnalyzeOptions
from commute_cli.commands.watch import CALIBRATION_STEPS, DEFAULT_COST, Watcher
from commute_cli.core.schedule import Schedule


class CommuteCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that measures the criterion every ``every`` steps.

    Args: as :class:`~commute_cli.commands.watch.Watcher` (``domains``, ``tokenizer``, ``weights``,
    ``seq_len``, ``out``, ``every``, ``cost``, ``options``). ``options.ckpt_dir`` defaults to the Trainer's
    ``output_dir`` (where its checkpoints are, for ``recommend``).
    """

    def __init__(
        self,
        domains: Mapping[str, str],
        tokenizer: Any,
        weights: Schedule | Mapping[str, float],
        *,
        seq_len: int,
        out: Path | str = Path("commute_watch"),
        every: int | None = None,
        cost: float = DEFAULT_COST,
        options: AnalyzeOptions | None = None,
    ) -> None:
        self.watcher = Watcher(
            domains, tokenizer, weights, seq_len=seq_len, out=out, every=every, cost=cost, options=options
        )
        self._ckpt_dir_given = options is not None and Path(options.ckpt_dir) != Path(out)
        self._attached = False
        self._pending: dict[str, float] = {}
        self._pending_step = -1
        self._last_end: float | None = None
        self._timed: list[float] = []
        self._first_measure_s: float | None = None
        self._measured_step: int | None = None
        self.seconds = 0.0
        """Wall seconds spent in this callback so far (measurements, files, bookkeeping): its cost."""

    # ------------------------------------------------------------------------------------------ set-up

    def attach(self, trainer: Any) -> CommuteCallback:
        """Make this callback one of ``trainer``'s, right after its flow callback (ahead of the reporting
        callbacks, which then see the ``commute/...`` values). Returns self."""
        handler = trainer.callback_handler
        handler.callbacks = [cb for cb in handler.callbacks if cb is not self]
        flow = [i for i, cb in enumerate(handler.callbacks) if isinstance(cb, DefaultFlowCallback)]
        handler.callbacks.insert(flow[0] + 1 if flow else 0, self)
        self._attached = True
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        entered = time.perf_counter()
        w = self.watcher
        if not self._ckpt_dir_given:
            w.opts.ckpt_dir = Path(args.output_dir)
        w.begin(state.max_steps, start=state.global_step, model=model)
        if not self._attached:
            w.note(
                "note: commute watch: the callback was given in callbacks=[...], after the reporting "
                "callbacks: the commute/ values reach log_history and results.csv, not TensorBoard/W&B "
                "(use CommuteCallback.attach(trainer))"
            )
        optimizer = kwargs.get("optimizer")
        start = state.global_step
        if optimizer is not None and (w.every is None or w.due(start)):  # the first step of this session
            self._timed_measure(model, start, optimizer)
        self._last_end = time.perf_counter()
        self.seconds += self._last_end - entered

    def _timed_measure(self, model: Any, step: int, optimizer: Any) -> dict[str, float]:
        """Measure at ``step``; keep the seconds of the first real measurement (not a skip at lr 0)."""
        t0 = time.perf_counter()
        scalars = self.watcher.measure(model, step, _learning_rate(optimizer))
        if self._first_measure_s is None and self.watcher.measured_at == step:
            self._first_measure_s = time.perf_counter() - t0
        self._measured_step = step
        return scalars

    # ------------------------------------------------------------------------------------------ steps

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        w = self.watcher
        now = time.perf_counter()
        step = state.global_step
        optimizer = kwargs["optimizer"]
        if w.every is None and self._last_end is not None:
            self._timed.append(now - self._last_end)
            if len(self._timed) > CALIBRATION_STEPS:  # the first step warms up: left out
                if self._first_measure_s is None:  # the first one was skipped (lr 0, warmup): time one now
                    self._timed_measure(model, step, optimizer)
                if self._first_measure_s is not None:
                    step_s = sum(self._timed[1:]) / (len(self._timed) - 1)
                    w.choose_interval(self._first_measure_s, step_s)
        if w.due(step) and step != self._measured_step:
            scalars = self._timed_measure(model, step, optimizer)
            if scalars:
                self._pending, self._pending_step = scalars, step
                control.should_log = True
        self._last_end = time.perf_counter()
        self.seconds += self._last_end - now
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A run that ended before the interval was chosen: choose it from the steps timed so far, so the
        rows measured so far are written."""
        w = self.watcher
        if w.every is None and self._first_measure_s is not None and self._timed:
            timed = self._timed[1:] or self._timed
            w.choose_interval(self._first_measure_s, sum(timed) / len(timed))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if not self._pending or logs is None or state.global_step != self._pending_step:
            return
        logs.update(self._pending)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == self._pending_step:
            last.update(self._pending)  # the Trainer copied logs into log_history before calling us
        self._pending = {}

    @property
    def folder(self) -> Path:
        """The folder of the rows (``out``, or ``out/run-<id>/`` when ``out`` held another run)."""
        return self.watcher.folder


def _learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate in force: the first parameter group's (after the scheduler's step, the rate of the
    next update; the Trainer's own ``_get_learning_rate`` reads the same)."""
    return float(optimizer.param_groups[0]["lr"])
