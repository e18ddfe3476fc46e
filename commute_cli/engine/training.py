"""The training loop of ``commute train`` and of ``commute validate``'s branches, nanoGPT style.

What a step does:

1. The schedule gives the domain weights ``w`` at this step; ``core.mixing.batch_counts(w, B)`` turns them
   into exact per-domain row counts.
2. Each domain's rows come from its own :class:`DomainStream`: the domain's fixed-length blocks visited in
   a seeded random order, a new permutation each epoch. A stream's state is one integer (blocks handed
   out), so a checkpoint records it exactly, and two branches started from the same checkpoint with the
   same seed read the same blocks of every domain, whatever their weights.
3. One forward pass over the concatenated rows; the loss is the mean over rows of the per-row mean token
   cross-entropy, i.e. ``sum_i (n_i / B) L_i``, the mixture loss with the realized weights ``n_i / B``.
4. AdamW or SGD (the Hugging Face Trainer's two parameter groups, decay and no-decay) at ``lr_fn(step)``.

Blocks stay in host memory; each batch is moved to the model's device (``--device``).
Files (checkpoints, manifest, resume) are ``io.runfiles``' job; this module touches none.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from commute_cli.core.mixing import batch_counts
from commute_cli.core.schedule import Schedule
from commute_cli.errors import CommuteError

# ----------------------------------------------------------------------------------------------- batches


def stream_seed(seed: int, domain: str, epoch: int) -> int:
    """The seed of a domain's permutation in one epoch: a hash, so streams of different domains and epochs
    are independent and do not depend on the order or number of domains."""
    digest = hashlib.sha256(f"commute-stream/{seed}/{domain}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


class DomainStream:
    """The blocks ``[N, T]`` of one domain, handed out without replacement, a fresh permutation each epoch.

    The whole state is ``position`` (blocks handed out so far): block ``k`` of the stream is
    ``blocks[perm(k // N)[k % N]]`` with ``perm(e) = randperm(N, generator seeded by stream_seed(seed, name,
    e))``. :meth:`copy` gives an independent stream that continues identically.
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
        """The block indices of the next ``n`` draws, ``[n]`` (advances the stream)."""
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
        """Epochs read so far (fractional)."""
        return self.position / len(self)

    def copy(self, seed: int | None = None) -> DomainStream:
        """An independent stream at the same position (with another permutation seed when given)."""
        return DomainStream(self.name, self.blocks, self.seed if seed is None else seed, self.position)


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


# ----------------------------------------------------------------------------------------------- losses


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (where batches go)."""
    return next(model.parameters()).device


def row_losses(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row in nats, ``[B]`` (float32), on the model's device.

    The targets are the inputs shifted left, the last position ignored; computing the loss on the full
    logits tensor (not a ``[:, :-1]`` slice) saves a copy of the largest tensor of the step.
    """
    input_ids = input_ids.to(model_device(model))
    logits = model(input_ids=input_ids).logits.float()
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return loss.view(targets.shape).sum(dim=1) / (input_ids.shape[1] - 1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, blocks: Mapping[str, torch.Tensor], batch_size: int = 32
) -> dict[str, float]:
    """Mean token loss (nats) of each domain's blocks ``[N, T]`` (eval mode, restored afterwards)."""
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


# ----------------------------------------------------------------------------------------------- optimizer


def build_optimizer(
    model: torch.nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    *,
    decay: Collection[str],
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
) -> torch.optim.Optimizer:
    """AdamW or SGD over two groups, decay (names in ``decay``) then no-decay, each in ``named_parameters()``
    order: the HF Trainer's layout (its rule is ``io.checkpoints.decay_parameter_names``). The groups
    carry ``param_names``, so a saved ``optimizer.pt`` names its own positions."""
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

    Linear warmup ``base_lr * (step + 1) / warmup`` for ``step < warmup`` (one step ahead of transformers'
    ``step / warmup``, so that the first update is not at rate 0); then ``base_lr`` (constant) or
    ``base_lr * (1 + cos(pi * p)) / 2`` with ``p = (step - warmup) / (total_steps - warmup)`` (cosine: the
    same curve as transformers' ``get_cosine_schedule_with_warmup`` after the warmup).
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
    """What one update did: its step number after the update, learning rate, losses (nats), grad norm."""

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
    detached = losses.detach().cpu()
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
    """Run ``n_steps`` updates from global step ``start_step``: the weights come from
    ``schedule.weights_at(step)`` in the streams' order. The building block of ``train`` and of
    ``validate``'s branches (see :meth:`TrainingState.fork`)."""
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


class LossLog:
    """A ``log_history`` entry: mean loss (nats; overall, and per domain weighted by rows) since the last
    entry, and the last gradient norm."""

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


def copy_optimizer(
    optimizer: torch.optim.Optimizer, old: torch.nn.Module, new: torch.nn.Module
) -> torch.optim.Optimizer:
    """An optimizer of the same type, groups and state over ``new``, a deep copy of ``old``."""
    name_of = {id(p): n for n, p in old.named_parameters()}
    params = dict(new.named_parameters())
    groups = []
    for g in optimizer.param_groups:
        names = [name_of[id(p)] for p in g["params"]]
        hyper = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        groups.append({**hyper, "params": [(n, params[n]) for n in names]})
    out = type(optimizer)(groups)  # type: ignore[call-arg]  # torch's optimizers take params (+ defaults)
    out.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return out


@dataclass
class TrainingState:
    """Everything needed to continue training from a checkpoint: model, optimizer, positioned streams.

    :meth:`fork` gives an independent copy, so that several branches (``commute validate``) start from
    the same state and read the same per-domain streams; :meth:`run` trains one branch further.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    streams: list[DomainStream]
    step: int
    batch_size: int
    max_grad_norm: float | None = None

    def fork(self, seed: int | None = None) -> TrainingState:
        """A deep copy (model, optimizer state, streams; the streams re-seeded when ``seed`` is given)."""
        model = copy.deepcopy(self.model)
        optimizer = copy_optimizer(self.optimizer, self.model, model)
        streams = [s.copy(seed) for s in self.streams]
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


def resolve_device(device: str = "auto") -> torch.device:
    """``--device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; the
    one resolver (analyze, validate, train and the preview).

    Raises ``CommuteError`` for another name, and for CUDA or MPS on a machine that has none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise CommuteError(f"unknown device {device!r}", hint="use auto, cpu, cuda, cuda:N or mps")
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }[device.split(":")[0]]
    if not available:
        kind = "CUDA" if device.startswith("cuda") else "MPS"
        raise CommuteError(
            f"--device {device} was asked for but no {kind} device is available", hint="use --device cpu"
        )
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise CommuteError(
            f"--device {device} was asked for but this machine has {torch.cuda.device_count()} CUDA devices",
            hint="use --device cuda (the first) or a smaller index",
        )
    return resolved
