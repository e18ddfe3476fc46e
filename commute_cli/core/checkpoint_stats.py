"""The engine -> math contract: :class:`CheckpointStats`, the per-block scalar estimates of one checkpoint
that the estimator returns, the store caches and the criterion reads (a few kB whatever the model size).
Pure numpy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class CheckpointStats:
    """Per-block scalar estimates at one checkpoint (float64 numpy arrays): what the engine's estimator
    returns, what the store caches, and all that the criterion needs (a few kB whatever the model size).

    Attributes:
        plan: "pair" or "target".
        losses: ``[B, K]`` mean loss (nats) of every domain on each block (all three parts).
        first: ``[B, K, K]``, ``first[b, k, l] = < g_k^(0), D g_l^(2) >`` (first-order progress terms).
        Q: ``[B, K, K, K]`` (pair plan) estimates of ``< D g_k, H_a D g_l >``, zero on a == l.
        M: ``[B, T, K, K]`` (target plan) interaction matrices of the targets in ``target_coefs``.
        target_coefs: ``[T, K]`` target weights the target plan was computed for (``None`` for pair).
        seqs_per_part: sequences per part and domain (the same for all).
        estimator: "cross" or "block" (how the raw products were reduced; engine.estimator).
        groups: ``[B, G, ...]`` (only with a decomposition, ``--decompose``): the per-block values of ``Q``
            (pair) or ``M`` (target) restricted to each parameter group, the same reduction of the same
            products; summed over ``G`` they give ``Q``/``M`` to float64 rounding.
        group_labels: the ``G`` group labels (``None`` without a decomposition).
    """

    plan: str
    losses: np.ndarray
    first: np.ndarray
    Q: np.ndarray | None = None
    M: np.ndarray | None = None
    target_coefs: np.ndarray | None = None
    seqs_per_part: int = 0
    estimator: str = "cross"
    groups: np.ndarray | None = None
    group_labels: list[str] | None = None

    @property
    def n_blocks(self) -> int:
        return int(self.losses.shape[0])

    @property
    def n_domains(self) -> int:
        return int(self.losses.shape[1])

    def interaction(self, coefs: Sequence[float] | np.ndarray) -> np.ndarray:
        """``[B, K, K]`` interaction matrices ``M[a, l] = < D g_L, H_a D g_l >`` of target ``sum c_k L_k``.

        Pair plan: a linear combination of ``Q`` (any target). Target plan: only a target that was
        computed, looked up by its weights (``KeyError`` otherwise).
        """
        c = np.asarray(coefs, dtype=np.float64)
        if self.plan == "pair":
            assert self.Q is not None
            return np.einsum("k,bkal->bal", c, self.Q)
        assert self.M is not None and self.target_coefs is not None
        for t, ct in enumerate(self.target_coefs):
            if np.allclose(ct, c, rtol=0.0, atol=1e-12):
                return self.M[:, t]
        raise KeyError(f"target {c.tolist()} was not computed in the target plan")

    def group_interaction(self, coefs: Sequence[float] | np.ndarray) -> np.ndarray:
        """``[B, G, K, K]``: :meth:`interaction` restricted to each parameter group (a decomposition).

        Raises:
            ValueError: the statistics were computed without groups.
        """
        if self.groups is None:
            raise ValueError("these statistics have no per-group decomposition")
        c = np.asarray(coefs, dtype=np.float64)
        if self.plan == "pair":
            return np.einsum("k,bgkal->bgal", c, self.groups)
        assert self.target_coefs is not None
        for t, ct in enumerate(self.target_coefs):
            if np.allclose(ct, c, rtol=0.0, atol=1e-12):
                return self.groups[:, :, t]
        raise KeyError(f"target {c.tolist()} was not computed in the target plan")

    def first_order(
        self, coefs: Sequence[float] | np.ndarray, wbar: Sequence[float] | np.ndarray
    ) -> np.ndarray:
        """``[B]`` estimates of ``< g_L, D gbar >``: the target's first-order decrease rate under ``wbar``."""
        c = np.asarray(coefs, dtype=np.float64)
        w = np.asarray(wbar, dtype=np.float64)
        return np.einsum("k,bkl,l->b", c, self.first, w)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays by name (the store's safetensors layout)."""
        out = {"losses": self.losses, "first": self.first}
        if self.Q is not None:
            out["Q"] = self.Q
        if self.M is not None:
            out["M"] = self.M
        if self.target_coefs is not None:
            out["target_coefs"] = self.target_coefs
        if self.groups is not None:
            out["groups"] = self.groups
        return out

    @classmethod
    def from_arrays(
        cls,
        plan: str,
        arrays: dict[str, np.ndarray],
        seqs_per_part: int,
        estimator: str = "cross",
        group_labels: list[str] | None = None,
    ) -> CheckpointStats:
        """Inverse of :meth:`to_arrays`."""
        return cls(
            plan=plan,
            losses=arrays["losses"],
            first=arrays["first"],
            Q=arrays.get("Q"),
            M=arrays.get("M"),
            target_coefs=arrays.get("target_coefs"),
            seqs_per_part=seqs_per_part,
            estimator=estimator,
            groups=arrays.get("groups") if group_labels is not None else None,
            group_labels=group_labels if "groups" in arrays else None,
        )
