"""Delay differential equations: MethodOfSteps against exact piecewise
polynomials and independent references, convergence order, discontinuity
tracking, errors, and gradients (w.r.t. y0, args and a lag) against central
finite differences."""
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from numpy.polynomial import polynomial as npoly

import neuralde as nde

# ----------------------------------------------------------------- references


def exact_linear(coef, lags, t, n_pieces=64, piece=0.5):
    """Exact solution of y' = sum_j coef[j] y(t - lags[j]), y = 1 for t <= 0,
    by the method of steps with exact polynomial arithmetic: every lag is a
    multiple of ``piece``, so on each piece [(k-1) piece, k piece] the solution
    is a polynomial built from the earlier pieces shifted by the lags."""
    shifts = [int(round(lag / piece)) for lag in lags]
    assert all(abs(s * piece - lag) < 1e-12 for s, lag in zip(shifts, lags))
    polys = {k: np.array([1.0]) for k in range(-max(shifts), 1)}  # history pieces
    for k in range(1, n_pieces + 1):
        rhs = np.zeros(1)
        for c, s in zip(coef, shifts):
            prev = polys[k - s]
            shifted = np.zeros(1)
            for j, a in enumerate(prev):  # prev(t - lag)
                shifted = npoly.polyadd(shifted, a * npoly.polypow([-s * piece, 1.0], j))
            rhs = npoly.polyadd(rhs, c * shifted)
        integral = npoly.polyint(rhs)
        left = (k - 1) * piece
        start = npoly.polyval(left, polys[k - 1])
        polys[k] = npoly.polyadd(integral, [start - npoly.polyval(left, integral)])
    t = np.asarray(t, float)
    k = np.maximum(np.ceil(t / piece - 1e-12).astype(int), 0)
    return np.array([npoly.polyval(tt, polys[kk]) for tt, kk in zip(t, k)])


def rk4_method_of_steps(f, history, y0, lag, t1, n_per_lag):
    """Independent reference: classical RK4 with a step dividing the lag, the
    delayed values at half steps from the cubic Hermite interpolant of the
    stored grid values and slopes (fourth order, like RK4)."""
    h = lag / n_per_lag
    n = int(round(t1 / h))
    ys = np.zeros((n + 1, np.size(y0)))
    fs = np.zeros_like(ys)
    ys[0] = y0

    def past(s):
        if s <= 1e-14:
            return history(s)
        i = min(int(np.floor(s / h + 1e-9)), n - 1)
        th = s / h - i
        if th < 1e-9:
            return ys[i]
        h00, h10 = 2 * th**3 - 3 * th**2 + 1, th**3 - 2 * th**2 + th
        h01, h11 = -2 * th**3 + 3 * th**2, th**3 - th**2
        return h00 * ys[i] + h10 * h * fs[i] + h01 * ys[i + 1] + h11 * h * fs[i + 1]

    for i in range(n):
        t = i * h
        y = ys[i]
        k1 = f(t, y, past(t - lag))
        fs[i] = k1
        k2 = f(t + h / 2, y + h / 2 * k1, past(t + h / 2 - lag))
        k3 = f(t + h / 2, y + h / 2 * k2, past(t + h / 2 - lag))
        k4 = f(t + h, y + h * k3, past(t + h - lag))
        ys[i + 1] = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        fs[i + 1] = f(t + h, ys[i + 1], past(t + h - lag))
    return np.arange(n + 1) * h, ys


# ------------------------------------- linear DDEs with exact solutions


def linear_field(t, y, h, args):
    coef, lags = args
    return sum(coef[j] * h(t - lags[j]) for j in range(3))


def negative_feedback(t, y, h, args):
    return -h(t - 1.0)


ONE = lambda s, args: jnp.ones(())  # noqa: E731
TS5 = jnp.linspace(0.0, 5.0, 101)


