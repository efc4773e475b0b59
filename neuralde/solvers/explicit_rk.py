"""Explicit Runge--Kutta methods: one stepping function, methods as tableaus."""
from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
import jax.tree_util as jtu

from .._tableaus import DOPRI5, EULER, HEUN, RK4, TSIT5, ButcherTableau
from .base import AbstractSolver


def _combine(y0, dt, weights, ks):
    """``y0 + dt * sum_j weights[j] ks[j]`` leaf by leaf, skipping zero weights.

    The weights are Python floats (from the tableau), so the sum is traced only
    over the non-zero entries and keeps each leaf's dtype.
    """
    terms = [(float(w), k) for w, k in zip(weights, ks) if w != 0.0]

    def leaf(y, *k_leaves):
        h = dt.astype(y.dtype)
        acc = None
        for (w, _), k in zip(terms, k_leaves):
            acc = w * k if acc is None else acc + w * k
        return y if acc is None else y + h * acc

    return jtu.tree_map(leaf, y0, *[k for _, k in terms])


def _weighted_sum(dt, weights, ks):
    """``dt * sum_j weights[j] ks[j]`` (no base state)."""
    terms = [(float(w), k) for w, k in zip(weights, ks) if w != 0.0]

    def leaf(*k_leaves):
        acc = None
        for (w, _), k in zip(terms, k_leaves):
            acc = w * k if acc is None else acc + w * k
        return dt.astype(acc.dtype) * acc

    return jtu.tree_map(leaf, *[k for _, k in terms])


class ExplicitRK(AbstractSolver):
    """An explicit Runge--Kutta method given by ``tableau``.

    The stage loop is a static Python loop on purpose: explicit methods have at
    most seven stages, and unrolling lets XLA fuse each stage's combination
    with the vector field (a `lax.scan` over stages costs a loop iteration and a
    dynamic-update of the stage buffer per stage, which dominates small
    problems).
    """

    tableau: ClassVar[ButcherTableau]
    # Step-size control of Hairer's DOPRI5 code (Hairer, Norsett & Wanner,
    # Solving ODEs I, 2nd ed., II.4 and its appendix: exponent 0.2 - 0.75 beta
    # of the current error and beta = 0.04 of the previous one). On smooth
    # problems it lets the step grow where OrdinaryDiffEq's (0.7, 0.4) holds
    # it back: W4's batched neural ODE took 6 steps with those and takes 4,
    # Lotka-Volterra at 1e-6 105 attempts and takes 98. It aims at a larger
    # fraction of the tolerance (errors 2-3x larger at the same rtol, still
    # below diffrax's and scipy's; benchmarks/PERF_NOTES.md, seventh session).
    pi_coefficients: ClassVar[tuple] = (0.85, 0.2)

    @property
    def init_fevals(self) -> int:
        return 1 if self.tableau.fsal else 0

    def init(self, problem, t0, y0):
        if self.tableau.fsal:
            return problem.vf(t0, y0)
        return None

    def step(self, problem, t0, dt, y0, state):
        tab = self.tableau
        s = tab.num_stages
        if tab.fsal:
            k1 = state
            num_fevals = s - 1
        else:
            k1 = problem.vf(t0, y0)
            num_fevals = s
        ks = [k1]
        y_stage = y0
        for i in range(1, s):
            y_stage = _combine(y0, dt, tab.a[i, :i], ks)
            ks.append(problem.vf(t0 + float(tab.c[i]) * dt, y_stage))
        # For FSAL methods the last stage is evaluated at the solution itself.
        y1 = y_stage if tab.fsal else _combine(y0, dt, tab.b, ks)
        y_error = None if tab.b_err is None else _weighted_sum(dt, tab.b_err, ks)
        coeffs = self._dense_coeffs(dt, ks) if problem.dense_output else None
        new_state = ks[-1] if tab.fsal else None
        return y1, y_error, coeffs, new_state, num_fevals

    def _dense_coeffs(self, dt, ks):
        interp = self.tableau.interp
        cols = [_weighted_sum(dt, interp[:, j], ks) for j in range(interp.shape[1])]
        return jtu.tree_map(lambda *c: jnp.stack(c), *cols)


class Euler(ExplicitRK):
    """Forward Euler; order 1, fixed step (``dt0``), linear dense output.
    Reference: Euler (1768), Institutionum calculi integralis."""

    tableau = EULER
    order = 1
    interp_degree = 1


class Heun(ExplicitRK):
    """Heun's method (explicit trapezoidal rule); order 2, fixed step, with its
    second-order continuous extension. Reference: Heun (1900), Z. Math. Phys. 45."""

    tableau = HEUN
    order = 2
    interp_degree = 2


class RK4(ExplicitRK):
    """The classical Runge--Kutta method; order 4, fixed step, with its free
    third-order continuous extension. Reference: Kutta (1901), Z. Math. Phys. 46;
    Hairer, Norsett & Wanner, Solving ODEs I, II.1 and II.6."""

    tableau = RK4
    order = 4
    interp_degree = 3


class Dopri5(ExplicitRK):
    """Dormand--Prince 5(4), FSAL, adaptive, with Shampine's fourth-order dense
    output. References: Dormand & Prince (1980), J. Comput. Appl. Math.
    6(1):19-26; Shampine (1986), Math. Comp. 46(173):135-150."""

    tableau = DOPRI5
    order = 5
    error_order = 5
    adaptive = True
    interp_degree = 4


class Tsit5(ExplicitRK):
    """Tsitouras 5(4), FSAL, adaptive, with its free fourth-order interpolant.
    Reference: Tsitouras (2011), Comput. Math. Appl. 62(2):770-775."""

    tableau = TSIT5
    order = 5
    error_order = 5
    adaptive = True
    interp_degree = 4
