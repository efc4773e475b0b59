"""The forward solve's loop compiled as one XLA:CPU kernel (`neuralde._single_kernel`).

The mark changes how XLA emits the loop, not what it computes: solutions with
and without it must agree to rounding (the one kernel may contract a multiply
and an add differently: a few ulps), and the mark must be applied where the
emitter handles the loop, and nowhere else (a matrix-matrix product, a
library call such as an LU factorisation, a dense history carried through the
loop). Which loops get it is read off the compiled program.
"""
from __future__ import annotations

import re

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
@pytest.mark.parametrize("mode", ["batch as one state", "vmap"])
def test_small_matrix_products_are_split_marked_and_agree(mode, monkeypatch):
    # A batch of 5 states in 2-D through a 2-16-2 MLP (W3's shape, smaller):
    # its products are matrix-matrix ([5, 2] @ [2, 16]: 2 terms summed;
    # [5, 16] @ [16, 2]: 2 columns; backward, [2, 5] @ [5, 16]: 2 rows). Inside
    # the marked calls they are split into outer and matrix-vector products,
    # and the forward solve and both CheckpointAdjoint loops are one kernel.
    # Under `vmap` (a per-lane [16] @ [16, 2] batched into [5, 16] @ [16, 2])
    # the solve is; its gradient's loops index the saves per lane (a gather
    # and a scatter, which the emitter does not take) and are not marked, so
    # only the solve is compared there.
    params = _mlp([2, 16, 2], key=4)
    y0 = jnp.asarray(np.random.default_rng(5).normal(size=(5, 2)))

    def solve(p):
        one = lambda y: nde.solve(nde.ODETerm(_mlp_field), nde.Tsit5(), y, TS[:11], args=p,  # noqa: E731
                                  rtol=1e-8, atol=1e-8).ys
        return jax.vmap(one)(y0) if mode == "vmap" else one(y0)

    def loss(p):
        return jnp.sum(solve(p) ** 2)

    for f, calls in ((solve, 1),) if mode == "vmap" else ((solve, 1), (jax.grad(loss), 2)):
        marked, text = _compiled(f, (params,), monkeypatch, True)
        plain, plain_text = _compiled(f, (params,), monkeypatch, False)
        assert _marked_calls(text) >= calls and MARK not in plain_text
        x, y = jax.tree_util.tree_leaves(marked(params)), jax.tree_util.tree_leaves(plain(params))
        scale = max(float(np.max(np.abs(b))) for b in y)
        for a, b in zip(x, y):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-11 * scale)
    if mode == "vmap":
        return
    # and the gradient is the exact one of the steps taken: central differences
    w = params[0][0]
    eps = 1e-6
    shifted = lambda d: [(w.at[1, 7].add(d), params[0][1]), params[1]]  # noqa: E731
    fd = (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)
    np.testing.assert_allclose(float(x[0][1, 7]), float(fd), rtol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
@pytest.mark.parametrize("case", ["matrix-matrix", "lu", "large state", "vmap-matmul"])
def test_loops_the_emitter_cannot_take_are_not_marked(case, monkeypatch):
    if case == "matrix-matrix":
        # A state that is a matrix: the vector field is a matrix-matrix product
        # (8 x 8 x 8: too wide on every side to be split, see below).
        a = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8))) / 8 - jnp.eye(8)
        f, operands = _solve(field=lambda t, y, a: a @ y, y0=jnp.eye(8), args=a)
    elif case == "lu":
        # An implicit solver on more than 8 equations factorises its Newton
        # matrix with a library call (LAPACK's getrf); on up to 8, unrolled.
        f, operands = _solve(solver=nde.Kvaerno5(), field=lambda t, y, a: -a * y, y0=jnp.ones(9),
                             args=jnp.asarray(0.5))
    elif case == "large state":
        # The error norm sums 4096 squares: XLA:CPU gives a float reduction of
        # 4096 elements or more to its YNNPACK fusion, which the emitter does
        # not implement (marked, the program fails to compile).
        f, operands = _solve(field=lambda t, y, a: -a * y, y0=jnp.linspace(1.0, 2.0, 4096), args=jnp.asarray(0.5))
    else:
        # Under `jax.vmap` a matrix-vector product becomes a matrix-matrix one
        # (8 lanes of an 8 x 8 product: not split).
        w = jnp.linspace(-1.0, 1.0, 64).reshape(8, 8) / 8
        g, _ = _solve(field=lambda t, y, w: jnp.tanh(y @ w), y0=jnp.ones(8), args=w)
        f, operands = jax.vmap(g, in_axes=(0, None)), (jnp.ones((8, 8)), w)
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