@pytest.fixture(scope="module")
def solve_linear():
    """y' = sum_j coef[j] y(t - lags[j]) (three lags), history 1: one compiled
    solve for every coefficient, lag and tolerance (all traced)."""

    @jax.jit
    def run(coef, lags, tol):
        term = nde.DDETerm(linear_field, ONE, (lags[0], lags[1], lags[2]))
        return nde.solve(term, nde.MethodOfSteps(nde.Tsit5()), jnp.array(1.0), TS5, args=(coef, lags),
                         rtol=tol, atol=tol, max_steps=1024)

    return lambda coef, lags, tol: run(jnp.asarray(coef, float), jnp.asarray(lags, float), jnp.asarray(tol))


def test_exact_piecewise_polynomial(solve_linear):
    # y'(t) = -y(t - 1) (the other two terms have zero coefficients).
    exact = exact_linear([-1.0], [1.0], TS5, n_pieces=12)
    for tol, bound in ((1e-9, 1e-7), (1e-6, 1e-4)):
        sol = solve_linear([-1.0, 0.0, 0.0], [1.0, 1.0, 1.0], tol)
        assert int(sol.status) == 0
        err = np.max(np.abs(np.asarray(sol.ys) - exact))
        assert err <= bound, (tol, err)
    # y = 1 - t on [0, 1] and 1/2 t^2 - 2t + 3/2 on [1, 2] (by hand)
    np.testing.assert_allclose(exact[10], 0.5)
    np.testing.assert_allclose(exact[30], 0.5 * 1.5**2 - 3.0 + 1.5)


def test_several_lags(solve_linear):
    # y' = -y(t - 1) + 0.5 y(t - 1.5) - 0.3 y(t - 0.5)
    sol = solve_linear([-1.0, 0.5, -0.3], [1.0, 1.5, 0.5], 1e-9)
    exact = exact_linear([-1.0, 0.5, -0.3], [1.0, 1.5, 0.5], TS5, n_pieces=12)
    assert np.max(np.abs(np.asarray(sol.ys) - exact)) <= 1e-7


def test_steps_longer_than_lag(solve_linear):
    # y' = -2 y(t - 0.05) at loose tolerances: steps exceed the lag, and the
    # fixed-point iteration on the step's own interpolant is used.
    sol = solve_linear([-2.0, 0.0, 0.0], [0.05, 0.05, 0.05], 1e-5)
    exact = exact_linear([-2.0], [0.05], TS5, n_pieces=101, piece=0.05)
    assert int(sol.stats["num_fixed_point_iters"]) > 0
    assert np.max(np.abs(np.asarray(sol.ys) - exact)) <= 2e-4


class _NoTracking(nde.MethodOfSteps):
    def breakpoints(self, problem, t0):
        return None


@pytest.fixture(scope="module")
def fixed_step_errors():
    term = nde.DDETerm(negative_feedback, ONE, (1.0,))
    exact = exact_linear([-1.0], [1.0], TS5, n_pieces=12)

    def errors(solver):
        run = jax.jit(lambda dt: nde.solve(term, solver, jnp.array(1.0), TS5, dt0=dt, max_steps=128).ys)
        out = {}
        for dt in (0.5, 0.25, 0.125, 0.3, 0.15, 0.075):
            out[dt] = np.max(np.abs(np.asarray(run(jnp.asarray(dt))) - exact))
        return out

    return errors(nde.MethodOfSteps(nde.RK4())), errors(_NoTracking(nde.RK4()))


def _slope(errs, dts):
    return np.polyfit(np.log(dts), np.log([errs[d] for d in dts]), 1)[0]


@pytest.mark.parametrize("dts", [(0.5, 0.25, 0.125), (0.3, 0.15, 0.075)], ids=["divides-lag", "not-dividing"])
def test_fixed_step_order(fixed_step_errors, dts):
    tracked, _ = fixed_step_errors
    assert 3.7 <= _slope(tracked, dts) <= 4.5, tracked


