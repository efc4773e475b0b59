"""Delay differential equations with constant lags: the method of steps.

`MethodOfSteps(solver)` wraps any one-step solver whose step evaluates the
vector field through ``problem.vf(t, y)``. The wrapper hands the solver a
`_DelayProblem` whose ``vf`` calls the user's ``f(t, y, h, args)`` with ``h``
bound to the solution's past:

* ``s <= t0``: the user's ``history(s, args)``;
* ``t0 < s <= t_n`` (the start of the current step): the dense-output
  polynomials of the accepted steps, kept in a buffer of the last
  ``max_history`` steps in the solver state (oldest first, unused slots
  at the most negative float); a step is found by counting the step ends below ``s`` (a
  vectorised binary search);
* ``s > t_n`` (only when the step is longer than the smallest lag): the
  current step's own interpolant, found by fixed-point iteration -- the step
  is first taken with the previous step's polynomial extrapolated, then
  retaken with its own interpolant until two successive solutions agree to a
  fraction of the tolerance; a step that does not converge is rejected and
  retried shorter (Bellen & Zennaro, "Numerical Methods for Delay
  Differential Equations", OUP 2003, ch. 7; the same scheme as
  DelayDiffEq.jl, Widmann & Rackauckas 2022).

Discontinuities: a derivative jump at ``t0`` (the history's slope rarely
matches ``f`` there) reappears, one derivative higher each time, at ``t0``
plus every sum of lags. `MethodOfSteps.breakpoints` lists them up to sums of
``order + 1`` lags and the integration loop lands on them instead of stepping
over them (Bellen & Zennaro, ch. 4), which keeps the solver's order.

Only the last ``max_history`` accepted steps are kept: when a step that may
still be read (it ends after ``t - max(lags)``) would be dropped, the solve
stops with `Status.HISTORY_OVERFLOW` rather than read anything stale.
"""
from __future__ import annotations

import itertools
from typing import Any, Optional

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._controller import scaled_error
from .._interpolation import evaluate_polynomial
from .._solution import Status
from .base import AbstractSolver, StepInfo


class _Buffer(tuple):
    """(t_start, bt0, bt1, y0s, coeffs) -- a plain tuple so it is a pytree."""


def _UNUSED(dtype):
    # Start and end of an unused slot: below every time, and finite (the loop
    # checks that its carry is finite).
    return -jnp.finfo(dtype).max


def _tree_where(pred, a, b):
    return jtu.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def _lags(term):
    return [jnp.asarray(lag) for lag in term.lags]


