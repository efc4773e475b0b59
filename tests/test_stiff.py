"""Stiff solvers (Kvaerno3/4/5): tableaus, convergence order, stiff benchmark
problems against scipy's Radau at tight tolerances, gradients against central
finite differences of an independent (scipy) solve, and failure reporting.

Problems (E. Hairer & G. Wanner, Solving ODEs II, IV.1 and IV.10):
* ROBER, Robertson's chemical reaction (rate constants 0.04, 3e7, 1e4);
* Van der Pol with mu = 1000, y(0) = (2, 0);
* HIRES, the 8-component "high irradiance responses" of plant morphogenesis
  (Schäfer 1975), on [0, 321.8122].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
from test_tableaus import max_residual_up_to

import neuralde as nde
from neuralde.solvers.implicit import KVAERNO3, KVAERNO4, KVAERNO5, stability_at_infinity

RATES = np.array([0.04, 3e7, 1e4])


def rober(xp, t, y, k):
    y1, y2, y3 = y[0], y[1], y[2]
    return xp.stack([-k[0] * y1 + k[2] * y2 * y3, k[0] * y1 - k[1] * y2**2 - k[2] * y2 * y3, k[1] * y2**2])


def rober_log(xp, t, y, log_k):
    return rober(xp, t, y, xp.exp(log_k))


def vdp(xp, t, y, mu):
    return xp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def hires(xp, t, y, _):
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    r = 280.0 * y6 * y8
    return xp.stack([
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
        1.71 * y1 - 8.75 * y2,
        -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
        8.32 * y2 + 1.71 * y3 - 1.12 * y4,
        -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
        -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
        r - 1.81 * y7,
        -r + 1.81 * y7,
    ])


HIRES_Y0 = np.array([1.0, 0, 0, 0, 0, 0, 0, 0.0057])


def rober_jac(t, y, k):
    _y1, y2, y3 = y
    return np.array([[-k[0], k[2] * y3, k[2] * y2],
                     [k[0], -2 * k[1] * y2 - k[2] * y3, -k[2] * y2],
                     [0.0, 2 * k[1] * y2, 0.0]])


def vdp_jac(t, y, mu):
    return np.array([[0.0, 1.0], [-2 * mu * y[0] * y[1] - 1, mu * (1 - y[0] ** 2)]])


def radau(field, y0, ts, args, rtol=1e-12, atol=1e-16, jac=None):
    """scipy's Radau IIA (order 5), with the analytic Jacobian where given."""
    sol = scipy.integrate.solve_ivp(
        lambda t, y: np.asarray(field(np, t, y, args), dtype=np.float64), (ts[0], ts[-1]), y0,
        method="Radau", t_eval=ts, rtol=rtol, atol=atol, jac=None if jac is None else (lambda t, y: jac(t, y, args)),
    )
    assert sol.success
    return sol.y.T


def term(field):
    return nde.ODETerm(lambda t, y, a: field(jnp, t, y, a))


# ------------------------------------------------------------------ tableaus

@pytest.mark.parametrize("tab,order", [(KVAERNO3, 3), (KVAERNO4, 4), (KVAERNO5, 5)])
def test_tableau(tab, order):
    # Order conditions (all rooted trees) of the solution and the embedded pair.
    assert max_residual_up_to(tab.b, tab.a, order) < 1e-13
    assert max_residual_up_to(tab.bhat, tab.a, order - 1) < 1e-13
    assert max_residual_up_to(tab.b, tab.a, order + 1) > 1e-4  # not accidentally higher
    # b is the last row (stiffly accurate), bhat the second-to-last, c = row sums.
    np.testing.assert_allclose(tab.a.sum(axis=1), tab.c, atol=1e-15)
    assert abs(tab.c[-1] - 1) < 1e-14 and abs(tab.c[-2] - 1) < 1e-14
    # L-stability: R(inf) = 0, and |R(z)| <= 1 on the imaginary axis (A-stability).
    assert abs(stability_at_infinity(tab.a)) < 1e-12
    s = tab.num_stages
    for y in np.logspace(-2, 4, 60):
        z = 1j * y
        r = 1 + z * tab.b @ np.linalg.solve(np.eye(s) - z * tab.a, np.ones(s))
        assert abs(r) <= 1 + 1e-12
    # The stage predictors are exact for linear solutions (y = t: k_j = 1,
    # Z_i = c_i), and from the third stage on, for quadratics (Hermite
    # extrapolation; y = t^2: k_j = 2 c_j, Z_i = c_i^2).
    np.testing.assert_allclose(tab.predictor[1:] @ np.ones(s), tab.c[1:], atol=1e-12)
    np.testing.assert_allclose(tab.predictor[2:] @ (2 * tab.c), tab.c[2:] ** 2, atol=1e-12)


