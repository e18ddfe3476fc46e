"""``commute train``: a small causal LM trained on a weighted mixture of domains.

It exists to make real checkpoint series for the analyzer (``sample_checkpoints/``) and the starting points
of ``commute validate``. The step itself is ``engine.training`` (read it top to bottom); the files of the
run folder are ``io.runfiles``; the configuration, the starting model and optimizer, the manifest and the
resume command are ``commands.train_setup``; this module wires them together:

- inputs: ``io.run_inputs.resolve_run_inputs`` (flags, then ``--init``'s checkpoint, then ``--manifest``);
- the model: ``DEFAULT_MODEL`` or a config JSON (new), or ``--init`` a checkpoint, loaded through the one
  checkpoint loader (``io.checkpoints.load_model``: pickle and weight preflight always run), continuing its
  optimizer state, step, stream positions and RNG;
- saves: ``checkpoint-N/`` every ``save_every`` steps and at the end (each appears complete or not at all),
  the manifest ``commute.json`` last. While training, ``.commute-incomplete`` marks the folder, so an
  interrupted run is never taken for a complete one (``analyze`` and ``validate`` refuse it with the
  command that resumes it).

Decisions:

- Dropout is 0 in the default model, so training is a deterministic function of the seed and a saved
  checkpoint analyzes deterministically (docs/MATH.md "Attention and precision").
- ``learning_rate`` in ``log_history`` at step ``s`` is the rate of the *next* update (as the Trainer logs
  it after its scheduler step): the rate in force at checkpoint ``s``.
- ``steps`` is the final global step (like the Trainer's ``max_steps``): continuing from ``checkpoint-500``
  with ``steps=1000`` trains 500 more steps; a cosine schedule spans 0..1000 in both runs.
- Exact counts per batch, not sampling: the realized weights are ``n_i / B``. When ``B * w`` is not whole
  (0.8/0.2 with B = 16 gives 13/3) the run says so once.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from commute_cli.commands.options import AnalyzeOptions
from commute_cli.commands.train_setup import (
    TrainConfig,
    clashing_checkpoints,
    inherit_training,
    model_and_optimizer,
    resume_command,
    run_manifest,
    validate_config,
)
from commute_cli.commands.watch import Watcher
from commute_cli.core.mixing import batch_counts, uneven_split
from commute_cli.core.schedule import Schedule
from commute_cli.engine import training
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints, discovery, run_inputs, runfiles
from commute_cli.render.progress import StepProgress


def train(config: TrainConfig) -> Path:
    """Train, saving ``checkpoint-N/`` every ``save_every`` steps and at the end; write the manifest last.

    Returns the output folder. On KeyboardInterrupt the checkpoints saved so far stay (complete), the
    folder stays marked incomplete, and the interrupt propagates (the CLI says how to resume).
    """
    validate_config(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = training.resolve_device(config.device)
    out = Path(config.out_dir)
    init = Path(config.init).expanduser() if config.init else None
    if init is not None and not init.exists():
        raise CommuteError(f"--init {init} does not exist", "give a config JSON or a checkpoint folder")
    init_dir = init if init is not None and init.is_dir() else None
    if init_dir is not None:  # the one loader's checks (pickles, truncation) before anything is read
        if not checkpoints.is_checkpoint_dir(init_dir):
            raise CommuteError(f"--init {init_dir} is not a model folder", "it needs config.json and weights")
        checkpoints.validate_weights(init_dir)
    inputs = run_inputs.resolve_run_inputs(
        init_dir,
        domains=config.domains,
        eval_domains=config.eval_domains,
        manifest=config.manifest,
        tokenizer=config.tokenizer,
        weights=config.weights,
        schedule=Path(config.schedule) if isinstance(config.schedule, str) else config.schedule,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        seed=config.seed,
        note=None if config.quiet else (lambda t: print(t, file=sys.stderr)),
        schedule_use="this run trains on the schedule given",
    )
    if not inputs.domains:
        raise CommuteError("no training domains", "pass --domains name=source ... (or --manifest)")
    config = inherit_training(config, inputs.manifest)
    validate_config(config)
    if inputs.tokenizer_path is None:
        raise CommuteError("no tokenizer given", "pass --tokenizer FOLDER, or --init a checkpoint with one")
    names = inputs.names
    schedule = inputs.schedule or Schedule.constant({n: 1.0 / len(names) for n in names}, names)
    seq_len = int(inputs.seq_len or run_inputs.DEFAULT_SEQ_LEN)
    batch_size = int(inputs.batch_size or run_inputs.DEFAULT_BATCH_SIZE)
    tokenizer = inputs.load_tokenizer()
    tok_src = inputs.tokenizer_path
    resumed = runfiles.read_training_state(init_dir) if init_dir is not None else None
    start_step = resumed.step if resumed else 0
    if start_step >= config.steps:
        raise CommuteError(
            f"the checkpoint is at step {start_step}, not before --steps {config.steps}",
            "--steps is the final global step: give a larger one",
        )
    clash = clashing_checkpoints(out, init_dir, start_step, config.overwrite)

    # Data: fixed-length blocks per domain; streams positioned where the checkpoint left them.
    train_blocks = run_inputs.load_blocks(
        inputs.domains, tokenizer, seq_len, inputs.base_dir or config.base_dir
    )
    eval_blocks = run_inputs.load_blocks(
        inputs.eval_domains, tokenizer, seq_len, inputs.base_dir or config.base_dir
    )
    eval_blocks = {n: _at_most(b, config.eval_blocks, config.seed) for n, b in eval_blocks.items()}
    positions = resumed.positions if resumed else {}
    streams = [training.DomainStream(n, train_blocks[n], config.seed, positions.get(n, 0)) for n in names]
    model, optimizer = model_and_optimizer(config, tokenizer, seq_len, init, init_dir, resumed, device)
    if resumed and resumed.rng is not None:
        runfiles.set_rng_state(resumed.rng)
    else:
        random.seed(config.seed)
        torch.manual_seed(config.seed)

    for old in clash:  # everything could be loaded: now replace the other run's checkpoints
        shutil.rmtree(old)
    (out / runfiles.MANIFEST_NAME).unlink(missing_ok=True)  # written again, last
    runfiles.mark_incomplete(out, resume_command(config, None))
    # The tokenizer travels with the run: out/tokenizer unless it already lives inside out.
    try:
        tok_rel = tok_src.resolve().relative_to(out.resolve()).as_posix()
        tok_dir = tok_src
    except ValueError:
        tok_dir, tok_rel = out / "tokenizer", "tokenizer"
        runfiles.copy_tokenizer_files(tok_src, tok_dir)

    log = _Logger(config, names, start_step)
    uneven = uneven_split(schedule, batch_size)
    if uneven is not None:
        s, w = uneven
        counts = batch_counts([w[n] for n in names], batch_size)
        log.note(
            f"note: batch size {batch_size} cannot split weights {w} exactly at step {s}; "
            f"each batch takes {dict(zip(names, counts, strict=True))} rows"
        )
    if resumed and resumed.seed is not None and resumed.seed != config.seed:
        log.note(f"note: the checkpoint was trained with seed {resumed.seed}; this run uses {config.seed}")
    history = list(resumed.log_history) if resumed else []
    total_blocks = sum(len(s) for s in streams)

    def epoch() -> float:
        return round(sum(s.position for s in streams) / total_blocks, 4)

    if start_step == 0 and eval_blocks:
        history.append({"step": 0, "epoch": 0.0, **_eval_entry(training.evaluate(model, eval_blocks))})
    watcher = _watcher(config, inputs, tokenizer, schedule, seq_len, out, start_step, model, log)
    acc = training.LossLog(names)

    def lr_fn(s: int) -> float:
        return training.lr_at(s, config.lr, config.lr_schedule, config.steps, config.warmup)

    def watch(step: int) -> None:  # before the step's log entry and save: the checkpoint's log has it
        if watcher is not None and watcher.due(step):
            scalars = watcher.measure(model, step, lr_fn(step))
            if scalars:
                history.append({"step": step, "epoch": epoch(), **scalars})

    watch(start_step)

    def on_step(r: training.StepResult) -> None:
        acc.add(r)
        log.step(r)
        watch(r.step)
        saving = r.step % config.save_every == 0 or r.step == config.steps
        if r.step % config.logging_steps == 0 or saving:  # every checkpoint has its rate in the log
            history.append({"step": r.step, "epoch": epoch(), "learning_rate": lr_fn(r.step), **acc.flush()})
        if saving:
            if eval_blocks:
                losses = training.evaluate(model, eval_blocks)
                history.append({"step": r.step, "epoch": epoch(), **_eval_entry(losses)})
                log.eval(r.step, losses)
            trainer_state = runfiles.trainer_state_json(
                epoch=epoch(),
                global_step=r.step,
                max_steps=config.steps,
                logging_steps=config.logging_steps,
                eval_steps=config.save_every,
                save_steps=config.save_every,
                train_batch_size=batch_size,
                num_train_epochs=math.ceil(epoch()) or 1,
                num_input_tokens_seen=r.step * batch_size * seq_len,
                log_history=list(history),
            )
            commute_state = {
                "global_step": r.step,
                "seed": config.seed,
                "positions": {s.name: s.position for s in streams},
                "blocks": {s.name: len(s) for s in streams},
                "schedule": schedule.to_records(),
                "batch_size": batch_size,
                "seq_len": seq_len,
            }
            runfiles.save_checkpoint(out, r.step, model, optimizer, tok_dir, trainer_state, commute_state)
            log.saved = r.step
            runfiles.mark_incomplete(out, resume_command(config, out / f"checkpoint-{r.step}"))

    try:
        with log:
            training.train_branch(
                model,
                optimizer,
                streams,
                schedule,
                start_step,
                config.steps - start_step,
                batch_size=batch_size,
                lr_fn=lr_fn,
                max_grad_norm=config.max_grad_norm,
                on_step=on_step,
            )
    except KeyboardInterrupt:
        # an interrupt between a save and the lines after it: the checkpoint on disk is complete (saves are
        # atomic), so it counts, and the marker names it
        steps = [discovery.name_step(p.name) for p in out.glob("checkpoint-*") if p.is_dir()]
        on_disk = [s for s in steps if s is not None and s > start_step]
        if on_disk and max(on_disk) > (log.saved or -1):
            log.saved = max(on_disk)
        if log.saved is not None:
            runfiles.mark_incomplete(out, resume_command(config, out / f"checkpoint-{log.saved}"))
        if log.saved is None:
            kept = f"nothing was saved in {out}; run the same command again to start over"
        else:
            kept = f"checkpoints up to checkpoint-{log.saved} are kept in {out}; resume with: "
            kept += resume_command(config, out / f"checkpoint-{log.saved}")
        raise KeyboardInterrupt(f"interrupted: training stopped; {kept}") from None
    runfiles.write_json(
        out / runfiles.MANIFEST_NAME, run_manifest(config, inputs, schedule, tok_rel, seq_len, batch_size)
    )
    runfiles.mark_complete(out)
    return out


def _watcher(
    config: TrainConfig,
    inputs: run_inputs.RunInputs,
    tokenizer: object,
    schedule: Schedule,
    seq_len: int,
    out: Path,
    start_step: int,
    model: torch.nn.Module,
    log: _Logger,
) -> Watcher | None:
    """``--watch N``: the criterion every N steps on the held-out domains (the training domains when there
    are none), with analyze's default options, into ``out/watch/`` (checkpoint folder: ``out``)."""
    if config.watch is None:
        return None
    sources = inputs.eval_domains or inputs.domains
    options = AnalyzeOptions(ckpt_dir=out, seed=config.seed, device=config.device)
    watcher = Watcher(
        sources, tokenizer, schedule, seq_len=seq_len, out=out / "watch", every=config.watch, options=options,
        base_dir=inputs.base_dir or config.base_dir, note=log.note,
    )  # fmt: skip
    watcher.begin(config.steps, start=start_step, model=model)
    return watcher


