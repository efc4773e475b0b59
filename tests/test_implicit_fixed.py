"""Implicit solvers (Kvaerno3/4/5) with fixed steps (``adaptive=False``).

A fixed step cannot be retried with a shorter one, so the Newton iteration of
its stages must not give up where the adaptive loop would just halve the step:
a Jacobian kept from an earlier step is refreshed within the step, the
iteration limit is longer, and the stages are solved to round-off while the
corrections contract (the tolerance alone would leave a Newton error above the
truncation error at small steps, and the observed order would sag).

Problems: Lotka--Volterra (non-stiff, nonlinear) against scipy's DOP853 at
rtol 1e-12, and the oscillator y' = (1 + cos(t)/2) (y_2, -y_1) (smooth, with a
time-dependent Jacobian) for the orders and tight tolerances.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

import neuralde as nde

SOLVERS = [(nde.Kvaerno3(), 3), (nde.Kvaerno4(), 4), (nde.Kvaerno5(), 5)]
IDS = ["Kvaerno3", "Kvaerno4", "Kvaerno5"]


def lotka_volterra(xp, t, u):
    return xp.stack([1.5 * u[0] - u[0] * u[1], -3.0 * u[1] + u[0] * u[1]])


def oscillator(xp, t, y):
    return (1.0 + 0.5 * xp.cos(t)) * xp.stack([y[1], -y[0]])


# One term object per problem (and `t` of one length): every call of a solver
# on it reuses one compilation, whatever dt0 and the tolerances.
LV_TERM = nde.ODETerm(lambda t, y, a: lotka_volterra(jnp, t, y))
OSC_TERM = nde.ODETerm(lambda t, y, a: oscillator(jnp, t, y))
LV_Y0, LV_T1 = np.array([1.0, 1.0]), 10.0
OSC_Y0, OSC_T1 = np.array([1.0, 0.5]), 2.0


def reference(fn, y0, t1):
    return scipy.integrate.solve_ivp(lambda t, y: fn(np, t, y), (0.0, t1), y0, method="DOP853",
                                     rtol=1e-12, atol=1e-12).y[:, -1]


@pytest.fixture(scope="module")
def refs():
    return {"lv": reference(lotka_volterra, LV_Y0, LV_T1), "osc": reference(oscillator, OSC_Y0, OSC_T1)}


def fixed_solve(term, solver, y0, t1, dt, **kwargs):
    sol = nde.solve(term, solver, jnp.asarray(y0), jnp.array([0.0, t1]), dt0=dt, adaptive=False, throw=False,
                    **kwargs)
    stats = {k: int(v) for k, v in sol.stats.items()}
    assert int(sol.status) == nde.Status.SUCCESS, (type(solver).__name__, dt, kwargs, nde.Status(int(sol.status)),
                                                    stats)
    return np.asarray(sol.ys[-1]), stats


# Global errors at dt0 = 0.1 on [0, 10] (measured: 2.6e-3, 1.2e-3, 4.1e-5),
# with a margin of about 2.
LV_BOUND = {3: 5e-3, 4: 2.5e-3, 5: 1e-4}


@pytest.mark.parametrize("solver, order", SOLVERS, ids=IDS)
def test_lotka_volterra_fixed_step(solver, order, refs):
    # The report's case: Newton failed with the Jacobian kept from an earlier
    # step (theta ~ 0.3), and a fixed step cannot be retried.
    y1, st = fixed_solve(LV_TERM, solver, LV_Y0, LV_T1, 0.1)
    assert st["num_steps"] == 100 and st["num_rejected"] == 0, st
    err = np.max(np.abs(y1 - refs["lv"]))
    assert err < LV_BOUND[order], (err, st)
    # One evaluation per step for the explicit stage, one per Newton iteration.
    assert st["num_fevals"] == st["num_steps"] + st["num_newton_iters"], st
    assert 1 <= st["num_jacobians"] <= st["num_steps"], st
    # The error is the method's: halving the step divides it by about 2^order.
    y2, _ = fixed_solve(LV_TERM, solver, LV_Y0, LV_T1, 0.05)
    rate = np.log2(err / np.max(np.abs(y2 - refs["lv"])))
    assert abs(rate - order) < 0.5, rate


# Errors from 2e-4 (dt 0.1, Kvaerno3) down to 1e-10 (dt 0.025, Kvaerno5): in
# the asymptotic range (rates within 0.06 of the order) and far above round-off.
ORDER_DTS = {3: [0.1, 0.05, 0.025, 0.0125], 4: [0.1, 0.05, 0.025, 0.0125], 5: [0.2, 0.1, 0.05, 0.025]}


@pytest.mark.parametrize("solver, order", SOLVERS, ids=IDS)
def test_fixed_step_order_at_default_tolerance(solver, order, refs):
    # At the default rtol = atol = 1e-6 the stage equations must still be
    # solved well below the truncation error (4e-7 at the smallest step for
    # Kvaerno3, 6e-9 for Kvaerno4): stopping Newton at a fraction of the
    # tolerance gave rates 3.01, 2.63, 3.01 (Kvaerno3), 3.94, 3.60, 2.18
    # (Kvaerno4) and 5.21, 3.68, 4.27 (Kvaerno5).
    dts = np.array(ORDER_DTS[order])
    errs = np.array([np.max(np.abs(fixed_solve(OSC_TERM, solver, OSC_Y0, OSC_T1, dt)[0] - refs["osc"]))
                     for dt in dts])
    rates = np.log2(errs[:-1] / errs[1:])
    slope = np.polyfit(np.log(dts), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.2, (slope, rates, errs)
    assert np.all(np.abs(rates - order) < 0.25), (rates, errs)


@pytest.mark.parametrize("solver, order", SOLVERS, ids=IDS)
@pytest.mark.parametrize("tol", [1e-10, 1e-12])
def test_tight_tolerance_fixed_step(solver, order, tol, refs):
    # A tolerance far below the step's truncation error: the first Newton
    # corrections are ~1e7 in the tolerance's units and converge linearly
    # (rate ~0.05); the iteration limit of adaptive steps (8) was too short.
    y1, st = fixed_solve(OSC_TERM, solver, OSC_Y0, OSC_T1, 0.1, rtol=tol, atol=tol)
    y_default, _ = fixed_solve(OSC_TERM, solver, OSC_Y0, OSC_T1, 0.1)
    # The solution of the method's equations does not depend on the tolerance.
    np.testing.assert_allclose(y1, y_default, rtol=0, atol=1e-13)
    assert np.max(np.abs(y1 - refs["osc"])) < 3 * 0.1 ** order, st
    assert st["num_steps"] == 20


def test_newton_failure_is_reported():
    # With one Newton iteration allowed no stage can pass the convergence test
    # (it needs a measured rate): the fixed-step solve must report failure and
    # NaN, never return the unconverged stages.
    solver = nde.Kvaerno3(max_newton_iters=1, fixed_newton_iters=1)
    sol = nde.solve(LV_TERM, solver, jnp.asarray(LV_Y0), jnp.array([0.0, LV_T1]), dt0=0.1, adaptive=False,
                    throw=False)
    assert int(sol.status) == nde.Status.STEP_SIZE_TOO_SMALL
    assert np.all(np.isnan(np.asarray(sol.ys)[-1]))
    assert int(sol.stats["num_steps"]) == 0
