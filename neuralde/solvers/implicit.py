"""Stiff solvers: ESDIRK methods (singly diagonally implicit Runge--Kutta with an
explicit first stage) with a simplified Newton iteration.

One step of an ``s``-stage ESDIRK method with diagonal ``gamma`` solves, for
``i = 2..s``, the stage equation for the increment ``Z_i = Y_i - y0``

    Z_i - gamma dt f(t0 + c_i dt, y0 + Z_i) - dt sum_{j<i} a_ij k_j = 0,

where ``k_1 = f(t0, y0)`` (explicit first stage) and ``k_i = (Z_i - base_i) /
(gamma dt)`` (the stage derivative recovered from the converged equation, which
does not amplify the Newton error by the stiffness the way ``f(Y_i)`` would).
Kværnø's methods are stiffly accurate (``b`` is the last row of ``a``, so
``y1 = Y_s``) and their embedded method is the second-to-last stage.

Newton (Hairer & Wanner, Solving ODEs II, IV.8): every stage iterates
``(I - gamma dt J) dZ = -residual(Z)`` with one LU factorisation per step
(``jax.scipy.linalg.lu_factor``), ``J = df/dy`` at ``(t0, y0)`` by
``jax.jacfwd``. The rate ``theta_k = |dZ_k| / |dZ_{k-1}|`` (in the
tolerance-scaled RMS norm) is monitored: the stage stops when ``eta_k |dZ_k| <=
kappa`` with ``eta_k = theta_k / (1 - theta_k)``, after at least two
iterations; it fails when ``theta_k >= 1``,
when the rate predicts no convergence within the iteration limit, or at the
limit. A failure with a ``J`` kept from an earlier step refreshes ``J`` (at
``(t0, y0)``) and solves the stage again from its predictor within the same
attempt; a failure with a fresh ``J`` fails the step (`StepInfo(ok=False)`):
the loop rejects it and halves the step. ``J`` is kept across steps while
Newton converges fast (largest rate below ``reuse_theta``); slow convergence
refreshes it.

Fixed steps (``solve(..., adaptive=False)``) cannot be retried shorter, and
their truncation error has no relation to the tolerance (far below it at small
steps, far above it at large ones), so there the iteration (i) may take up to
``fixed_newton_iters`` iterations (the failure tests above use that limit),
and (ii) after meeting the tolerance test goes on while the corrections
contract, until the predicted Newton error is at the round-off of the stage
values (``8 eps |Y|``) or the rate exceeds 1/2 (the corrections are then
round-off noise): the stage values are then the method's to round-off, and a
convergence study shows the method's order at any tolerance. Meeting the
tolerance test stays the condition of success; a correction that grows again
after it fails the stage only if it exceeds ``kappa``.

The error estimate ``dt sum_j (b_j - bhat_j) k_j`` is filtered through
``(I - gamma dt J)^-1`` (Hairer & Wanner II, IV.8, eq. (8.19) in the SDIRK form;
Shampine's idea): unchanged to leading order for non-stiff components, bounded
for stiff ones, which avoids spurious rejections on stiff problems.

Dense output: the cubic Hermite interpolant of ``(y0, k_1)`` and
``(y1, k_s)`` (Kværnø's methods come without a continuous extension; the
Hermite cubic is third-order accurate, like the dense output of diffrax's and
OrdinaryDiffEq's Kvaerno solvers).

Gradients: each converged stage is a root of its residual, differentiated by
the implicit function theorem (`jax.lax.custom_root`), never by unrolling the
Newton iterations; the derivative of a stage therefore is that of the exact
stage solution, at the cost of one linear solve with ``I - gamma dt df/dy(Y_i)``
per stage.

Pytree states are flattened (`jax.flatten_util.ravel_pytree`).

References:
    A. Kværnø (2004), "Singly diagonally implicit Runge--Kutta methods with an
    explicit first stage", BIT Numer. Math. 44(3):489--502 (the tableaus).
    E. Hairer & G. Wanner, Solving Ordinary Differential Equations II (2nd ed.),
    Springer 1996, IV.8 (simplified Newton, its stopping rule, Jacobian reuse).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.scipy.sparse.linalg as jssl
import numpy as np
from jax.flatten_util import ravel_pytree

from .base import AbstractSolver, StepInfo


@dataclasses.dataclass(frozen=True, eq=False)
class ESDIRKTableau:
    """An ESDIRK method: ``a`` lower triangular with ``a[0] = 0`` (explicit first
    stage) and ``a[i, i] = gamma`` for ``i >= 1``; stiffly accurate (``b = a[-1]``),
    with the embedded solution ``bhat = a[-2]`` (the second-to-last stage).

    ``predictor`` (computed here) gives the Newton starting value of each stage
    as ``Z_i^0 = dt sum_j predictor[i, j] k_j``: the cubic Hermite extrapolation
    from ``(t0, y0, k_1)`` and the earlier stage ``m`` with the largest ``c_m``
    (so that the extrapolation is over the widest base available).
    """

    gamma: float
    a: np.ndarray
    c: np.ndarray = dataclasses.field(init=False)
    b: np.ndarray = dataclasses.field(init=False)
    bhat: np.ndarray = dataclasses.field(init=False)
    predictor: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self):
        a = np.asarray(self.a, dtype=np.float64)
        object.__setattr__(self, "a", a)
        s = a.shape[0]
        if a.shape != (s, s) or np.any(np.triu(a, 1) != 0) or np.any(a[0] != 0):
            raise ValueError("an ESDIRK tableau needs a lower-triangular `a` with an explicit first row")
        if not np.all(np.diag(a)[1:] == self.gamma):
            raise ValueError("an ESDIRK tableau needs a[i, i] = gamma for i >= 1")
        object.__setattr__(self, "c", a.sum(axis=1))
        object.__setattr__(self, "b", a[-1].copy())
        object.__setattr__(self, "bhat", a[-2].copy())
        if abs(self.c[-1] - 1.0) > 1e-13 or abs(self.bhat.sum() - 1.0) > 1e-13:
            raise ValueError("the last two rows of `a` must sum to one (stiffly accurate pair)")
        object.__setattr__(self, "predictor", _hermite_predictor(a, self.c))

    #: Not first-same-as-last in the loop's sense (the loop asks).
    fsal: ClassVar[bool] = False

    @property
    def num_stages(self) -> int:
        return self.a.shape[0]


def _hermite_predictor(a, c):
    s = a.shape[0]
    p = np.zeros((s, s))
    for i in range(1, s):
        earlier = [j for j in range(1, i) if c[j] > 0]
        if not earlier:
            p[i, 0] = c[i]  # linear: Z ~ c_i dt k_1
            continue
        m = max(earlier, key=lambda j: c[j])
        th = c[i] / c[m]
        h10, h11, h01 = th - 2 * th**2 + th**3, th**3 - th**2, 3 * th**2 - 2 * th**3
        # Z(theta) = c_m dt (h10 k_1 + h11 k_m) + h01 (Y_m - y0), Y_m - y0 = dt a_m . k
        p[i] = h01 * a[m]
        p[i, 0] += c[m] * h10
        p[i, m] += c[m] * h11
    return p


def stability_at_infinity(a, row: int = -1) -> float:
    """``R(inf)`` of the stage ``row`` of an ESDIRK tableau (the solution of a
    stiffly accurate method is its last stage, the embedded one here the
    second-to-last). For ``y' = lambda y`` and ``z = dt lambda -> inf`` the
    implicit stages ``Y = (I - z A~)^-1 (1 + z alpha)`` tend to ``-A~^-1 alpha``,
    with ``A~`` the implicit block of ``a`` and ``alpha`` its first column."""
    a = np.asarray(a, dtype=np.float64)
    limit = -np.linalg.solve(a[1:, 1:], a[1:, 0])
    return float(limit[row if row < 0 else row - 1])


def _kvaerno3() -> ESDIRKTableau:
    # Kværnø (2004), the 3(2) pair with four stages; gamma is the root of
    # 6 g^3 - 18 g^2 + 9 g - 1 = 0 near 0.4358665215 (L-stability) and the other
    # coefficients are the closed forms in gamma.
    roots = np.roots([6.0, -18.0, 9.0, -1.0])
    g = float(min(roots.real[np.abs(roots.real - 0.4358665215) < 1e-6]))
    a31 = (-4 * g**2 + 6 * g - 1) / (4 * g)
    a32 = (-2 * g + 1) / (4 * g)
    a41 = (6 * g - 1) / (12 * g)
    a42 = -1 / ((24 * g - 12) * g)
    a43 = (-6 * g**2 + 6 * g - 1) / (6 * g - 3)
    a = [[0, 0, 0, 0], [g, g, 0, 0], [a31, a32, g, 0], [a41, a42, a43, g]]
    return ESDIRKTableau(gamma=g, a=a)


def _kvaerno4() -> ESDIRKTableau:
    # Kværnø (2004), the 4(3) pair with five stages, in the closed forms of the
    # paper in gamma ~ 0.5728160625, the value for which the fourth-order
    # solution (the last stage) is L-stable; the 10 digits printed leave
    # R(inf) ~ 1e-5, so gamma is refined here by a secant iteration on R(inf).
    def rows(g):
        def poly(*coeffs):
            return np.polyval(coeffs, g)

        a31 = poly(144, -180, 81, -15, 1) * g / poly(12, -6, 1) ** 2
        a32 = poly(-36, 39, -15, 2) * g / poly(12, -6, 1) ** 2
        a41 = poly(-144, 396, -330, 117, -18, 1) / (12 * g**2 * poly(12, -9, 2))
        a42 = poly(72, -126, 69, -15, 1) / (12 * g**2 * poly(3, -1))
        a43 = (poly(-6, 6, -1) * poly(12, -6, 1) ** 2) / (12 * g**2 * poly(12, -9, 2) * poly(3, -1))
        a51 = poly(288, -312, 120, -18, 1) / (48 * g**2 * poly(12, -9, 2))
        a52 = poly(24, -12, 1) / (48 * g**2 * poly(3, -1))
        a53 = -(poly(12, -6, 1) ** 3) / (48 * g**2 * poly(3, -1) * poly(12, -9, 2) * poly(6, -6, 1))
        a54 = poly(-24, 36, -12, 1) / poly(24, -24, 4)
        return np.array([[0, 0, 0, 0, 0], [g, g, 0, 0, 0], [a31, a32, g, 0, 0], [a41, a42, a43, g, 0],
                         [a51, a52, a53, a54, g]])

    g0, g1 = 0.5728160625, 0.5728160626
    r0, r1 = stability_at_infinity(rows(g0)), stability_at_infinity(rows(g1))
    for _ in range(20):
        if r1 == r0 or abs(r1) < 1e-15:
            break
        g0, g1 = g1, g1 - r1 * (g1 - g0) / (r1 - r0)
        r0, r1 = r1, stability_at_infinity(rows(g1))
    return ESDIRKTableau(gamma=g1, a=rows(g1))


def _kvaerno5() -> ESDIRKTableau:
    # Kværnø (2004), the 5(4) pair with seven stages, gamma = 0.26 (coefficients
    # to 17 digits).
    g = 0.26
    a = [
        [0, 0, 0, 0, 0, 0, 0],
        [g, g, 0, 0, 0, 0, 0],
        [0.13, 0.84033320996790809, g, 0, 0, 0, 0],
        [0.22371961478320505, 0.47675532319799699, -0.06470895363112615, g, 0, 0, 0],
        [0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998, g, 0, 0],
        [0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676, g, 0],
        [0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403,
         0.06962479448202728, g],
    ]
    return ESDIRKTableau(gamma=g, a=a)


KVAERNO3 = _kvaerno3()
KVAERNO4 = _kvaerno4()
KVAERNO5 = _kvaerno5()


def _num_quadrature(problem, y0) -> int:
    """Size of the trailing pure-quadrature block of the state, declared by the
    term (``quadrature_last = True``: ``y0`` is a tuple whose last element is
    such a block), else 0."""
    if getattr(getattr(problem, "term", None), "quadrature_last", False) and isinstance(y0, tuple):
        return int(ravel_pytree(y0[-1])[0].shape[0])
    return 0


def _or(value, default):
    return default if value is None else value


def _rms(x):
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _fixed_steps(problem) -> bool:
    """Whether the loop takes fixed steps (``solve(..., adaptive=False)``),
    where a failed step ends the solve instead of being retried shorter
    (``problem.adaptive``; a caller's problem without it: adaptive)."""
    return not bool(getattr(problem, "adaptive", True))


class ESDIRK(AbstractSolver):
    """An ESDIRK method given by ``tableau`` (see the module docstring).

    Args:
        linear_solver: ``"lu"`` (dense Jacobian, LU factorised once per step)
            or ``"gmres"`` (matrix-free: Jacobian--vector products and
            `jax.scipy.sparse.linalg.gmres`, for large states).
        kappa: Newton stops when its predicted remaining error is below
            ``kappa`` in the tolerance-scaled norm (Hairer & Wanner use
            0.01--0.1; 0.05 left the Newton error visible at the save times of
            HIRES and ROBER, 6e-4 relative at rtol 1e-7, against 3e-5 with 0.01).
        max_newton_iters: iteration limit per stage (per Jacobian: a stage that
            fails with a kept Jacobian is solved again with a fresh one);
            reaching it fails the step.
        fixed_newton_iters: the limit with fixed steps (``adaptive=False``),
            where the stages are solved to round-off and a failed step ends the
            solve (at least ``max_newton_iters``).
        reuse_theta: keep the Jacobian for the next step when every stage of
            an accepted step converged with rate below this (``0`` refreshes
            it every step).
        gmres_tol, gmres_restart: settings of the matrix-free linear solves.
        filter_error: filter the error estimate through ``(I - gamma dt J)^-1``
            (see the module docstring).
    """

    linear_solver: str = eqx.field(static=True, default="lu")
    kappa: float = eqx.field(static=True, default=0.01)
    max_newton_iters: int = eqx.field(static=True, default=8)
    fixed_newton_iters: int = eqx.field(static=True, default=20)
    reuse_theta: float = eqx.field(static=True, default=0.1)
    gmres_tol: float = eqx.field(static=True, default=1e-8)
    gmres_restart: int = eqx.field(static=True, default=20)
    filter_error: bool = eqx.field(static=True, default=True)

    tableau: ClassVar[ESDIRKTableau]
    adaptive = True
    interp_degree = 3
    stat_names = ("num_jacobians", "num_newton_iters")

    def __check_init__(self):
        if self.linear_solver not in ("lu", "gmres"):
            raise ValueError(
                f"`linear_solver` must be 'lu' or 'gmres'; got {self.linear_solver!r}."
            )
        if not (self.max_newton_iters >= 1 and self.fixed_newton_iters >= 1 and self.kappa > 0):
            raise ValueError(
                f"`max_newton_iters` must be >= 1 and `kappa` > 0; got {self.max_newton_iters} and {self.kappa}."
            )

    def init(self, problem, t0, y0):
        flat, _ = ravel_pytree(y0)
        n = flat.shape[0] - _num_quadrature(problem, y0) if self.linear_solver == "lu" else 0
        jac = jnp.zeros((n, n), flat.dtype)
        # (Jacobian, refresh it before the next step?)
        return jac, jnp.asarray(True)

    def step(self, problem, t0, dt, y0, state):
        tab = self.tableau
        s = tab.num_stages
        y0f, unravel = ravel_pytree(y0)
        dtype = y0f.dtype
        n = y0f.shape[0]
        # A trailing pure-quadrature block (its derivative does not depend on
        # it, and nothing depends on it: the dL/dtheta channel of an adjoint
        # system) needs no Newton matrix: its stage equation is explicit given the
        # others, so Newton runs on the first ``nd`` components only and the
        # quadrature block is updated with identity (one iteration behind).
        nd = n - _num_quadrature(problem, y0)
        h = dt.astype(dtype)
        gamma = tab.gamma
        use_lu = self.linear_solver == "lu"
        # Fixed steps (``adaptive=False``): a failed step cannot be retried with
        # a shorter one, so Newton iterates further (see the module docstring).
        fixed = _fixed_steps(problem)

        def f(t, y):
            return ravel_pytree(problem.vf(t, unravel(y)))[0]

        jac_old, refresh = state
        # The solve's tolerances (`Problem` carries them; 1e-6 if a caller's does not).
        rtol = jnp.asarray(_or(getattr(problem, "rtol", None), 1e-6), dtype)
        atol = jnp.asarray(_or(getattr(problem, "atol", None), 1e-6), dtype)
        y0_const = lax.stop_gradient(y0f)
        scale = (atol + rtol * jnp.abs(y0_const))[:nd]
        t0c = lax.stop_gradient(t0)
        hc = lax.stop_gradient(h)

        k1 = f(t0, y0f)
        # The Newton matrix is a fixed approximation: no derivative flows through it.
        def f_dyn(y_dyn):
            return f(t0c, jnp.concatenate([y_dyn, y0_const[nd:]]))[:nd]

        eye = jnp.eye(nd, dtype=dtype)

        def fresh_jacobian():
            return lax.stop_gradient(jax.jacfwd(f_dyn)(y0_const[:nd]).astype(dtype))

        def factor(jac_):
            lu_, perm_ = _lu_factor(eye - (gamma * hc) * jac_)
            # (The pivots travel as floats: they are aux outputs of
            # `custom_root`, which attaches float tangents to them.)
            return lax.stop_gradient(lu_), lax.stop_gradient(perm_.astype(dtype))

        jac = lax.stop_gradient(jac_old)
        if use_lu:
            # Factorised by the first implicit stage's Newton iteration (after
            # refreshing J if ``refresh``): the code that builds the Newton
            # matrix is then traced once, for that and for a refresh after a
            # failure (see `stage`).
            lu, perm = jnp.zeros((nd, nd), dtype), jnp.zeros((nd,), dtype)
        else:
            # Matrix-free: the linearisation is taken at (t0, y0) in every step.
            lu, perm = jnp.zeros((0, 0), dtype), jnp.zeros((0,), dtype)
            _, jvp0 = jax.linearize(f_dyn, y0_const[:nd])

        def newton_solve(lu_, perm_, rhs):
            if use_lu:
                x = _lu_solve((lu_, perm_.astype(jnp.int32)), rhs[:nd])
            else:
                op = lambda v: v - (gamma * hc) * jvp0(v)  # noqa: E731
                x = jssl.gmres(op, rhs[:nd], tol=self.gmres_tol, restart=self.gmres_restart)[0]
            if nd == n:
                return x
            return jnp.concatenate([x, rhs[nd:]])

        kappa = self.kappa
        kmax = max(self.max_newton_iters, self.fixed_newton_iters) if fixed else self.max_newton_iters
        eps = float(jnp.finfo(dtype).eps)
        tiny_ = float(jnp.finfo(dtype).tiny)

        def tangent_solve(g, rhs):
            # Implicit function theorem: solve g(x) = rhs with g the exact
            # linearisation of the stage residual at the converged stage.
            if use_lu:
                mat = jax.jacfwd(g)(rhs)
                return _lu_solve(_lu_factor(mat), rhs)
            return jssl.gmres(g, rhs, tol=1e-12, restart=self.gmres_restart)[0]

        a_mat = jnp.asarray(tab.a, dtype)
        pred = jnp.asarray(tab.predictor, dtype)
        c = jnp.asarray(tab.c, dtype)

        def stage(carry, i):
            ks, ok, iters, theta_max, lu_c, perm_c, jac_c, fresh_c, njac = carry
            first = i == 1
            base = h * (a_mat[i] @ ks)
            z_pred = h * (pred[i] @ ks)
            t_i = t0 + c[i] * h

            def residual(z):
                return z - (gamma * h) * f(t_i, y0f + z) - base

            def solve(res_fn, z_init):
                # Simplified Newton from ``z_init``. A failure with a Jacobian
                # kept from an earlier step does not fail the stage: the
                # Jacobian is refreshed (at (t0, y0)) and the stage solved again
                # from its predictor, in this attempt (Hairer & Wanner II, IV.8).
                def cond(st):
                    k_att, stop, fail, pending = st[1], st[5], st[6], st[12]
                    return ~stop & ~fail & ((k_att < kmax) | pending)

                def body(st):
                    k, k_att, z, ndz_prev, met, _, _, th_max, lu_, perm_, jac_, fresh, pending, nref = st
                    if use_lu:
                        # ``pending``: (re)build the Newton matrix before this
                        # iteration, with a fresh J if ``want_jac``: in the first
                        # stage (J fresh if the state asks for it) and after a
                        # failure with a kept J. (`unvmap_any`: under `vmap` a
                        # real branch, taken only when some lane needs it; the
                        # others keep their values.)
                        want_jac = pending & ((k > 0) | refresh)

                        def rebuild():
                            jac_n = lax.cond(eqxi.unvmap_any(want_jac), fresh_jacobian, lambda: jac_)
                            jac_n = jnp.where(want_jac, jac_n, jac_)
                            lu_n, perm_n = factor(jac_n)
                            return tuple(jnp.where(pending, new, old) for new, old in
                                         ((lu_n, lu_), (perm_n, perm_), (jac_n, jac_)))

                        lu_, perm_, jac_ = lax.cond(eqxi.unvmap_any(pending), rebuild,
                                                    lambda: (lu_, perm_, jac_))
                        # (A no-op before the first iteration.)
                        z = jnp.where(pending, z_init, z)
                        k_att = jnp.where(pending, 0, k_att)
                        ndz_prev = jnp.where(pending, 1.0, ndz_prev).astype(dtype)
                        met = met & ~pending
                        th_max = jnp.where(pending, 0.0, th_max).astype(dtype)
                        fresh = fresh | want_jac
                        nref = nref + want_jac.astype(nref.dtype)
                    dz = -newton_solve(lu_, perm_, res_fn(z))
                    z = z + dz
                    ndz = _rms(dz[:nd] / scale)
                    theta = jnp.where(k_att > 0, ndz / jnp.maximum(ndz_prev, tiny_), 0.0)
                    eta_ = theta / jnp.maximum(1 - theta, tiny_)
                    # At least two iterations, so that the rate is measured: Hairer &
                    # Wanner's guess for the first one (the previous stage's rate)
                    # accepted stages far from converged on ROBER (3220 steps, 2666
                    # rejected, 3e-3 error with Kvaerno5 at rtol 1e-6, against 135,
                    # 34 and 3e-8 with this rule).
                    # Two successive corrections both far below the tolerance: the
                    # iteration is at round-off level, where the rate is noise (on
                    # ROBER at t ~ 1e8 a "diverging" 3e-4 -> 4e-4 otherwise failed
                    # most steps of Kvaerno5).
                    tiny = (ndz <= 0.1 * kappa) & (ndz_prev <= 0.1 * kappa)
                    crit = ((k_att > 0) & ((eta_ * ndz <= kappa) | tiny)) | (ndz == 0)
                    # Predicted not to meet the tolerance within the iteration limit.
                    slow = (k_att > 0) & (theta ** (kmax - 1 - k_att) / jnp.maximum(1 - theta, tiny_) * ndz > kappa)
                    diverging = (k_att > 0) & (theta >= 1.0)
                    finite = jnp.isfinite(ndz)
                    if not fixed:
                        met = stop = crit
                        fail = ~crit & (diverging | slow | ~finite)
                        th_max = jnp.maximum(th_max, theta)
                    else:
                        # The tolerance test decides success, but the stage goes on
                        # while the corrections contract, down to round-off: the
                        # Newton error must stay below the truncation error of the
                        # step whatever dt is, while the tolerance only bounds it.
                        # ``rho``: round-off of the stage value in the scaled norm.
                        rho = _rms(8 * eps * (jnp.abs(y0_const) + jnp.abs(y0_const + z))[:nd] / scale)
                        at_roundoff = (ndz <= rho) | ((k_att > 0) & (eta_ * ndz <= rho))
                        stalled = (k_att > 0) & (theta >= 0.5)
                        # The rate of the iterations that count (not of those at
                        # round-off, where it is noise): it decides Jacobian reuse.
                        th_max = jnp.where(met, th_max, jnp.maximum(th_max, theta))
                        met_now = met | crit
                        stop = met_now & (at_roundoff | stalled)
                        # Before the tolerance is met: fail as in adaptive mode (with
                        # the longer limit); after it, a growing correction ends
                        # the iteration and fails the stage only if it is not small.
                        fail = ~finite | (~met_now & (diverging | slow)) | (met & diverging & (ndz > kappa))
                        met = met_now
                    k_att = k_att + 1
                    fail = fail | ((k_att >= kmax) & ~met)
                    pending = fail & ~fresh if use_lu else jnp.asarray(False)
                    fail = fail & ~pending
                    return k + 1, k_att, z, ndz, met, stop, fail, th_max, lu_, perm_, jac_, fresh, pending, nref

                false = jnp.asarray(False)
                zero = jnp.asarray(0)
                init = (zero, zero, z_init, jnp.asarray(1.0, dtype), false, false, ~ok, jnp.asarray(0.0, dtype),
                        lu_c, perm_c, jac_c, fresh_c, first & ok & use_lu, zero)
                k, _, z, _, met, _, fail, th_max, lu_n, perm_n, jac_n, _, _, nref = lax.while_loop(cond, body, init)
                done = met & ~fail
                # An unconverged stage fails the step; return a finite point so that
                # the (discarded) derivative of the rejected step stays finite.
                z = jnp.where(done, z, z_init)
                # (custom_root attaches tangents to the aux outputs: keep them float.)
                flags = jnp.stack([done.astype(dtype), k.astype(dtype), th_max, nref.astype(dtype)])
                return z, (flags, lu_n, perm_n, jac_n)

            z, aux = lax.custom_root(residual, lax.stop_gradient(z_pred), solve, tangent_solve, has_aux=True)
            flags, lu_n, perm_n, jac_n = lax.stop_gradient(aux)
            done, k, th_max, refreshed = flags[0] > 0.5, flags[1].astype(jnp.int32), flags[2], flags[3] > 0.5
            k_i = (z - base) / (gamma * h)
            ks = lax.dynamic_update_index_in_dim(ks, k_i, i, 0)  # (not a scatter: see _SMALL_LU)
            # After a refresh the rate of the failed iteration no longer counts.
            theta_max = jnp.where(refreshed, th_max, jnp.maximum(theta_max, th_max))
            carry = (ks, ok & done, iters + k, theta_max, lu_n, perm_n, jac_n, fresh_c | refreshed,
                     njac + flags[3].astype(jnp.int32))
            return carry, z

        ks0 = lax.dynamic_update_index_in_dim(jnp.zeros((s, n), dtype), k1, 0, 0)
        # (``fresh``: whether J is fresh; the first stage makes it so if ``refresh``.)
        fresh0 = jnp.asarray(False) if use_lu else jnp.asarray(True)
        njac0 = jnp.asarray(0, jnp.int32) if use_lu else refresh.astype(jnp.int32)
        carry0 = (ks0, jnp.asarray(True), jnp.asarray(0), jnp.asarray(0.0, dtype), lu, perm, jac, fresh0, njac0)
        (ks, ok, iters, theta_max, lu, perm, jac, _, njac), zs = lax.scan(stage, carry0, jnp.arange(1, s))
        y1f = y0f + zs[-1]
        err_raw = lax.stop_gradient(h * (jnp.asarray(tab.b - tab.bhat, dtype) @ ks))
        y_err = newton_solve(lu, perm, err_raw) if self.filter_error else err_raw
        # Cubic Hermite through (y0, k_1) and (y1, k_s).
        k_end = ks[-1]
        dy = y1f - y0f
        coeffs_f = jnp.stack([h * k1, 3 * dy - h * (2 * k1 + k_end), -2 * dy + h * (k1 + k_end)])

        ok = ok & jnp.all(jnp.isfinite(y1f))
        # Keep J for the next step only while Newton converged fast with it.
        new_state = (jac, theta_max > self.reuse_theta)
        if use_lu:
            # A failed attempt had a fresh J (a reused one is refreshed within
            # the attempt): the step is halved and keeps that J (still at y0).
            reject_state = (jac, jnp.asarray(False))
            fail_factor = jnp.asarray(0.5)
        else:
            reject_state = (jac, ~refresh)
            fail_factor = jnp.where(refresh, 0.5, 1.0)
        stats = (njac, iters.astype(jnp.int32))
        info = StepInfo(nfev=(1 + iters).astype(jnp.int32), ok=ok, stats=stats, fail_factor=fail_factor,
                        reject_state=reject_state)
        coeffs = jax.vmap(unravel)(coeffs_f) if problem.dense_output else None
        return unravel(y1f), unravel(y_err), coeffs, new_state, info


class Kvaerno3(ESDIRK):
    """Kværnø's ESDIRK 3(2): four stages (three implicit), L-stable, stiffly
    accurate, with an embedded second-order solution; cubic Hermite dense output.
    Reference: Kværnø (2004), BIT Numer. Math. 44(3):489-502."""

    tableau = KVAERNO3
    order = 3
    error_order = 3


class Kvaerno4(ESDIRK):
    """Kværnø's ESDIRK 4(3): five stages (four implicit), L-stable, stiffly
    accurate, with an embedded third-order solution; cubic Hermite dense output.
    Reference: Kværnø (2004), BIT Numer. Math. 44(3):489-502."""

    tableau = KVAERNO4
    order = 4
    error_order = 4


class Kvaerno5(ESDIRK):
    """Kværnø's ESDIRK 5(4): seven stages (six implicit), L-stable, stiffly
    accurate, with an embedded fourth-order solution; cubic Hermite dense output.
    Reference: Kværnø (2004), BIT Numer. Math. 44(3):489-502."""

    tableau = KVAERNO5
    order = 5
    error_order = 5


# Up to this size the LU factorisation is written out in array operations
# instead of calling LAPACK: the solver's loop then has no library call in it,
# and on XLA:CPU compiles as one kernel (`neuralde._single_kernel`), which for
# a small stiff system (ROBER, Van der Pol) is most of a step's cost.
_SMALL_LU = 8


def _lu_factor(a):
    """``(lu, pivots)`` of the square matrix ``a``: LAPACK's ``getrf`` through
    `jax.scipy.linalg.lu_factor`, or for ``n <= _SMALL_LU`` the same algorithm
    unrolled (Gaussian elimination with partial pivoting, Golub & Van Loan,
    Matrix Computations, 4th ed., Alg. 3.4.1: the row of largest magnitude in
    the column is the pivot, the first one on ties, as ``getrf`` chooses), with
    the row permutation instead of LAPACK's swap sequence."""
    n = a.shape[0]
    if n > _SMALL_LU:
        return jsl.lu_factor(a)
    idx = jnp.arange(n)
    perm = idx
    for k in range(n):
        pivot = jnp.argmax(jnp.where(idx >= k, jnp.abs(a[:, k]), -jnp.inf))
        row_k, row_p = a[k], lax.dynamic_index_in_dim(a, pivot, 0, keepdims=False)
        a = jnp.where((idx == k)[:, None], row_p[None, :], jnp.where((idx == pivot)[:, None], row_k[None, :], a))
        perm_k, perm_p = perm[k], lax.dynamic_index_in_dim(perm, pivot, 0, keepdims=False)
        perm = jnp.where(idx == k, perm_p, jnp.where(idx == pivot, perm_k, perm))
        below = idx > k
        multipliers = jnp.where(below, a[:, k] / a[k, k], 0)
        a = a - multipliers[:, None] * jnp.where(below, a[k], 0)[None, :]
        a = jnp.where(below[:, None] & (idx == k)[None, :], multipliers[:, None], a)
    return a, perm


def _lu_solve(lu_and_perm, b):
    """Solve ``a x = b`` from `_lu_factor`'s result."""
    lu, perm = lu_and_perm
    n = lu.shape[0]
    if n > _SMALL_LU:
        return jsl.lu_solve((lu, perm), b)
    idx = jnp.arange(n)
    b = jnp.sum(jnp.where(perm[:, None] == idx[None, :], b[None, :], 0), axis=1)  # b[perm]
    y = b  # forward substitution, unit lower triangle
    for i in range(1, n):
        y = jnp.where(idx == i, b[i] - jnp.sum(jnp.where(idx < i, lu[i] * y, 0)), y)
    x = y  # back substitution
    for i in range(n - 1, -1, -1):
        x = jnp.where(idx == i, (y[i] - jnp.sum(jnp.where(idx > i, lu[i] * x, 0))) / lu[i, i], x)
    return x