def test_bad_options():
    with pytest.raises(ValueError, match="linear_solver"):
        nde.Kvaerno5(linear_solver="cholesky")
    with pytest.raises(ValueError, match="max_newton_iters"):
        nde.Kvaerno3(max_newton_iters=0)


# ------------------------------------------------------------------ order

def test_fixed_step_orders():
    m = jnp.array([[-0.5, 2.0], [-2.0, -0.5]])
    y0 = jnp.array([1.0, 0.5])
    exact = np.asarray(jax.scipy.linalg.expm(2.0 * m) @ y0)
    ns = np.array([8, 16, 32, 64])
    for solver, order in [(nde.Kvaerno3(), 3), (nde.Kvaerno4(), 4), (nde.Kvaerno5(), 5)]:
        run = jax.jit(lambda dt, solver=solver: nde.solve(
            nde.ODETerm(lambda t, y, a: m @ y), solver, y0, jnp.array([0.0, 2.0]), dt0=dt, adaptive=False,
            rtol=1e-13, atol=1e-13).ys[-1])
        errs = [float(np.max(np.abs(np.asarray(run(2.0 / n)) - exact))) for n in ns]
        slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
        assert abs(slope - order) < 0.35, (type(solver).__name__, slope, errs)


# ------------------------------------------------------------------ stiff problems

ROBER_TERM = term(rober)


KVAERNO5 = nde.Kvaerno5()


def solve_rober(ts, solver=KVAERNO5, **kwargs):
    # One term object and save grids of one length: one compilation.
    return nde.solve(ROBER_TERM, solver, jnp.array([1.0, 0.0, 0.0]), jnp.asarray(ts), args=jnp.asarray(RATES),
                     **{"rtol": 1e-6, "atol": 1e-10, "max_steps": 4096, **kwargs})


@pytest.fixture(scope="module")
def rober_long():
    ts = np.concatenate([[0.0], np.logspace(-5, 11, 33)])
    return ts, solve_rober(ts)


def test_rober_long(rober_long):
    ts, sol = rober_long
    # Reference at rtol 1e-10 (1e-12 costs scipy a minute here): four orders
    # below the error asserted.
    ref = radau(rober, np.array([1.0, 0.0, 0.0]), ts, RATES, rtol=1e-10, atol=1e-20, jac=rober_jac)
    ys = np.asarray(sol.ys)
    mask = np.abs(ref) >= 1e-7
    rel = np.abs(ys - ref)[mask] / np.abs(ref)[mask]
    assert np.max(rel) <= 1e-3, np.max(rel)
    # mass conservation y1 + y2 + y3 = 1
    np.testing.assert_allclose(ys.sum(axis=1), 1.0, atol=1e-8)


def check_stats(st, implicit_stages):
    attempts = st["num_steps"] + st["num_rejected"]
    # At least one Jacobian, at most one per attempt (reused across steps).
    assert 1 <= st["num_jacobians"] <= attempts
    # Every implicit stage of an accepted step took at least two Newton
    # iterations, and none more than the limit (8).
    assert 2 * implicit_stages * st["num_steps"] <= st["num_newton_iters"] <= 8 * implicit_stages * attempts
    # One evaluation per attempt for the explicit stage, one per Newton
    # iteration, two for the starting-step heuristic.
    assert st["num_fevals"] == attempts + st["num_newton_iters"] + 2


def test_rober_stats(rober_long):
    # The benchmark problem (to 1e5): few steps and few rejections (diffrax's
    # Kvaerno5: 694 steps of which 351 rejected; scipy's Radau: 188 steps).
    ts = np.concatenate([[0.0], np.logspace(-5, 5, 33)])
    st = {k: int(v) for k, v in solve_rober(ts).stats.items()}
    assert 50 < st["num_steps"] < 250 and st["num_rejected"] < 0.4 * st["num_steps"], st
    check_stats(st, 6)
    # To 1e11 Newton fails more often (see the benchmark README), but the
    # counters stay consistent.
    check_stats({k: int(v) for k, v in rober_long[1].stats.items()}, 6)


def test_van_der_pol_stiff():
    ts = np.linspace(0.0, 3000.0, 7)
    y0 = np.array([2.0, 0.0])
    sol = nde.solve(term(vdp), nde.Kvaerno5(), jnp.asarray(y0), jnp.asarray(ts), args=1000.0,
                    rtol=1e-6, atol=1e-6, max_steps=4096)
    ref = radau(vdp, y0, ts, 1000.0, rtol=1e-10, atol=1e-10, jac=vdp_jac)
    np.testing.assert_allclose(np.asarray(sol.ys)[:, 0], ref[:, 0], rtol=0, atol=1e-3)
    assert int(sol.stats["num_steps"]) < 1000


