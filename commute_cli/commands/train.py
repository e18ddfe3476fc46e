"""A small mixture trainer: a causal LM trained on a weighted mixture of domains (``commute train``).

It exists to make real checkpoint series for the analyzer (``sample_checkpoints/``) and to run the paper's
intervention experiment (``commute validate``: branches from one checkpoint with different schedules on the
same data). It is written to be read top to bottom, nanoGPT style.

What a training step does:

1. The schedule gives the domain weights ``w`` at this step; ``batch_counts(w, B)`` turns them into exact
   per-domain row counts (largest-remainder rounding of ``B * w``, ties to the earlier domain).
2. Each domain's rows come from its own ``DomainStream``: the domain's fixed-length blocks visited in a
   seeded random order, a new permutation each epoch. A stream's state is one integer (how many blocks it
   has handed out), so a checkpoint records it exactly, and two branches started from the same checkpoint
   with the same seed read the same blocks of every domain, whatever their weights.
3. One forward pass over the concatenated rows; the loss is the mean over rows of the per-row mean token
   cross-entropy, i.e. ``sum_i (n_i / B) L_i``, the mixture loss with the realized weights ``n_i / B``.
4. AdamW (the Hugging Face Trainer's two parameter groups, decay and no-decay) or SGD, at the learning rate
   ``lr_at(step)`` of a constant or cosine schedule with optional linear warmup.

Decisions:

- Dropout is 0 in the default model, so that training is a deterministic function of the seed and a saved
  checkpoint analyzes deterministically (MATH.md "Attention and precision").
- Checkpoints use the Hugging Face Trainer layout, so the analyzer reads ours and the Trainer's the same way:
  ``checkpoint-N/`` with ``config.json``, ``model.safetensors``, tokenizer files, ``trainer_state.json``
  (``global_step``; ``log_history`` with ``learning_rate``, ``loss`` and ``loss_<domain>`` every
  ``logging_steps``, ``eval_<domain>_loss`` at every save), ``optimizer.pt`` (``torch.save`` of the
  optimizer's ``state_dict``; the param groups also carry ``param_names``) and ``rng_state.pth``, all
  loadable with ``torch.load(weights_only=True)``. No ``training_args.bin`` (an arbitrary pickle).
  What the Trainer has no place for (the stream positions, the schedule) is in ``commute_state.json``.
- ``learning_rate`` in ``log_history`` at step ``s`` is the rate of the *next* update (from ``s`` to
  ``s + 1``), as in the Trainer, which logs after its scheduler step: the rate in force at checkpoint ``s``.
- ``steps`` is the final global step (like the Trainer's ``max_steps``): continuing from ``checkpoint-500``
  with ``steps=1000`` trains 500 more steps, and the cosine schedule spans 0..1000 in both runs.
- Exact counts per batch, not sampling: the realized weights are ``n_i / B``. When ``B * w`` is not whole
  (0.8/0.2 with B = 16 gives 13/3) the run says so once; pick B so that it is (B = 10 or 20 for 0.8/0.2).
- Manifest paths must stay inside the run folder (docs/CONVENTIONS.md). Data given from outside it is
  recorded under ``external_sources`` for information only; put the data inside the folder (as
  ``sample_checkpoints/`` does) to make ``commute analyze RUN`` work without flags.
- Branches (``commute validate``): ``load_training_state(checkpoint)`` gives a ``TrainingState``;
  ``fork()`` copies it, ``run(schedule, n, lr_fn)`` trains one branch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from commute_cli import __version__
from commute_cli.core.schedule import Schedule
from commute_cli.errors import CommuteError
from commute_cli.io import atomic

MANIFEST_NAME = "commute.json"
MANIFEST_FORMAT = "commute-manifest/1"
STATE_NAME = "commute_state.json"
STATE_FORMAT = "commute-train-state/1"

DEFAULT_MODEL: dict[str, Any] = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
"""The default model, a tiny GPT-2; ``n_positions`` (= seq_len) and ``vocab_size`` (= tokenizer) are added."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
"""The files copied when a tokenizer travels with a checkpoint (never model weights)."""

_DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "attention_dropout", "dropout")