def test_discontinuity_tracking_matters(fixed_step_errors):
    # Without landing on t = 1, 2, ... a step straddles the kinks of y'' and
    # the error is larger at the same step size.
    tracked, untracked = fixed_step_errors
    for dt in (0.3, 0.15, 0.075):
        assert untracked[dt] > 5 * tracked[dt], (dt, tracked[dt], untracked[dt])


# ------------------------------------------------------- delay Lotka-Volterra


def delay_lv(t, u, h, p):
    # DiffEqFlux.jl's delay Lotka-Volterra example (lag 0.1, history 1).
    x, y = u[0], u[1]
    a, b, d, g = p[0], p[1], p[2], p[3]
    return jnp.stack([(a - b * y) * h(t - 0.1)[0], (d * x - g) * y])


P_LV = np.array([2.2, 1.0, 2.0, 0.4])


def test_delay_lotka_volterra_vs_reference():
    ts = jnp.linspace(0.0, 10.0, 101)
    term = nde.DDETerm(delay_lv, lambda s, p: jnp.ones(2), (0.1,))
    sol = nde.solve(term, nde.MethodOfSteps(nde.Tsit5()), jnp.ones(2), ts, args=jnp.asarray(P_LV),
                    rtol=1e-9, atol=1e-9)

    def f(t, u, past):
        x, y = u
        a, b, d, g = P_LV
        return np.array([(a - b * y) * past[0], (d * x - g) * y])

    grid, ref = rk4_method_of_steps(f, lambda s: np.ones(2), np.ones(2), 0.1, 10.0, 80)
    ref_at = ref[np.round(np.asarray(ts) / (0.1 / 80)).astype(int)]
    err = np.max(np.abs(np.asarray(sol.ys) - ref_at) / (1 + np.abs(ref_at)))
    assert err <= 1e-6, err


def test_stiff_delay_equation_with_an_implicit_solver():
    # y' = -200 (y - cos t) + 0.5 y(t - 1): stiff, so Tsit5 at this tolerance
    # fills a 128-step history within one lag (HISTORY_OVERFLOW) where
    # Kvaerno5 takes about 220 steps; the Newton iteration, the Jacobian kept
    # across steps (and the one to keep when a step is rejected) pass through
    # the method of steps' loop of attempts.
    lam, mu = 200.0, 0.5

    def f(t, y, h, p):
        return -p[0] * (y - jnp.cos(t)) + p[1] * h(t - 1.0)

    ts = jnp.linspace(0.0, 4.0, 41)
    term = nde.DDETerm(f, lambda s, p: jnp.ones(()), (1.0,))
    sol = nde.solve(term, nde.MethodOfSteps(nde.Kvaerno5()), jnp.ones(()), ts, args=jnp.array([lam, mu]),
                    rtol=1e-8, atol=1e-8)
    assert int(sol.status) == 0 and int(sol.stats["num_steps"]) < 400, sol.stats
    assert int(sol.stats["num_newton_iters"]) > 0
    grid, ref = rk4_method_of_steps(lambda t, y, past: -lam * (y - np.cos(t)) + mu * past, lambda s: np.ones(1),
                                    np.ones(1), 1.0, 4.0, 2000)
    ref_at = ref[np.round(np.asarray(ts) * 2000).astype(int), 0]
    err = np.max(np.abs(np.asarray(sol.ys) - ref_at))
    assert err <= 1e-6, err