def _marked_calls(text):
    return sum(1 for line in text.splitlines() if " call(" in line and MARK in line)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
def test_checkpoint_adjoint_loops_are_marked_and_exact(monkeypatch):
    # CheckpointAdjoint's loop of steps alone, forward (checkpoints made inside
    # the kernel) and backward (the checkpoints passed beside the packed inputs).
    def loss(p, sensitivity):
        sol = nde.solve(nde.ODETerm(lotka_volterra), nde.Tsit5(), U0, TS, args=p, rtol=1e-8, atol=1e-8,
                        sensitivity=sensitivity)
        return jnp.sum((sol.ys - 1.0) ** 2)

    f = jax.grad(lambda p: loss(p, nde.CheckpointAdjoint()))
    q = jnp.array([2.2, 1.0, 2.0, 0.4])
    marked, text = _compiled(f, (q,), monkeypatch, True)
    plain, plain_text = _compiled(f, (q,), monkeypatch, False)
    assert _marked_calls(text) >= 2 and MARK not in plain_text
    g, g0 = np.asarray(marked(q)), np.asarray(plain(q))
    np.testing.assert_allclose(g, g0, rtol=1e-11, atol=1e-11 * np.max(np.abs(g0)))
    # and the same steps' exact gradient: ReverseMode through the solver
    ref = np.asarray(jax.jit(jax.grad(lambda p: loss(p, nde.ReverseMode())))(q))
    np.testing.assert_allclose(g, ref, rtol=1e-9, atol=1e-9 * np.max(np.abs(ref)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
@pytest.mark.parametrize("case", ["all-constant solve", "all-constant gradient", "dense, history unused"])
def test_constant_inputs_compile(case, monkeypatch):
    # XLA clones a call's constant operands into the callee and folds the uses
    # it can; the single-kernel emitter aborts the process on a parameter left
    # without uses unless its operand is a small constant. These programs give
    # the loops constant inputs only (the first two: no argument at all).
    q = jnp.array([2.2, 1.0, 2.0, 0.4])

    def loss(p):
        sol = nde.solve(nde.ODETerm(lotka_volterra), nde.Tsit5(), U0, TS, args=p, rtol=1e-8, atol=1e-8,
                        sensitivity=nde.CheckpointAdjoint())
        return jnp.sum((sol.ys - 1.0) ** 2)

    if case == "all-constant solve":
        f = lambda: _solve()[0](U0, P)[0]  # noqa: E731
    elif case == "all-constant gradient":
        f = lambda: jax.grad(loss)(q)  # noqa: E731
    else:
        f = lambda: _solve(dense=True)[0](U0, P)[0]  # noqa: E731
    marked, text = _compiled(f, (), monkeypatch, True)
    plain, _ = _compiled(f, (), monkeypatch, False)
    assert MARK in text
    x, y = np.asarray(marked()), np.asarray(plain())
    np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-11 * np.max(np.abs(y)))


def _mlp(sizes, key=0):
    rng = np.random.default_rng(key)
    return [(jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(a), (a, b))), jnp.asarray(rng.normal(0.0, 0.1, b)))
            for a, b in zip(sizes[:-1], sizes[1:])]


