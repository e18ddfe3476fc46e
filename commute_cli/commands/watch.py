"""``commute watch``: the criterion measured on the live model while it trains.

:class:`Watcher` is the machinery: every ``every`` steps it borrows the trainer's model
(``engine.live.borrowed``: eval mode, eager attention; train mode, attention, ``.grad`` and the random
generators restored exactly, so a watched run's weights are bit-identical to an unwatched one's), measures
it with analyze's estimator and options (``commands.stats.estimate_model``) on fixed per-domain samples
(``commands.stats.prepare_samples``: the same sample at every measurement), turns the statistics into
analyze's rows with the learning rate in force at that step (``commands.outputs``) and rewrites the folder
(``results.csv``, ``losses.csv``, ``baselines.csv``, ``run.json``, each statistics entry in ``cache/``), so
``recommend``, ``plot`` and ``validate`` read a watched run like an analysed one. It returns the
measurement as ``commute/...`` scalars for the trainer's logs.

Two trainers use it: the Hugging Face ``Trainer`` through :class:`CommuteCallback` (``commute_cli.commands.
watch_callback``), and ``commute train --watch N`` (``commands.train``).

Interval. ``every`` steps when given; otherwise a cost target (``cost``, default 1% of training time): the
first measurement (step 0) is timed, then the next :data:`CALIBRATION_STEPS` training steps, and
``every`` is the number of steps whose training takes ``measurement / cost``, rounded up
(:func:`interval_for_cost`), shown when it is chosen. The step-0 measurement is one more on top: over a run
of ``n`` intervals the cost is ``(n + 1) / n`` times the target. The paper's own estimate: every 1000 steps
costs under half a percent of training.

Horizon. Each measurement's intervention spans half the spacing to the next planned measurement
(``core.regime.choose_horizon`` over the planned steps ``0, every, 2 every, ..., max_steps``), as analyze
does with checkpoints, so the windows of successive measurements never overlap.

Data parallel (``torchrun``): when ``torch.distributed`` is initialized every rank measures its slice of
each sample and the sums are all-reduced (``engine.distributed``), exactly as analyze; rank 0 draws the
sample, writes the files and chooses the interval (broadcast to the others, so all ranks measure at the
same steps).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from commute_cli import __version__
from commute_cli.commands.options import AnalyzeOptions, Inputs
from commute_cli.commands.outputs import RowTables, write_folder
from commute_cli.commands.stats import estimate_model, hvp_micro_batch, prepare_samples, versions
from commute_cli.core import criterion
from commute_cli.core.regime import REGIME_MAX_PROGRESS, REGIME_MAX_RATIO, choose_horizon, parse_targets
from commute_cli.core.schedule import Schedule
from commute_cli.engine import distributed, live
from commute_cli.errors import CommuteError
from commute_cli.io import store
from commute_cli.io.tokenizer import load_tokenizer

DEFAULT_COST = 0.01
"""Default cost target of watching: the fraction of training time spent measuring."""
CALIBRATION_STEPS = 5
"""Training steps timed (after the first, which warms up) to set the interval from the cost target."""


def interval_for_cost(measure_s: float, step_s: float, cost: float = DEFAULT_COST) -> int:
    """Steps between measurements so that measuring costs at most ``cost`` of training time.

    ``measure_s``: seconds of one measurement; ``step_s``: seconds of one training step; the result is
    ``need = measure_s / (cost x step_s)`` rounded up to a whole step, and above 100 steps up to two
    significant digits (2378 -> 2400): measurements land on round steps and the cost stays at or just
    under the target.

    Raises:
        ValueError: a non-positive cost or step time, a negative measurement time.
    """
    if not (cost > 0 and measure_s >= 0 and step_s > 0):
        raise ValueError(f"need cost > 0, measure_s >= 0, step_s > 0; got {cost}, {measure_s}, {step_s}")
    need = max(1.0, measure_s / (cost * step_s))
    unit = 1 if need <= 100 else 10 ** (math.floor(math.log10(need)) - 1)
    return int(math.ceil(need / unit - 1e-9) * unit)


def planned_steps(every: int, max_steps: int, start: int = 0) -> list[int]:
    """The steps measured from ``start`` on: ``start`` when it is a multiple of ``every``, every multiple of
    ``every`` up to ``max_steps`` (inclusive)."""
    first = start if start % every == 0 else start + every - start % every
    return list(range(first, max_steps + 1, every))


class Watcher:
    """Measures a live model every ``every`` steps and keeps an analysis folder of the measurements.

    Args:
        domains: domain name -> data source (a file, folder or glob as ``commute analyze --domains``).
        tokenizer: the tokenizer of the training data, or its folder.
        weights: the domain weights of the run (a :class:`Schedule`, or constant ``{name: weight}``).
        seq_len: tokens per sampled sequence.
        out: the folder of ``results.csv``, ``run.json`` and ``cache/`` (``store.choose_folder``: another
            run's folder is never overwritten; then ``out/run-<id>/``).
        every: steps between measurements; None: from the cost target ``cost`` (fraction of training).
        options: analyze's options (``--samples``, ``--blocks``, ``--batch-size``, ``--dw``, ``--target``,
            ``--confidence``, ...); ``ckpt_dir`` is where the trainer saves its checkpoints (``run.json``'s
            checkpoint folder: ``recommend`` finds them there). ``--metric euclid`` only.
        base_dir: the folder relative data sources are read from (a manifest's folder; default: the working
            directory).
        note: where notes go (default: stderr, rank 0 only).

    Raises:
        CommuteError: fewer than two domains, weights for other domains, an ``adam`` metric, a bad interval.
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
        base_dir: Path | None = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        names = list(domains)
        if len(names) < 2:
            raise CommuteError(f"watch needs at least two domains, got {names}")
        if every is not None and every < 1:
            raise CommuteError(f"the watch interval must be a positive number of steps, got {every}")
        if not (0.0 < cost < 1.0):
            raise CommuteError(f"the watch cost target must be in (0, 1), got {cost:g}", hint="e.g. 0.01")
        self.opts = options or AnalyzeOptions(ckpt_dir=Path(out))
        self.opts = AnalyzeOptions(**{**asdict(self.opts), "seq_len": seq_len})
        self.opts.validate()
        if self.opts.metric != "euclid":
            raise CommuteError(
                "watch measures with --metric euclid only",
                hint="analyze saved checkpoints with --metric adam (their optimizer state holds the moments)",
            )
        self.schedule = weights if isinstance(weights, Schedule) else Schedule.constant(dict(weights), names)
        self.schedule = Schedule.from_entries(self.schedule.entries, names)
        self.names = names
        self.sources = {n: str(domains[n]) for n in names}
        self.tokenizer_path = (
            str(tokenizer)
            if isinstance(tokenizer, str | Path)
            else getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        )
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str | Path) else tokenizer
        self.seq_len = int(seq_len)
        self.targets = parse_targets(self.opts.targets, names)
        self.root = Path(out)
        self.base_dir = base_dir
        self.every = every
        self.cost = cost
        self.interval_reason = "given" if every is not None else f"cost target {cost:.2%} of training time"
        self._note = note
        self.max_steps: int | None = None
        self.start = 0
        self.ctx = distributed.DistContext()
        self.device = torch.device("cpu")
        self.tables = RowTables()
        self.per_step: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.step_seconds: float | None = None
        self.measured_at: int | None = None
        """The step of the last measurement that ran (None before the first; a skip at lr 0 is none)."""
        self._ready = False
        self._pending: list[
            tuple[int, float, Any, dict[str, Any]]
        ] = []  # measured before the interval was known

    # ------------------------------------------------------------------------------------------ set-up

    def note(self, text: str) -> None:
        if not self.ctx.is_main:
            return
        if self._note is not None:
            self._note(text)
        else:
            print(text, file=sys.stderr)

    def begin(self, max_steps: int, start: int = 0, model: torch.nn.Module | None = None) -> None:
        """Before training: the run's last step, the first step of this session (a resumed run measures
        from there on and keeps the rows before it), the process group when one is initialized."""
        self.max_steps = int(max_steps)
        self.start = int(start)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
            self.ctx = distributed.DistContext(rank=rank, world=world, owns_group=False)
        if model is not None:
            self.device = next(model.parameters()).device
        K, T = len(self.names), len(self.targets)
        self.plan = criterion.choose_plan(K, T) if self.opts.plan == "auto" else self.opts.plan
        if self.every is not None:
            self.note(f"commute watch: measuring every {self.every} steps (given) into {self.root}/")

    def _prepare(self) -> None:
        """The fixed per-domain samples (drawn once by rank 0 and sent to the others), the run's identity
        and folder, and the rows an earlier session of the same run left there."""
        inputs = Inputs(
            refs=[], names=self.names, sources=self.sources, base_dir=self.base_dir, tokenizer=self.tokenizer,
            tokenizer_path=self.tokenizer_path, seq_len=self.seq_len, schedule=self.schedule,
            targets=self.targets, manifest=None,
        )  # fmt: skip
        ctx = self.ctx
        prepared = ctx.broadcast(ctx.agree(lambda: prepare_samples(inputs, self.opts), main_only=True))
        assert prepared is not None
        parts, self.sample_digest, self.provenance = prepared
        self.samples_per_domain = int(sum(p.shape[0] for blk in parts[0] for p in blk))
        self.parts = [[[ctx.shard(p) for p in blk] for blk in dom] for dom in parts]
        self.identity = {
            "options": {
                "ckpt_dir": str(self.opts.ckpt_dir),
                "metric": self.opts.metric,
                **{k: getattr(self.opts, k) for k in store.QUESTION_OPTIONS},
            },
            "ckpt_dir_resolved": str(Path(self.opts.ckpt_dir).resolve()),
            "domains": dict(self.sources),
            "text_fields": {},
            "schedule": json.loads(self.schedule.to_json()),
            "targets": [{"name": t.name, "kind": t.kind} for t in self.targets],
            "selected_steps": "watch",  # the measured steps grow with the run: not part of its identity
        }
        self.run_id = store.run_identity(self.identity)
        chosen = ctx.agree(lambda: self._folder(), main_only=True)
        self.out = Path(ctx.broadcast(str(chosen if chosen is not None else self.root)))
        self._ready = True

    def _folder(self) -> Path:
        out, note = store.choose_folder(self.root, self.run_id, self.opts.name, self.identity)
        store.check_writable(out)
        if note:
            self.note(note)
        previous = store.read_run_json(out)
        if previous is not None and previous.get("run_id") == self.run_id and self.start > 0:
            self.tables = RowTables.read(out)  # a resumed run: keep the steps before this session
            self.tables.drop_from(self.start)
            self.per_step = [c for c in previous.get("checkpoints", []) if int(c.get("step", 0)) < self.start]
        return out

    # ------------------------------------------------------------------------------------------ interval

    def due(self, step: int) -> bool:
        """Whether ``step`` is a measurement step (False while the interval is not known yet)."""
        return self.every is not None and step % self.every == 0

    def choose_interval(self, measure_s: float, step_s: float) -> int:
        """Set ``every`` from the cost target (:func:`interval_for_cost`; rank 0's times on every rank), say
        so, and write the measurements taken before it was known. Returns the interval."""
        every = self.ctx.broadcast(interval_for_cost(measure_s, step_s, self.cost))
        self.every, self.step_seconds = int(every), float(step_s)
        self.note(
            f"commute watch: one measurement takes {measure_s:.2f} s = {measure_s / step_s:.1f} "
            f"training steps of {step_s * 1e3:.1f} ms; measuring every {every} steps "
            f"(<= {self.cost:.1%} of training time) "
            f"into {self.root}/"
        )
        pending, self._pending = self._pending, []
        for step, lr, stats, info in pending:
            self._record(step, lr, stats, info)
        return self.every

    # ------------------------------------------------------------------------------------------ measure

    def measure(self, model: torch.nn.Module, step: int, lr: float) -> dict[str, float]:
        """Measure ``model`` at ``step`` with learning rate ``lr`` (the rate of the update that follows
        ``step``); returns the ``commute/...`` scalars (empty when ``lr`` is 0: no update follows, nothing
        to predict, as analyze skips such checkpoints). Writes the folder on rank 0.

        Scalars: ``commute/<target>/<i>-<j>/el`` (the predicted ``EL^{ij}``, nats), ``.../el_se``,
        ``.../t`` (its t-score), ``commute/loss/<domain>`` (nats) and ``commute/weight/<domain>``.
        """
        if not self._ready:
            self._prepare()
        if not (lr > 0.0 and math.isfinite(lr)):
            self.skipped.append({"name": f"checkpoint-{step}", "step": step, "reason": f"lr = {lr:g}"})
            return {}
        t0 = time.perf_counter()
        self.measured_at = step
        wbar = self._wbar(step)
        coefs = np.stack([t.coefs_at(wbar) for t in self.targets]) if self.plan == "target" else None
        with live.borrowed(model) as m:
            stats, offload = estimate_model(
                m, self.opts, parts=self.parts, plan=self.plan, coefs=coefs, D=None, ctx=self.ctx
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        info = {"offload": offload, "seconds": time.perf_counter() - t0}
        if not np.all(np.isfinite(stats.losses)):
            raise CommuteError(
                f"non-finite loss at step {step} (nan or inf): training has diverged",
                hint="lower the learning rate; the rows so far are in " + str(self.out),
            )
        if self.every is None:  # the interval (hence the horizon) is not known yet: rows follow later
            self._pending.append((step, lr, stats, info))
            return {}
        return self._record(step, lr, stats, info)

    def _wbar(self, step: int) -> np.ndarray:
        w = self.schedule.weights_at(step)
        return np.array([w[n] for n in self.names], dtype=np.float64)

    def weights_scalars(self, step: int) -> dict[str, float]:
        """``commute/weight/<domain>`` at ``step`` (the domain weights contract of the trainer's logs)."""
        return {f"commute/weight/{n}": float(w) for n, w in zip(self.names, self._wbar(step), strict=True)}

    def _record(self, step: int, lr: float, stats: Any, info: dict[str, Any]) -> dict[str, float]:
        assert self.every is not None and self.max_steps is not None
        # the planned measurements, and the one after this step even past the run's end: a run shorter than
        # one interval still gets half the interval as its horizon
        plan = planned_steps(self.every, max(self.max_steps, step), 0)
        steps = sorted({*plan, step, step - step % self.every + self.every})
        horizon, reason = choose_horizon(steps, steps.index(step), self.opts.horizon)
        wbar = self._wbar(step)
        rows = self.tables.add(
            stats, self.opts, step=step, names=self.names, wbar=wbar, targets=self.targets, lr=lr,
            horizon=horizon, horizon_reason=reason,
        )  # fmt: skip
        name = f"checkpoint-{step}"
        cache = self._save_stats(name, step, stats, info)
        self.per_step.append(
            {"name": name, "step": step, "lr": lr, "lr_source": {"source": "live optimizer", "value": lr},
             "horizon": horizon, "horizon_reason": reason, "cache": cache, "cached": False, "live": True,
             **info}
        )  # fmt: skip
        self.ctx.agree(self._write, main_only=True)
        scalars = self.weights_scalars(step)
        for r in rows:
            key = f"commute/{r['target']}/{r['domain_i']}-{r['domain_j']}"
            scalars.update({f"{key}/el": float(r["el_ij"]), f"{key}/el_se": float(r["el_se"])})
            scalars[f"{key}/t"] = float(r["t"])
        for r in self.tables.losses[-len(self.names) :]:
            scalars[f"commute/loss/{r['domain']}"] = float(r["loss"])
        scalars["commute/seconds"] = float(info["seconds"])
        return scalars

    def _save_stats(self, name: str, step: int, stats: Any, info: dict[str, Any]) -> str:
        """The statistics in the content-addressed cache (``out/cache``; ``recommend`` reads the per-block
        values from there), keyed by the run, the step, the sample and the options that set them."""
        key = store.content_key(
            [store.CACHE_FORMAT, "live", self.run_id, step, self.sample_digest, self.opts.blocks,
             self.opts.hvp, self.plan, self.opts.batch_size, hvp_micro_batch(self.opts), self.device.type,
             self.ctx.world]
        )  # fmt: skip
        file = store.stats_file(self.root / "cache", name, key)
        meta = {"checkpoint": f"live step {step}", "info": json.dumps(info)}
        self.ctx.agree(lambda: store.save_stats(file, stats, meta), main_only=True)
        return file.name

    def run_record(self) -> dict[str, Any]:
        """``run.json`` of the watched run: analyze's fields, ``command: watch`` and the interval."""
        K, T = len(self.names), len(self.targets)
        return {
            "format": store.ANALYSIS_FORMAT,
            "command": "watch",
            "run_id": self.run_id,
            **self.identity,
            "commute_version": __version__,
            "argv": sys.argv,
            "options": {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.opts).items()},
                **self.identity["options"],
            },
            "versions": versions(),
            "data_split": "given",
            "data_sha256": {n: self.provenance[n]["text_sha256"] for n in self.names},
            "data": self.provenance,
            "tokenizer": self.tokenizer_path,
            "seq_len": self.seq_len,
            "plan": self.plan,
            "estimator": "cross",
            "hvps_per_block": criterion.plan_hvp_count(K, T)[self.plan],
            "samples_per_domain": self.samples_per_domain,
            "sample_digest": self.sample_digest,
            "device": str(self.device),
            "world_size": self.ctx.world,
            "hvp_batch_size": hvp_micro_batch(self.opts),
            "checkpoints": self.per_step,
            "last_step": self.max_steps,
            "skipped_checkpoints": self.skipped,
            "watch": {
                "every": self.every,
                "interval": self.interval_reason,
                "cost_target": self.cost,
                "step_seconds": self.step_seconds,
            },
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "regime": {
                "max_ratio": REGIME_MAX_RATIO,
                "max_progress_fraction": REGIME_MAX_PROGRESS,
                "judged_on": "interval",
            },
            "min_effect": self.opts.min_effect,
            "optimizer": None,
            "size_note": None,
        }

    def _write(self) -> None:
        frames = self.tables.frames(self.run_id, self.opts.decompose is not None)
        write_folder(self.out, *frames, self.run_record())

    @property
    def folder(self) -> Path:
        """Where the rows are (``out``, or ``out/run-<id>/`` when ``out`` held another run)."""
        return self.out if self._ready else self.root