def test_breakpoints_are_every_sum_of_lags_sorted():
    # t0 plus every sum of 1 .. order + 1 lags (with repetition), ascending,
    # ties kept (sorted by ranks, not `sort`: see `_sort_small`); and their
    # derivative with respect to a lag is the count of that lag in the sum.
    import itertools

    solver = nde.MethodOfSteps(nde.Tsit5())  # order 5: sums of up to 6 lags

    def breakpoints(lags, t0):
        term = nde.DDETerm(lambda t, y, h, a: y, lambda s, a: jnp.ones(()), lags)
        return solver.breakpoints(type("Problem", (), {"term": term})(), jnp.asarray(t0))

    lags = (0.3, 0.7, 0.6)
    got = np.asarray(breakpoints(lags, 1.0))
    sums = [sum(c) for k in range(1, 7) for c in itertools.combinations_with_replacement(lags, k)]
    np.testing.assert_allclose(got, 1.0 + np.sort(sums), rtol=0, atol=1e-15)
    jac = np.asarray(jax.jacobian(lambda l0: breakpoints((l0, 0.7, 0.6), 0.0))(jnp.asarray(0.3)))
    assert jac[0] == 1.0 and jac[-1] == 0.0  # 0.3 itself; 6 x 0.7


# ------------------------------------------------------------ Mackey-Glass


def test_mackey_glass_long_time():
    # beta 0.2, gamma 0.1, n 10, tau 17: a chaotic attractor within about
    # [0.2, 1.4] (Mackey & Glass 1977); a bad history or breakpoint handling
    # shows up as blow-up, decay to the fixed point 1, or NaN.
    def f(t, y, h, args):
        yd = h(t - 17.0)
        return 0.2 * yd / (1 + yd**10) - 0.1 * y

    ts = jnp.linspace(0.0, 1000.0, 2001)
    term = nde.DDETerm(f, lambda s, a: jnp.asarray(0.5), (17.0,))
    sol = nde.solve(term, nde.MethodOfSteps(nde.Tsit5()), jnp.asarray(0.5), ts, rtol=1e-6, atol=1e-6,
                    max_steps=8192)
    assert int(sol.status) == 0
    late = np.asarray(sol.ys)[ts > 200]
    assert 0.15 < late.min() < 0.5 and 1.1 < late.max() < 1.45, (late.min(), late.max())
    assert late.std() > 0.15  # still oscillating, not at the fixed point


# ----------------------------------------------------------------- errors


def test_errors():
    with pytest.raises(ValueError, match="lags"):
        nde.DDETerm(negative_feedback, ONE, (0.0,))
    with pytest.raises(ValueError, match="lags"):
        nde.DDETerm(negative_feedback, ONE, (1.0, -0.5))
    term = nde.DDETerm(negative_feedback, ONE, (1.0,))
    with pytest.raises(TypeError, match="`solver` must be MethodOfSteps"):
        nde.solve(term, nde.Tsit5(), jnp.array(1.0), TS5)
    with pytest.raises(TypeError, match="MethodOfSteps"):
        nde.solve(nde.ODETerm(lambda t, y, a: -y), nde.MethodOfSteps(nde.Tsit5()), jnp.array(1.0), TS5)
    with pytest.raises(TypeError, match="solver"):
        nde.MethodOfSteps("Tsit5")
    with pytest.raises(ValueError, match="increasing"):
        nde.solve(term, nde.MethodOfSteps(nde.Tsit5()), jnp.array(1.0), TS5[::-1])
    with pytest.raises(ValueError, match="history"):
        nde.solve(term, nde.MethodOfSteps(nde.Tsit5()), jnp.ones(2), TS5)

    # A traced array closed over by the field would escape the custom
    # derivative rule: refused, with the fix in the message.
    def closes_over(c):
        closed = nde.DDETerm(lambda t, y, h, a: -c * h(t - 1.0), ONE, (1.0,))
        return nde.solve(closed, nde.MethodOfSteps(nde.Tsit5()), jnp.array(1.0), TS5).ys[-1]

    with pytest.raises(ValueError, match="args"):
        jax.grad(closes_over)(1.0)


