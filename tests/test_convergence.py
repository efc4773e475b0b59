"""Observed convergence orders of every solver with fixed steps.

The problem is DETEST B5 (Euler's equations of a rigid body; Hull et al. 1972):
non-linear, with the exact solution (sn, cn, dn)(t | m = 0.51), solved over
[0, 20] with ``adaptive=False`` and ``dt0 = 20/n``. It was chosen because the
fifth-order pairs reach their asymptotic rate (5.0-5.1) there while the error is
still far above round-off; on simpler problems (y' = -y + sin t, a limit cycle)
Tsit5's leading error term is so small that the observed rate is 5.5-6 until
round-off takes over.

Checks, with slopes fitted by least squares to log(error) against log(dt):

* global order: error at t = 20 ~ dt^p, the method's order p, within 0.2;
* dense output, globally: max error of `Solution.evaluate` at 64 times strictly
  inside steps ~ dt^min(p, q + 1) (q: the interpolant's order, so its local error
  is O(dt^(q+1)), and the error of the step's starting value is O(dt^p)); the
  slope must be at least that minus 0.2 (for Tsit5/Dopri5, >= 4.8, stronger
  than the required >= 3.8);
* the interpolant's local order: one step of size h from the exact state, max
  error of `evaluate` at 64 interior points ~ h^(q + 1), within 0.2.

For speed each solver's solve is one `jax.jit` function of (y0, t, dt0, query
times), compiled once (dt0 is a traced argument, `max_steps` one static value).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralde as nde

from problems import B5

T_END = 20.0
MAX_STEPS = 16384
NUM_QUERY = 64


def _geometric(n0, count):
    return tuple(int(round(n0 * 2.0 ** (k / 2))) for k in range(count))


# name: (solver, order p, interpolant order q, numbers of steps n for dt = 20/n)
SOLVERS = {
    "Euler": (nde.Euler(), 1, 1, _geometric(2048, 5)),
    "Heun": (nde.Heun(), 2, 2, _geometric(256, 7)),
    "RK4": (nde.RK4(), 4, 3, _geometric(128, 7)),
    "Dopri5": (nde.Dopri5(), 5, 4, _geometric(128, 7)),
    "Tsit5": (nde.Tsit5(), 5, 4, _geometric(128, 7)),
}
# Single-step sizes for the local interpolation order.
LOCAL_STEPS = tuple(2.0 ** -(3.5 + 0.5 * k) for k in range(5))
LOCAL_T0 = 1.0


@functools.lru_cache(maxsize=None)
def compiled_solve(name):
    solver = SOLVERS[name][0]

    @jax.jit
    def run(y0, t, dt0, query):
        sol = nde.solve(
            nde.ODETerm(B5.f), solver, y0, t, dt0=dt0, adaptive=False, max_steps=MAX_STEPS, dense=True
        )
        return sol.ys[-1], sol.stats["num_steps"], sol.evaluate(query), sol.status

    return run


def _fmt(values):
    return "[" + " ".join(f"{v:.2e}" for v in values) + "]"


def fitted_slope(dts, errors) -> float:
    return float(np.polyfit(np.log(dts), np.log(errors), 1)[0])


@functools.lru_cache(maxsize=None)
def global_sweep(name):
    """(dts, end-point errors, dense-output errors) of the sweep over [0, 20]."""
    run = compiled_solve(name)
    ns = SOLVERS[name][3]
    y0 = jnp.asarray(B5.y0)
    t = jnp.array([0.0, T_END])
    y_end_exact = B5.exact(np.array([T_END]))[0]
    dts, end_errors, dense_errors = [], [], []
    for n in ns:
        dt = T_END / n
        # Query times strictly inside steps spread over the whole interval.
        step = np.floor(np.arange(NUM_QUERY) * n / NUM_QUERY)
        theta = np.array([0.2, 0.45, 0.7, 0.9])[np.arange(NUM_QUERY) % 4]
        query = (step + theta) * dt
        y_end, num_steps, y_query, status = run(y0, t, jnp.asarray(dt), jnp.asarray(query))
        assert int(status) == 0
        assert int(num_steps) == n, f"{name}: {int(num_steps)} fixed steps of 20/{n}, expected {n}"
        dts.append(dt)
        end_errors.append(np.max(np.abs(np.asarray(y_end) - y_end_exact)))
        dense_errors.append(np.max(np.abs(np.asarray(y_query) - B5.exact(query))))
    return np.array(dts), np.array(end_errors), np.array(dense_errors)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_global_order(name):
    order = SOLVERS[name][1]
    dts, errors, _ = global_sweep(name)
    slope = fitted_slope(dts, errors)
    print(f"{name}: end errors {_fmt(errors)} slope {slope:.3f}")
    # The range is in the asymptotic regime and well above round-off.
    assert np.all(np.diff(errors) < 0)
    assert errors.min() > 1e-12
    assert abs(slope - order) <= 0.2


@pytest.mark.parametrize("name", list(SOLVERS))
def test_dense_output_global_order(name):
    order, interp_order = SOLVERS[name][1:3]
    dts, _, errors = global_sweep(name)
    slope = fitted_slope(dts, errors)
    expected = min(order, interp_order + 1)
    print(f"{name}: dense errors {_fmt(errors)} slope {slope:.3f} (expected {expected})")
    assert np.all(np.diff(errors) < 0)
    assert slope >= expected - 0.2
    if name in ("Tsit5", "Dopri5"):
        assert slope >= 3.8


@pytest.mark.parametrize("name", list(SOLVERS))
def test_interpolant_local_order(name):
    """One step of size h from the exact state at t = 1: the interpolant's error
    inside the step is O(h^(q+1))."""
    interp_order = SOLVERS[name][2]
    run = compiled_solve(name)
    y0 = jnp.asarray(B5.exact(np.array([LOCAL_T0]))[0])
    theta = np.linspace(0.05, 0.95, NUM_QUERY)
    errors = []
    for h in LOCAL_STEPS:
        query = LOCAL_T0 + theta * h
        _, num_steps, y_query, status = run(y0, jnp.array([LOCAL_T0, LOCAL_T0 + h]), jnp.asarray(h), jnp.asarray(query))
        assert int(status) == 0
        assert int(num_steps) == 1
        errors.append(np.max(np.abs(np.asarray(y_query) - B5.exact(query))))
    errors = np.array(errors)
    slope = fitted_slope(np.array(LOCAL_STEPS), errors)
    print(f"{name}: local interpolation errors {_fmt(errors)} slope {slope:.3f}")
    assert errors.min() > 1e-13
    assert abs(slope - (interp_order + 1)) <= 0.2
