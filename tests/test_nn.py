"""`nde.NeuralODE`: the layer against independent references.

- a linear field against the matrix exponential (scipy.linalg.expm);
- gradients of a tiny MLP field under every sensitivity method against
  central finite differences of the layer's own forward solve;
- ``jax.vmap(model)`` against a Python loop over the batch;
- the solve options given at construction reach the solve;
- a short Optax/Equinox training loop recovers a known parameter.
"""
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import scipy.linalg

import neuralde as nde

TS = jnp.linspace(0.0, 1.0, 6)
A = np.array([[-0.3, 1.2], [-1.0, -0.2]])
Y0 = jnp.array([1.0, -0.5])


class Linear(eqx.Module):
    """f(t, y) = A y with A a trainable parameter."""

    A: jax.Array

    def __call__(self, t, y, args):
        return self.A @ y


class MLPField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        # `args` scales the field, so that its gradient is checked too.
        return args * self.mlp(y)


def _mlp_field():
    return MLPField(eqx.nn.MLP(2, 2, 3, 1, activation=jnp.tanh, key=jr.PRNGKey(1), dtype=jnp.float64))


SENSITIVITIES = {
    "reverse": nde.ReverseMode(),
    "forward": nde.ForwardMode(),
    "checkpoint": nde.CheckpointAdjoint(),
    "backsolve": nde.BacksolveAdjoint(),
}


def test_linear_field_matches_matrix_exponential():
    model = nde.NeuralODE(Linear(jnp.asarray(A)), TS, rtol=1e-11, atol=1e-11)
    ys = np.asarray(model(Y0))
    expected = np.stack([scipy.linalg.expm(A * t) @ np.asarray(Y0) for t in np.asarray(TS)])
    assert ys.shape == (6, 2)
    np.testing.assert_allclose(ys, expected, rtol=0, atol=1e-9)


def test_only_the_field_is_trainable():
    model = nde.NeuralODE(Linear(jnp.asarray(A)), TS)
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    assert len(leaves) == 1 and leaves[0].shape == (2, 2)
    assert model.t == tuple(float(t) for t in np.asarray(TS))
    assert isinstance(model.sensitivity, nde.CheckpointAdjoint)  # the documented default


def _loss(diff):
    model, y0, scale = diff
    return jnp.sum(model(y0, scale) ** 2)


# Exact methods differentiate the computed solution: compare them with central
# differences of the very same fixed-step RK4 solve (smooth in the inputs, so
# h = 1e-5 leaves ~1e-10 truncation and round-off). Backsolve approximates the
# derivative of the exact solution: compare it with central differences of a
# 1e-12 adaptive solve (h = 1e-4: step-size switching adds noise ~ tol / h).
FIXED = dict(solver=nde.RK4(), dt0=0.05, adaptive=False)
ADAPTIVE = dict(rtol=1e-12, atol=1e-12)


def _central_differences(model, h):
    flat, unravel = jax.flatten_util.ravel_pytree(eqx.filter((model, Y0, jnp.asarray(0.7)), eqx.is_inexact_array))
    static = eqx.filter((model, Y0, jnp.asarray(0.7)), eqx.is_inexact_array, inverse=True)
    f = jax.jit(lambda x: _loss(eqx.combine(unravel(x), static)))
    return np.array([(f(flat + h * e) - f(flat - h * e)) / (2 * h) for e in np.eye(flat.size)])


@pytest.fixture(scope="module")
def fd_reference():
    field = _mlp_field()
    return field, {
        "fixed": _central_differences(nde.NeuralODE(field, TS, **FIXED), 1e-5),
        "adaptive": _central_differences(nde.NeuralODE(field, TS, **ADAPTIVE), 1e-4),
    }


@pytest.mark.parametrize("name", list(SENSITIVITIES))
def test_gradients_match_central_differences(fd_reference, name):
    field, fd = fd_reference
    if name == "backsolve":
        model, reference, rtol = nde.NeuralODE(field, TS, sensitivity=SENSITIVITIES[name], **ADAPTIVE), fd["adaptive"], 1e-6
    else:
        model, reference, rtol = nde.NeuralODE(field, TS, sensitivity=SENSITIVITIES[name], **FIXED), fd["fixed"], 1e-8
    # One filter_value_and_grad over (model, y0, args): the field's parameters,
    # the initial state and args all receive gradients.
    value, grads = eqx.filter_jit(eqx.filter_value_and_grad(_loss))((model, Y0, jnp.asarray(0.7)))
    got, _ = jax.flatten_util.ravel_pytree(eqx.filter(grads, eqx.is_inexact_array))
    assert np.isfinite(float(value)) and got.size == reference.size == 17 + 2 + 1  # MLP 2-3-2, y0, args
    np.testing.assert_allclose(np.asarray(got), reference, rtol=rtol, atol=rtol * np.abs(reference).max())