def _at_most(blocks: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    from commute_cli.io.sampling import sample_blocks

    return blocks if blocks.shape[0] <= n else sample_blocks(blocks, n, seed)


def _eval_entry(losses: Mapping[str, float]) -> dict[str, float]:
    return {f"eval_{n}_loss": round(v, 6) for n, v in losses.items()}


class _Logger:
    """The training bar (``render.progress.StepProgress``: steps, running loss per domain, elapsed, ETA; only
    on a terminal) plus one line per evaluation."""

    def __init__(self, config: TrainConfig, names: Sequence[str], start_step: int) -> None:
        self.quiet = config.quiet
        show = config.progress if config.progress is not None else True  # bars, or lines when piped
        self.names = list(names)
        self.start = start_step
        self.saved: int | None = None
        self.total = config.steps
        self.ema: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.bar = StepProgress("train", bool(show) and not config.quiet, fields=("losses",), transient=False)

    def __enter__(self) -> _Logger:
        self.bar.__enter__()
        self.bar.start(self.total, completed=self.start)
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.bar.print(text)

    def step(self, r: training.StepResult) -> None:
        for name, value in r.domain_loss.items():
            self.ema[name] = value if name not in self.ema else 0.9 * self.ema[name] + 0.1 * value
        losses = "  ".join(f"{n} {self.ema[n]:.3f}" for n in self.names if n in self.ema)
        self.bar.update(r.step, losses=f"loss {losses}")

    def eval(self, step: int, losses: Mapping[str, float]) -> None:
        text = "  ".join(f"{n} {v:.4f}" for n, v in losses.items())
        line = f"step {step}/{self.total}: validation loss {text}  ({time.monotonic() - self.t0:.0f} s)"
        if not self.quiet:
            self.bar.print(line)