def test_history_overflow_is_reported():
    # 2 kept steps cannot span a lag of 1 with steps of 0.1.
    term = nde.DDETerm(negative_feedback, ONE, (1.0,))
    solver = nde.MethodOfSteps(nde.RK4(), max_history=2)
    sol = nde.solve(term, solver, jnp.array(1.0), TS5, dt0=0.1, throw=False, max_steps=128)
    assert int(sol.status) == nde.Status.HISTORY_OVERFLOW
    assert np.isnan(np.asarray(sol.ys)[-1])
    assert "max_history" in nde.Status.HISTORY_OVERFLOW.message


# -------------------------------------------------------------- gradients

TS_G = jnp.linspace(0.0, 3.0, 7)
W_G = jnp.linspace(0.5, 1.5, 7)


def feedback_with_lag(t, y, h, p):
    return -p[0] * h(t - p[1]) + 0.1 * jnp.sin(y)


def grad_loss(sensitivity):
    def loss(p, y0, dt):
        # The lag p[1] is read by the field and tracked as a breakpoint.
        term = nde.DDETerm(feedback_with_lag, lambda s, p: 0.8 * jnp.cos(s), (p[1],))
        sol = nde.solve(term, nde.MethodOfSteps(nde.RK4(), max_history=40), y0, TS_G, args=p, dt0=dt,
                        max_steps=128, sensitivity=sensitivity)
        return jnp.sum(W_G * sol.ys)

    return loss


P_G = jnp.array([1.3, 0.7])
Y0_G = jnp.array(0.8)
# "checkpoint-4": strided checkpoints, recomputed segments whose steps end at
# breakpoints that move with the lag.
SENS = {"reverse": nde.ReverseMode(), "forward": nde.ForwardMode(), "checkpoint": nde.CheckpointAdjoint(),
        "checkpoint-4": nde.CheckpointAdjoint(checkpoints=4)}
# Steps of 0.03 (shorter than the lag) and 1.0 (longer: fixed-point iteration).
DTS = (0.03, 1.0)


@pytest.fixture(scope="module")
def dde_grads():
    out = {}
    for name, s in SENS.items():
        g = jax.jit(jax.grad(grad_loss(s), argnums=(0, 1)))
        out[name] = {dt: g(P_G, Y0_G, jnp.asarray(dt)) for dt in DTS}
    loss = jax.jit(grad_loss(nde.CheckpointAdjoint()))
    eps = 1e-6
    fd = {}
    for dt in DTS:
        d = jnp.asarray(dt)
        fd[dt] = (
            np.array([(loss(P_G.at[i].add(eps), Y0_G, d) - loss(P_G.at[i].add(-eps), Y0_G, d)) / (2 * eps)
                      for i in range(2)]),
            (loss(P_G, Y0_G + eps, d) - loss(P_G, Y0_G - eps, d)) / (2 * eps),
        )
    return out, fd


