"""The resummed prediction of an intervention's effect: exact response of linearized training (numpy only).

docs/MATH.md "Resummed prediction" derives all of this. In short: around the checkpoint theta_0 each domain's
gradient field is taken linear, ``g_k(theta_0 + x) = g_k + H_k x``, and training with weights ``w`` and a
frozen diagonal preconditioner ``D`` is the flow ``x' = -D (g_w + H_w x)`` in time ``t = sum of learning
rates``. In the coordinates ``y = D^{-1/2} x`` the flow is ``y' = -(b_w + S_w y)`` with the symmetric ``S_k
= D^{1/2} H_k D^{1/2}`` and ``b_k = D^{1/2} g_k``; a target ``L = sum_k c_k L_k`` is ``L_0 + <u, y> + 1/2
<y, S_L y>`` with ``u = D^{1/2} g_L``.

The parameter space is far too large for dense matrices, so the engine (``engine.resummed``) projects
onto an orthonormal basis ``V`` (``[m, n]``) of a block Krylov space of ``S_bar`` started from the ``b_k`` and
the targets' ``u`` (HVPs only). This module takes the projected quantities

- ``T[k] = V S_k V^T``  ``[K, m, m]`` (symmetric),
- ``c[k] = V b_k``      ``[K, m]``,
- ``e[t] = V u_t``      ``[T, m]``,

and computes, exactly for the projected linear system:

- :func:`flow` -- the affine flow over one phase of constant weights (matrix exponential of an augmented
  ``(m+1) x (m+1)`` matrix, so it is exact for any ``dt x curvature``, saturating directions included);
- :func:`steps` -- the same system stepped discretely (plain gradient descent with learning rates ``lrs``);
- :func:`intervention` -- the predicted ``EL^{12}`` and ``EL^{21}`` of the two-phase intervention
  (``wbar + d`` for ``dt``, then ``wbar - d`` for ``dt``, against ``wbar`` for ``2 dt``);
- :func:`bracket_el` -- the second-order limit ``dt^2 <u, S_bar b_d - S_d b_bar>`` (the criterion of
  ``commute analyze``), which :func:`intervention` reduces to as ``dt -> 0``;
- :func:`saturation` -- the regime indicator ``dt x <v, S_bar v> / <v, v>`` along the vectors involved.

Shapes: ``K`` domains, ``m`` basis size. Units: ``dt`` is a sum of learning rates (dimensionless for SGD;
for Adam the preconditioner carries the units of the parameters over gradients); ``EL`` in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.linalg import expm

from commute_cli.errors import CommuteError

Phase = tuple[np.ndarray, float]
"""``(weights [K], dt)``: constant domain weights for a time ``dt`` (sum of the learning rates)."""


def _mix(T: np.ndarray, c: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(S_w, b_w) = (sum_k w_k T_k, sum_k w_k c_k)`` projected."""
    return np.einsum("k,kij->ij", w, T), np.einsum("k,ki->i", w, c)


NEGATIVE = ("exact", "clamp", "abs")
"""How a phase treats negative curvature (eigenvalues ``theta < 0`` of its symmetric matrix): ``exact``
keeps the exponential growth ``e^{dt |theta|}`` of the linear model; ``clamp`` sets ``theta = 0`` there
(those directions drift with their gradient, no growth); ``abs`` uses ``|theta|`` (they settle like positive
ones, as in saddle-free Newton). Only ``exact`` is the linearized dynamics; the others are safeguards for
directions where the quadratic model is not trusted (a noisy Hessian from a few sequences, or Adam's bounded
steps)."""


