"""Data parallelism for ``commute analyze`` over processes (``torchrun --nproc_per_node=N``).

Every quantity the estimator needs is a mean over sequences (MATH.md "Noise": g_k, u and H_a v are means
over the sequences of one part of one design block). Each rank therefore takes a disjoint, contiguous
slice of *every* part of every design block, accumulates its local sums, and ``curvature``'s ``reduce``
hook all-reduces (SUM) the sums and the sequence counts before dividing. After the gradient all-reduce the
HVP vectors are identical on every rank, so every rank runs the same HVP schedule on its own sequences,
and the results equal the single-process run up to float32 rounding (the summation order changes).

Roles: rank 0 alone reads and writes the per-checkpoint cache and the output files and draws progress;
the other ranks stay quiet. The process group is created only when ``WORLD_SIZE > 1`` is in the
environment (torchrun sets it): gloo on CPU, nccl on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``).

Errors: steps that can fail before or between collectives (inputs, data, model loading, writing) go
through :meth:`DistContext.agree`: every rank learns whether any rank failed and raises, so all ranks stop
with the same exit code and the message is printed once (by the first failing rank; the copies raised on
the other ranks carry ``silent = True``, which the CLI honours). A failure *inside* a collective phase (an
out-of-memory error in the middle of an HVP pass, say) leaves the other ranks waiting in an all-reduce.
The process group is created with ``--dist-timeout`` seconds (default 1800): a collective in which a rank
does not take part within that time fails, and one whose peer has exited fails at once. The collectives
here (:meth:`DistContext.reduce_fn`, ``broadcast``, ``all_gather``, ``barrier``) turn that failure into
one line, ``rank R: another rank did not join a collective within T s or left the run (...)``, exit code
1, instead of a long traceback, so the first error (printed by the rank that had it) stands out; torchrun
also stops the other ranks when a rank exits with an error. With gloo (CPU) the error is raised where the
collective waits; with nccl the collectives are asynchronous, and a timeout is usually caught by torch's
watchdog, which ends the process with its own message after the same time.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from commute_cli.errors import CommuteError

R = TypeVar("R")

DEFAULT_TIMEOUT_S = 1800.0  # --dist-timeout: seconds a rank waits for the others in one collective

# what a collective raises when it times out or loses a peer (DistBackendError, DistNetworkError, ...)
_COLLECTIVE_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, getattr(dist, "DistError", RuntimeError))


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (torchrun sets it); 1 when absent or unreadable."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    """Whether this process should print and write: rank 0, or a single process.

    Reads the environment, so the CLI can decide about progress bars before any process group exists.
    """
    return env_world_size() <= 1 or env_rank() == 0


@dataclass
class DistContext:
    """Where this process stands in a data-parallel run (``world == 1``: a plain single process)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False
    timeout_s: float | None = None  # the process group's timeout (None: a group someone else created)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -------------------------------------------------------------------------------- collectives

    def _lost_peer(self, err: BaseException) -> CommuteError:
        """The one-line error for a collective that timed out or lost a peer (``err``: what torch raised)."""
        lines = str(err).strip().splitlines()
        # gloo starts its messages with the C++ source location: "[.../pair.cc:553] Connection closed ..."
        first = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(err).__name__
        within = f"{self.timeout_s:g} s" if self.timeout_s is not None else "the process group's timeout"
        return CommuteError(
            f"rank {self.rank}: another rank did not join a collective within {within} or left the run "
            f"({first})",
            hint="see the other ranks' output for the first error; raise --dist-timeout if a rank is just "
            "slow (large model, slow disk)",
            exit_code=1,
        )

    def reduce_fn(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``curvature``'s ``reduce`` hook: an all-reduce SUM (``None`` for a single process)."""
        if not self.enabled:
            return None

        def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
            # in place when possible: curvature passes fresh sums it never reads again, and an [m, n]
            # copy of the HVP sums would cost GPU memory
            out = t if t.is_contiguous() else t.contiguous()
            try:
                dist.all_reduce(out, op=dist.ReduceOp.SUM)
            except _COLLECTIVE_ERRORS as err:
                raise self._lost_peer(err) from err
            return out

        return all_reduce_sum

    def shard(self, blocks: torch.Tensor) -> torch.Tensor:
        """This rank's disjoint contiguous slice of ``blocks`` (sizes differ by at most 1; may be empty)."""
        if not self.enabled:
            return blocks
        return blocks.tensor_split(self.world)[self.rank]

    def broadcast(self, obj: R) -> R:
        """Rank 0's ``obj`` on every rank (small picklable objects only)."""
        if not self.enabled:
            return obj
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0)
        except _COLLECTIVE_ERRORS as err:
            raise self._lost_peer(err) from err
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, obj)
        except _COLLECTIVE_ERRORS as err:
            raise self._lost_peer(err) from err
        return out

    def agree(self, fn: Callable[[], R], *, main_only: bool = False) -> R | None:
        """Run ``fn`` (on every rank, or on rank 0 only) and fail on all ranks if it failed on any.

        Returns ``fn``'s result (``None`` on the ranks that did not run it). The first failing rank
        re-raises its own exception (printed by the CLI); every other rank raises a
        :class:`CommuteError` with the same message and exit code, marked ``silent`` so it is not printed
        twice.
        """
        result: R | None = None
        error: BaseException | None = None
        if not main_only or self.is_main:
            try:
                result = fn()
            except Exception as err:
                error = err
        if not self.enabled:
            if error is not None:
                raise error
            return result
        payload = None if error is None else _error_payload(error, self.rank)
        gathered = self.all_gather(payload)
        failed = [(r, p) for r, p in enumerate(gathered) if p is not None]
        if not failed:
            return result
        first_rank, first = failed[0]
        if error is not None and first_rank == self.rank:
            raise error
        copy = CommuteError(first["message"], hint=first["hint"], exit_code=first["exit_code"])
        copy.silent = True  # type: ignore[attr-defined]
        if error is not None:
            raise copy from error
        raise copy

    def barrier(self) -> None:
        if self.enabled:
            try:
                dist.barrier()
            except _COLLECTIVE_ERRORS as err:
                raise self._lost_peer(err) from err

    def close(self, *, finished: bool = True) -> None:
        """Destroy the process group if this context created it.

        ``finished``: the run ended normally on this rank, so every rank reaches this point; they meet at a
        barrier first. Destroying a gloo group while a peer still has traffic in flight (rank 0 writing the
        outputs while rank 1 tears down) can abort the faster rank at exit ("terminate called without an
        active exception"). After a failure the peers may be gone, so there is no barrier then.
        """
        if not (self.owns_group and dist.is_initialized()):
            return
        if finished and self.enabled:
            # a peer that left after finishing: nothing is waiting for us
            with contextlib.suppress(*_COLLECTIVE_ERRORS):
                dist.barrier()
        dist.destroy_process_group()
        self.owns_group = False


