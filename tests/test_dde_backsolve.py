"""BacksolveAdjoint on delay equations (the continuous adjoint, an advanced
DDE solved backwards; `neuralde.sensitivity.dde_backsolve`) against exact
derivatives and tight-tolerance references."""
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import neuralde as nde

TS = jnp.linspace(0.0, 3.0, 7)
W = jnp.linspace(0.5, 1.5, 7)


def two_calls(t, y, h, p):
    # A lag that is a parameter (p[2]) and a fixed one, one of them nonlinear.
    return p[0] * y + p[1] * h(t - p[2]) + 0.3 * jnp.sin(h(t - 0.35))


def weighted_loss(sensitivity):
    def loss(p, y0, ts, rtol):
        term = nde.DDETerm(two_calls, lambda s, a: jnp.cos(a[3] * s), (p[2], 0.35))
        sol = nde.solve(term, nde.MethodOfSteps(nde.Tsit5()), y0, ts, args=p, rtol=rtol, atol=rtol,
                        sensitivity=sensitivity, max_steps=4096)
        return jnp.sum(W * sol.ys**2)

    # The save times too (t0's gradient includes the move of where h switches
    # from the history to the solution).
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


P = jnp.array([-0.4, -1.1, 0.9, 1.3])


@pytest.fixture(scope="module")
def backsolve_grad():
    return weighted_loss(nde.BacksolveAdjoint())


@pytest.fixture(scope="module")
def reference_grad():
    return weighted_loss(nde.CheckpointAdjoint())


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_gradient_converges_to_the_exact_one(backsolve_grad, reference_grad):
    # y0 = 0.8 differs from history(0) = 1: h jumps at t0, so the gradient of
    # the lag includes the jump's move (t0 + lag moves with the lag). The
    # reference: the exact gradient of a solve at rtol 1e-12 (its error ~1e-9).
    y0 = jnp.asarray(0.8)
    ref = reference_grad(P, y0, TS, 1e-12)
    errors = []
    for rtol in (1e-6, 1e-8):
        got = backsolve_grad(P, y0, TS, rtol)
        errors.append(max(_rel(a, b) for a, b in zip(got, ref)))
    # Measured: 2.7e-7 and 6.8e-9 over p, y0 and the save times (the gradient
    # of the exact solution; 2.4e-4 and 2.4e-6 for p and y0 while the forward
    # solver read history(t0) on the step after t0 + lag, whose dense output
    # the backward pass reads).
    assert errors[0] < 1e-5 and errors[1] < 1e-7, errors
    assert errors[1] < errors[0] / 10, errors


def test_y0_gradient_against_the_closed_form():
    # y' = a y + b y(t - tau), history cos(s), on [0, T] with tau < T <= 2 tau:
    # z = dy/dy0 solves z' = a z + b z(t - tau) with z = 0 before 0, so
    # z = e^{a t} on [0, tau] and e^{a t} + b (t - tau) e^{a (t - tau)} after.
    # The loss y(T)^2 has the gradient 2 y(T) z(T). CheckpointAdjoint (the
    # derivative of the computed solution) is checked too: it was 27% off
    # (z(T) = 0.029 is a small difference) while the step that starts at
    # t0 + tau read history(t0) at its first stage -- the previous step's
    # last (FSAL) -- instead of y0.
    a, b, tau, t_end = -0.4, -1.1, 0.9, 1.5
    term = nde.DDETerm(lambda t, y, h, args: a * y + b * h(t - tau), lambda s, args: jnp.cos(s), (tau,))
    ts = jnp.array([0.0, t_end])

    z = np.exp(a * t_end) + b * (t_end - tau) * np.exp(a * (t_end - tau))
    for sensitivity in (nde.BacksolveAdjoint(), nde.CheckpointAdjoint()):
        def loss(y0, s=sensitivity):
            sol = nde.solve(term, nde.MethodOfSteps(nde.Tsit5()), y0, ts, rtol=1e-9, atol=1e-9, sensitivity=s)
            return sol.ys[-1] ** 2, sol.ys[-1]

        g, y_end = jax.grad(loss, has_aux=True)(jnp.asarray(1.0))
        # Measured 2e-7 and 1.3e-9 relative.
        np.testing.assert_allclose(float(g), 2 * float(y_end) * z, rtol=1e-6)


def test_steps_longer_than_the_lag_converge():
    # Fixed RK4 steps of 0.4 and 0.2 with a lag of 0.3: the longer steps read
    # inside themselves (the backward steps too: fixed-point iteration).
    lag = 0.3
    term = nde.DDETerm(lambda t, y, h, p: p[0] * y + p[1] * jnp.tanh(h(t - lag)),
                       lambda s, p: jnp.ones(()), (lag,))
    ts = jnp.linspace(0.0, 2.4, 4)

    def grad(sensitivity, solver):
        def loss(p, dt0):
            sol = nde.solve(term, nde.MethodOfSteps(solver, max_history=64), jnp.asarray(1.0), ts, args=p,
                            dt0=dt0, sensitivity=sensitivity, max_steps=2048, rtol=1e-12, atol=1e-12)
            return jnp.sum(sol.ys**2)

        return jax.jit(jax.grad(loss))

    p = jnp.array([-0.3, -1.2])
    ref = grad(nde.CheckpointAdjoint(), nde.Tsit5())(p, None)
    fixed = grad(nde.BacksolveAdjoint(), nde.RK4())
    errors = [_rel(fixed(p, jnp.asarray(dt)), ref) for dt in (0.4, 0.2)]
    assert errors[1] < 1e-3, errors
    assert errors[0] / errors[1] > 6, errors  # third order or better