def flow(Tw: np.ndarray, cw: np.ndarray, y0: np.ndarray, dt: float, negative: str = "exact") -> np.ndarray:
    """Solution at time ``dt`` of ``y' = -(Tw y + cw)``, ``y(0) = y0`` (``Tw`` symmetric).

    ``y(dt) = exp(-dt Tw) y0 - dt phi_1(-dt Tw) cw`` with ``phi_1(z) = (e^z - 1)/z``, computed as one matrix
    exponential of the augmented matrix ``[[-Tw, -cw], [0, 0]]`` (Higham's scaling and squaring, via
    ``scipy.linalg.expm``), which is accurate for stiff ``dt Tw`` (eigenvalues of ``dt Tw`` in the
    thousands: those directions have settled, ``y -> -Tw^{-1} cw`` there).
    Shapes ``[m, m]``, ``[m]``, ``[m]``.
    """
    if negative not in NEGATIVE:
        raise CommuteError(
            f"unknown negative-curvature rule {negative!r}", hint=f"use one of {', '.join(NEGATIVE)}"
        )
    if negative != "exact":
        theta, Z = np.linalg.eigh(0.5 * (Tw + Tw.T))
        theta = np.maximum(theta, 0.0) if negative == "clamp" else np.abs(theta)
        x = dt * theta
        safe = np.where(x > 0.0, x, 1.0)
        phi1 = np.where(x > 0.0, -np.expm1(-x) / safe, 1.0)  # (1 - e^{-x}) / x, 1 at x = 0
        return Z @ (np.exp(-x) * (Z.T @ y0) - dt * phi1 * (Z.T @ cw))
    m = Tw.shape[0]
    A = np.zeros((m + 1, m + 1))
    A[:m, :m] = -Tw
    A[:m, m] = -cw
    E = expm(dt * A)
    return E[:m, :m] @ y0 + E[:m, m]


def steps(Tw: np.ndarray, cw: np.ndarray, y0: np.ndarray, lrs: Sequence[float]) -> np.ndarray:
    """Discrete gradient descent on the same linear system: ``y <- y - lr (Tw y + cw)`` for each ``lr``."""
    y = np.array(y0, dtype=np.float64)
    for lr in lrs:
        y = y - lr * (Tw @ y + cw)
    return y


def response(
    T: np.ndarray,
    c: np.ndarray,
    phases: Sequence[Phase],
    y0: np.ndarray | None = None,
    negative: str = "exact",
) -> np.ndarray:
    """The projected displacement ``y`` after the phases (each a :func:`flow`), from ``y0`` (default 0)."""
    y = np.zeros(T.shape[1]) if y0 is None else np.asarray(y0, dtype=np.float64)
    for w, dt in phases:
        Tw, cw = _mix(T, c, np.asarray(w, dtype=np.float64))
        y = flow(Tw, cw, y, float(dt), negative)
    return y


def target_change(e: np.ndarray, TL: np.ndarray | None, y: np.ndarray) -> float:
    """``<e, y> + 1/2 <y, TL y>``: the target's change for a displacement ``y`` (``TL=None``: linear part
    only)."""
    out = float(e @ y)
    if TL is not None:
        out += 0.5 * float(y @ TL @ y)
    return out


@dataclass
class Intervention:
    """Predicted excess losses of the two orders, in nats; ``el12`` is ``L(theta_12) - L(theta_base)``."""

    el12: float
    el21: float

    @property
    def antisym(self) -> float:
        """``(EL^12 - EL^21) / 2``: the part odd in ``d`` (the bracket predicts only this part)."""
        return 0.5 * (self.el12 - self.el21)


