"""Solution, dense output, batching, compilation and the progress meter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralde as nde


def rotation(t, y, args):
    # y'' = -w^2 y as a first-order system; exact solution cos/sin.
    w = args
    return jnp.stack([y[1], -(w**2) * y[0]])


def exact_rotation(t, w):
    t = np.asarray(t)
    return np.stack([np.cos(w * t), -w * np.sin(w * t)], axis=-1)


TERM = nde.ODETerm(rotation)
Y0 = jnp.array([1.0, 0.0])
W = jnp.asarray(2.0)


@pytest.mark.parametrize("solver", [nde.Tsit5(), nde.Dopri5()])
def test_dense_evaluate_matches_exact(solver):
    sol = nde.solve(TERM, solver, Y0, jnp.array([0.0, 3.0]), args=W, rtol=1e-9, atol=1e-9, dense=True)
    tq = jnp.linspace(0.0, 3.0, 37)
    ys = sol.evaluate(tq)
    assert ys.shape == (37, 2)
    np.testing.assert_allclose(np.asarray(ys), exact_rotation(tq, 2.0), atol=1e-7)
    # Scalar query and the end points.
    np.testing.assert_allclose(np.asarray(sol.evaluate(3.0)), np.asarray(sol.ys[-1]), rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.asarray(sol.evaluate(0.0)), np.asarray(Y0), atol=1e-14)


def test_dense_evaluate_decreasing_time():
    sol = nde.solve(TERM, nde.Tsit5(), Y0, jnp.array([0.0, -2.0]), args=W, rtol=1e-9, atol=1e-9, dense=True)
    tq = jnp.linspace(-2.0, 0.0, 11)
    np.testing.assert_allclose(np.asarray(sol.evaluate(tq)), exact_rotation(tq, 2.0), atol=1e-7)


def test_save_times_do_not_force_steps():
    few = nde.solve(TERM, nde.Tsit5(), Y0, jnp.array([0.0, 5.0]), args=W)
    many = nde.solve(TERM, nde.Tsit5(), Y0, jnp.linspace(0.0, 5.0, 501), args=W)
    assert int(few.stats["num_steps"]) == int(many.stats["num_steps"])
    np.testing.assert_allclose(np.asarray(many.ys[-1]), np.asarray(few.ys[-1]), rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.asarray(many.ys), exact_rotation(many.ts, 2.0), atol=2e-5)


@pytest.mark.parametrize("sensitivity", [nde.ReverseMode(), nde.ForwardMode()])
def test_loop_kinds_agree(sensitivity):
    # Under differentiation ReverseMode runs the bounded loop, ForwardMode the
    # while loop with tangents; both take the same steps as the plain solve
    # and give the same numbers.
    ts = jnp.linspace(0.0, 4.0, 17)
    ref = nde.solve(TERM, nde.Tsit5(), Y0, ts, args=W)

    def run(y0):
        sol = nde.solve(TERM, nde.Tsit5(), y0, ts, args=W, sensitivity=sensitivity)
        return sol.ys, sol.stats

    (ys, stats), _ = jax.jvp(run, (Y0,), (jnp.array([1.0, 0.0]),))
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ref.ys), rtol=0, atol=1e-13)
    for k in ("num_steps", "num_rejected", "num_fevals"):
        assert int(stats[k]) == int(ref.stats[k])


def test_stats_and_status_types():
    sol = nde.solve(TERM, nde.Tsit5(), Y0, jnp.linspace(0.0, 1.0, 4), args=W)
    assert set(sol.stats) >= {"num_steps", "num_rejected", "num_fevals"}
    assert int(sol.status) == nde.Status.SUCCESS and bool(sol.success)
    assert sol.ts.shape == (4,)
    # Fixed-step RK4: one accepted step per dt, 4 evaluations each.
    sol = nde.solve(TERM, nde.RK4(), Y0, jnp.array([0.0, 1.0]), args=W, dt0=0.125)
    assert int(sol.stats["num_steps"]) == 8 and int(sol.stats["num_fevals"]) == 32
    assert int(sol.stats["num_rejected"]) == 0


def test_fixed_step_last_step_is_clipped():
    # dt0 does not divide the interval: the last step is shortened to land on t1.
    sol = nde.solve(TERM, nde.RK4(), Y0, jnp.array([0.0, 1.0]), args=W, dt0=0.3)
    assert int(sol.stats["num_steps"]) == 4
    np.testing.assert_allclose(np.asarray(sol.ys[-1]), exact_rotation(1.0, 2.0), atol=5e-3)


def test_vmap_over_y0_and_args():
    ts = jnp.linspace(0.0, 2.0, 5)

    def run(y0, w):
        return nde.solve(TERM, nde.Tsit5(), y0, ts, args=w, rtol=1e-8, atol=1e-8).ys

    y0s = jnp.stack([Y0, 2 * Y0, -Y0])
    ws = jnp.array([1.0, 2.0, 3.0])
    batched = jax.vmap(run)(y0s, ws)
    assert batched.shape == (3, 5, 2)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(run(y0s[i], ws[i])), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(batched[i]), float(y0s[i, 0]) * exact_rotation(ts, float(ws[i])),
                                   atol=1e-6)


def test_jit_does_not_retrace():
    traces = []

    def field(t, y, args):
        traces.append(1)
        return -args * y

    term = nde.ODETerm(field)

    @jax.jit
    def run(y0, k, ts):
        return nde.solve(term, nde.Tsit5(), y0, ts, args=k).ys

    ts = jnp.linspace(0.0, 1.0, 3)
    run(Y0, 1.0, ts).block_until_ready()
    n = len(traces)
    for k in (0.5, 2.0, 3.0):
        out = run(Y0 * k, k, ts + k)
        np.testing.assert_allclose(np.asarray(out[-1]), np.asarray(Y0 * k) * np.exp(-k), rtol=1e-5)
    assert len(traces) == n
    # Eager calls with new tolerances or step sizes do not recompile either.
    sol1 = nde.solve(term, nde.Tsit5(), Y0, ts, args=1.0, rtol=1e-5)
    n = len(traces)
    sol2 = nde.solve(term, nde.Tsit5(), Y0, ts, args=1.0, rtol=1e-9)
    assert len(traces) == n
    assert int(sol2.stats["num_steps"]) > int(sol1.stats["num_steps"])


def test_progress_meter(capfd):
    sol = nde.solve(TERM, nde.Tsit5(), Y0, jnp.linspace(0.0, 2.0, 3), args=W, progress=True)
    jax.block_until_ready(sol.ys)
    err = capfd.readouterr().err
    assert "neuralde.solve [" in err and "100.0%" in err
    # Under jit, vmap and grad it still works and gives the same numbers.
    quiet = nde.solve(TERM, nde.Tsit5(), Y0, jnp.linspace(0.0, 2.0, 3), args=W)
    np.testing.assert_allclose(np.asarray(sol.ys), np.asarray(quiet.ys), rtol=0, atol=0)

    def loss(w):
        return jnp.sum(nde.solve(TERM, nde.Tsit5(), Y0, jnp.array([0.0, 1.0]), args=w, progress=True).ys[-1])

    g = jax.jit(jax.vmap(jax.grad(loss)))(jnp.array([1.0, 2.0]))
    g_ref = jax.vmap(jax.grad(lambda w: jnp.sum(nde.solve(TERM, nde.Tsit5(), Y0, jnp.array([0.0, 1.0]),
                                                                    args=w).ys[-1])))(jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-12)
    assert "100.0%" in capfd.readouterr().err
