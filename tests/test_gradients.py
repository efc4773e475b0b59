"""ReverseMode and ForwardMode derivatives against central finite differences,
against each other, and under jit/vmap."""
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import neuralde as nde
from _compiled import release_after_module


def lotka_volterra(t, u, p):
    x, y = u[0], u[1]
    a, b, d, g = p[0], p[1], p[2], p[3]
    return jnp.stack([a * x - b * x * y, -d * y + g * x * y])


P = jnp.array([1.5, 1.0, 3.0, 1.0])
U0 = jnp.array([1.0, 1.0])
TS = jnp.linspace(0.0, 5.0, 11)
WEIGHTS = jnp.linspace(0.5, 1.5, 22).reshape(11, 2)
SENSITIVITIES = {
    "reverse": nde.ReverseMode(),
    "forward": nde.ForwardMode(),
    "checkpoint": nde.CheckpointAdjoint(),
    "checkpoint-3": nde.CheckpointAdjoint(checkpoints=3),
    "backsolve": nde.BacksolveAdjoint(),
}


def make_loss(sensitivity, rtol=1e-10):
    def loss(u0, p, tol=rtol):
        # `tol` may be a traced argument: one compiled gradient serves every tolerance.
        sol = nde.solve(nde.ODETerm(lotka_volterra), nde.Tsit5(), u0, TS, args=p, rtol=tol, atol=tol,
                        sensitivity=sensitivity)
        return jnp.sum(WEIGHTS * sol.ys)

    return loss


# One compiled gradient w.r.t. (u0, p) per sensitivity, the tolerance an argument (compilation,
# not the solve, is what these tests cost on a small CPU).
GRAD_FNS = {name: jax.jit(jax.grad(make_loss(s), argnums=(0, 1))) for name, s in SENSITIVITIES.items()}


_release_compiled = release_after_module(GRAD_FNS.clear)


@pytest.fixture(scope="module")
def fd_reference():
    loss = jax.jit(make_loss(nde.ForwardMode()))
    h = 1e-6

    def central(f, x):
        out = np.zeros(x.shape)
        for i in range(x.size):
            e = jnp.zeros_like(x).at[i].set(h)
            out[i] = (float(f(x + e)) - float(f(x - e))) / (2 * h)
        return out

    return {
        "p": central(lambda p: loss(U0, p), P),
        "u0": central(lambda u: loss(u, P), U0),
    }


@pytest.fixture(scope="module")
def grads():
    return {name: GRAD_FNS[name](U0, P, 1e-10) for name in SENSITIVITIES}


@pytest.mark.parametrize("name", list(SENSITIVITIES))
def test_grad_vs_finite_differences(name, grads, fd_reference):
    g_u0, g_p = grads[name]
    for got, ref in ((g_p, fd_reference["p"]), (g_u0, fd_reference["u0"])):
        rel = np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref))
        assert rel <= 1e-6, (name, rel)


@pytest.mark.parametrize("name", ["forward", "checkpoint", "checkpoint-3"])
def test_exact_methods_agree_to_roundoff(name, grads):
    # All three differentiate the same computed solution.
    for a, b in zip(grads["reverse"], grads[name]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["reverse", "forward"])
def test_jvp_matches_grad(name, grads):
    loss = make_loss(SENSITIVITIES[name])
    v = jnp.array([0.3, -0.2, 0.7, 0.1])
    _, tangent = jax.jvp(lambda p: loss(U0, p), (P,), (v,))
    np.testing.assert_allclose(float(tangent), float(jnp.dot(grads["reverse"][1], v)), rtol=1e-10)


@pytest.mark.parametrize("name", list(SENSITIVITIES))
def test_vmap_of_grad_equals_per_sample(name):
    loss = make_loss(SENSITIVITIES[name], rtol=1e-8)
    ps = jnp.stack([P, P * 1.1, P * 0.9])
    batched = jax.jit(jax.vmap(jax.grad(loss, argnums=1), in_axes=(None, 0)))(U0, ps)
    for i in range(3):  # the unbatched gradient at the same tolerance, from the shared compiled function
        single = GRAD_FNS[name](U0, ps[i], 1e-8)[1]
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single), rtol=1e-10)


def test_grad_wrt_final_time():
    # d y(T) / dT = f(T, y(T)): flows through the save times under ReverseMode.
    def final(T):
        ts = jnp.stack([jnp.asarray(0.0), T])
        return nde.solve(nde.ODETerm(lotka_volterra), nde.Tsit5(), U0, ts, args=P, rtol=1e-10, atol=1e-10).ys[-1]

    T = jnp.asarray(2.0)
    jac = jax.jacrev(final)(T)
    np.testing.assert_allclose(np.asarray(jac), np.asarray(lotka_volterra(T, final(T), P)), rtol=1e-7)