def intervention(
    T: np.ndarray,
    c: np.ndarray,
    e: np.ndarray,
    wbar: Sequence[float] | np.ndarray,
    d: Sequence[float] | np.ndarray,
    dt: float | tuple[float, float],
    *,
    TL: np.ndarray | None = None,
    discrete_lrs: tuple[Sequence[float], Sequence[float]] | None = None,
    negative: str = "exact",
) -> Intervention:
    """``EL^12`` (``wbar + d`` for ``dt``, then ``wbar - d`` for ``dt``) and ``EL^21`` (the reverse), each
    against ``wbar`` for both phases, for the linearized dynamics projected on the basis.

    Args:
        T, c, e: projected Hessians ``[K, m, m]``, gradients ``[K, m]``, target gradient ``[m]``
            (see the module).
        wbar, d: base weights and shift ``[K]`` (``sum d = 0``).
        dt: time of each phase (sum of its learning rates), or ``(dt_1, dt_2)`` when they differ
            (lr schedules).
        TL: the target's projected Hessian (``sum_k c_k T_k``) for its quadratic term; ``None``:
            linear target.
        discrete_lrs: per-step learning rates of the two phases: step the system (:func:`steps`) instead of
            the exact flow (plain gradient descent; unstable where ``lr x curvature > 2``).
        negative: negative-curvature rule of the flow (:data:`NEGATIVE`).

    Returns: :class:`Intervention`. As ``dt -> 0`` with the flow, ``el12 = bracket_el(...) + O(dt^3)`` and
    ``el21 = -el12 + O(dt^3)``.
    """
    wb = np.asarray(wbar, dtype=np.float64)
    dd = np.asarray(d, dtype=np.float64)
    if abs(float(dd.sum())) > 1e-9:
        raise CommuteError(f"an intervention must keep the total data: sum(d) = {dd.sum():g}, not 0")
    dt1, dt2 = (float(dt), float(dt)) if not isinstance(dt, tuple) else (float(dt[0]), float(dt[1]))

    def run(first: np.ndarray, second: np.ndarray) -> np.ndarray:
        if discrete_lrs is None:
            return response(T, c, [(first, dt1), (second, dt2)], negative=negative)
        y = np.zeros(T.shape[1])
        for w, lrs in ((first, discrete_lrs[0]), (second, discrete_lrs[1])):
            Tw, cw = _mix(T, c, w)
            y = steps(Tw, cw, y, lrs)
        return y

    base = run(wb, wb)
    y12 = run(wb + dd, wb - dd)
    y21 = run(wb - dd, wb + dd)
    lb = target_change(e, TL, base)
    return Intervention(target_change(e, TL, y12) - lb, target_change(e, TL, y21) - lb)


def bracket_el(
    T: np.ndarray,
    c: np.ndarray,
    e: np.ndarray,
    wbar: Sequence[float] | np.ndarray,
    d: Sequence[float] | np.ndarray,
    dt: float,
) -> float:
    """The second-order prediction ``dt^2 <u, S_bar b_d - S_d b_bar>`` (MATH.md "What an intervention does to
    the target", in the coordinates ``y``), from the projected quantities: exact when ``u`` and the ``b_k``
    lie in the basis (they start the Krylov space)."""
    wb = np.asarray(wbar, dtype=np.float64)
    dd = np.asarray(d, dtype=np.float64)
    Sbar, bbar = _mix(T, c, wb)
    Sd, bd = _mix(T, c, dd)
    return float(dt * dt * (e @ (Sbar @ bd - Sd @ bbar)))


@dataclass
class Saturation:
    """Regime indicator along the vectors the prediction involves (see :func:`saturation`)."""

    index: float
    """max over the vectors v of ``dt <v, S_bar v> / <v, v>``: ~1 or more means those directions settle within
    one phase, and a second-order expansion in dt (the bracket) no longer describes them."""
    per_vector: dict[str, float]
    settled_fraction: float
    """Share of ``|b_bar|^2`` on Ritz directions with ``dt x theta > 1`` (nan without a full projection)."""


def rayleigh(S: np.ndarray, v: np.ndarray) -> float:
    """``<v, S v> / <v, v>`` (0 for a zero vector)."""
    vv = float(v @ v)
    return float(v @ S @ v) / vv if vv > 0.0 else 0.0


def saturation(
    T: np.ndarray,
    c: np.ndarray,
    e: np.ndarray | None,
    wbar: Sequence[float] | np.ndarray,
    dt: float,
    names: Sequence[str] = (),
) -> Saturation:
    """``dt x`` Rayleigh quotients of ``S_bar`` along ``b_k`` (each domain's preconditioned
    gradient), ``b_bar`` and the target vector ``u``, and the share of ``b_bar`` on Ritz directions that
    settle within ``dt``.

    The bracket is the dt^2 term of an expansion whose next terms carry one more factor ``dt S_bar`` each;
    along a vector ``v`` that factor is ``dt <v, S v>/<v, v>`` on average, so an index above ~1 flags a
    prediction whose directions saturate (the resummed prediction then differs from the bracket).
    """
    wb = np.asarray(wbar, dtype=np.float64)
    Sbar, bbar = _mix(T, c, wb)
    per = {}
    for k in range(c.shape[0]):
        per[names[k] if k < len(names) else f"b{k}"] = dt * rayleigh(Sbar, c[k])
    per["mix"] = dt * rayleigh(Sbar, bbar)
    if e is not None:
        per["target"] = dt * rayleigh(Sbar, e)
    theta, Z = np.linalg.eigh(0.5 * (Sbar + Sbar.T))
    coef = Z.T @ bbar
    total = float(coef @ coef)
    settled = float((coef[dt * theta > 1.0] ** 2).sum()) / total if total > 0.0 else float("nan")
    return Saturation(index=max(per.values()), per_vector=per, settled_fraction=settled)