def _mlp_field(t, y, params):
    for i, (w, b) in enumerate(params):
        y = y @ w + b
        y = jnp.tanh(y) if i < len(params) - 1 else y
    return y


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
@pytest.mark.parametrize("case", ["gradient", "all-constant gradient"])
def test_neural_field_beyond_the_constant_bound(case, monkeypatch):
    # A 2-40-40-2 MLP: its weights (14.7 kB) exceed the 10000 bytes XLA:CPU
    # embeds as a constant, so the packed inputs are made a run-time value;
    # "all-constant": the weights closed over, every input a constant. The
    # backward steps hold outer products (the weights' cotangents), which
    # become broadcast multiplies; both CheckpointAdjoint loops are marked.
    params = _mlp([2, 40, 40, 2])
    y0 = jnp.array([0.5, -0.3])

    def loss(p):
        sol = nde.solve(nde.ODETerm(_mlp_field), nde.Tsit5(), y0, TS[:11], args=p, rtol=1e-8, atol=1e-8)
        return jnp.sum(sol.ys ** 2)

    if case == "gradient":
        f, operands = jax.grad(loss), (params,)
    else:
        f, operands = (lambda: jax.grad(loss)(params)), ()
    marked, text = _compiled(f, operands, monkeypatch, True)
    plain, plain_text = _compiled(f, operands, monkeypatch, False)
    assert _marked_calls(text) >= 2 and MARK not in plain_text
    g = jax.tree_util.tree_leaves(marked(*operands))
    g0 = jax.tree_util.tree_leaves(plain(*operands))
    scale = max(float(np.max(np.abs(x))) for x in g0)
    for x, y in zip(g, g0):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-11, atol=1e-11 * scale)
    # and the exact gradient of the same steps, by central differences on one
    # weight (the steps do not move for a step of 1e-6: same count both sides)
    w = params[1][0]
    eps = 1e-6
    plus = [params[0], (w.at[3, 5].add(eps), params[1][1]), params[2]]
    minus = [params[0], (w.at[3, 5].add(-eps), params[1][1]), params[2]]
    fd = (loss(plus) - loss(minus)) / (2 * eps)
    np.testing.assert_allclose(float(g[2][3, 5]), float(fd), rtol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
def test_small_dot_rules_match_dot_general():
    # `_small_dot_p` differentiates, transposes and batches as `dot_general`
    # does (its rules are dot_general's, traced and re-bound).
    from neuralde._single_kernel import _small_dot_p

    rng = np.random.default_rng(3)
    x, y = jnp.asarray(rng.normal(size=(3, 4))), jnp.asarray(rng.normal(size=(4, 5)))
    dims = dict(dimension_numbers=(((1,), (0,)), ((), ())), precision=None, preferred_element_type=jnp.float64,
                out_sharding=None)
    small = lambda a, b: _small_dot_p.bind(a, b, **dims)  # noqa: E731
    ref = lambda a, b: a @ b  # noqa: E731
    for fn in (lambda f: f(x, y),
               lambda f: jax.jvp(f, (x, y), (jnp.cos(x), jnp.sin(y)))[1],
               lambda f: jax.grad(lambda a, b: jnp.sum(jnp.sin(f(a, b))), argnums=(0, 1))(x, y),
               lambda f: jax.vmap(f, in_axes=(0, None))(jnp.stack([x, 2 * x]), y),
               lambda f: jax.vmap(f, in_axes=(None, 1))(x, jnp.stack([y, -y], axis=1)),
               lambda f: jax.jit(jax.hessian(lambda a: jnp.sum(jnp.tanh(f(a, y)))))(x)):
        for a, b in zip(jax.tree_util.tree_leaves(fn(small)), jax.tree_util.tree_leaves(fn(ref))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-13)
    # lowered for the CPU: small matrix-matrix products split into outer or
    # matrix-vector products (by rows, by columns, by terms summed), exactly
    for shape_x, shape_y in (((3, 6), (6, 5)), ((6, 5), (5, 2)), ((6, 2), (2, 7))):
        a, b = jnp.asarray(rng.normal(size=shape_x)), jnp.asarray(rng.normal(size=shape_y))
        lowered = [line for line in jax.jit(small).lower(a, b).as_text().splitlines() if "dot_general" in line]
        assert not any(re.search(r"\(tensor<\d+x\d+xf64>, tensor<\d+x\d+xf64>\)", line) for line in lowered)
        np.testing.assert_allclose(np.asarray(jax.jit(small)(a, b)), np.asarray(a) @ np.asarray(b), rtol=1e-13)
    # an outer product (nothing contracted) as a multiply
    outer = dict(dims, dimension_numbers=(((), ()), ((), ())))
    u, v = x[0], y[:, 0]
    text = jax.jit(lambda a, b: _small_dot_p.bind(a, b, **outer)).lower(u, v).as_text()
    assert "dot_general" not in text
    np.testing.assert_allclose(np.asarray(jax.jit(lambda a, b: _small_dot_p.bind(a, b, **outer))(u, v)),
                               np.outer(np.asarray(u), np.asarray(v)), rtol=1e-15)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
def test_products_screened_at_trace_time_are_the_ones_never_marked(monkeypatch):
    # `_has_large_product` skips the packed call where its product could never
    # be marked. It must agree with the lowering's own verdict, read off the
    # compiled program with the screen off: no call it drops would have been
    # one kernel, and the ones it drops are not.
    from neuralde import _single_kernel as sk

    monkeypatch.setenv("NEURALDE_SINGLE_KERNEL", "1")
    rng = np.random.default_rng(4)

    def loop(x, w):  # a small loop around the products, as a solver's
        return jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ w) @ w.T + c[..., :1], x)

    cases = {  # name: (x shape, w shape, vmapped over x's first axis)
        "matrix-vector": ((8,), (8, 8), False),
        "split by columns and by terms": ((6, 5), (5, 3), False),
        "split by terms": ((30, 2), (2, 2), False),
        "8 x 8 x 8, not split": ((8, 8), (8, 8), False),
        "W4's layer": ((256, 64), (64, 64), False),
        "vmap of matrix-vector (W4 per lane)": ((256, 64), (64, 64), True),
        "vmap of a small one": ((3, 4), (4, 4), True),
    }
    screen = sk._has_large_product
    verdicts = set()
    for name, (sx, sw, batched) in cases.items():
        x, w = jnp.asarray(rng.normal(size=sx)), jnp.asarray(rng.normal(size=sw)) / sw[0]
        f = (lambda x, w: sk.single_kernel(loop, x, w))
        f = jax.vmap(f, in_axes=(0, None)) if batched else f
        dropped = []
        monkeypatch.setattr(sk, "_has_large_product", lambda j: dropped.append(screen(j)) or False)
        jax.clear_caches()
        marked = MARK in jax.jit(f).lower(x, w).compile().as_text()
        monkeypatch.setattr(sk, "_has_large_product", screen)
        # the screen's verdict on the call actually lowered (the batched one
        # under `vmap`, screened again by `_call`)
        assert dropped, name
        assert dropped[-1] == (not marked), name
        verdicts.add(marked)
        np.testing.assert_allclose(np.asarray(jax.jit(f)(x, w)), np.asarray(jax.vmap(loop, in_axes=(0, None))(x, w)
                                   if batched else loop(x, w)), rtol=1e-13, atol=1e-13)
    assert verdicts == {True, False}  # both kinds were among the cases