def test_grad_wrt_every_save_time():
    # d/dt_i sum_k y(t_k) = sum(f(t_i, y(t_i))) at an interior save time. The
    # default CheckpointAdjoint then differentiates the loop's times too (they
    # are constants, left out of its backward steps, when t is not
    # differentiated); it agrees with ReverseMode to round-off.
    ts = jnp.linspace(0.0, 3.0, 7)

    def total(sensitivity):
        def f(ts):
            sol = nde.solve(nde.ODETerm(lotka_volterra), nde.Tsit5(), U0, ts, args=P, rtol=1e-10, atol=1e-10,
                            sensitivity=sensitivity)
            return jnp.sum(sol.ys), sol.ys

        return jax.jit(jax.grad(f, has_aux=True))(ts)

    g, ys = total(nde.CheckpointAdjoint())
    ref, _ = total(nde.ReverseMode())
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-9, atol=1e-12)
    exact = [float(jnp.sum(lotka_volterra(ts[i], ys[i], P))) for i in range(1, 6)]
    np.testing.assert_allclose(np.asarray(g[1:6]), exact, rtol=1e-6)


class MLPField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return jnp.tanh(self.mlp(y)) - 0.5 * y


NEURAL_TS = jnp.linspace(0.0, 1.0, 5)
FD_INDICES = [(layer, idx) for layer in (0, 1) for idx in [(0, 0), (1, 1)]]


def neural_field():
    return MLPField(eqx.nn.MLP(2, 2, width_size=8, depth=1, activation=jnp.tanh, key=jr.PRNGKey(0)))


def neural_loss(field, sensitivity):
    sol = nde.solve(nde.ODETerm(field), nde.Tsit5(), U0, NEURAL_TS, rtol=1e-10, atol=1e-10, sensitivity=sensitivity)
    return jnp.sum(sol.ys**2)


@pytest.fixture(scope="module")
def neural_fd():
    """Central differences on a few weights of each layer. The forward solve does not depend on
    the sensitivity method, so one compiled loss gives the reference for all of them."""
    field = neural_field()
    f = eqx.filter_jit(lambda field: neural_loss(field, nde.CheckpointAdjoint()))
    h = 1e-6
    fd = {}
    for layer, idx in FD_INDICES:
        w = field.mlp.layers[layer].weight

        def shifted(delta):
            return eqx.tree_at(lambda m: m.mlp.layers[layer].weight, field, w.at[idx].add(delta))

        fd[layer, idx] = (float(f(shifted(h))) - float(f(shifted(-h)))) / (2 * h)
    return fd


@pytest.mark.parametrize("name", list(SENSITIVITIES))
def test_neural_field_parameters(name, neural_fd):
    grads = eqx.filter_jit(eqx.filter_grad(lambda field: neural_loss(field, SENSITIVITIES[name])))(neural_field())
    for (layer, idx), fd in neural_fd.items():
        got = float(grads.mlp.layers[layer].weight[idx])
        assert abs(got - fd) <= 1e-6 * max(1.0, abs(fd)), (layer, idx, got, fd)


def test_forward_mode_closure_over_traced_value():
    # A vector field that closes over the differentiated value: ForwardMode
    # hoists it by closure conversion instead of dropping its derivative.
    def loss(k, sensitivity):
        term = nde.ODETerm(lambda t, y, args: -k * y)
        return nde.solve(term, nde.Tsit5(), U0, jnp.array([0.0, 1.0]), rtol=1e-10, atol=1e-10,
                         sensitivity=sensitivity).ys[-1, 0]

    k = jnp.asarray(0.7)
    exact = -np.exp(-0.7)  # d/dk exp(-k)
    for s in SENSITIVITIES.values():
        np.testing.assert_allclose(float(jax.grad(loss)(k, s)), exact, rtol=1e-8)


def test_pytree_state_gradients():
    def field(t, y, args):
        return {"x": -args * y["x"], "v": (y["x"] * args)[:1] - y["v"]}

    y0 = {"x": jnp.array([1.0, 2.0]), "v": jnp.array([0.5])}

    def loss(a, s):
        ys = nde.solve(nde.ODETerm(field), nde.Tsit5(), y0, jnp.array([0.0, 1.0]), args=a,
                       rtol=1e-10, atol=1e-10, sensitivity=s).ys
        return jnp.sum(ys["x"][-1]) + 2 * jnp.sum(ys["v"][-1])

    a = jnp.asarray(0.8)
    h = 1e-6
    fd = (float(loss(a + h, nde.ForwardMode())) - float(loss(a - h, nde.ForwardMode()))) / (2 * h)
    for s in SENSITIVITIES.values():
        np.testing.assert_allclose(float(jax.grad(loss)(a, s)), fd, rtol=1e-6)


def test_args_with_non_array_leaves():
    # Strings or flags in `args` stay static; the arrays beside them are differentiated.
    def field(t, y, args):
        return -args["k"] * y if args["mode"] == "decay" else y

    def loss(k, s):
        return nde.solve(nde.ODETerm(field), nde.Tsit5(), U0, jnp.array([0.0, 1.0]), args={"k": k, "mode": "decay"},
                         sensitivity=s, rtol=1e-10, atol=1e-10).ys[-1, 0]

    for s in SENSITIVITIES.values():
        np.testing.assert_allclose(float(jax.grad(loss)(jnp.asarray(0.5), s)), -np.exp(-0.5), rtol=1e-8)