class _DelayProblem:
    """What the wrapped solver sees: ``vf(s, y)`` calls ``f(s, y, h, args)``
    with ``h`` the solution's past (see the module docstring). ``current`` is
    ``(t_n, dt, y_n, coeffs)``, the polynomial used for times inside the step
    being taken."""

    def __init__(self, problem, history, current):
        self.problem = problem
        self.term = problem.term
        self.args = problem.args
        self.direction = problem.direction
        self.history_buffer = history
        self.current = current
        # The history is made of the steps' polynomials, whatever is saved.
        self.dense_output = True

    def __getattr__(self, name):  # rtol, atol and whatever later loops add
        return getattr(self.problem, name)

    def h(self, s, stage=None):
        t_start, bt0, bt1, y0s, coeffs = self.history_buffer
        t_n, dt, y_n, c_n = self.current
        s = jnp.asarray(s, bt1.dtype)
        # Past the start: the user's history (evaluated at min(s, t0) so that
        # an unused branch never sees a time it was not written for).
        v_hist = self.term.history(jnp.minimum(s, t_start), self.args)
        v_hist = jtu.tree_map(lambda v, y: jnp.asarray(v, y.dtype), v_hist, y_n)
        in_hist = s <= t_start
        near_solution = jnp.asarray(False)
        if stage is not None:
            # At t0 itself (to rounding) the side is the step's: a step that
            # starts at t0 + lag reads the solution there (y0, the limit from
            # the right), one that ends there the history. (Steps land on
            # t0 + lag, so none straddles it.) Reading history(t0) on the step
            # after made the solution's derivative in y0 -- and its value, when
            # y0 differs from history(t0) -- first order in that step's length.
            scale = jnp.maximum(jnp.abs(t_start), jnp.abs(stage))
            near = jnp.abs(s - t_start) <= 16 * jnp.finfo(bt1.dtype).eps * scale
            middle = s + (t_n + 0.5 * dt - stage)  # the time read from the step's midpoint
            in_hist = jnp.where(near, middle <= t_start, in_hist)
            near_solution = near & ~in_hist
            # (A time that rounding put just below t0 is read at t0.)
            s = jnp.where(near_solution, jnp.maximum(s, t_start), s)
        # Accepted steps: the first step whose end is >= s. A step ends where
        # the next one starts (the last where the current one starts): the
        # loop's step end, not ``t0 + dt`` as the step computed it, which can
        # differ by an ulp and leave a gap where a lookup found no step (NaN
        # in the attempt, and NaN reverse-mode gradients through it).
        width = bt1.shape[0]
        used = bt1 > bt0
        ends = jnp.concatenate([bt0[1:], jnp.asarray(t_n, bt0.dtype)[None]])
        # (The indices are in range by construction: a dynamic index read
        # traces no wrap-around of negative indices, which `x[idx]` does for
        # each lookup. `h` runs at every stage of every step, forward and
        # transposed: a lean `h` is a smaller program to compile.)
        at = lambda x, i: lax.dynamic_index_in_dim(x, i, keepdims=False)  # noqa: E731
        idx = jnp.minimum(jnp.sum(ends < s, dtype=jnp.int32), width - 1)
        # (The unused slot just before the first step "ends" at t0, where the
        # solution's side of t0 is read: the step after it holds t0.)
        idx = jnp.minimum(idx + (~at(used, idx)).astype(jnp.int32), width - 1)
        a, b = at(bt0, idx), at(ends, idx)
        found = at(used, idx) & (a <= s) & (s <= b) & (a < b)
        # Inside the current step: its own (or the predicted) polynomial.
        # (The solution's side of t0 on the first step -- a field that reads
        # h(t) at t0 -- has no stored step yet: the current one starts there.)
        in_buf = (s <= t_n) & ~(near_solution & (t_n <= t_start))
        # One polynomial is evaluated: the found step's or the current one's,
        # on a safe interval where neither applies (a 0/0, though never
        # selected, makes the gradients NaN through its zero cotangent; and
        # under `jax.vmap` the loop keeps attempting steps of length 0 once a
        # solve has finished, `cond` being `select`).
        lo = jnp.where(in_buf, jnp.where(found, a, s - 1), t_n)
        length = jnp.where(in_buf, jnp.where(found, b - a, 1), jnp.where(dt != 0, dt, 1))
        theta = jnp.where(in_buf | (dt != 0), (s - lo) / length, 0)
        val = evaluate_polynomial(
            _tree_where(in_buf, jtu.tree_map(lambda x: at(x, idx), y0s), y_n),
            _tree_where(in_buf, jtu.tree_map(lambda x: at(x, idx), coeffs), c_n),
            theta,
        )
        # A time before every kept step (a vector field that reads further back
        # than its largest lag) gives NaN, never a stale value.
        return jtu.tree_map(
            lambda x, v: jnp.where(in_hist, x, jnp.where(in_buf & ~found, jnp.nan, v)), v_hist, val
        )

    def vf(self, s, y):
        # Delay problems integrate forward in time (checked by `solve`).
        return self.term.vector_field(s, y, lambda q: self.h(q, stage=s), self.args)


#: Past steps kept by `MethodOfSteps(max_history=None)` (unless `solve` sizes
#: the buffer for fixed steps).
DEFAULT_HISTORY = 128