@dataclass
class TrainConfig:
    """Everything ``train`` needs; the CLI builds one from its flags.

    ``domains`` and ``eval_domains`` map names to sources (paths relative to ``base_dir`` or the working
    directory, or hub names; see ``commute_cli.io.data.load_texts``). Without ``schedule`` or ``weights``
    the weights are uniform.
    ``init`` is a model config JSON, a model folder, or a checkpoint to continue (weights, optimizer state,
    step and stream positions).
    """

    out_dir: Path
    domains: dict[str, str]
    tokenizer: str | None = None
    eval_domains: dict[str, str] | None = None
    schedule: Schedule | str | Path | None = None
    """A ``Schedule``, or a schedule file (JSON/CSV); exclusive with ``weights``."""
    weights: Sequence[str] | str | Mapping[str, float] | None = None
    """Constant weights: ``{"en": 0.8, "ru": 0.2}`` or ``"en=0.8 ru=0.2"`` (``schedule.parse_weights``)."""
    manifest: Path | None = None
    """A ``commute.json`` (or its folder) whose domains, eval domains and tokenizer fill in missing ones."""
    steps: int = 1000
    save_every: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    lr_schedule: str = "constant"
    warmup: int = 0
    max_grad_norm: float | None = None
    init: str | None = None
    seed: int = 0
    threads: int | None = None
    logging_steps: int = 10
    eval_blocks: int = 256
    base_dir: Path | None = None
    overwrite: bool = False
    quiet: bool = False
    progress: bool | None = None
    """Show a progress bar: None = only when stderr is a terminal (and not ``quiet``)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- batches


def batch_counts(weights: Sequence[float], batch_size: int) -> list[int]:
    """Rows per domain in a batch of ``batch_size``: largest-remainder rounding of ``batch_size * w``.

    The counts sum to ``batch_size`` exactly; each is ``floor(B w_i)`` or one more; the rows left over go to
    the largest fractional parts, ties to the earlier domain. ``B w_i`` is rounded to 9 decimals first, so
    that 0.7 * 10 = 7.000000000000001 counts as 7. Deterministic: the same weights give the same counts.
    """
    if batch_size < 1:
        raise CommuteError(f"batch size must be positive, got {batch_size}")
    scaled = [round(batch_size * float(w), 9) for w in weights]
    counts = [math.floor(x) for x in scaled]
    left = batch_size - sum(counts)
    order = sorted(range(len(scaled)), key=lambda i: (-(scaled[i] - counts[i]), i))
    for i in order[: max(left, 0)]:
        counts[i] += 1
    return counts


def stream_seed(seed: int, domain: str, epoch: int) -> int:
    """The seed of a domain's permutation in one epoch: a hash, so streams of different domains and epochs
    are independent and do not depend on the order or number of domains."""
    digest = hashlib.sha256(f"commute-stream/{seed}/{domain}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


class DomainStream:
    """The blocks of one domain, handed out without replacement in a fresh seeded permutation each epoch.

    The whole state is ``position`` (blocks handed out so far): block ``k`` of the stream is
    ``blocks[perm(k // N)[k % N]]`` with ``perm(e) = randperm(N, generator seeded by stream_seed(seed, name,
    e))``. Copies (``copy``) give independent streams that continue identically.
    """

    def __init__(self, name: str, blocks: torch.Tensor, seed: int, position: int = 0) -> None:
        if blocks.dim() != 2 or blocks.shape[0] < 1:
            raise CommuteError(f"domain {name!r} has no blocks of data")
        self.name = name
        self.blocks = blocks
        self.seed = int(seed)
        self.position = int(position)
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator(device="cpu").manual_seed(stream_seed(self.seed, self.name, epoch))
            self._perm = torch.randperm(len(self), generator=gen)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, n: int) -> torch.Tensor:
        """The block indices of the next ``n`` draws (advances the stream)."""
        out = []
        for _ in range(n):
            epoch, k = divmod(self.position, len(self))
            out.append(self._permutation(epoch)[k])
            self.position += 1
        return torch.stack(out) if out else torch.empty(0, dtype=torch.long)

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` blocks, ``[n, seq_len]``."""
        return self.blocks[self.indices(n)]

    @property
    def epoch(self) -> float:
        return self.position / len(self)

    def copy(self) -> DomainStream:
        return DomainStream(self.name, self.blocks, self.seed, self.position)