def test_packing_is_exact_and_differentiable():
    from neuralde._single_kernel import _Packing

    values = [jnp.array([True, False, True]), jnp.array([-2**31, 2**31 - 1], jnp.int32),
              jnp.array([2**32 - 1, 7], jnp.uint32), jnp.array([-2**63, 2**63 - 1], jnp.int64),
              jnp.array([1e-3, -65504.0], jnp.float16), jnp.array([np.pi, np.nan, -np.inf], jnp.float32),
              jnp.arange(6.0).reshape(2, 3) / 7, np.zeros((2,), jax.dtypes.float0)]
    packing = _Packing([(v.dtype, v.shape) for v in values])
    assert packing.nbytes == 8 * (3 + 2 + 2 + 2 + 2 + 3 + 6)
    out = packing.unpack(packing.pack(values))
    for v, w in zip(values, out):
        assert v.dtype == w.dtype and v.shape == w.shape
        np.testing.assert_array_equal(np.asarray(v), np.asarray(w))
    # floats carry their tangents through, exactly
    floats = [jnp.array([1.5, 2.5], jnp.float32), jnp.array([3.0]), jnp.array([4, 5], jnp.int32)]
    p = _Packing([(v.dtype, v.shape) for v in floats])

    def f(a, b):
        x, y, n = p.unpack(p.pack([a, b, floats[2]]))
        return jnp.sum(x * 2.0) + y[0] ** 2 + jnp.sum(n)

    ga, gb = jax.grad(f, argnums=(0, 1))(floats[0], floats[1])
    np.testing.assert_array_equal(np.asarray(ga), [2.0, 2.0])
    np.testing.assert_array_equal(np.asarray(gb), [6.0])
    # a float32-only set packs into float32
    assert _Packing([(jnp.float32, (2,)), (jnp.int32, ())]).dtype == jnp.float32


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
@pytest.mark.parametrize("solver", [nde.SRIW1(), nde.EulerMaruyama()], ids=["SRIW1", "EulerMaruyama"])
def test_sde_loop_is_marked_and_agrees(solver, monkeypatch):
    # The SDE loop queries the Brownian tree inside (integer bit operations,
    # `count_leading_zeros` among them). Fixed steps: the same increments, so
    # the same solution to rounding. (Adaptive steps accept or reject on error
    # estimates that depend on the noise, and a rounding difference can change
    # the sequence of steps: the unmarked solver's step count moves by up to
    # 10% when rtol moves by 1e-15, so there only the fixed steps are compared.)
    term = nde.SDETerm(lambda t, y, a: -a * y, lambda t, y, a: 0.3 * y)
    ts = jnp.linspace(0.0, 1.0, 11)

    def f(a, key):
        return nde.solve(term, solver, jnp.ones(2), ts, args=a, key=key, dt0=0.0123, adaptive=False).ys

    operands = (jnp.asarray(0.5), jax.random.key(3))
    marked, text = _compiled(f, operands, monkeypatch, True)
    plain, plain_text = _compiled(f, operands, monkeypatch, False)
    assert MARK in text and MARK not in plain_text
    x, y = np.asarray(marked(*operands)), np.asarray(plain(*operands))
    np.testing.assert_allclose(x, y, rtol=8 * np.finfo(np.float64).eps, atol=1e-15)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