@pytest.mark.parametrize("name", list(SENS))
@pytest.mark.parametrize("dt", DTS)
def test_grad_vs_finite_differences(dde_grads, name, dt):
    grads, fd = dde_grads
    g_p, g_y0 = grads[name][dt]
    fd_p, fd_y0 = fd[dt]
    np.testing.assert_allclose(np.asarray(g_p), fd_p, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(float(g_y0), float(fd_y0), rtol=1e-6, atol=1e-8)
    # Every method differentiates the same computed solution.
    for a, b in zip(jax.tree_util.tree_leaves(grads["reverse"][dt]), jax.tree_util.tree_leaves(grads[name][dt])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


def test_lookup_at_a_landed_step_end_regression():
    """Regression: a step that lands on the breakpoint at the lag L stored its
    end as ``t0 + dt``, which can round an ulp below L, where the next step
    starts; that step, [L, 2L], reads h(L) at its last stage and found no step
    there: NaN in the attempt, a rejected step, and NaN reverse-mode gradients
    (zero cotangents times the NaN attempt's derivatives) although the solve
    was finite. With these numbers (y' = -a y(t - 0.68), rtol 1e-4) the old
    lookup failed."""
    a0, lag = 1.0, 0.68
    ts = jnp.linspace(0.0, 3.0, 4)

    def loss(a, lag, sensitivity):
        term = nde.DDETerm(lambda t, y, h, p: -p[0] * h(t - p[1]), lambda s, p: jnp.asarray(1.0), (lag,))
        sol = nde.solve(term, nde.MethodOfSteps(nde.Tsit5(), max_history=16), jnp.asarray(1.0), ts,
                        args=(a, lag), rtol=1e-4, atol=1e-4, max_steps=32, sensitivity=sensitivity)
        return jnp.sum(sol.ys), sol.stats["num_rejected"]

    # Independent reference: the exact solution's derivative in a (central
    # differences of exact piecewise polynomials); the solve is at rtol 1e-4.
    exact = lambda a: float(np.sum(exact_linear([-a], [lag], np.asarray(ts), n_pieces=5, piece=lag)))  # noqa: E731
    eps = 1e-6
    fd = (exact(a0 + eps) - exact(a0 - eps)) / (2 * eps)
    # CheckpointAdjoint only (one compilation, about half ReverseMode's): the
    # old lookup failed both alike (and the spurious rejection is the solve's).
    grad = jax.jit(jax.value_and_grad(lambda a, lag: loss(a, lag, nde.CheckpointAdjoint()), has_aux=True))
    (value, rejected), g = grad(jnp.asarray(a0), jnp.asarray(lag))
    assert np.isfinite(float(g))
    np.testing.assert_allclose(float(g), fd, rtol=2e-3)
    np.testing.assert_allclose(float(value), exact(a0), rtol=1e-3)
    assert int(rejected) == 0


# -------------------------------------------------------------- NeuralDDE


class DelayedMLP(eqx.Module):
    mlp: eqx.nn.MLP
    lags: tuple

    def __call__(self, t, y, h, args):
        return self.mlp(jnp.concatenate([y, h(t - self.lags[0])]))


def test_stored_while_loop_gradient_matches_the_unrolled_loop():
    # The corrections loop of CheckpointAdjoint's backward delay steps: a `custom_vjp`
    # while loop that stores its carries. Reference: plain reverse mode through the same
    # iterations written out in Python, lane by lane (their counts differ under vmap).
    from neuralde._loop import stored_while_loop

    max_iters = 16

    def body(p, c):
        k, x, _, n_evals = c
        x_new = jnp.cos(p[0] * x) + p[1] * x**2
        return k + 1, x_new, jnp.abs(x_new - x) < 1e-3, n_evals + 2

    def looped(p, x0, max_iters=max_iters):
        init = (jnp.asarray(0, jnp.int32), x0, jnp.asarray(False), jnp.asarray(0, jnp.int32))
        k, x, done, n_evals = stored_while_loop(lambda c: ~c[2], lambda c: body(p, c), init, max_iters)
        return x, (k, done, n_evals)

    def unrolled(p, x0, n):
        c = (0, x0, False, 0)
        for _ in range(n):
            c = body(p, c)
        return c[1]

    p = jnp.array([0.9, 0.05])
    x0s = jnp.array([0.1, 0.7, 2.0, -1.3])
    (xs, (ks, dones, n_evals)), (g_p, g_x0) = jax.jit(jax.vmap(
        lambda x0: jax.value_and_grad(looped, argnums=(0, 1), has_aux=True)(p, x0)))(x0s)
    ks = np.asarray(ks)
    assert len(set(ks.tolist())) > 1 and ks.max() <= max_iters and bool(np.all(dones))
    np.testing.assert_array_equal(np.asarray(n_evals), 2 * ks)
    for i, (x0, k) in enumerate(zip(x0s, ks)):
        ref_x = unrolled(p, x0, int(k))
        ref_p, ref_x0 = jax.grad(unrolled, argnums=(0, 1))(p, x0, int(k))
        np.testing.assert_allclose(float(xs[i]), float(ref_x), rtol=1e-14)
        np.testing.assert_allclose(np.asarray(g_p[i]), np.asarray(ref_p), rtol=1e-12)
        np.testing.assert_allclose(float(g_x0[i]), float(ref_x0), rtol=1e-12)
    # A loop cut off at its bound: the derivative of exactly that many iterations.
    assert ks[2] > 3
    _, (k, done, _) = looped(p, x0s[2], 3)
    assert int(k) == 3 and not bool(done)
    g = jax.grad(lambda q: looped(q, x0s[2], 3)[0])(p)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(unrolled)(p, x0s[2], 3)), rtol=1e-12)