class MethodOfSteps(AbstractSolver):
    """Solve a `DDETerm` with constant lags using ``solver`` for the steps.

    Args:
        solver: any solver of this library whose steps evaluate the vector
            field through ``problem.vf`` (the explicit Runge--Kutta methods,
            and implicit ones that follow the same protocol); the order,
            adaptivity and dense output are its own.
        max_history: number of past steps kept for ``h(s)`` (the buffer is in
            the loop carry, so reverse-mode memory grows with it). It must
            cover the steps taken in any window of length ``max(lags)``;
            otherwise the solve stops with `Status.HISTORY_OVERFLOW`. ``None``
            (the default): 128, or with fixed steps of a known ``dt0`` as many
            as a window of the largest lag holds, if more (`solve` sizes it).
        max_fixed_point_iters: corrections per step when the step is longer
            than the smallest lag (see the module docstring).
        fixed_point_tol: convergence threshold of those corrections, as a
            fraction of the tolerance (the scaled change of the step's
            solution between two iterations).

    Reference: Bellen & Zennaro (2003), "Numerical Methods for Delay
    Differential Equations", Oxford University Press, chapters 3, 4 and 7.
    """

    solver: AbstractSolver
    max_history: Optional[int] = None
    max_fixed_point_iters: int = 10
    fixed_point_tol: float = 0.01

    term_kinds = ("DDETerm",)

    def __check_init__(self):
        if not isinstance(self.solver, AbstractSolver) or isinstance(self.solver, MethodOfSteps):
            raise TypeError(
                "MethodOfSteps(solver): `solver` must be an ODE solver instance such as Tsit5(); "
                f"got {self.solver!r}."
            )
        for name in ("max_history", "max_fixed_point_iters"):
            value = getattr(self, name)
            if value is None and name == "max_history":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"MethodOfSteps({name}=...): expected a positive integer; got {value!r}.")
        if not (isinstance(self.fixed_point_tol, (int, float)) and self.fixed_point_tol > 0):
            raise ValueError(f"MethodOfSteps(fixed_point_tol=...): expected a positive number; got "
                             f"{self.fixed_point_tol!r}.")

    # The method is the wrapped solver's.
    @property
    def order(self):
        return self.solver.order

    @property
    def error_order(self):
        return self.solver.error_order

    @property
    def pi_coefficients(self):
        return self.solver.pi_coefficients

    @property
    def adaptive(self):
        return self.solver.adaptive

    @property
    def interp_degree(self):
        return self.solver.interp_degree

    @property
    def stat_names(self):
        return tuple(self.solver.stat_names) + ("num_fixed_point_iters",)

    @property
    def init_fevals(self) -> int:
        return self.solver.init_fevals

    def breakpoints(self, problem, t0):
        """``t0`` plus every sum of at most ``order + 1`` lags, sorted: where
        the derivative jump at ``t0`` propagates (a static number of points;
        their values follow the lags, so they are differentiable)."""
        lags = _lags(problem.term)
        sums = []
        for k in range(1, self.order + 2):
            for combo in itertools.combinations_with_replacement(range(len(lags)), k):
                sums.append(sum(lags[i] for i in combo))
        return _sort_small(t0 + jnp.stack(sums).astype(jnp.result_type(t0)))

    def init(self, problem, t0, y0):
        width = DEFAULT_HISTORY if self.max_history is None else self.max_history
        dtype = jnp.result_type(t0)
        buffer = _Buffer((
            jnp.asarray(t0, dtype),
            jnp.full((width,), _UNUSED(dtype), dtype),
            jnp.full((width,), _UNUSED(dtype), dtype),
            jtu.tree_map(lambda y: jnp.zeros((width,) + y.shape, y.dtype), y0),
            jtu.tree_map(lambda y: jnp.zeros((width, self.interp_degree) + y.shape, y.dtype), y0),
        ))
        current = (jnp.asarray(t0, dtype), jnp.asarray(1, dtype), y0,
                   jtu.tree_map(lambda y: jnp.zeros((self.interp_degree,) + y.shape, y.dtype), y0))
        inner = self.solver.init(_DelayProblem(problem, buffer, current), t0, y0)
        return inner, tuple(buffer)

    def step(self, problem, t0, dt, y0, state):
        inner_state, buffer = state
        t_start, bt0, bt1, y0s, coeffs = buffer
        lags = _lags(problem.term)
        min_lag = lax.stop_gradient(jnp.min(jnp.stack(lags)))
        max_lag = lax.stop_gradient(jnp.max(jnp.stack(lags)))

        def attempt(current):
            out = self.solver.step(_DelayProblem(problem, buffer, current), t0, dt, y0, inner_state)
            y1, y_err, c1, new_state, info = out
            if not isinstance(info, StepInfo):
                info = StepInfo(nfev=info)
            return (y1, y_err, c1, new_state), info

        # A step that starts at t0 + lag: the first stage a FSAL method reuses
        # is the last step's, which read history(t0) at its end; this step
        # reads y0 there (see `_DelayProblem.h`), so the stage is recomputed.
        if inner_state is not None:
            tol = 16 * jnp.finfo(bt1.dtype).eps * jnp.maximum(jnp.abs(t0), jnp.abs(t_start))
            at_switch = jnp.any(jnp.abs(lax.stop_gradient(t0 - (t_start + jnp.stack(lags)))) <= tol)
            start = (t0, dt, y0, jtu.tree_map(lambda c: jnp.zeros_like(c[-1]), coeffs))
            inner_state = lax.cond(at_switch,
                                   lambda st: self.solver.init(_DelayProblem(problem, buffer, start), t0, y0),
                                   lambda st: st, inner_state)

        # Predictor for times inside the step: the last step's polynomial
        # extrapolated (the constant y0 on the first step).
        has_prev = bt1[-1] > bt0[-1]
        a_prev = jnp.where(has_prev, bt0[-1], t0 - dt)
        h_prev = jnp.where(has_prev, bt1[-1] - bt0[-1], jnp.where(dt != 0, dt, 1))  # no 0/0 (see `h`)
        c_last = jtu.tree_map(lambda c: c[-1], coeffs)
        c_prev = _tree_where(has_prev, c_last, jtu.tree_map(jnp.zeros_like, c_last))
        y_prev = _tree_where(has_prev, jtu.tree_map(lambda y: y[-1], y0s), y0)
        c_pred = _reexpand(y_prev, c_prev, a_prev, h_prev, t0, dt, y0)

        # One loop of attempts: the first with the predictor, then corrections
        # while the step reads inside itself (it is longer than the smallest
        # lag) and has not converged. One traced copy of the wrapped step serves
        # them all, in a `lax.while_loop`. Where the step is differentiated by
        # `jax.vjp` alone (`problem.vjp_steps`: `CheckpointAdjoint`'s backward
        # steps), the loop stores the attempts' inputs and its vjp walks back
        # through them (`stored_while_loop`): one copy of the step and of its
        # vjp. Where it may also be forward-differentiated (`ReverseMode`), the
        # loop must be made of scans: the first attempt is then peeled off (a
        # second copy), so that a step without corrections does not pay for the
        # skipped iterations of a scan, which store (and in reverse mode read)
        # their residuals.
        needs_fixed_point = lax.stop_gradient(dt) > min_lag
        n_iters = self.max_fixed_point_iters + 1

        def iteration(carry):
            k, out, reject, _, nfev, stats = carry
            first = k == 0
            new, info = attempt((t0, dt, y0, _tree_where(first, c_pred, out[2])))
            change = jtu.tree_map(lambda a, b: a - b, new[0], out[0])
            # A convergence test only: no derivative (sqrt at a zero change has none).
            err = scaled_error(lax.stop_gradient(change), y0, new[0], problem.rtol, problem.atol)
            done = jnp.where(first, ~needs_fixed_point, err <= self.fixed_point_tol)
            if info.ok is not None:  # an attempt that failed (Newton) ends the loop unconverged
                done = done & info.ok
            stats = tuple(s + jnp.asarray(d, jnp.int32) for s, d in zip(stats, info.stats)) or stats
            if info.reject_state is not None:  # the state to keep if the step is rejected: the first attempt's
                reject = _tree_where(first, info.reject_state, reject)
            return k + 1, new, reject, done, nfev + jnp.asarray(info.nfev, jnp.int32), stats

        def unfinished(carry):
            return ~carry[3] & (carry[0] < n_iters)

        int0 = jnp.asarray(0, jnp.int32)
        # Placeholders of the attempt's outputs, overwritten by the first.
        placeholder = jtu.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                   jax.eval_shape(lambda: attempt((t0, dt, y0, c_pred))[0]))
        init = (int0, placeholder, inner_state, jnp.asarray(False), int0,
                tuple(int0 for _ in self.solver.stat_names))
        if problem.reverse_steps and problem.vjp_steps:
            from .._loop import stored_while_loop  # (here: `_loop` imports the solvers' package)

            carry = stored_while_loop(unfinished, iteration, init, n_iters)
        elif problem.reverse_steps:
            from .._loop import bounded_while_loop

            carry = iteration(init)
            carry = lax.cond(unfinished(carry), lambda c: bounded_while_loop(unfinished, iteration, c, n_iters - 1),
                             lambda c: c, carry)
        else:
            carry = lax.while_loop(unfinished, iteration, init)
        # The last attempt's ``done`` is the step's ``ok`` (converged, and that
        # attempt's own check passed); ``attempts - 1`` corrections followed
        # the first attempt.
        attempts, (y1, y_err, c1, new_inner), reject_inner, ok, nfev, stats = carry
        iters = attempts - 1

        # Append the step; the oldest slot drops out. If that step may still be
        # read (it ends after t1 - max(lags)), the buffer is too short.
        t1 = t0 + dt
        overflow = bt1[0] > lax.stop_gradient(t1) - max_lag
        push = lambda b, x: jnp.concatenate([b[1:], jnp.asarray(x, b.dtype)[None]])  # noqa: E731
        new_buffer = (
            t_start, push(bt0, t0), push(bt1, t1),
            jtu.tree_map(push, y0s, y0), jtu.tree_map(push, coeffs, c1),
        )
        info = StepInfo(
            nfev=nfev,
            ok=ok,
            stats=tuple(stats) + (iters,),
            fail_factor=0.5,
            reject_state=(reject_inner, buffer),
            status=jnp.where(overflow, Status.HISTORY_OVERFLOW, Status.SUCCESS).astype(jnp.int32),
        )
        return y1, y_err, c1, (new_inner, new_buffer), info