SATURATION_LIMIT = 1.0
"""``dt x`` curvature along the directions involved above which those directions settle within the window
(their response ``1 - exp(-dt x curvature)`` is far from its second-order expansion): ``commute analyze``
then marks the row's regime ``saturated`` (docs/MATH.md "Resummed prediction", "What this says")."""


def saturation_from_stats(
    Q: np.ndarray, first: np.ndarray, wbar: Sequence[float] | np.ndarray, dt: float
) -> np.ndarray:
    """A cheap saturation index from the statistics ``commute analyze`` already has (pair plan), per block.

    ``Q[b, k, a, l] = <D g_k, H_a D g_l>`` (``a != l``) and ``first[b, k, l] = <g_k, D g_l>`` give, for each
    domain ``l``, the curvature of the *other* domains along ``D^{1/2} g_l``:
    ``rho_l = sum_{a != l} wbar_a Q[l, a, l] / first[l, l]`` (a Rayleigh quotient of ``S_bar`` without its own
    term ``wbar_l S_l``, which the pair plan does not compute, so a lower bound when Hessians are
    PSD). Returns
    ``[B]``: ``dt x max_l rho_l`` per block. Shapes ``Q [B, K, K, K]``, ``first [B, K, K]``.
    """
    wb = np.asarray(wbar, dtype=np.float64)
    B, K = first.shape[0], first.shape[1]
    out = np.zeros(B)
    for b in range(B):
        best = 0.0
        for ell in range(K):
            den = first[b, ell, ell]
            if den <= 0.0:
                continue
            num = sum(wb[a] * Q[b, ell, a, ell] for a in range(K) if a != ell)
            best = max(best, num / den)
        out[b] = dt * best
    return out


def progress_rate(c: np.ndarray, e: np.ndarray, wbar: Sequence[float] | np.ndarray) -> float:
    """The mixture's first-order decrease rate ``<g_bar, D g_bar>`` (nats per unit time) from one projection.

    ``c[k] = V D^{1/2} g_k`` (part 0) and ``e[l] = V D^{1/2} g_l`` (part 2, the per-domain targets, i.e.
    ``target_coefs`` the identity): both lie in the basis, so ``sum_kl wbar_k wbar_l <c_k, e_l>`` is the
    product of gradients from disjoint samples, an unbiased estimate. Shapes ``c [K, m]``, ``e [K, m]``.
    """
    w = np.asarray(wbar, dtype=np.float64)
    return float(w @ (c @ e.T) @ w)