def test_neural_dde_float32_vmapped():
    # A network field, a learned lag held by the field (NeuralDDE(lags=None)),
    # a batch under vmap, float32: against a float64 solve at rtol 1e-11 of
    # the same network.
    class Field(eqx.Module):
        mlp: eqx.nn.MLP
        lags: tuple

        def __call__(self, t, y, h, args):
            return self.mlp(jnp.concatenate([y, h(t - self.lags[0])]))

    mlp = eqx.nn.MLP(4, 2, 16, 1, activation=jnp.tanh, key=jr.PRNGKey(0), dtype=jnp.float32)
    y0s = jnp.array([[0.7, 0.2], [-0.3, 0.9]])

    def grads(dtype, sensitivity, tol):
        cast = lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x  # noqa: E731
        field = Field(jax.tree_util.tree_map(cast, mlp), (jnp.asarray(0.4, dtype),))
        model = nde.NeuralDDE(field, lambda s, a: jnp.array([1.0, -0.5], dtype), None,
                              jnp.linspace(0.0, 2.0, 5).astype(dtype), sensitivity=sensitivity, rtol=tol, atol=tol,
                              max_steps=4096, solver=nde.MethodOfSteps(nde.Tsit5(), max_history=1024))
        g = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(y0s.astype(dtype)) ** 2)))(model)
        return jax.tree_util.tree_leaves(eqx.filter(g.field, eqx.is_inexact_array))

    # (conftest.py enables float64 for the reference.)
    got = grads(jnp.float32, nde.BacksolveAdjoint(), 1e-6)
    ref = grads(jnp.float64, nde.CheckpointAdjoint(), 1e-11)
    # Every parameter's gradient, the lag's included, in float32.
    assert len(got) == len(ref) == 5 and all(x.dtype == jnp.float32 for x in got)
    got, ref = [np.asarray(x, np.float64) for x in got], [np.asarray(x) for x in ref]
    flat = lambda leaves: np.concatenate([x.ravel() for x in leaves])  # noqa: E731
    err = np.linalg.norm(flat(got) - flat(ref)) / np.linalg.norm(flat(ref))
    assert err < 1e-5, err  # measured 3e-7


def test_a_time_that_is_not_t_minus_a_constant_lag_is_refused():
    term = nde.DDETerm(lambda t, y, h, a: -a * h(t / 2), lambda s, a: jnp.ones(()), (1.0,))

    def loss(a):
        return nde.solve(term, nde.MethodOfSteps(nde.Tsit5()), jnp.ones(()), jnp.linspace(0.0, 3.0, 4), args=a,
                         sensitivity=nde.BacksolveAdjoint()).ys[-1]

    with pytest.raises(Exception, match="constant lag"):
        jax.block_until_ready(jax.grad(loss)(1.0))


def test_a_start_away_from_zero_matches_the_shifted_problem():
    # t0 = 0.3: t0 + 0.35 - 0.35 rounds below t0, where the step that starts
    # at t0 + 0.35 reads the solution's side of t0 (a regression: NaN). The
    # same problem shifted to start at 0 is the reference.
    def solve(shift):
        term = nde.DDETerm(lambda t, y, h, a: -0.4 * y - 1.1 * h(t - 0.9) + 0.3 * jnp.sin(h(t - 0.35)),
                           lambda s, a: jnp.cos(1.3 * (s - shift)) + 0.2, (0.9, 0.35))
        ts = jnp.linspace(0.0, 3.0, 7) + shift
        return nde.solve(term, nde.MethodOfSteps(nde.Tsit5()), jnp.asarray(1.0), ts, rtol=1e-10, atol=1e-10).ys

    np.testing.assert_allclose(np.asarray(solve(0.3)), np.asarray(solve(0.0)), rtol=0, atol=1e-8)


def test_hessian_forward_over_the_adjoint():
    # jax.hessian keeps the custom rule and differentiates its backward pass
    # in forward mode (a custom_jvp closing over the forward solution broke
    # this once): against central differences of the same rule's gradient.
    # (CheckpointAdjoint's Hessian, the reference before, agreed to 9e-10 but
    # took 23 s of the suite to compile; these differences take 2.5 s.)
    term = nde.DDETerm(lambda t, y, h, a: -a * y + 0.5 * jnp.sin(h(t - 1.0)), lambda s, a: jnp.ones(()), (1.0,))

    def loss(a):
        sol = nde.solve(term, nde.MethodOfSteps(nde.Tsit5()), jnp.ones(()), jnp.linspace(0.0, 3.0, 4), args=a,
                        sensitivity=nde.BacksolveAdjoint(), rtol=1e-9, atol=1e-9)
        return jnp.sum(sol.ys**2)

    got = jax.hessian(loss)(2.0)
    grad = jax.jit(jax.grad(loss))
    eps = 1e-4
    fd = (float(grad(2.0 + eps)) - float(grad(2.0 - eps))) / (2 * eps)
    # Measured 3.6e-8, as strict as against the Hessian before (differences
    # of 1e-5 agree to 4.4e-8: the gap is not the differences' truncation).
    np.testing.assert_allclose(float(got), fd, rtol=1e-7)