def test_hires():
    ts = np.array([0.0, 1.0, 10.0, 100.0, 321.8122])
    sol = nde.solve(term(hires), nde.Kvaerno5(), jnp.asarray(HIRES_Y0), jnp.asarray(ts), rtol=1e-7, atol=1e-9)
    ref = radau(hires, HIRES_Y0, ts, None, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(sol.ys), ref, rtol=1e-4, atol=1e-8)


def test_matrix_free_pytree_state():
    # Matrix-free Newton (GMRES) on a dict state, against scipy.
    def field(t, y, k):
        out = rober(jnp, t, jnp.stack([y["a"], y["b"][0], y["b"][1]]), k)
        return {"a": out[0], "b": out[1:]}

    y0 = {"a": jnp.array(1.0), "b": jnp.array([0.0, 0.0])}
    ts = jnp.array([0.0, 1.0, 100.0])
    ref = radau(rober, np.array([1.0, 0, 0]), np.asarray(ts), RATES)
    sol = nde.solve(nde.ODETerm(field), nde.Kvaerno5(linear_solver="gmres"), y0, ts, args=jnp.asarray(RATES),
                    rtol=1e-7, atol=1e-11)
    got = np.concatenate([np.asarray(sol.ys["a"])[:, None], np.asarray(sol.ys["b"])], axis=1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-10)


# ------------------------------------------------------------------ failures

def test_tsit5_fails_on_rober():
    args = {"args": jnp.asarray(RATES), "rtol": 1e-6, "atol": 1e-10, "max_steps": 200}
    y0, ts = jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 1.0, 1e3])
    sol = nde.solve(term(rober), nde.Tsit5(), y0, ts, throw=False, **args)
    assert int(sol.status) == nde.Status.MAX_STEPS_REACHED
    assert np.all(np.isnan(np.asarray(sol.ys)[-1]))
    with pytest.raises(RuntimeError, match=r"MAX_STEPS_REACHED.*stiff.*Kvaerno5"):
        nde.solve(term(rober), nde.Tsit5(), y0, ts, throw=True, **args)


def test_newton_failure_is_rejected():
    # With one Newton iteration allowed, no stage can pass the convergence test
    # (it needs a measured rate): every attempt must be rejected and the solve
    # must report failure, never accept an unconverged step.
    y0, ts = jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 1.0])
    sol = nde.solve(term(rober), nde.Kvaerno3(max_newton_iters=1), y0, ts, args=jnp.asarray(RATES),
                    rtol=1e-6, atol=1e-10, max_steps=100, throw=False)
    assert int(sol.stats["num_steps"]) == 0
    assert int(sol.stats["num_rejected"]) > 0
    assert int(sol.status) != nde.Status.SUCCESS
    assert np.all(np.isnan(np.asarray(sol.ys)[-1]))


# ------------------------------------------------------------------ gradients

GRAD_TS = np.array([0.0, 1e-4, 1e-3])
WEIGHTS = np.array([1.0, 1e4, 1.0])


@pytest.fixture(scope="module")
def rober_fd():
    """Central differences of a scipy Radau solve (independent of neuralde)."""
    log_k = np.log(RATES)

    def loss(lk):
        ys = radau(rober_log, np.array([1.0, 0, 0]), GRAD_TS, lk, rtol=1e-13, atol=1e-18)
        return np.sum(ys[1:] * WEIGHTS)

    eps = 1e-5
    return np.array([(loss(log_k + eps * e) - loss(log_k - eps * e)) / (2 * eps) for e in np.eye(3)])


# CheckpointAdjoint(checkpoints=4): strided checkpoints, the Newton solves of
# each segment recomputed through the backward steps' primals.
@pytest.mark.parametrize("sensitivity", [nde.ReverseMode(), nde.CheckpointAdjoint(),
                                         nde.CheckpointAdjoint(checkpoints=4), nde.ForwardMode(),
                                         nde.BacksolveAdjoint()],
                         ids=["ReverseMode", "CheckpointAdjoint", "CheckpointAdjoint-strided", "ForwardMode",
                              "BacksolveAdjoint"])
def test_rober_rate_gradients(sensitivity, rober_fd):
    def loss(lk):
        sol = nde.solve(term(rober_log), nde.Kvaerno5(), jnp.array([1.0, 0.0, 0.0]), jnp.asarray(GRAD_TS), args=lk,
                        rtol=1e-8, atol=1e-12, sensitivity=sensitivity, max_steps=512)
        return jnp.sum(sol.ys[1:] * jnp.asarray(WEIGHTS))

    grad = np.asarray(jax.grad(loss)(jnp.log(jnp.asarray(RATES))))
    np.testing.assert_allclose(grad, rober_fd, rtol=2e-4)
