"""CheckpointAdjoint and BacksolveAdjoint: every solver, dense output, float32,
batching, and the memory plan of the checkpoints."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralde as nde
from _compiled import release_after_module


def decay_rotation(t, y, args):
    k, w = args[0], args[1]
    return jnp.stack([-k * y[0] - w * y[1], w * y[0] - k * y[1]]) + 0.1 * jnp.sin(t)


ARGS = jnp.array([0.3, 2.0])
Y0 = jnp.array([1.0, 0.5])
TS = jnp.linspace(0.0, 2.0, 9)
WEIGHTS = jnp.linspace(-1.0, 1.0, 18).reshape(9, 2)

FIXED = {"Euler": nde.Euler(), "Heun": nde.Heun(), "RK4": nde.RK4()}
ADAPTIVE = {"Dopri5": nde.Dopri5(), "Tsit5": nde.Tsit5()}


def loss_fn(solver, sensitivity, dtype=jnp.float64, dense=False, **kw):
    def loss(y0, args):
        sol = nde.solve(nde.ODETerm(decay_rotation), solver, y0, TS.astype(dtype), args=args,
                        sensitivity=sensitivity, dense=dense, **kw)
        out = jnp.sum(WEIGHTS.astype(dtype) * sol.ys)
        if dense:
            out = out + jnp.sum(sol.evaluate(jnp.array([0.37, 1.41], dtype)) ** 2)
        return out

    return loss


def grad(loss, y0=Y0, args=ARGS):
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(y0, args)


SOLVERS = {**FIXED, **ADAPTIVE}
SENSITIVITIES = {
    "reverse": nde.ReverseMode(),
    "forward": nde.ForwardMode(),
    "checkpoint": nde.CheckpointAdjoint(),
    "checkpoint-4": nde.CheckpointAdjoint(checkpoints=4),
    "backsolve": nde.BacksolveAdjoint(),
}


@functools.lru_cache(maxsize=None)
def compiled_grad(solver_name, sensitivity_name, dtype=jnp.float64):
    """The jitted gradient w.r.t. (y0, args) of the weighted-sum loss, with the step (fixed-step
    solvers: ``dt0``) or the tolerance (adaptive: ``rtol = atol``) as a traced argument, so that
    the tests below share one compilation per (solver, sensitivity, dtype)."""
    solver, sensitivity = SOLVERS[solver_name], SENSITIVITIES[sensitivity_name]

    def loss(y0, args, step):
        kw = {"dt0": step} if solver_name in FIXED else {"rtol": step, "atol": step}
        return loss_fn(solver, sensitivity, dtype, **kw)(y0, args)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def shared_grad(solver_name, sensitivity_name, step, y0=Y0, args=ARGS):
    return compiled_grad(solver_name, sensitivity_name, jnp.dtype(y0.dtype))(y0, args, step)


_release_compiled = release_after_module(compiled_grad.cache_clear)


# The default plan on a small state: every step a checkpoint, each step saving
# the points it passed; with 4 slots: strided checkpoints, segments recomputed
# through the backward step's primal.
@pytest.mark.parametrize("checkpoint", ["checkpoint", "checkpoint-4"], ids=["every-step", "strided"])
@pytest.mark.parametrize("name", list(FIXED) + list(ADAPTIVE))
def test_checkpoint_equals_reverse_every_solver(name, checkpoint):
    step = 0.05 if name in FIXED else 1e-8  # dt0 or rtol = atol
    ref = shared_grad(name, "reverse", step)
    got = shared_grad(name, checkpoint, step)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", ["RK4", "Tsit5"])
def test_backsolve_every_solver_kind(name):
    # The continuous adjoint converges to the exact gradient with the solver's
    # accuracy (RK4: fixed steps, Tsit5: adaptive).
    step = 0.01 if name in FIXED else 1e-10  # dt0 or rtol = atol
    ref = shared_grad(name, "reverse", step)
    got = shared_grad(name, "backsolve", step)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-7, atol=1e-9)


def test_dense_output_gradients():
    ref = grad(loss_fn(nde.Tsit5(), nde.ReverseMode(), dense=True))
    got = grad(loss_fn(nde.Tsit5(), nde.CheckpointAdjoint(), dense=True))
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-13)
    with pytest.raises(NotImplementedError, match=r"BacksolveAdjoint cannot differentiate through Solution.evaluate"):
        grad(loss_fn(nde.Tsit5(), nde.BacksolveAdjoint(), dense=True))
    # dense=True without differentiating evaluate() is fine for backsolve.
    def loss(sensitivity):
        def f(y0, args):
            sol = nde.solve(nde.ODETerm(decay_rotation), nde.Tsit5(), y0, TS, args=args, dense=True,
                            sensitivity=sensitivity, rtol=1e-9, atol=1e-9)
            return jnp.sum(WEIGHTS * sol.ys)

        return f

    # Reference: ReverseMode at the same tolerance (dense output does not change the saved states).
    for a, b in zip(grad(loss(nde.BacksolveAdjoint())), shared_grad("Tsit5", "reverse", 1e-9)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sensitivity", ["checkpoint", "backsolve"])
def test_float32(sensitivity):
    y0, args = Y0.astype(jnp.float32), ARGS.astype(jnp.float32)
    ref = shared_grad("Tsit5", "reverse", jnp.float32(1e-5), y0, args)
    got = shared_grad("Tsit5", sensitivity, jnp.float32(1e-5), y0, args)
    for a, b in zip(got, ref):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("sensitivity", ["checkpoint", "backsolve", "reverse", "forward"])
def test_grad_of_vmap_equals_sum_of_per_sample(sensitivity):
    loss = loss_fn(nde.Tsit5(), SENSITIVITIES[sensitivity], rtol=1e-9, atol=1e-9)
    y0s = jnp.stack([Y0, 2 * Y0, -Y0])
    batched = jax.jit(jax.grad(lambda a: jnp.sum(jax.vmap(loss, in_axes=(0, None))(y0s, a))))(ARGS)
    total = sum(np.asarray(shared_grad("Tsit5", sensitivity, 1e-9, y0s[i])[1]) for i in range(3))
    np.testing.assert_allclose(np.asarray(batched), total, rtol=1e-10)


def test_checkpoint_memory_plan():
    small = nde.CheckpointAdjoint()
    # A small state: every iteration is a checkpoint (stride 1, no recomputation).
    assert small.plan(4197, carry_bytes=8 * 7 * 2) == (4197, 1)
    # 256 vmap lanes of a small state: at most 4 MiB of checkpoints, and a
    # stride that can still cover every iteration.
    slots, stride = small.plan(4197, carry_bytes=100 * 256)
    assert slots * 100 * 256 <= 4 * 2**20 and slots * stride >= 4197 and slots * stride // 2 < 4197
    # A large state (16k x 64 floats): O(sqrt(iterations)) carries in all,
    # never max_steps copies of the state.
    big = 8 * 7 * 16384 * 64
    slots, stride = small.plan(4197, carry_bytes=big)
    assert slots == 66 and stride == 64 and (slots + stride) * big < 4197 * big / 30
    assert nde.CheckpointAdjoint(checkpoints=10).plan(100, 1) == (10, 16)
    with pytest.raises(ValueError, match=r"checkpoints=...\): expected a positive integer"):
        nde.CheckpointAdjoint(checkpoints=0)


@pytest.mark.parametrize("checkpoints", [8, 32])
@pytest.mark.parametrize("ts", [(0.0, 0.5, 1.0), (0.0, 1.0)], ids=["interior-save", "endpoints"])
def test_strided_checkpoints_take_the_memory_they_plan(checkpoints, ts):
    # XLA's temporary memory of a strided CheckpointAdjoint gradient is the
    # plan's slots plus one segment of carries, not a multiple of it (a branch
    # with a buffer as operand copies the buffer in and out: twice the plan).
    y0 = jnp.ones((32, 16))

    def loss(a):
        sol = nde.solve(nde.ODETerm(lambda t, y, a: y @ a), nde.Tsit5(), y0, jnp.array(ts), args=a,
                        max_steps=1000, sensitivity=nde.CheckpointAdjoint(checkpoints=checkpoints))
        return jnp.sum(sol.ys[-1] ** 2)

    temp = jax.jit(jax.grad(loss)).lower(-0.1 * jnp.eye(16)).compile().memory_analysis().temp_size_in_bytes
    # One Tsit5 carry of the loop of steps: y and its FSAL derivative, and 56
    # bytes of scalars (saves are made from each step's own outputs, so the
    # last step's polynomial is no part of it). The plan covers the 1000
    # steps; the backward pass's segment buffer has one spare row. An adaptive
    # solve also records every attempt's time and step (two float64s each).
    carry = 2 * y0.nbytes + 56
    slots, stride = nde.CheckpointAdjoint(checkpoints=checkpoints).plan(1000, carry)
    planned = (slots + stride + 1) * carry + 1000 * 2 * 8
    assert planned <= temp <= 1.25 * planned, (temp, planned)


@pytest.mark.parametrize("checkpoints", [None, 2], ids=["every-iteration", "strided"])
def test_vmapped_checkpoint_adjoint_matches_per_sample_reverse_mode(checkpoints):
    # Under vmap the backward pass sums the shared parameters' cotangent over
    # the lanes inside one batched VJP; with 2 slots the stride doubles until
    # the solve fits, and every segment is recomputed. Lanes finish at
    # different steps (different initial states).
    loss = loss_fn(nde.Tsit5(), nde.CheckpointAdjoint(checkpoints=checkpoints), rtol=1e-9, atol=1e-9)
    ref = loss_fn(nde.Tsit5(), nde.ReverseMode(), rtol=1e-9, atol=1e-9)
    y0s = jnp.stack([Y0, 3 * Y0, -0.5 * Y0])
    got = jax.jit(jax.grad(lambda y, a: jnp.sum(jax.vmap(loss, in_axes=(0, None))(y, a)), argnums=(0, 1)))(y0s, ARGS)
    single = jax.jit(jax.grad(ref, argnums=(0, 1)))
    per = [single(y0s[i], ARGS) for i in range(3)]
    np.testing.assert_allclose(np.asarray(got[0]), np.stack([np.asarray(g[0]) for g in per]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got[1]), sum(np.asarray(g[1]) for g in per), rtol=1e-10, atol=1e-12)


def _mlp_field(t, y, p):
    (w1, b1), (w2, b2) = p
    return jnp.tanh(y @ w1 + b1) @ w2 + b2


_MLP = [(jnp.asarray(np.random.default_rng(0).normal(size=(2, 8)) / 2), jnp.linspace(-0.2, 0.2, 8)),
        (jnp.asarray(np.random.default_rng(1).normal(size=(8, 2)) / 3), jnp.array([0.1, -0.1]))]
_LANES = jnp.asarray(np.random.default_rng(2).normal(size=(5, 2)))


def _lane_loss(sensitivity):
    def loss(y0, p):
        sol = nde.solve(nde.ODETerm(_mlp_field), nde.Tsit5(), y0, TS, args=p, rtol=1e-9, atol=1e-9,
                        sensitivity=sensitivity)
        return jnp.sum(WEIGHTS * sol.ys ** 2)

    return loss


@pytest.fixture(scope="module")
def per_lane_reference():
    """Each lane's gradient w.r.t. the shared MLP (ReverseMode, exact), and
    each lane's Hessian-vector product along the MLP itself (central
    differences of those gradients, step 1e-5 of the MLP)."""
    grads = jax.jit(jax.vmap(jax.grad(_lane_loss(nde.ReverseMode()), argnums=1), in_axes=(0, None)))
    g = grads(_LANES, _MLP)
    h = 1e-5
    plus, minus = (grads(_LANES, jax.tree_util.tree_map(lambda w: (1 + s) * w, _MLP)) for s in (h, -h))
    hvp = jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * h), plus, minus)
    return g, hvp


@pytest.mark.parametrize("checkpoints", [None, 2], ids=["every-iteration", "strided"])
def test_vmapped_gradients_in_every_order(checkpoints, per_lane_reference):
    # `solve` under the `vmap` that batches it, innermost (`jax.grad` of a
    # `jax.vmap`): the backward steps sum the shared weights' cotangent over
    # the lanes inside their products. Everywhere else each lane keeps its
    # own: `jax.vmap` of `jax.grad`, `jax.jacrev` of the vmapped solve (a
    # `vmap` of cotangents outside), nested vmaps, and a Hessian-vector
    # product (forward over the adjoint).
    per_lane, hvp = per_lane_reference
    loss = _lane_loss(nde.CheckpointAdjoint(checkpoints=checkpoints))
    lanes = jax.vmap(loss, in_axes=(0, None))
    tree = jax.tree_util.tree_map

    def check(got, want, what):
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-11, err_msg=what)

    grad_of_vmap = jax.jit(jax.grad(lambda p, y: jnp.sum(lanes(y, p))))
    check(grad_of_vmap(_MLP, _LANES), tree(lambda g: jnp.sum(g, axis=0), per_lane), "grad(vmap)")
    check(jax.jit(jax.jacrev(lambda p: lanes(_LANES, p)))(_MLP), per_lane, "jacrev(vmap)")
    if checkpoints is None:
        check(jax.jit(jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None)))(_LANES, _MLP), per_lane,
              "vmap(grad)")
        halves = _LANES.reshape(1, 5, 2)  # an outer vmap over groups of lanes
        nested = jax.jit(jax.vmap(lambda y: jax.grad(lambda p: jnp.sum(lanes(y, p)))(_MLP)))(halves)
        check(nested, tree(lambda g: jnp.sum(g, axis=0, keepdims=True), per_lane), "vmap(grad(vmap))")
        got_hvp = jax.jit(lambda: jax.jvp(lambda p: jax.grad(lambda q: jnp.sum(lanes(_LANES, q)))(p),
                                          (_MLP,), (_MLP,))[1])()
        want = tree(lambda h: jnp.sum(h, axis=0), hvp)
        for a, b in zip(jax.tree_util.tree_leaves(got_hvp), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8 * np.max(np.abs(b)),
                                       err_msg="jvp(grad(vmap))")
        # The sum is formed inside the products: the program holds no
        # per-lane copy of a weight's cotangent (f64[5,8,2] or f64[5,2,8]).
        text = grad_of_vmap.lower(_MLP, _LANES).compile().as_text()
        assert "f64[5,8,2]" not in text and "f64[5,2,8]" not in text


def test_default_sensitivity_is_checkpoint_adjoint():
    import inspect

    default = inspect.signature(nde.solve).parameters["sensitivity"].default
    assert isinstance(default, nde.CheckpointAdjoint)
    # And the default matches ReverseMode to round-off.
    ref = shared_grad("Tsit5", "reverse", 1e-6)  # solve's default rtol = atol

    def loss(y0, args):
        sol = nde.solve(nde.ODETerm(decay_rotation), nde.Tsit5(), y0, TS, args=args)
        return jnp.sum(WEIGHTS * sol.ys)

    for a, b in zip(grad(loss), ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("case", ["blow-up", "max-steps"])
def test_checkpoint_forward_values_on_failure_match_the_primal(case):
    # A failed solve under differentiation saves exactly what the solve alone
    # saves (NaN from the failure on), reports the same status, and its
    # gradient is ReverseMode's. Blow-up: y' = a y^2, y(0) = 1 ends at t = 1/a.
    ts = jnp.linspace(0.0, 2.0, 9)
    if case == "blow-up":
        term, y0, a, kw = nde.ODETerm(lambda t, y, a: a * y**2), jnp.array([1.0]), 1.0, {}
    else:
        term, y0, a, kw = nde.ODETerm(decay_rotation), Y0, ARGS, dict(max_steps=12, rtol=1e-10, atol=1e-10)

    def run(sensitivity):
        def loss(a):
            sol = nde.solve(term, nde.Tsit5(), y0, ts, args=a, throw=False, sensitivity=sensitivity, **kw)
            return jnp.nansum(sol.ys**2), (sol.ys, sol.status)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(a)

    primal = jax.jit(lambda a: nde.solve(term, nde.Tsit5(), y0, ts, args=a, throw=False, **kw))(a)
    (_, (ys, status)), g = run(nde.CheckpointAdjoint())
    (_, (_, ref_status)), ref = run(nde.ReverseMode())
    expected = ((nde.Status.STEP_SIZE_TOO_SMALL, nde.Status.NONFINITE_STATE) if case == "blow-up"
                else (nde.Status.MAX_STEPS_REACHED,))
    assert int(status) == int(primal.status) == int(ref_status) and int(status) in expected
    nan = np.isnan(np.asarray(primal.ys))
    assert nan.any() and not nan.all()
    np.testing.assert_array_equal(np.isnan(np.asarray(ys)), nan)
    # To rounding, which the blow-up amplifies: a relative perturbation of
    # y = 1/(1/y0 - t) grows by the factor y(t)/y(s), here up to ~1e6. (The
    # forward loops are compiled as single kernels, `neuralde._single_kernel`,
    # which contract multiply-adds differently from each other.)
    got, want = np.asarray(ys)[~nan], np.asarray(primal.ys)[~nan]
    np.testing.assert_array_less(np.abs(got - want), 1e-13 * np.maximum(1.0, np.abs(want)) * np.abs(want))
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-8 if case == "blow-up" else 1e-10)


def lorenz(t, y, p):
    sigma, rho, beta = p[0], p[1], p[2]
    return jnp.stack([sigma * (y[1] - y[0]), y[0] * (rho - y[2]) - y[1], y[0] * y[1] - beta * y[2]])


def test_backsolve_failure_is_reported_not_nan():
    # Lorenz cannot be integrated backwards over a long span: the backward solve
    # fails. With throw=True that is an error naming the cause and the fix;
    # with throw=False the gradient is NaN (never plausible-looking numbers).
    p = jnp.array([10.0, 28.0, 8.0 / 3.0])

    def loss(p, sensitivity, throw):
        sol = nde.solve(nde.ODETerm(lorenz), nde.Tsit5(), jnp.ones(3), jnp.array([0.0, 5.0]), args=p, rtol=1e-8,
                        atol=1e-8, max_steps=2000, sensitivity=sensitivity, throw=throw)
        return sol.ys[-1, 0]

    with pytest.raises(RuntimeError, match=r"BacksolveAdjoint: the backward solve.*CheckpointAdjoint"):
        jax.block_until_ready(jax.grad(loss)(p, nde.BacksolveAdjoint(), True))
    assert np.all(np.isnan(np.asarray(jax.grad(loss)(p, nde.BacksolveAdjoint(), False))))
    assert np.all(np.isfinite(np.asarray(jax.grad(loss)(p, nde.CheckpointAdjoint(), True))))


def test_strided_checkpoints_replay_an_adaptive_sde_exactly():
    # An adaptive SDE solve's accept/reject sequence changes with the last ulp
    # of its states (see `benchmarks/PERF_NOTES.md`): a backward pass that
    # recomputed a segment's carries in its own kernel drifted off the forward
    # pass's steps within a few attempts (with 4 slots this gradient came out
    # 1.48 instead of 1.154, with 1 NaN). The recomputation now replays the
    # forward pass's times and steps: plans with different segments agree to
    # round-off. (GBM: d y(1)/da is about y(1) on any path. The every-step
    # plan's forward loop is one kernel, the strided ones' are not, and its
    # step sequence may differ within the tolerance, hence two strided plans.)
    term = nde.SDETerm(lambda t, y, a: a * y, lambda t, y, a: 0.5 * y)

    def value_and_grad(checkpoints):
        def loss(a):
            sol = nde.solve(term, nde.SRIW1(), jnp.array([1.0]), jnp.array([0.0, 1.0]), args=a,
                            key=jax.random.key(0), rtol=1e-4, atol=1e-4,
                            sensitivity=nde.CheckpointAdjoint(checkpoints=checkpoints))
            return sol.ys[-1, 0]

        return jax.jit(jax.value_and_grad(loss))(0.3)

    y3, g3 = value_and_grad(3)
    y8, g8 = value_and_grad(8)
    assert float(y3) == float(y8)
    np.testing.assert_allclose(float(g3), float(y3), rtol=2e-3)
    np.testing.assert_allclose(float(g8), float(g3), rtol=1e-12)
