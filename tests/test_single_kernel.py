"""The forward solve's loop compiled as one XLA:CPU kernel (`neuralde._single_kernel`).

The mark changes how XLA emits the loop, not what it computes: solutions with
and without it must agree to rounding (the one kernel may contract a multiply
and an add differently: a few ulps), and the mark must be applied where the
emitter handles the loop, and nowhere else (a matrix-matrix product, a
library call such as an LU factorisation, a dense history carried through the
loop). Which loops get it is read off the compiled program.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralde as nde

MARK = 'inlineable="false",xla_cpu_small_call="true"'


def lotka_volterra(t, u, p):
    return jnp.stack([p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]])


TS = jnp.linspace(0.0, 10.0, 41)
U0 = jnp.array([1.0, 1.0])
P = jnp.array([1.5, 1.0, 3.0, 1.0])


def _solve(solver=nde.Tsit5(), field=lotka_volterra, y0=U0, args=P, **kw):
    def f(y0, args):
        sol = nde.solve(nde.ODETerm(field), solver, y0, TS, args=args, rtol=1e-8, atol=1e-8, **kw)
        return sol.ys, sol.stats["num_steps"], sol.status

    return f, (y0, args)


def _compiled(f, operands, monkeypatch, enabled):
    monkeypatch.setenv("NEURALDE_SINGLE_KERNEL", "1" if enabled else "0")
    jax.clear_caches()  # the setting is read when the solve is traced
    compiled = jax.jit(f).lower(*operands).compile()
    return compiled, compiled.as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
def test_marked_loop_matches_the_ordinary_one(monkeypatch):
    f, operands = _solve()
    marked, text = _compiled(f, operands, monkeypatch, True)
    plain, plain_text = _compiled(f, operands, monkeypatch, False)
    assert text.count(MARK) >= 1 and MARK not in plain_text
    (ys, steps, status), (ys0, steps0, status0) = marked(*operands), plain(*operands)
    assert int(status) == int(status0) == 0 and int(steps) == int(steps0)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ys0), rtol=8 * np.finfo(np.float64).eps)
    # and both are the solution: against scipy's DOP853 at tight tolerances.
    from scipy.integrate import solve_ivp

    a, b, c, d = np.asarray(P)
    ref = solve_ivp(lambda t, u: [a * u[0] - b * u[0] * u[1], -c * u[1] + d * u[0] * u[1]], (0.0, 10.0), np.asarray(U0),
                    method="DOP853", rtol=1e-12, atol=1e-12, t_eval=np.asarray(TS)).y.T
    np.testing.assert_allclose(np.asarray(ys), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
def test_matrix_vector_products_are_marked_and_agree(monkeypatch):
    w1 = jnp.linspace(-1.0, 1.0, 2 * 16).reshape(2, 16) * 0.5
    w2 = jnp.linspace(1.0, -1.0, 16 * 2).reshape(16, 2) * 0.5

    def field(t, y, ws):
        return jnp.tanh(y @ ws[0]) @ ws[1]

    f, operands = _solve(field=field, args=(w1, w2))
    marked, text = _compiled(f, operands, monkeypatch, True)
    plain, _ = _compiled(f, operands, monkeypatch, False)
    assert MARK in text
    np.testing.assert_allclose(np.asarray(marked(*operands)[0]), np.asarray(plain(*operands)[0]),
                               rtol=8 * np.finfo(np.float64).eps, atol=1e-15)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
@pytest.mark.parametrize("case", ["matrix-matrix", "lu", "dense", "vmap-matmul"])
def test_loops_the_emitter_cannot_take_are_not_marked(case, monkeypatch):
    if case == "matrix-matrix":
        # A state that is a matrix: the vector field is a matrix-matrix product.
        a = jnp.array([[0.0, 1.0], [-1.0, -0.1]])
        f, operands = _solve(field=lambda t, y, a: a @ y, y0=jnp.eye(2), args=a)
    elif case == "lu":
        # An implicit solver factorises its Newton matrix with a library call.
        f, operands = _solve(solver=nde.Kvaerno5(), field=lambda t, y, a: -a * y, y0=U0, args=jnp.asarray(0.5))
    elif case == "dense":
        f, operands = _solve(dense=True)
    else:
        # Under `jax.vmap` a matrix-vector product becomes a matrix-matrix one.
        w = jnp.linspace(-1.0, 1.0, 4).reshape(2, 2)
        g, _ = _solve(field=lambda t, y, w: jnp.tanh(y @ w), args=w)
        f, operands = jax.vmap(g, in_axes=(0, None)), (jnp.ones((3, 2)), w)
    _, text = _compiled(f, operands, monkeypatch, True)
    assert MARK not in text
    # and the solve runs
    out = jax.jit(f)(*operands)
    assert np.all(np.isfinite(np.asarray(out[0])))


def _configurations():
    ts = jnp.linspace(0.0, 1.0, 11)

    def decay(t, y, a):
        return -a * y

    def pytree_field(t, y, a):
        return {"x": -a * y["x"], "v": jnp.sum(y["x"]) - y["v"]}

    return {
        "vmap": (lambda a: jax.vmap(lambda y0: nde.solve(nde.ODETerm(decay), nde.Tsit5(), y0, ts, args=a).ys)(
            jnp.linspace(0.5, 1.5, 6).reshape(3, 2)), 0.7),
        "jacfwd": (jax.jacfwd(lambda a: nde.solve(nde.ODETerm(decay), nde.Tsit5(), jnp.ones(2), ts, args=a,
                                                  sensitivity=nde.ForwardMode()).ys), 0.7),
        "backsolve-grad": (jax.grad(lambda a: jnp.sum(nde.solve(nde.ODETerm(decay), nde.Tsit5(), jnp.ones(2), ts,
                                                                args=a, sensitivity=nde.BacksolveAdjoint()).ys)), 0.7),
        "pytree": (lambda a: nde.solve(nde.ODETerm(pytree_field), nde.Dopri5(), {"x": jnp.ones(2), "v": jnp.zeros(())},
                                       ts, args=a).ys, 0.7),
        "float32": (lambda a: nde.solve(nde.ODETerm(decay), nde.Tsit5(), jnp.ones(3, jnp.float32),
                                        ts.astype(jnp.float32), args=a).ys, jnp.float32(0.7)),
    }


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
@pytest.mark.parametrize("name", ["vmap", "jacfwd", "backsolve-grad", "pytree", "float32"])
def test_marked_and_ordinary_loops_agree_under_transformations(name, monkeypatch):
    f, a = _configurations()[name]
    operands = (jnp.asarray(a),)
    marked, text = _compiled(f, operands, monkeypatch, True)
    plain, plain_text = _compiled(f, operands, monkeypatch, False)
    # Both programs are what they claim to be, or the comparison would be of a
    # loop with itself.
    assert MARK in text and MARK not in plain_text
    for x, y in zip(jax.tree_util.tree_leaves(marked(*operands)), jax.tree_util.tree_leaves(plain(*operands))):
        x, y = np.asarray(x), np.asarray(y)
        assert np.all(np.isfinite(x))
        ulps = 8 * np.finfo(x.dtype).eps
        np.testing.assert_allclose(x, y, rtol=ulps, atol=ulps * np.max(np.abs(y)))