def compose_batch(
    streams: Sequence[DomainStream], weights: Sequence[float], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch by the weights: ``(input_ids [B, T], domain index of each row [B])``, domains in order."""
    counts = batch_counts(weights, batch_size)
    rows, owner = [], []
    for i, (stream, n) in enumerate(zip(streams, counts, strict=True)):
        if n:
            rows.append(stream.take(n))
            owner.append(torch.full((n,), i, dtype=torch.long))
    return torch.cat(rows), torch.cat(owner)


# ----------------------------------------------------------------------------------------------- model


def row_losses(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row, ``[B]`` (float32).

    The targets are the inputs shifted left, the last position ignored; computing the loss on the full
    logits tensor (not a ``[:, :-1]`` slice) saves a copy of the largest tensor of the step.
    """
    logits = model(input_ids=input_ids).logits.float()
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return loss.view(targets.shape).sum(dim=1) / (input_ids.shape[1] - 1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, blocks: Mapping[str, torch.Tensor], batch_size: int = 32
) -> dict[str, float]:
    """Mean token loss of each domain's blocks (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    out = {}
    for name, data in blocks.items():
        total = 0.0
        for start in range(0, int(data.shape[0]), batch_size):
            total += float(row_losses(model, data[start : start + batch_size]).double().sum())
        out[name] = total / int(data.shape[0])
    model.train(was_training)
    return out


def model_config(tokenizer: Any, seq_len: int, init_json: Path | None, overrides: Mapping[str, Any]) -> Any:
    """A model config: DEFAULT_MODEL, or a JSON file's fields, with vocabulary and context from the data."""
    from transformers import AutoConfig

    fields: dict[str, Any] = dict(DEFAULT_MODEL)
    if init_json is not None:
        try:
            given = json.loads(init_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise CommuteError(f"cannot read model config {init_json}: {err}", "give a JSON file") from err
        if not isinstance(given, dict):
            raise CommuteError(f"model config {init_json} is not a JSON object")
        fields = {"model_type": "gpt2", **{k: 0.0 for k in _DROPOUT_KEYS[:3]}, **given}
    fields.update(overrides)
    fields.setdefault("vocab_size", len(tokenizer))
    if fields["model_type"] == "gpt2":
        fields.setdefault("n_positions", seq_len)
    eos = tokenizer.eos_token_id
    if eos is not None:
        fields.setdefault("bos_token_id", eos)
        fields.setdefault("eos_token_id", eos)
    model_type = fields.pop("model_type")
    for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        fields.pop(key, None)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError) as err:
        raise CommuteError(f"bad model config: {err}", "check the config's fields") from err
    if config.vocab_size < len(tokenizer):
        raise CommuteError(
            f"the model's vocabulary ({config.vocab_size}) is smaller than the tokenizer's "
            f"({len(tokenizer)})",
            "drop vocab_size from the config, or use the matching tokenizer",
        )
    return config


def new_model(config: Any, seed: int) -> torch.nn.Module:
    """A freshly initialized causal LM (float32, eager attention), initialized from ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.float()


def load_model(folder: Path) -> torch.nn.Module:
    """A saved model (safetensors preferred; no remote code), float32, eager attention, train mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, attn_implementation="eager", dtype=torch.float32
        )
    except (OSError, ValueError) as err:
        raise CommuteError(f"cannot load a model from {folder}: {err}", "give a checkpoint folder") from err
    model.train()
    return model


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise CommuteError(f"tokenizer folder not found: {p}", "give a folder with tokenizer.json")
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as err:
        hint = "give a folder with tokenizer.json"
        raise CommuteError(f"cannot load a tokenizer from {p}: {err}", hint) from err


# ----------------------------------------------------------------------------------------------- optimizer