def test_vmap_equals_python_loop():
    model = nde.NeuralODE(_mlp_field(), TS, rtol=1e-8, atol=1e-8)
    y0s = jnp.array([[1.0, 0.0], [0.2, -0.4], [-1.5, 0.3]])
    batched = jax.vmap(model, in_axes=(0, None))(y0s, jnp.asarray(0.7))
    looped = jnp.stack([model(y0, jnp.asarray(0.7)) for y0 in y0s])
    assert batched.shape == (3, 6, 2)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(looped), rtol=1e-12, atol=1e-12)
    # Batch-mean loss: gradient of the vmapped model equals the mean of the per-sample gradients.
    g_batch = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.mean(jax.vmap(lambda y: jnp.sum(m(y, 0.7) ** 2))(y0s))))(model)
    grad_one = eqx.filter_jit(eqx.filter_grad(lambda m, y: jnp.sum(m(y, 0.7) ** 2)))
    g_each = [grad_one(model, y) for y in y0s]
    flat_batch, _ = jax.flatten_util.ravel_pytree(eqx.filter(g_batch, eqx.is_inexact_array))
    flat_each = np.mean([jax.flatten_util.ravel_pytree(eqx.filter(g, eqx.is_inexact_array))[0] for g in g_each], 0)
    np.testing.assert_allclose(np.asarray(flat_batch), flat_each, rtol=1e-10, atol=1e-12)


def test_solve_options_reach_the_solve():
    # Euler with a fixed step of 0.25 on y' = A y is (I + 0.25 A)^k y0 at t = 0.25 k.
    ts = jnp.linspace(0.0, 1.0, 5)
    model = nde.NeuralODE(Linear(jnp.asarray(A)), ts, solver=nde.Euler(), dt0=0.25)
    step = np.eye(2) + 0.25 * A
    expected = np.stack([np.linalg.matrix_power(step, k) @ np.asarray(Y0) for k in range(5)])
    np.testing.assert_allclose(np.asarray(model(Y0)), expected, rtol=1e-13, atol=1e-13)

    # max_steps and throw are passed through: too few steps fails loudly.
    short = nde.NeuralODE(Linear(jnp.asarray(A)), TS, max_steps=2)
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(short(Y0))
    quiet = nde.NeuralODE(Linear(jnp.asarray(A)), TS, max_steps=2, throw=False)
    assert np.isnan(np.asarray(quiet(Y0))[-1]).all()


def test_bad_construction_arguments():
    with pytest.raises(TypeError, match="'key'.*dt0, adaptive, max_steps"):
        nde.NeuralODE(Linear(jnp.asarray(A)), TS, key=jr.PRNGKey(0))
    with pytest.raises(TypeError, match="`field` must be callable"):
        nde.NeuralODE(jnp.zeros(2), TS)
    with pytest.raises(ValueError, match="1-D"):
        nde.NeuralODE(Linear(jnp.asarray(A)), jnp.zeros((2, 2)))


def test_optax_training_recovers_decay_rate():
    # Data from y' = -0.5 y; the model starts at rate 2 and Adam must find 0.5.
    class Decay(eqx.Module):
        rate: jax.Array

        def __call__(self, t, y, args):
            return -self.rate * y

    ts = jnp.linspace(0.0, 2.0, 9)
    data = jnp.exp(-0.5 * ts)[:, None]
    model = nde.NeuralODE(Decay(jnp.asarray(2.0)), ts, rtol=1e-8, atol=1e-8)
    optim = optax.adam(0.05)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(lambda m: jnp.sum((m(jnp.ones(1)) - data) ** 2))(model)
        updates, opt_state = optim.update(grads, opt_state)
        return eqx.apply_updates(model, updates), opt_state, loss

    for _ in range(200):
        model, opt_state, loss = step(model, opt_state)
    assert abs(float(model.field.rate) - 0.5) < 1e-2