def test_sde_checkpoint_gradient_is_marked_and_agrees(monkeypatch):
    # Regression: the backward loop of an SDE gradient, its checkpoints passed
    # beside the packed inputs. XLA prunes the parts of the carry the backward
    # step does not read, the loop drops them, and the emitter aborted the
    # process on the call's parameter left without a use (here max_steps=512;
    # the default 4096 was then over the size bound, and not marked; fixed or
    # adaptive steps alike). The call now holds a use of every such input that
    # XLA cannot remove.
    term = nde.SDETerm(lambda t, y, a: a * y * (1.0 - y), lambda t, y, a: 0.3 * y)
    ts = jnp.linspace(0.0, 1.0, 3)

    def loss(a, key):
        sol = nde.solve(term, nde.SRIW1(), jnp.array([0.3]), ts, args=a, key=key, dt0=0.01, adaptive=False,
                        max_steps=512)
        return jnp.sum(sol.ys[-1] ** 2)

    f = jax.grad(loss)
    operands = (jnp.asarray(1.5), jax.random.key(3))
    marked, text = _compiled(f, operands, monkeypatch, True)
    plain, plain_text = _compiled(f, operands, monkeypatch, False)
    assert _marked_calls(text) >= 2 and MARK not in plain_text
    g, g0 = float(marked(*operands)), float(plain(*operands))
    np.testing.assert_allclose(g, g0, rtol=1e-10)
    # and it is the gradient of this path: central differences (fixed steps:
    # the same increments on both sides)
    eps = 1e-6
    fd = (loss(1.5 + eps, operands[1]) - loss(1.5 - eps, operands[1])) / (2 * eps)
    np.testing.assert_allclose(g, float(fd), rtol=1e-7)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
def test_delay_loop_is_marked_and_agrees(monkeypatch):
    # Delay Lotka-Volterra with a lag (0.1) shorter than most steps: the
    # history lookups, and the loop of attempts that corrects a step which
    # reads inside itself, all in one kernel.
    def delay_lv(t, u, h, p):
        return jnp.stack([(p[0] - p[1] * u[1]) * h(t - 0.1)[0], (p[2] * u[0] - p[3]) * u[1]])

    def f(p):
        term = nde.DDETerm(delay_lv, lambda s, p: jnp.ones(2), (0.1,))
        sol = nde.solve(term, nde.MethodOfSteps(nde.Tsit5()), jnp.ones(2), TS, args=p, rtol=1e-8, atol=1e-8)
        return sol.ys, sol.stats["num_steps"], sol.stats["num_fixed_point_iters"]

    p = jnp.array([2.2, 1.0, 2.0, 0.4])
    marked, text = _compiled(f, (p,), monkeypatch, True)
    plain, plain_text = _compiled(f, (p,), monkeypatch, False)
    assert MARK in text and MARK not in plain_text
    (ys, steps, iters), (ys0, steps0, iters0) = marked(p), plain(p)
    assert int(iters) > 0 and (int(steps), int(iters)) == (int(steps0), int(iters0))
    # Round-off: the two compilations order a few operations differently (5e-11
    # measured since the step at t0 + lag recomputes its first stage).
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ys0), rtol=1e-10)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
def test_delay_checkpoint_adjoint_loops_are_marked(monkeypatch):
    # The backward steps rebuild the breakpoints (sums of lags, sorted by
    # ranks: a `sort` would keep the emitter off). With a history and step
    # bound small enough that every step is checkpointed, both loops are
    # marked (read off the lowered program: the mark is set when lowering).
    # That these gradients are right is checked in test_dde.py, whose
    # gradient fixture runs this path (RK4, against finite differences and
    # ReverseMode).
    def delay_lv(t, u, h, p):
        return jnp.stack([(p[0] - p[1] * u[1]) * h(t - 0.1)[0], (p[2] * u[0] - p[3]) * u[1]])

    def loss(p):
        term = nde.DDETerm(delay_lv, lambda s, p: jnp.ones(2), (0.1, 0.25))
        sol = nde.solve(term, nde.MethodOfSteps(nde.Tsit5(), max_history=16), jnp.ones(2), TS, args=p, rtol=1e-8,
                        atol=1e-8, max_steps=256)
        return jnp.sum((sol.ys - 1.0) ** 2)

    monkeypatch.setenv("NEURALDE_SINGLE_KERNEL", "1")
    jax.clear_caches()
    text = jax.jit(jax.grad(loss)).lower(jnp.array([2.2, 1.0, 2.0, 0.4])).as_text()
    assert "stablehlo.sort" not in text
    assert text.count("xla_cpu_small_call") >= 2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the mark is for XLA:CPU")