def build_optimizer(
    model: torch.nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
) -> torch.optim.Optimizer:
    """AdamW or SGD over two groups, decay then no-decay, each in ``named_parameters()`` order (the HF
    Trainer's layout). The groups carry ``param_names``, so ``optimizer.pt`` names its own positions."""
    from commute_cli.io.checkpoints import decay_parameter_names  # the Trainer's rule, shared with the reader

    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [(n, p) for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise CommuteError(f"unknown optimizer {name!r}", "use adamw or sgd")


def lr_at(step: int, base_lr: float, kind: str = "constant", total_steps: int = 1, warmup: int = 0) -> float:
    """Learning rate of the update from ``step`` to ``step + 1``.

    Linear warmup ``base_lr * (step + 1) / warmup`` for ``step < warmup``; then ``base_lr`` (constant) or
    ``base_lr * (1 + cos(pi * p)) / 2`` with ``p = (step - warmup) / (total_steps - warmup)`` (cosine, the
    curve of transformers' ``get_cosine_schedule_with_warmup``).
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "constant":
        return base_lr
    if kind == "cosine":
        p = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * p))
    raise CommuteError(f"unknown learning-rate schedule {kind!r}", "use constant or cosine")


# ----------------------------------------------------------------------------------------------- the loop


@dataclass
class StepResult:
    """What one update did: its step number after the update, learning rate, losses and gradient norm."""

    step: int
    lr: float
    loss: float
    domain_loss: dict[str, float]
    domain_rows: dict[str, int]
    grad_norm: float


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    streams: Sequence[DomainStream],
    weights: Sequence[float],
    batch_size: int,
    lr: float,
    max_grad_norm: float | None = None,
) -> tuple[float, dict[str, float], dict[str, int], float]:
    """One update on a batch composed by ``weights``; returns (loss, per-domain loss, rows, grad norm)."""
    input_ids, owner = compose_batch(streams, weights, batch_size)
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses = row_losses(model, input_ids)
    loss = losses.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    optimizer.step()
    detached = losses.detach()
    per_domain, rows = {}, {}
    for i, s in enumerate(streams):
        mask = owner == i
        rows[s.name] = int(mask.sum())
        if rows[s.name]:
            per_domain[s.name] = float(detached[mask].mean())
    return float(loss.detach()), per_domain, rows, float(norm)


def train_branch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    streams: Sequence[DomainStream],
    schedule: Schedule,
    start_step: int,
    n_steps: int,
    *,
    batch_size: int,
    lr_fn: Callable[[int], float],
    max_grad_norm: float | None = None,
    on_step: Callable[[StepResult], None] | None = None,
) -> list[StepResult]:
    """Run ``n_steps`` updates from global step ``start_step`` (the building block of ``train`` and of
    ``commute validate``): the weights come from ``schedule.weights_at(step)`` in the streams' order.

    Branches: copy the model (``copy.deepcopy``), the optimizer state (a new optimizer over the copy, then
    ``load_state_dict``) and the streams (``DomainStream.copy``), then call this with different schedules.
    """
    names = [s.name for s in streams]
    if sorted(names) != sorted(schedule.domains):
        raise CommuteError(
            f"the schedule's domains ({', '.join(schedule.domains)}) differ from the data's "
            f"({', '.join(names)})",
            "give weights for exactly the training domains",
        )
    model.train()
    results = []
    for step in range(start_step, start_step + n_steps):
        w = schedule.weights_at(step)
        lr = lr_fn(step)
        loss, per_domain, rows, norm = train_step(
            model, optimizer, streams, [w[n] for n in names], batch_size, lr, max_grad_norm
        )
        result = StepResult(step + 1, lr, loss, per_domain, rows, norm)
        results.append(result)
        if on_step is not None:
            on_step(result)
    return results


# ----------------------------------------------------------------------------------------------- files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file in the same folder + os.replace), with the usual file permissions."""
    atomic.write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)),
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    import numpy as np

    if "python" in state:
        random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_model_quietly(model: torch.nn.Module, folder: Path) -> None:
    """``save_pretrained`` (safetensors) without transformers' per-save progress bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(folder))
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def checkpoint_step(path: Path) -> int | None:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else None


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer_dir: Path,
    trainer_state: dict[str, Any],
    commute_state: dict[str, Any],
) -> Path:
    """Write ``out_dir/checkpoint-<step>/`` completely under a temporary name, then rename it into place."""
    final = out_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=out_dir))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        _save_model_quietly(model, tmp)
        copy_tokenizer_files(tokenizer_dir, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng_state.pth")
        _write_json(tmp / "trainer_state.json", trainer_state)
        _write_json(tmp / STATE_NAME, commute_state)
        for file in tmp.iterdir():  # some writers create 0600 files; give them the usual permissions
            os.chmod(file, 0o666 & ~_umask())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@dataclass
class Resumed:
    """The training state read from a checkpoint folder."""

    step: int
    optimizer_state: dict[str, Any] | None
    positions: dict[str, int]
    log_history: list[dict[str, Any]]
    rng: dict[str, Any] | None
    seed: int | None = None


def read_training_state(folder: Path) -> Resumed:
    """Step, optimizer state, stream positions, log history and RNG state of a checkpoint (all optional
    except the step; a plain model folder gives step 0 and nothing else)."""
    step, history, positions = 0, [], {}
    ts = folder / "trainer_state.json"
    if ts.is_file():
        data = json.loads(ts.read_text(encoding="utf-8"))
        step = int(data.get("global_step", 0))
        history = list(data.get("log_history", []))
    elif checkpoint_step(folder) is not None:
        step = int(checkpoint_step(folder) or 0)
    cs = folder / STATE_NAME
    seed = None
    if cs.is_file():
        saved = json.loads(cs.read_text(encoding="utf-8"))
        positions = {str(k): int(v) for k, v in saved["positions"].items()}
        seed = saved.get("seed")
    opt_file, rng_file = folder / "optimizer.pt", folder / "rng_state.pth"
    opt = torch.load(opt_file, weights_only=True) if opt_file.is_file() else None
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    return Resumed(step, opt, positions, [e for e in history if int(e.get("step", 0)) <= step], rng, seed)


def _relative_source(source: str, out_dir: Path, base_dir: Path | None) -> str | None:
    """A source as the manifest writes it: relative to ``out_dir`` when it is a local path inside it, as
    given when it is not a local path (a hub name), None when it is a local path outside ``out_dir``."""
    p = Path(source).expanduser()
    if not p.is_absolute():
        p = (base_dir or Path.cwd()) / p
    if not p.exists():
        return source
    try:
        return p.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return None


def manifest_dict(config: TrainConfig, schedule: Schedule, tokenizer_rel: str) -> dict[str, Any]:
    """The ``commute.json`` content (docs/CONVENTIONS.md). Local data outside the output folder cannot be
    named there (manifest paths must stay inside it): such a domain map goes to ``external_sources``,
    for information only, and the analyzer then needs ``--domains``."""
    out = Path(config.out_dir)
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT}
    external: dict[str, dict[str, str]] = {}
    for key, mapping in (("domains", config.domains), ("eval_domains", config.eval_domains)):
        if not mapping:
            continue
        rel = {name: _relative_source(src, out, config.base_dir) for name, src in mapping.items()}
        if all(v is not None for v in rel.values()):
            manifest[key] = rel
        else:
            external[key] = {
                n: str(((config.base_dir or Path.cwd()) / s).resolve()) if rel[n] is None else s
                for n, s in mapping.items()
            }
    manifest["schedule"] = schedule.to_records()
    manifest["tokenizer"] = tokenizer_rel
    manifest["seq_len"] = config.seq_len
    if config.optimizer == "adamw":
        opt = {
            "name": "adamw",
            "lr": config.lr,
            "betas": list(config.betas),
            "eps": config.eps,
            "weight_decay": config.weight_decay,
        }
    else:
        opt = {"name": "sgd", "lr": config.lr, "momentum": config.momentum}
        opt["weight_decay"] = config.weight_decay
    manifest["optimizer"] = opt
    manifest["lr_schedule"] = config.lr_schedule
    manifest["warmup_steps"] = config.warmup
    manifest["max_steps"] = config.steps
    manifest["batch_size"] = config.batch_size
    manifest["seed"] = config.seed
    if external:
        manifest["external_sources"] = external
    manifest["created_by"] = f"commute {__version__} train"
    return manifest


# ----------------------------------------------------------------------------------------------- train


def _load_blocks(sources: Mapping[str, str], tokenizer: Any, seq_len: int, base_dir: Path | None) -> dict:
    from commute_cli.io.data import load_texts, pack_blocks

    return {
        name: pack_blocks(load_texts(src, domain=name, base_dir=base_dir), tokenizer, seq_len)
        for name, src in sources.items()
    }


def resolve_schedule(
    schedule: Schedule | str | Path | None,
    weights: Sequence[str] | str | Mapping[str, float] | None,
    domains: Sequence[str],
) -> Schedule:
    """The run's schedule from a ``Schedule``, a schedule file or constant weights (uniform when none),
    validated against the training domains."""
    from commute_cli.core.schedule import check_weights, load_schedule, parse_weights

    if schedule is not None and weights:
        raise CommuteError("both weights and a schedule given", "pass --weights or --schedule, not both")
    if isinstance(schedule, Schedule):
        if sorted(schedule.domains) != sorted(domains):
            raise CommuteError(
                f"the schedule names {', '.join(schedule.domains)} but the training domains are "
                f"{', '.join(domains)}",
                "give weights for exactly the training domains",
            )
        return Schedule.from_entries(schedule.entries, domains)
    if schedule is not None:
        return load_schedule(schedule, domains)
    if isinstance(weights, Mapping):
        return Schedule.constant(check_weights(weights, domains), domains)
    if weights:
        return Schedule.constant(parse_weights(weights, domains), domains)
    return Schedule.constant({n: 1.0 / len(domains) for n in domains}, domains)


def _with_manifest(config: TrainConfig) -> TrainConfig:
    """A copy of ``config`` with the domains, eval domains and tokenizer it lacks from ``config.manifest``."""
    if config.manifest is None:
        return config
    from commute_cli.io.checkpoints import read_manifest

    path = Path(config.manifest)
    manifest = read_manifest(path.parent if path.is_file() else path)
    if manifest is None:
        raise CommuteError(f"no commute.json at {path}", "give a manifest file or the folder that holds one")
    return dataclasses.replace(
        config,
        domains=config.domains or dict(manifest.domains),
        eval_domains=config.eval_domains or (dict(manifest.eval_domains) or None),
        tokenizer=config.tokenizer or (str(manifest.tokenizer) if manifest.tokenizer else None),
    )


def _validate_config(config: TrainConfig) -> None:
    checks = [
        (config.steps >= 1, f"--steps must be at least 1, got {config.steps}"),
        (config.save_every >= 1, f"--save-every must be at least 1, got {config.save_every}"),
        (config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}"),
        (config.seq_len >= 2, f"--seq-len must be at least 2, got {config.seq_len}"),
        (math.isfinite(config.lr) and config.lr > 0, f"--lr must be a positive number, got {config.lr}"),
        (config.warmup >= 0, f"--warmup must be non-negative, got {config.warmup}"),
        (config.logging_steps >= 1, f"logging_steps must be at least 1, got {config.logging_steps}"),
        (config.optimizer in ("adamw", "sgd"), f"unknown optimizer {config.optimizer!r} (adamw or sgd)"),
        (config.lr_schedule in ("constant", "cosine"), f"unknown --lr-schedule {config.lr_schedule!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise CommuteError(message)
    if config.threads is not None and config.threads < 1:
        raise CommuteError(f"--threads must be at least 1, got {config.threads}")


def _clashing_checkpoints(out: Path, init_dir: Path | None, start_step: int, overwrite: bool) -> list[Path]:
    """Refuse to mix runs: existing checkpoints must be the past of the run being continued. With
    ``overwrite``, return the ones to delete (deleted only once training starts)."""
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in out.iterdir() if p.is_dir() and checkpoint_step(p) is not None)
    continuing_here = init_dir is not None and init_dir.resolve().parent == out.resolve()
    clash = [p for p in existing if not continuing_here or (checkpoint_step(p) or 0) > start_step]
    if clash and not overwrite:
        raise CommuteError(
            f"{out} already holds checkpoints from another run ({', '.join(p.name for p in clash[:3])})",
            "choose an empty folder, continue from its last checkpoint with --init, or pass --overwrite",
        )
    return clash


def _model_and_optimizer(
    config: TrainConfig, tokenizer: Any, init: Path | None, init_dir: Path | None, resumed: Resumed | None
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A new model (default or config JSON) or a saved one, and its optimizer, with saved state if any."""
    if init_dir is not None:
        model = load_model(init_dir)
        if model.config.vocab_size < len(tokenizer):
            raise CommuteError(f"the model at {init_dir} has a smaller vocabulary than the tokenizer")
    else:
        model = new_model(model_config(tokenizer, config.seq_len, init, config.model_overrides), config.seed)
    model.train()
    optimizer = build_optimizer(
        model,
        config.optimizer,
        config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
    )
    if resumed and resumed.optimizer_state is not None:
        try:
            optimizer.load_state_dict(resumed.optimizer_state)
        except (ValueError, KeyError) as err:
            raise CommuteError(
                f"the optimizer state in {init_dir} does not fit a {config.optimizer} optimizer: {err}",
                "use the optimizer the checkpoint was trained with",
            ) from err
    return model, optimizer