def _sort_small(x):
    """``jnp.sort`` of a short vector by ranks: elementwise comparisons and sums
    instead of a `sort`, which would keep a loop that reads the breakpoints
    (`CheckpointAdjoint`'s backward steps) from compiling as one kernel
    (`_single_kernel`). Ties keep their order; differentiable like `sort`."""
    n = x.shape[0]
    i = jnp.arange(n)
    before = (x[None, :] < x[:, None]) | ((x[None, :] == x[:, None]) & (i[None, :] < i[:, None]))
    rank = jnp.sum(before, axis=1)
    return jnp.sum(jnp.where(rank[None, :] == i[:, None], x[None, :], 0), axis=1)


def _reexpand(y_prev, c_prev, a_prev, h_prev, t0, dt, y0):
    """Coefficients, on ``[t0, t0 + dt]`` and relative to ``y0``, of the
    polynomial ``y_prev + sum_j c_prev[j] ((t - a_prev) / h_prev)^(j+1)``
    (extrapolation of the previous step into the current one), found by
    sampling it at ``degree`` points."""
    degree = jtu.tree_leaves(c_prev)[0].shape[0]
    # Values at t0 + theta dt minus y0 for theta = 1/degree ... 1, then the
    # Vandermonde system, whose inverse is a constant (computed here in float64).
    thetas_np = np.arange(1, degree + 1) / degree
    inverse_np = np.linalg.inv(thetas_np[:, None] ** np.arange(1, degree + 1)[None, :])
    thetas = jnp.asarray(thetas_np, jnp.result_type(t0))

    def values(theta):
        return evaluate_polynomial(y_prev, c_prev, (t0 + theta * dt - a_prev) / h_prev)

    samples = jax.vmap(values)(thetas)

    def leaf(v, y):
        rhs = (v - y[None]).reshape(degree, -1)
        # (Written out as broadcast products, not a matrix product, which
        # would keep the loop from compiling as one kernel: `_single_kernel`.)
        inverse = jnp.asarray(inverse_np, rhs.dtype)
        sol = sum(inverse[:, j, None] * rhs[j] for j in range(degree))
        return sol.reshape((degree,) + y.shape)

    return jtu.tree_map(leaf, samples, y0)