def loss_slope(times: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of logged losses against training time (sum of learning rates), with its SE.

    The observed rate of progress of the run itself just before a checkpoint (``trainer_state.json``'s
    ``log_history``), in nats per unit time; negative while the loss falls.
    """
    t = np.asarray(times, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if t.size < 3 or np.ptp(t) <= 0.0:
        return float("nan"), float("nan")
    A = np.vstack([t - t.mean(), np.ones_like(t)]).T
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    se = float(np.sqrt(resid @ resid / (t.size - 2) / ((t - t.mean()) @ (t - t.mean()))))
    return float(coef[0]), se


def time_factor(observed_slope: float, predicted_rate: float) -> float:
    """``kappa = -observed_slope / predicted_rate``: how much faster (> 1) or slower (< 1) the run really
    progresses than the frozen-metric flow ``x' = -D g`` says. Used as an effective time ``kappa dt``
    (the bracket then scales by ``kappa^2``). nan when either rate is not a decrease."""
    if not (math.isfinite(observed_slope) and math.isfinite(predicted_rate)):
        return float("nan")
    if observed_slope >= 0.0 or predicted_rate <= 0.0:
        return float("nan")
    return -observed_slope / predicted_rate


# ------------------------------------------------------------------------------------------------ known sizes


@dataclass(frozen=True)
class SizeRecord:
    """How far a method's predicted sizes were from real interventions on one optimizer family.

    ``median``, ``low``, ``high``: predicted / observed ``EL`` over the cases whose observed effect was
    significant (signs included: a negative ratio is a wrong sign); ``cases`` and ``sign_agree`` count them.
    """

    family: str
    method: str
    cases: int
    sign_agree: int
    median: float
    low: float
    high: float
    source: str

    def note(self) -> str:
        """One line for the user: the measured range and which way the real effect probably lies."""
        if (
            self.cases == 0
            or not math.isfinite(self.median)
            or self.median <= 0.0
            or 2 * self.sign_agree <= self.cases
        ):
            return (
                f"sizes of --metric {self.method} on {self.family} runs are not calibrated: against real "
                f"interventions its predictions were {self.low:.2g} to {self.high:.2g} times the observed "
                f"effect "
                f"(negative: wrong sign; {self.sign_agree}/{self.cases} signs right, {self.source})"
            )
        way = "smaller" if self.median > 1.0 else "larger"
        factor = self.median if self.median > 1.0 else 1.0 / self.median
        return (
            f"on {self.family} runs, --metric {self.method} predicted {self.low:.2g} to {self.high:.2g} "
            f"times the observed effect (median {self.median:.2g}, "
            f"{self.sign_agree}/{self.cases} signs right, {self.source}): "
            f"real effects are likely ~{factor:.2g}x {way} than printed"
        )


_SOURCE = "benchmarks/adamw_sizes.py: tiny GPT-2 en/ru, dw 0.15, 3 stream seeds"
KNOWN_SIZES: dict[tuple[str, str], SizeRecord] = {
    # three AdamW runs (b2 0.999 lr 1e-3 constant; b2 0.95 lr 2e-3 warmup + cosine; b2 0.98 weight decay 0.1
    # lr 1e-3 warmup + cosine, checkpoints 500 and 1000), n = 20 and 100 steps
    ("adam", "euclid"): SizeRecord("adam", "euclid", 10, 6, 0.0778, -0.760, 1.034, _SOURCE),
    ("adam", "adam"): SizeRecord("adam", "adam", 10, 5, -119.9, -10974.0, 5089.0, _SOURCE),
    # SGD lr 0.02 from two SGD checkpoints, n = 20 and 60: dt x curvature 1.5-35, the bracket is far off
    ("sgd", "euclid"): SizeRecord("sgd", "euclid", 13, 9, 163.7, -559.3, 10602.0, _SOURCE),
}
"""Predicted / observed ``EL`` of ``commute analyze``'s bracket on significant real interventions, by
optimizer family and ``--metric``: benchmarks/results/adamw_sizes.json ("summary", ``bracket-*``),
docs/MATH.md "Resummed prediction", "Measurements". A test checks these numbers against that file."""


def optimizer_family(name: str | None) -> str | None:
    """``"adam"`` for Adam-family optimizer names (Adam, AdamW, ...), ``"sgd"`` for SGD, else None."""
    if not name:
        return None
    low = name.lower()
    if "adam" in low:
        return "adam"
    if "sgd" in low:
        return "sgd"
    return None


def known_size_error(optimizer: str | None, method: str = "euclid") -> SizeRecord | None:
    """What real interventions measured about this method's sizes on this optimizer family (None: unknown).

    ``optimizer``: a name such as ``"AdamW"``, ``"adamw"`` (a manifest's) or ``"SGD"``; ``method``:
    ``"euclid"`` or ``"adam"`` (``commute analyze --metric``).
    """
    family = optimizer_family(optimizer)
    if family is None:
        return None
    return KNOWN_SIZES.get((family, method))


__all__ = [
    "KNOWN_SIZES",
    "NEGATIVE",
    "Intervention",
    "Phase",
    "Saturation",
    "SizeRecord",
    "bracket_el",
    "flow",
    "intervention",
    "known_size_error",
    "loss_slope",
    "optimizer_family",
    "progress_rate",
    "rayleigh",
    "response",
    "saturation",
    "saturation_from_stats",
    "steps",
    "target_change",
    "time_factor",
]