def train(config: TrainConfig) -> Path:
    """Train, saving ``checkpoint-N/`` every ``save_every`` steps and at the end, and write the manifest.

    Returns the output folder. See the module docstring for what a step does and what is saved.
    """
    _validate_config(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    config = _with_manifest(config)
    if not config.domains:
        raise CommuteError("no training domains", "pass --domains name=source ... (or --manifest)")
    names = list(config.domains)
    schedule = resolve_schedule(config.schedule, config.weights, names)

    # Where the model (and maybe the whole training state) comes from.
    init = Path(config.init) if config.init else None
    init_dir = init if init is not None and init.is_dir() else None
    if init is not None and not init.exists():
        raise CommuteError(f"--init {init} does not exist", "give a config JSON or a checkpoint folder")
    tok_src = Path(config.tokenizer) if config.tokenizer else None
    if tok_src is None and init_dir is not None and (init_dir / "tokenizer.json").is_file():
        tok_src = init_dir
    if tok_src is None:
        raise CommuteError("no tokenizer given", "pass --tokenizer FOLDER, or --init a checkpoint with one")
    tokenizer = load_tokenizer(tok_src)
    resumed = read_training_state(init_dir) if init_dir is not None else None
    start_step = resumed.step if resumed else 0
    if start_step >= config.steps:
        raise CommuteError(
            f"the checkpoint is at step {start_step}, not before --steps {config.steps}",
            "--steps is the final global step: give a larger one",
        )
    clash = _clashing_checkpoints(out, init_dir, start_step, config.overwrite)

    # The tokenizer travels with the run: out/tokenizer unless it already lives inside out.
    try:
        tok_rel = tok_src.resolve().relative_to(out.resolve()).as_posix()
        tok_dir = tok_src
    except ValueError:
        tok_dir = out / "tokenizer"
        copy_tokenizer_files(tok_src, tok_dir)
        tok_rel = "tokenizer"

    # Data: fixed-length blocks per domain; streams positioned where the checkpoint left them.
    train_blocks = _load_blocks(config.domains, tokenizer, config.seq_len, config.base_dir)
    eval_blocks = _load_blocks(config.eval_domains or {}, tokenizer, config.seq_len, config.base_dir)
    eval_blocks = {
        n: b if b.shape[0] <= config.eval_blocks else _sample(b, config.eval_blocks, config.seed)
        for n, b in eval_blocks.items()
    }
    positions = resumed.positions if resumed else {}
    streams = [DomainStream(n, train_blocks[n], config.seed, positions.get(n, 0)) for n in names]

    model, optimizer = _model_and_optimizer(config, tokenizer, init, init_dir, resumed)
    if resumed and resumed.rng is not None:
        set_rng_state(resumed.rng)
    else:
        random.seed(config.seed)
        torch.manual_seed(config.seed)

    for old in clash:  # everything could be loaded: now replace the other run's checkpoints
        shutil.rmtree(old)
    manifest = manifest_dict(config, schedule, tok_rel)
    _write_json(out / MANIFEST_NAME, manifest)
    uneven = [
        (s, w)
        for s, w in schedule.entries
        if any(abs(config.batch_size * x - round(config.batch_size * x)) > 1e-9 for x in w.values())
    ]
    log = _Logger(config, names, start_step)
    if uneven:
        s, w = uneven[0]
        counts = batch_counts([w[n] for n in names], config.batch_size)
        log.note(
            f"note: batch size {config.batch_size} cannot split weights {w} exactly at step {s}; "
            f"each batch takes {dict(zip(names, counts, strict=True))} rows"
        )

    if resumed and resumed.seed is not None and resumed.seed != config.seed:
        log.note(f"note: the checkpoint was trained with seed {resumed.seed}; this run uses {config.seed}")
    history = list(resumed.log_history) if resumed else []
    total_blocks = sum(len(s) for s in streams)

    def epoch() -> float:
        return round(sum(s.position for s in streams) / total_blocks, 4)

    if start_step == 0 and eval_blocks:
        history.append({"step": 0, "epoch": 0.0, **_eval_entry(evaluate(model, eval_blocks))})
    acc = _Accumulator(names)
    lr_fn = lambda s: lr_at(s, config.lr, config.lr_schedule, config.steps, config.warmup)  # noqa: E731

    def on_step(r: StepResult) -> None:
        acc.add(r)
        log.step(r)
        if r.step % config.logging_steps == 0 or r.step == config.steps:
            history.append({"step": r.step, "epoch": epoch(), "learning_rate": lr_fn(r.step), **acc.flush()})
        if r.step % config.save_every == 0 or r.step == config.steps:
            if eval_blocks:
                losses = evaluate(model, eval_blocks)
                history.append({"step": r.step, "epoch": epoch(), **_eval_entry(losses)})
                log.eval(r.step, losses)
            trainer_state = _trainer_state(config, r.step, epoch(), history)
            commute_state = {
                "format": STATE_FORMAT,
                "global_step": r.step,
                "seed": config.seed,
                "positions": {s.name: s.position for s in streams},
                "blocks": {s.name: len(s) for s in streams},
                "schedule": schedule.to_records(),
                "batch_size": config.batch_size,
                "seq_len": config.seq_len,
            }
            save_checkpoint(out, r.step, model, optimizer, tok_dir, trainer_state, commute_state)

    with log:
        train_branch(
            model,
            optimizer,
            streams,
            schedule,
            start_step,
            config.steps - start_step,
            batch_size=config.batch_size,
            lr_fn=lr_fn,
            max_grad_norm=config.max_grad_norm,
            on_step=on_step,
        )
    _write_json(out / MANIFEST_NAME, manifest)
    return out


def _sample(blocks: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    from commute_cli.io.data import sample_blocks

    return sample_blocks(blocks, n, seed)


def _eval_entry(losses: Mapping[str, float]) -> dict[str, float]:
    return {f"eval_{n}_loss": round(v, 6) for n, v in losses.items()}


def _trainer_state(config: TrainConfig, step: int, epoch: float, history: list[dict]) -> dict[str, Any]:
    """``trainer_state.json`` with the fields of transformers' ``TrainerState``."""
    return {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": epoch,
        "eval_steps": config.save_every,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": list(history),
        "logging_steps": config.logging_steps,
        "max_steps": config.steps,
        "num_input_tokens_seen": step * config.batch_size * config.seq_len,
        "num_train_epochs": math.ceil(epoch) if epoch else 1,
        "save_steps": config.save_every,
        "stateful_callbacks": {},
        "total_flos": 0,
        "train_batch_size": config.batch_size,
        "trial_name": None,
        "trial_params": None,
    }


class _Accumulator:
    """Mean loss (overall, and per domain weighted by rows) since the last log entry; last gradient norm."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.loss = 0.0
        self.sums = dict.fromkeys(self.names, 0.0)
        self.rows = dict.fromkeys(self.names, 0)
        self.grad_norm = 0.0

    def add(self, r: StepResult) -> None:
        self.n += 1
        self.loss += r.loss
        self.grad_norm = r.grad_norm
        for name, value in r.domain_loss.items():
            self.sums[name] += value * r.domain_rows[name]
            self.rows[name] += r.domain_rows[name]

    def flush(self) -> dict[str, float]:
        entry = {"loss": round(self.loss / max(self.n, 1), 6), "grad_norm": round(self.grad_norm, 6)}
        for name in self.names:
            if self.rows[name]:
                entry[f"loss_{name}"] = round(self.sums[name] / self.rows[name], 6)
        self.reset()
        return entry


class _Logger:
    """A rich progress bar with the running loss per domain (only on a terminal), plus one line per save."""

    def __init__(self, config: TrainConfig, names: Sequence[str], start_step: int) -> None:
        self.quiet = config.quiet
        show = config.progress if config.progress is not None else sys.stderr.isatty()
        self.show = bool(show) and not config.quiet
        self.names = list(names)
        self.start = start_step
        self.total = config.steps
        self.ema: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> _Logger:
        if self.show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[losses]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=self.start, losses="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def note(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr)

    def step(self, r: StepResult) -> None:
        for name, value in r.domain_loss.items():
            self.ema[name] = value if name not in self.ema else 0.9 * self.ema[name] + 0.1 * value
        if self.progress is not None:
            losses = "  ".join(f"{n} {self.ema[n]:.3f}" for n in self.names if n in self.ema)
            self.progress.update(self.task, completed=r.step, losses=f"loss {losses}")

    def eval(self, step: int, losses: Mapping[str, float]) -> None:
        text = "  ".join(f"{n} {v:.4f}" for n, v in losses.items())
        line = f"step {step}/{self.total}: validation loss {text}  ({time.monotonic() - self.t0:.0f} s)"
        if self.progress is not None:
            self.progress.console.print(line)
        elif not self.quiet:
            print(line, file=sys.stderr)


# ----------------------------------------------------------------------------------------------- branches


@dataclass
class TrainingState:
    """Everything needed to continue training from a checkpoint: model, optimizer, positioned streams.

    ``fork`` gives an independent copy, so that several branches (the intervention experiment of
    ``commute validate``) start from the same state and read the same per-domain streams; ``run`` trains
    one branch further under any schedule.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    streams: list[DomainStream]
    step: int
    batch_size: int
    max_grad_norm: float | None = None

    def fork(self) -> TrainingState:
        import copy

        model = copy.deepcopy(self.model)
        state = self.optimizer.state_dict()
        name = "sgd" if isinstance(self.optimizer, torch.optim.SGD) else "adamw"
        optimizer = build_optimizer(model, name)
        optimizer.load_state_dict(copy.deepcopy(state))
        streams = [s.copy() for s in self.streams]
        return TrainingState(model, optimizer, streams, self.step, self.batch_size, self.max_grad_norm)

    def run(
        self,
        schedule: Schedule,
        n_steps: int,
        lr_fn: Callable[[int], float],
        on_step: Callable[[StepResult], None] | None = None,
    ) -> list[StepResult]:
        """``n_steps`` updates from ``self.step`` with the weights of ``schedule`` (by global step)."""
        results = train_branch(
            self.model,
            self.optimizer,
            self.streams,
            schedule,
            self.step,
            n_steps,
            batch_size=self.batch_size,
            lr_fn=lr_fn,
            max_grad_norm=self.max_grad_norm,
            on_step=on_step,
        )
        self.step += n_steps
        return results


def load_training_state(
    checkpoint: str | Path,
    domains: Mapping[str, str] | None = None,
    *,
    tokenizer: str | Path | None = None,
    base_dir: Path | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
) -> TrainingState:
    """A checkpoint written by ``commute train`` (or any model folder) as a ``TrainingState``.

    Defaults come from the checkpoint's ``commute_state.json`` (seed, batch size, sequence length, stream
    positions) and from the run's manifest (training domains, tokenizer); arguments override them. The
    optimizer is AdamW when the saved state has second moments, SGD otherwise; its hyperparameters are
    those saved in ``optimizer.pt``. Without saved optimizer state a fresh AdamW starts.
    """
    from commute_cli.io.checkpoints import read_manifest

    folder = Path(checkpoint)
    resumed = read_training_state(folder)
    saved: dict[str, Any] = {}
    if (folder / STATE_NAME).is_file():
        saved = json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
    manifest = read_manifest(folder)
    if domains is None:
        if manifest is None or not manifest.domains:
            raise CommuteError(f"no domains for {folder}", "pass the training domains (name=source)")
        domains = manifest.domains
    tok = tokenizer or (folder if (folder / "tokenizer.json").is_file() else None)
    tok = tok or (manifest.tokenizer if manifest is not None else None)
    if tok is None:
        raise CommuteError(f"no tokenizer for {folder}", "pass a tokenizer folder")
    seq_len = seq_len or saved.get("seq_len") or (manifest.seq_len if manifest else None) or 128
    batch_size = batch_size or saved.get("batch_size") or (manifest.batch_size if manifest else None) or 16
    seed = seed if seed is not None else saved.get("seed", 0)

    tokenizer_obj = load_tokenizer(tok)
    blocks = _load_blocks(domains, tokenizer_obj, int(seq_len), base_dir)
    streams = [DomainStream(n, b, int(seed), resumed.positions.get(n, 0)) for n, b in blocks.items()]
    model = load_model(folder)
    opt_state = resumed.optimizer_state
    is_adam = opt_state is None or any("exp_avg_sq" in s for s in opt_state.get("state", {}).values())
    optimizer = build_optimizer(model, "adamw" if is_adam else "sgd")
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    return TrainingState(model, optimizer, streams, resumed.step, int(batch_size))
