"""Forward-mode derivatives (jax.jvp, jax.jacfwd, jax.hessian) of solves whose
sensitivity is a custom-VJP rule (the default CheckpointAdjoint, and
BacksolveAdjoint), against the exact solution of y' = -a y,
y(t) = y0 exp(-a t); and reverse mode still through the custom rule."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import neuralde as nde
from neuralde._solve import _autodiff_sensitivity, _DirectForward

TS = jnp.array([0.0, 0.5, 1.0])
Y0 = jnp.array([1.0, 2.0])
A = jnp.array([0.7, 1.3])
TOL = 1e-10
SENSITIVITIES = {"default": {}, "backsolve": {"sensitivity": nde.BacksolveAdjoint()}}


def decay(t, y, a):
    return -a * y


def solve_ys(y0, a, **kw):
    return nde.solve(nde.ODETerm(decay), nde.Tsit5(), y0, TS, args=a, rtol=TOL, atol=TOL, **kw).ys


def exact(y0, a):
    return np.asarray(y0) * np.exp(-np.outer(TS, a))


@pytest.mark.parametrize("name", list(SENSITIVITIES))
def test_jvp_matches_exact(name):
    dy0, da = jnp.array([0.3, -0.4]), jnp.array([1.0, -0.5])
    ys, tangent = jax.jvp(lambda y0, a: solve_ys(y0, a, **SENSITIVITIES[name]), (Y0, A), (dy0, da))
    t = np.asarray(TS)[:, None]
    want = np.exp(-t * np.asarray(A)) * (np.asarray(dy0) - t * np.asarray(da) * np.asarray(Y0))
    np.testing.assert_allclose(np.asarray(ys), exact(Y0, A), rtol=1e-8)
    np.testing.assert_allclose(np.asarray(tangent), want, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", list(SENSITIVITIES))
def test_jacfwd_matches_exact_and_central_differences(name):
    jac = np.asarray(jax.jacfwd(lambda a: solve_ys(Y0, a, **SENSITIVITIES[name]))(A))  # (len(TS), 2, 2)
    t = np.asarray(TS)[:, None]
    want = np.zeros((3, 2, 2))
    for i in range(2):
        want[:, i, i] = (-t * np.asarray(Y0) * np.exp(-t * np.asarray(A)))[:, i]
    np.testing.assert_allclose(jac, want, rtol=1e-7, atol=1e-12)
    h = 1e-6
    for j in range(2):
        e = np.zeros(2)
        e[j] = h
        fd = (exact(Y0, np.asarray(A) + e) - exact(Y0, np.asarray(A) - e)) / (2 * h)
        np.testing.assert_allclose(jac[:, :, j], fd, rtol=1e-6, atol=1e-10)


def test_hessian_of_default_solve():
    # L(a) = sum y(1)^2 = sum y0^2 exp(-2 a): diagonal Hessian 4 y0^2 exp(-2 a).
    def loss(a):
        return jnp.sum(solve_ys(Y0, a)[-1] ** 2)

    hess = np.asarray(jax.hessian(loss)(A))
    want = np.diag(4 * np.asarray(Y0) ** 2 * np.exp(-2 * np.asarray(A)))
    np.testing.assert_allclose(hess, want, rtol=1e-7, atol=1e-12)
    g = np.asarray(jax.grad(loss)(A))
    np.testing.assert_allclose(g, -2 * np.asarray(Y0) ** 2 * np.exp(-2 * np.asarray(A)), rtol=1e-8)


def test_dispatch_by_transformation():
    # Which sensitivity `solve` runs, as it sees each transformation: the custom
    # VJP wherever reverse mode is innermost; the plain loop under jvps only.
    ckpt = nde.CheckpointAdjoint()
    seen = []

    def probe(x):
        seen.append(_autodiff_sensitivity(ckpt))
        return jnp.sum(jnp.sin(x))

    x = jnp.ones(2)
    cases = {
        "grad": lambda: jax.grad(probe)(x),
        "value_and_grad": lambda: jax.value_and_grad(probe)(x),
        "vjp": lambda: jax.vjp(probe, x),
        "jacrev": lambda: jax.jacrev(probe)(x),
        "hessian": lambda: jax.hessian(probe)(x),
        "jvp(grad)": lambda: jax.jvp(jax.grad(probe), (x,), (x,)),
        "jvp": lambda: jax.jvp(probe, (x,), (x,)),
        "jacfwd": lambda: jax.jacfwd(probe)(x),
        "vmap(jvp)": lambda: jax.vmap(lambda y: jax.jvp(probe, (y,), (y,)))(jnp.ones((3, 2))),
        "jvp(vmap)": lambda: jax.jvp(jax.vmap(probe), (jnp.ones((3, 2)),), (jnp.ones((3, 2)),)),
        "jit(jvp)": lambda: jax.jit(lambda y: jax.jvp(probe, (y,), (y,)))(x),
        "grad(jvp)": lambda: jax.grad(lambda y: jax.jvp(probe, (y,), (y,))[1])(x),
        "linearize": lambda: jax.linearize(probe, x),
    }
    got = {}
    for name, run in cases.items():
        seen.clear()
        run()
        got[name] = seen[0]
    for name in ("grad", "value_and_grad", "vjp", "jacrev", "hessian", "jvp(grad)"):
        assert got[name] is ckpt, (name, got[name])
    for name in ("jvp", "jacfwd", "vmap(jvp)", "jvp(vmap)", "jit(jvp)"):
        assert isinstance(got[name], _DirectForward), (name, got[name])
    for name in ("grad(jvp)", "linearize"):
        assert isinstance(got[name], nde.ReverseMode), (name, got[name])
    # Sensitivities that JAX can differentiate in forward mode are left alone.
    for s in (nde.ForwardMode(), nde.ReverseMode()):
        seen.clear()
        jax.jvp(lambda y: (seen.append(_autodiff_sensitivity(s)), probe(y))[1], (x,), (x,))
        assert seen[0] is s


def test_grad_still_custom_vjp():
    # Outside any forward mode, solve's default sensitivity is passed on as it
    # is (its custom VJP runs), and the gradient is the exact one.
    assert _autodiff_sensitivity(nde.CheckpointAdjoint()) == nde.CheckpointAdjoint()
    g = jax.grad(lambda a: jnp.sum(solve_ys(Y0, a)[-1]))(A)
    np.testing.assert_allclose(np.asarray(g), -np.asarray(Y0) * np.exp(-np.asarray(A)), rtol=1e-8)


class Linear(eqx.Module):
    w: jax.Array

    def __call__(self, t, y, args):
        return self.w @ y


def test_neural_ode_forward_mode_at_defaults():
    w = jnp.array([[-0.5, 1.0], [-1.0, -0.3]])
    v = jnp.array([[0.2, -0.1], [0.4, 0.3]])

    def run(w, y0):
        return nde.NeuralODE(Linear(w), TS, rtol=TOL, atol=TOL)(y0)

    # d/dw of expm(w t) y0 along v: the Frechet derivative of expm.
    _, tangent = jax.jvp(lambda w: run(w, Y0), (w,), (v,))
    want = np.stack([scipy.linalg.expm_frechet(np.asarray(w) * t, np.asarray(v) * t, compute_expm=False)
                     @ np.asarray(Y0) for t in np.asarray(TS)])
    np.testing.assert_allclose(np.asarray(tangent), want, rtol=1e-7, atol=1e-10)
    jac = jax.jacfwd(lambda y0: run(w, y0))(Y0)
    want = np.stack([scipy.linalg.expm(np.asarray(w) * t) for t in np.asarray(TS)])
    np.testing.assert_allclose(np.asarray(jac), want, rtol=1e-7, atol=1e-10)
