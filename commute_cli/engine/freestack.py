"""The estimator's stack of free factors and every inner product against it, formed in few float64 GEMMs.

The block-design estimator (:mod:`commute_cli.engine.estimator`) pairs each *unit* vector (an HVP output, a
gradient of the unit's part) with the free factor of every design block: ``R = B K`` parameter-sized
float32 vectors kept from phase one. Forming those products one unit vector at a time against the whole
stack (``A @ B.T`` per call, each call converting the stack to float64 chunk by chunk) costs ``R n``
conversions per call, ``2 B K`` calls: ``2 B^2 K^2 n`` conversions per checkpoint (either plan), which
grew faster with ``K`` than the gradient and HVP passes (issue 24: analysis time ratio K = 8 / K = 2 of 10.6
where the passes' is 4.0).

:class:`FreeStack` queues the unit vectors (:meth:`FreeStack.dot`) and forms the products of up to
``pending_rows`` of them in one pass over the parameter axis (:meth:`FreeStack.flush`): per chunk of the
parameter axis, the stack's chunk is converted to float64 once into a reused buffer and multiplied with all
queued vectors' chunk (one GEMM, ``addmm_`` into a float64 accumulator). Conversions then cost
``R n`` per flush, not per vector, and the arithmetic is one GEMM with ``pending`` rows instead of
``pending`` GEMVs. The numbers are the same inner products as before, accumulated in float64 from the exact
float64 images of float32 entries: only the summation order changes (float64 rounding).

Memory: the stack (``R`` float32 vectors, on ``store``), the queued vectors (at most ``pending_rows``
besides the one being added) and two float64 chunk buffers of ``chunk_bytes`` in all, whatever ``R``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

Tensor = torch.Tensor

#: bytes of the two float64 chunk buffers together: a few L2/L3-sized pieces on a CPU, larger kernels on CUDA
CHUNK_BYTES_CPU = 16 << 20
CHUNK_BYTES_CUDA = 256 << 20

Sink = Callable[[np.ndarray], None]

#: entries of the parameter axis per float64 chunk in :func:`gram` (8 MB per row and chunk on CUDA, 2 on CPU)
GRAM_CHUNK_CPU = 1 << 18
GRAM_CHUNK_CUDA = 1 << 20


def gram(A: Tensor, B: Tensor, compute: torch.device | None = None) -> np.ndarray:
    """``A @ B.T`` (``[rows(A), rows(B)]``) accumulated in float64, in one call: the form the estimator used
    per unit vector before :class:`FreeStack` batched them (kept for benchmarks/bench_decompose.py).

    Chunked over the parameter axis (float64 copies of whole stacks would cost twice the stacks); each chunk
    is moved to ``compute`` (default ``A``'s device), so offloaded stacks change where vectors wait, not the
    arithmetic.
    """
    dev = A.device if compute is None else compute
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=dev)
    n = A.shape[-1]
    step = GRAM_CHUNK_CUDA if dev.type == "cuda" else GRAM_CHUNK_CPU
    for start in range(0, n, step):
        a = A[:, start : start + step].to(dev, non_blocking=True).double()
        b = B[:, start : start + step].to(dev, non_blocking=True).double()
        out += a @ b.T
    return out.cpu().numpy()


class FreeStack:
    """``R`` parameter-sized vectors and their float64 inner products with queued vectors, in batches.

    Args:
        rows: ``R``, the number of stacked vectors (``B K`` free factors in the estimator).
        n: entries per vector (the flat parameter vector's length).
        dtype: the stored vectors' dtype (float32, or float64 for a float64 model).
        store: where the stack lives (the model's device, or the host with ``--offload``).
        compute: where the products run (the model's device); each chunk is moved there.
        segments: ``(start, stop, group)`` half-open ranges covering ``[0, n)``
            (:attr:`~commute_cli.engine.groups.ParamGroups.segments`); every product is then summed per group.
            ``None``: one group, the whole vector.
        n_groups: ``G``, the number of groups of ``segments`` (1 without).
        pending_rows: queued vectors formed together; a :meth:`dot` that would exceed it flushes first.
        chunk_bytes: bytes of the float64 chunk buffers (default by ``compute``'s type).

    Raises:
        ValueError: non-positive ``rows``, ``n`` or ``pending_rows``, or segments not covering ``[0, n)``.
    """

    def __init__(
        self,
        rows: int,
        n: int,
        *,
        dtype: torch.dtype,
        store: torch.device,
        compute: torch.device,
        segments: Sequence[tuple[int, int, int]] | None = None,
        n_groups: int = 1,
        pending_rows: int = 1,
        chunk_bytes: int | None = None,
    ) -> None:
        if rows < 1 or n < 1 or pending_rows < 1:
            raise ValueError(f"need rows, n and pending_rows >= 1, got {rows}, {n}, {pending_rows}")
        segs = [(0, n, 0)] if segments is None else [(int(a), int(b), int(g)) for a, b, g in segments]
        if sum(b - a for a, b, _ in segs) != n or min(a for a, _, _ in segs) != 0:
            raise ValueError(f"segments must cover the {n} entries exactly once")
        self.data = torch.empty(rows, n, dtype=dtype, device=store)
        self.compute = compute
        self.segments = segs
        self.n_groups = int(n_groups)
        self.pending_rows = int(pending_rows)
        default = CHUNK_BYTES_CUDA if compute.type == "cuda" else CHUNK_BYTES_CPU
        self.chunk_bytes = int(default if chunk_bytes is None else chunk_bytes)
        self._queue: list[tuple[Tensor, Sink]] = []
        self._queued = 0
        self.flushes = 0  # passes over the stack so far (tests and benchmarks)

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])

    def set_row(self, i: int, vector: Tensor) -> None:
        """Store ``vector`` ``[n]`` as row ``i`` (copied to the stack's device and dtype)."""
        self.data[i] = vector

    def dot(self, vectors: Tensor, sink: Sink) -> None:
        """Queue the products of ``vectors`` ``[m, n]`` with every row; ``sink`` gets them at the next flush.

        ``sink`` is called with a float64 array ``[G, m, R]``: entry ``[g, i, r]`` is the sum over group
        ``g``'s entries of ``vectors[i] * row r`` (``G = 1`` without segments; the sum over ``g`` is the whole
        inner product). ``vectors`` is held, not copied, until then: the caller must not change it in place.
        """
        if vectors.dim() != 2 or vectors.shape[1] != self.data.shape[1]:
            raise ValueError(f"need [m, {self.data.shape[1]}] vectors, got {tuple(vectors.shape)}")
        m = int(vectors.shape[0])
        if self._queue and self._queued + m > self.pending_rows:
            self.flush()
        self._queue.append((vectors, sink))
        self._queued += m
        if self._queued >= self.pending_rows:
            self.flush()

    def flush(self) -> None:
        """Form every queued product (one pass over the parameter axis) and hand each to its sink."""
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        P, R, dev = self._queued, self.rows, self.compute
        self._queued = 0
        width = max(1, self.chunk_bytes // (8 * (P + R)))
        fbuf = torch.empty(R, width, dtype=torch.float64, device=dev)
        pbuf = torch.empty(P, width, dtype=torch.float64, device=dev)
        out = torch.zeros(self.n_groups, P, R, dtype=torch.float64, device=dev)
        for start, stop, g in self.segments:
            for s in range(start, stop, width):
                e = min(stop, s + width)
                w = e - s
                f = fbuf[:, :w]
                f.copy_(self.data[:, s:e].to(dev, non_blocking=True))
                p = pbuf[:, :w]
                i = 0
                for vec, _ in queue:
                    p[i : i + vec.shape[0]].copy_(vec[:, s:e].to(dev, non_blocking=True))
                    i += vec.shape[0]
                out[g].addmm_(p, f.T)
        del fbuf, pbuf
        result = out.cpu().numpy()
        i = 0
        for vec, sink in queue:
            m = int(vec.shape[0])
            sink(result[:, i : i + m, :])
            i += m
        self.flushes += 1
