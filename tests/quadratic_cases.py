"""The reference quadratics of ``tests/references.py`` with the criterion's quantities, shared by
``tests/test_criterion.py`` and ``tests/test_multipair.py`` (a test module is never imported as a library)."""

from __future__ import annotations

import numpy as np
import torch

from commute_cli.core import criterion
from commute_cli.engine import metric

from references import Quadratics


class Quad(Quadratics):
    """The reference quadratics (tests/references.py) with the criterion's quantities: ``M`` through
    criterion.py from dense HVPs, ``P`` typed from MATH.md with dense matrices."""

    def M(self, x, c, D=None, plan: str = "pair") -> np.ndarray:
        """Interaction matrix through criterion.py, from HVPs computed with the dense A_k."""
        g = torch.from_numpy(self.grads(x))
        Dt = None if D is None else torch.from_numpy(D)
        Dg = metric.apply_preconditioner(Dt, g)
        u = metric.apply_preconditioner(Dt, torch.as_tensor(c, dtype=torch.float64) @ g)
        A = torch.from_numpy(self.A)
        if plan == "pair":
            hv = {(a, b): A[a] @ Dg[b] for a, b in criterion.ordered_pairs(self.K)}
            return criterion.interaction_pair_plan(u, hv, self.K)
        return criterion.interaction_target_plan(torch.stack([A[a] @ u for a in range(self.K)]), Dg)

    def P(self, x, i, j, c) -> float:
        """P(L_i, L_j; L) = <g_L, H_j g_i - H_i g_j>, typed from MATH.md with dense matrices."""
        g = self.grads(x)
        gL = np.asarray(c, float) @ g
        return float(gL @ (self.A[j] @ g[i] - self.A[i] @ g[j]))