def _error_payload(err: BaseException, rank: int) -> dict[str, Any]:
    if isinstance(err, CommuteError):
        return {"message": err.message, "hint": err.hint, "exit_code": err.exit_code}
    last = traceback.format_exception_only(type(err), err)[-1].strip()
    return {
        "message": f"rank {rank} failed: {last}",
        "hint": "see that rank's traceback above",
        "exit_code": 1,
    }


def setup(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[DistContext, torch.device]:
    """Join (or create) the process group when ``WORLD_SIZE > 1``; return the context and this rank's device.

    On CUDA each rank uses ``cuda:LOCAL_RANK`` (one GPU per process, the torchrun convention) and the nccl
    backend; otherwise gloo. ``timeout_s`` (``--dist-timeout``): how long a collective waits for the other
    ranks. An existing process group (a caller that initialized it) is used as is, with its own timeout, and
    left open.
    """
    world = env_world_size()
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext(), device
    if not dist.is_available():
        raise CommuteError(
            "WORLD_SIZE > 1 asks for several processes, but this torch build has no torch.distributed",
            hint="run a single process (without torchrun), or install a torch build with distributed support",
        )
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if device.index is None:
            if local >= count:
                raise CommuteError(
                    f"rank with LOCAL_RANK={local} has no GPU of its own ({count} visible)",
                    hint="use --nproc_per_node at most the number of GPUs",
                )
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), owns_group=False), device
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise CommuteError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} is not",
            hint="start several processes with torchrun --nproc_per_node=N -m commute_cli analyze ...",
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if backend == "nccl":
        kwargs["device_id"] = device
    try:
        dist.init_process_group(**kwargs)
    except TypeError:  # torch without device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(**kwargs)
    ctx = DistContext(rank=dist.get_rank(), world=dist.get_world_size(), owns_group=True, timeout_s=timeout_s)
    return ctx, device