def test_neural_dde_vmap_and_grad():
    mlp = eqx.nn.MLP(4, 2, 8, 1, activation=jnp.tanh, key=jr.PRNGKey(0))
    # dtype=float: a weakly typed lag would become strongly typed in the shifted models below and
    # compile the value-and-gradient a second time.
    field = DelayedMLP(mlp, (jnp.asarray(0.4, dtype=float),))
    model = nde.NeuralDDE(field, lambda s, a: jnp.array([1.0, -0.5]), None, jnp.linspace(0.0, 2.0, 5),
                          solver=nde.MethodOfSteps(nde.Tsit5(), max_history=32), rtol=1e-8, atol=1e-8,
                          max_steps=256)
    y0s = jnp.array([[1.0, -0.5], [0.7, 0.2], [-0.3, 0.9]])

    def loss(m):
        ys = jax.vmap(m)(y0s)
        return jnp.sum(ys**2), ys

    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    (_, batched), grads = value_and_grad(model)
    np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(model(y0s[1])), rtol=1e-10, atol=1e-12)
    # A directional derivative over every parameter, the lag included.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    direction = [jr.normal(jr.PRNGKey(i), x.shape, x.dtype) for i, x in enumerate(leaves)]
    g_leaves = treedef.flatten_up_to(eqx.filter(grads, eqx.is_inexact_array))
    predicted = sum(float(jnp.sum(g * d)) for g, d in zip(g_leaves, direction))
    # The loss values for the differences come from the compiled value-and-gradient (its gradient
    # is discarded): a second compilation of the vmapped solve costs more than those gradients.
    loss_j = lambda m: value_and_grad(m)[0][0]  # noqa: E731
    shifted = lambda s: eqx.combine(  # noqa: E731
        jax.tree_util.tree_unflatten(treedef, [x + s * d for x, d in zip(leaves, direction)]), static)
    eps = 1e-5
    fd = (float(loss_j(shifted(eps))) - float(loss_j(shifted(-eps)))) / (2 * eps)
    # Adaptive steps (rtol 1e-8): finite differences see the step sequence change.
    assert abs(predicted - fd) <= 1e-4 * max(1.0, abs(fd)), (predicted, fd)
    assert float(jnp.abs(grads.field.lags[0])) > 0


def test_fixed_small_steps_get_a_history_that_covers_the_lag():
    # 200 RK4 steps of 0.005 fall in a window of the lag 1, more than
    # MethodOfSteps' default 128-step history: solve sizes the buffer for the
    # fixed step (it stopped with HISTORY_OVERFLOW before). y' = -y(t - 1) with
    # history 1 is a cubic on [2, 3], which RK4 integrates exactly on steps
    # that land on the breakpoints: y(3) = -1/6.
    term = nde.DDETerm(lambda t, y, h, a: -h(t - 1.0), lambda s, a: jnp.ones(1), (1.0,))
    sol = nde.solve(term, nde.MethodOfSteps(nde.RK4()), jnp.ones(1), jnp.array([0.0, 3.0]), dt0=0.005,
                    throw=False)
    assert int(sol.status) == int(nde.Status.SUCCESS)
    np.testing.assert_allclose(np.asarray(sol.ys[-1]), [-1.0 / 6.0], rtol=0, atol=1e-12)
