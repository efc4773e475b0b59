"""BacksolveAdjoint on SDEs (the stochastic adjoint): the Itô--Stratonovich
correction against its formula, gradients against exact pathwise gradients of
linear SDEs solved in closed form on the same Brownian path (converging as the
step shrinks), against CheckpointAdjoint on a neural SDE ensemble, and the
report of a failed backward solve."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralde as nde
from neuralde import _brownian as B
from neuralde.sensitivity.sde_backsolve import _diffusion_and_correction
from _compiled import release_after_module

LEVELS = 20  # SDETerm's default: the exact solutions query the same tree
KEY = jax.random.key(11)
SEED = B.seed_from_key(KEY)
TS = jnp.array([0.0, 0.5, 1.0])
FNS = {}
_release_compiled = release_after_module(FNS.clear)


def w_at(t, n, seed=SEED):
    """W(t) - W(0) of the tree on [0, 1] the solves use, n channels."""
    return B.increment(seed, 0.0, 1.0, 0.0, t, n, LEVELS, jnp.float64)[0]


def rel_err(got, want):
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.max(np.abs(np.asarray(b)))))
               for a, b in zip(got, want))


# ---------------------------------------------------------------- correction

@pytest.mark.parametrize("noise", ["diagonal", "scalar", "general", "additive"])
def test_correction_is_the_ito_stratonovich_drift(noise):
    # c_i = 1/2 sum_jk G_kj dG_ij/dy_k, with G as the (y.size, m) matrix of
    # each layout; the diffusions couple the components (diagonal noise whose
    # g_1 depends on y_2 included), and y is a pytree.
    y = {"u": jnp.array([0.3, -0.7]), "v": jnp.array(1.1)}
    p = jnp.array([0.6, -0.4, 0.9])

    def flat(y):
        return jnp.concatenate([y["u"], y["v"][None]])

    def unflat(f):
        return {"u": f[:2], "v": f[2]}

    if noise == "general":
        def g(t, y, p):
            f = flat(y)
            return jnp.stack([p[0] * f * f[::-1], jnp.sin(f) * p[1], p[2] * f[0] * jnp.ones(3)], axis=1)
        G = lambda f: g(0.2, unflat(f), p)  # noqa: E731
        term = nde.SDETerm(lambda t, y, p: y, g, noise="general", noise_dim=3)
    else:
        def g(t, y, p):
            f = flat(y) if noise != "additive" else jnp.ones(3) * (1.0 + t)
            return unflat(p[0] * jnp.sin(f * f[::-1]) + p[1] * jnp.roll(f, 1) ** 2 + p[2])
        if noise == "scalar":
            G = lambda f: flat(g(0.2, unflat(f), p))[:, None]  # noqa: E731
        else:
            G = lambda f: jnp.diag(flat(g(0.2, unflat(f), p)))  # noqa: E731
        term = nde.SDETerm(lambda t, y, p: y, g, noise=noise)
    f0 = flat(y)
    Gm, dG = G(f0), jax.jacfwd(G)(f0)  # dG[i, j, k] = dG_ij/dy_k
    want = 0.5 * np.einsum("kj,ijk->i", np.asarray(Gm), np.asarray(dG))
    g_got, c_got = _diffusion_and_correction(term, 0.2, y, p)
    got = flat(c_got)
    np.testing.assert_array_equal(np.asarray(g_got if noise == "general" else flat(g_got)),
                                  np.asarray(g(0.2, y, p) if noise == "general" else flat(g(0.2, y, p))))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-14)
    if noise == "additive":
        assert np.all(want == 0)


# ------------------------------------------------- exact pathwise gradients

def gbm_loss_exact(p, y0):
    # dy = mu y dt + sigma y dW per component (diagonal noise, two channels).
    out = 0.0
    for t in (0.5, 1.0):
        out += jnp.sum(jnp.sin(y0 * jnp.exp((p[0] - p[1] ** 2 / 2) * t + p[1] * w_at(t, 2))))
    return out


def rot_coeffs(p):
    # A = a0 I + a1 J, B_j = b_j0 I + b_j1 J with J the rotation generator: all
    # commute, so y(t) = expm((A - 1/2 sum_j B_j^2) t + sum_j B_j W_j(t)) y0.
    return p[0], p[1], p[2:].reshape(-1, 2)


J = jnp.array([[0.0, -1.0], [1.0, 0.0]])


def rot_drift(t, y, p):
    a0, a1, _ = rot_coeffs(p)
    return a0 * y + a1 * (J @ y)


def rot_columns(y, p):
    _, _, b = rot_coeffs(p)
    return jnp.stack([b[j, 0] * y + b[j, 1] * (J @ y) for j in range(b.shape[0])], axis=1)


def rot_loss_exact(p, y0, m, seed=SEED):
    a0, a1, b = rot_coeffs(p)
    out = 0.0
    for t in (0.5, 1.0):
        w = w_at(t, m, seed)
        # B_j^2 = (b0^2 - b1^2) I + 2 b0 b1 J
        alpha = (a0 - 0.5 * jnp.sum(b[:, 0] ** 2 - b[:, 1] ** 2)) * t + jnp.sum(b[:, 0] * w)
        beta = (a1 - jnp.sum(b[:, 0] * b[:, 1])) * t + jnp.sum(b[:, 1] * w)
        rot = jnp.array([[jnp.cos(beta), -jnp.sin(beta)], [jnp.sin(beta), jnp.cos(beta)]])
        out += jnp.sum(jnp.sin(jnp.exp(alpha) * (rot @ y0)))
    return out


def grad_fn(name, term, solver):
    if name not in FNS:
        @jax.jit
        def g(p, y0, dt, tol):
            def loss(p, y0):
                fixed = solver.__class__ is nde.EulerMaruyama or name.endswith("fixed")
                sol = nde.solve(term, solver, y0, TS, args=p, key=KEY, sensitivity=nde.BacksolveAdjoint(), dt0=dt,
                                rtol=tol, atol=tol, adaptive=not fixed, max_steps=8192)
                return jnp.sum(jnp.sin(sol.ys[1:]))
            return jax.grad(loss, argnums=(0, 1))(p, y0)
        FNS[name] = g
    return FNS[name]


def test_gbm_diagonal_fixed_steps_converge_to_exact():
    term = nde.SDETerm(lambda t, y, p: p[0] * y, lambda t, y, p: p[1] * y)
    p, y0 = jnp.array([0.5, 0.8]), jnp.array([1.0, 2.0])
    want = jax.grad(gbm_loss_exact, argnums=(0, 1))(p, y0)
    g = grad_fn("gbm-fixed", term, nde.SRIW1())
    errs = [rel_err(g(p, y0, 2.0 ** -k, 1e-3), want) for k in (6, 9)]
    # Strong order 1 (commutative noise): 8x smaller steps, >= 4x smaller error.
    assert errs[1] < 5e-3 and errs[0] / errs[1] > 4, errs


def test_scalar_noise_adaptive_matches_exact():
    # One Brownian motion driving both coupled components (g_1 depends on y_2).
    # Adaptive: the error at a tolerance depends on the step sequence, which
    # a rounding-level change reshuffles (one path's error at tol 1e-5 moved
    # between 1.1e-3 and 2.5e-3 with the program's fusion): the mean over six
    # paths is the figure.
    p = jnp.array([0.3, 0.8, 0.5, 0.6])
    y0 = jnp.array([1.0, 0.5])
    keys = [KEY] + [jax.random.key(100 + k) for k in range(1, 6)]
    term = nde.SDETerm(rot_drift, lambda t, y, p: rot_columns(y, p)[:, 0], noise="scalar")

    @jax.jit
    def grads(tol):
        def one(key):
            def loss(p, y0):
                sol = nde.solve(term, nde.SRIW1(), y0, TS, args=p, key=key, sensitivity=nde.BacksolveAdjoint(),
                                dt0=0.01, rtol=tol, atol=tol, max_steps=8192)
                return jnp.sum(jnp.sin(sol.ys[1:]))
            return jax.grad(loss, argnums=(0, 1))(p, y0)
        return jax.vmap(one)(jnp.stack(keys))

    wants = [jax.grad(rot_loss_exact, argnums=(0, 1))(p, y0, 1, B.seed_from_key(k)) for k in keys]
    errs = []
    for tol in (1e-3, 1e-5):
        got = grads(tol)
        errs.append(np.mean([rel_err(jax.tree_util.tree_map(lambda x: x[i], got), wants[i])
                             for i in range(len(keys))]))
    assert errs[1] < 2e-3 and errs[1] < errs[0] / 5, errs


def test_general_noise_euler_maruyama_converges_to_exact():
    # Two Brownian motions through a (2, 2) diffusion matrix.
    p = jnp.array([-0.2, 0.5, 0.4, 0.3, 0.2, -0.5])
    y0 = jnp.array([0.7, -0.4])
    term = nde.SDETerm(rot_drift, lambda t, y, p: rot_columns(y, p), noise="general", noise_dim=2)
    want = jax.grad(rot_loss_exact, argnums=(0, 1))(p, y0, 2)
    g = grad_fn("rot-general", term, nde.EulerMaruyama())
    errs = [rel_err(g(p, y0, 2.0 ** -k, 1e-3), want) for k in (6, 10)]
    # Euler-Maruyama forward: strong order 1/2 (16x smaller steps, >= 2x).
    assert errs[1] < 3e-2 and errs[0] / errs[1] > 2, errs


def test_additive_noise_sra1_matches_checkpoint():
    # Ornstein-Uhlenbeck with a time-dependent noise: the adjoint gradient and
    # the exact derivative of the computed path meet as the step shrinks.
    term = nde.SDETerm(lambda t, y, p: -p[0] * y + p[1], lambda t, y, p: p[2] * (1.0 + t) * jnp.ones_like(y),
                       noise="additive")
    p, y0 = jnp.array([1.5, 0.3, 0.4]), jnp.array([1.0, -1.0])

    @jax.jit
    def ref(p, y0):
        def loss(p, y0):
            sol = nde.solve(term, nde.SRA1(), y0, TS, args=p, key=KEY, dt0=2.0 ** -12, adaptive=False,
                            max_steps=8192)
            return jnp.sum(jnp.sin(sol.ys[1:]))
        return jax.grad(loss, argnums=(0, 1))(p, y0)

    want = ref(p, y0)
    g = grad_fn("ou-fixed", term, nde.SRA1())
    errs = [rel_err(g(p, y0, 2.0 ** -k, 1e-3), want) for k in (5, 8)]
    assert errs[1] < 5e-3 and errs[0] / errs[1] > 4, errs


# ------------------------------------------------ a neural SDE, vmapped keys

def test_neural_sde_ensemble_matches_checkpoint():
    kd, kg = jax.random.split(jax.random.key(0))
    drift = eqx.nn.MLP(3, 3, 8, 1, activation=jnp.tanh, key=kd)
    diffusion = eqx.nn.MLP(3, 3, 8, 1, activation=jnp.tanh, final_activation=lambda x: 0.3 * jax.nn.sigmoid(x),
                           key=kg)
    ts = jnp.linspace(0.0, 1.0, 5)
    keys = jax.random.split(jax.random.key(5), 4)
    y0 = jnp.array([0.5, -0.3, 0.1])

    def loss(models, sensitivity):
        d, g = models
        model = nde.NeuralSDE(lambda t, y, a: d(y), lambda t, y, a: g(y), ts, sensitivity=sensitivity,
                              dt0=2.0 ** -8, adaptive=False, max_steps=1024)
        ys = jax.vmap(lambda k: model(y0, k))(keys)
        return jnp.mean((ys - 0.2) ** 2)

    params = eqx.filter((drift, diffusion), eqx.is_inexact_array)
    grads = {}
    for name, sens in (("backsolve", nde.BacksolveAdjoint()), ("checkpoint", nde.CheckpointAdjoint())):
        grads[name] = eqx.filter_jit(eqx.filter_grad(lambda m: loss(m, sens)))((drift, diffusion))
    got = jax.tree_util.tree_leaves(eqx.filter(grads["backsolve"], eqx.is_inexact_array))
    want = jax.tree_util.tree_leaves(eqx.filter(grads["checkpoint"], eqx.is_inexact_array))
    assert len(got) == len(jax.tree_util.tree_leaves(params))
    scale = max(float(np.max(np.abs(w))) for w in want)
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(got, want))
    assert err < 1e-2 * scale, (err, scale)


# ---------------------------------------------------------------- failure

def test_failed_backward_solve_is_reported():
    # Fast decay: y(10) underflows to 0 forwards, but the adjoint grows like
    # e^(100 t) backwards and overflows. throw=True names the cause and the fix;
    # throw=False gives NaN, never plausible numbers.
    term = nde.SDETerm(lambda t, y, p: -p * y, lambda t, y, p: 0.1 * jnp.ones_like(y), noise="additive")

    def loss(p, sensitivity, throw):
        sol = nde.solve(term, nde.SRA1(), jnp.array([1.0]), jnp.array([0.0, 10.0]), args=p, key=KEY, dt0=0.01,
                        adaptive=False, max_steps=2000, sensitivity=sensitivity, throw=throw)
        return sol.ys[-1, 0]

    p = jnp.array(100.0)
    with pytest.raises(RuntimeError, match=r"BacksolveAdjoint: the backward solve.*CheckpointAdjoint"):
        jax.block_until_ready(jax.grad(loss)(p, nde.BacksolveAdjoint(), True))
    assert np.isnan(float(jax.grad(loss)(p, nde.BacksolveAdjoint(), False)))
    assert np.isfinite(float(jax.grad(loss)(p, nde.CheckpointAdjoint(), True)))


def test_hessian_through_adaptive_backsolve():
    # Forward over reverse (`jax.hessian`) keeps the custom rule: its backward
    # solve's step sizes and Brownian queries must not be differentiated (the
    # tree's path is piecewise quadratic at 2^-20 of the span: a derivative
    # through the step times is ~1e10).
    term = nde.SDETerm(lambda t, y, a: -a[0] * y + jnp.sin(y[::-1]), lambda t, y, a: a[1] * jnp.cos(y))

    def f(p, sensitivity):
        return jnp.sum(nde.solve(term, nde.SRIW1(), jnp.array([0.8, -0.5]), jnp.array([0.0, 0.125, 0.25]), args=p,
                                 key=KEY, sensitivity=sensitivity, rtol=1e-5, atol=1e-5).ys[-1])

    p = jnp.array([0.7, 0.4])
    got = jax.jit(jax.hessian(lambda p: f(p, nde.BacksolveAdjoint())))(p)
    want = jax.jit(jax.hessian(lambda p: f(p, nde.CheckpointAdjoint())))(p)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2 * float(np.max(np.abs(want))))