def test_small_implicit_solve_is_marked_and_agrees(monkeypatch):
    # Kvaerno5 on ROBER (3 equations): the Newton matrix's LU is unrolled, so
    # the whole loop, Newton iterations included, is one kernel.
    def rober(t, y, k):
        return jnp.stack([-k[0] * y[0] + k[2] * y[1] * y[2],
                          k[0] * y[0] - k[1] * y[1] ** 2 - k[2] * y[1] * y[2], k[1] * y[1] ** 2])

    def f(k):
        sol = nde.solve(nde.ODETerm(rober), nde.Kvaerno5(), jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 40.0]),
                        args=k, rtol=1e-6, atol=1e-10)
        return sol.ys, sol.stats["num_steps"]

    k = jnp.array([0.04, 3e7, 1e4])
    marked, text = _compiled(f, (k,), monkeypatch, True)
    plain, plain_text = _compiled(f, (k,), monkeypatch, False)
    assert MARK in text and MARK not in plain_text
    (ys, steps), (ys0, steps0) = marked(k), plain(k)
    assert int(steps) == int(steps0)
    # The marked result is bit for bit what it was before endpoint-only solves
    # dropped the dense output; the ordinary compile of the changed loop
    # contracts other operations into FMAs, and its y2 (9.2e-6) moved by
    # 3.9e-17: 4.2e-12 relative, a fifth of an ulp of the largest component.
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ys0), rtol=1e-11, atol=1e-18)
    # and against scipy's Radau at tight tolerances
    from scipy.integrate import solve_ivp

    a, b, c = np.asarray(k)
    ref = solve_ivp(lambda t, y: [-a * y[0] + c * y[1] * y[2], a * y[0] - b * y[1] ** 2 - c * y[1] * y[2],
                                  b * y[1] ** 2], (0.0, 40.0), [1.0, 0.0, 0.0], method="Radau", rtol=1e-12,
                    atol=1e-16).y[:, -1]
    np.testing.assert_allclose(np.asarray(ys)[-1], ref, rtol=1e-5)


def test_unrolled_lu_is_lapacks():
    import jax.scipy.linalg as jsl
    from neuralde.solvers.implicit import _lu_factor, _lu_solve

    rng = np.random.default_rng(0)
    solve = jax.jit(lambda a, b: _lu_solve(_lu_factor(a), b))
    for n in (1, 2, 3, 5, 8):
        for _ in range(10):
            a = rng.normal(size=(n, n)) * 10.0 ** rng.uniform(-3, 3, size=(n, 1))
            b = rng.normal(size=n)
            lu, _ = jax.jit(_lu_factor)(a)
            lu0, _ = jsl.lu_factor(a)  # the same pivots give the same factors
            np.testing.assert_allclose(np.asarray(lu), np.asarray(lu0), rtol=1e-12, atol=1e-12 * np.abs(lu0).max())
            np.testing.assert_allclose(a @ np.asarray(solve(a, b)), b, rtol=1e-9, atol=1e-9 * np.abs(b).max())
    # a singular matrix gives non-finite values (the Newton iteration then fails), as LAPACK's
    x = np.asarray(solve(np.array([[1.0, 2.0], [2.0, 4.0]]), np.array([1.0, 1.0])))
    assert not np.all(np.isfinite(x))
