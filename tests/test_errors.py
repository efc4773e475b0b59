"""Bad input fails fast with a message naming the argument; failures found while
integrating raise with throw=True and set the status with throw=False."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralde as nde


def decay(t, y, args):
    return -y


TERM = nde.ODETerm(decay)
Y0 = jnp.array([1.0, 2.0])
TS = jnp.array([0.0, 1.0])


@pytest.mark.parametrize(
    "t, match",
    [
        (jnp.zeros((2, 2)), r"`t` must be a 1-D array.*shape \(2, 2\)"),
        (jnp.array(1.0), r"`t` must be a 1-D array.*shape \(\)"),
        (jnp.array([0.0]), r"`t` needs at least 2 times.*got 1"),
    ],
)
def test_bad_t_shape(t, match):
    with pytest.raises(ValueError, match=match):
        nde.solve(TERM, nde.Tsit5(), Y0, t)


@pytest.mark.parametrize("name, value", [("rtol", 0.0), ("rtol", -1e-6), ("atol", 0.0), ("atol", -1.0),
                                         ("rtol", float("nan"))])
def test_nonpositive_tolerances(name, value):
    with pytest.raises(ValueError, match=rf"`{name}` must be positive.*{name}="):
        nde.solve(TERM, nde.Tsit5(), Y0, TS, **{name: value})


@pytest.mark.parametrize("solver", [nde.Euler(), nde.Heun(), nde.RK4()])
def test_fixed_step_solver_needs_dt0(solver):
    with pytest.raises(ValueError, match=rf"`dt0` is required: {type(solver).__name__}\(\) is a fixed-step solver"):
        nde.solve(TERM, solver, Y0, TS)


def test_adaptive_false_needs_dt0():
    with pytest.raises(ValueError, match=r"`dt0` is required with adaptive=False"):
        nde.solve(TERM, nde.Tsit5(), Y0, TS, adaptive=False)


def test_bad_dt0_and_max_steps():
    with pytest.raises(ValueError, match=r"`dt0` must be a non-zero finite"):
        nde.solve(TERM, nde.Euler(), Y0, TS, dt0=0.0)
    with pytest.raises(ValueError, match=r"`max_steps` must be a positive integer; got 0"):
        nde.solve(TERM, nde.Tsit5(), Y0, TS, max_steps=0)


def test_vector_field_structure_shape_dtype():
    with pytest.raises(ValueError, match=r"same pytree structure as `y0`"):
        nde.solve(nde.ODETerm(lambda t, y, a: (y, y)), nde.Tsit5(), Y0, TS)
    with pytest.raises(ValueError, match=r"returned shape \(3,\) for y, but `y0` has shape \(2,\)"):
        nde.solve(nde.ODETerm(lambda t, y, a: jnp.zeros(3)), nde.Tsit5(), Y0, TS)
    with pytest.raises(ValueError, match=r"returned shape \(2,\) for \['b'\]"):
        nde.solve(nde.ODETerm(lambda t, y, a: {"a": y["a"], "b": jnp.zeros(2)}), nde.Tsit5(),
                  {"a": jnp.ones(1), "b": jnp.ones(3)}, TS)
    with pytest.raises(TypeError, match=r"returned dtype float64 for y, but `y0` has dtype float32"):
        nde.solve(nde.ODETerm(lambda t, y, a: jnp.zeros(2, jnp.float64)), nde.Tsit5(),
                  jnp.ones(2, jnp.float32), TS)


def test_wrong_term_solver_sensitivity_types():
    with pytest.raises(TypeError, match=r"`term` must be a neuralde term.*Wrap the function: nde.ODETerm\(f\)"):
        nde.solve(decay, nde.Tsit5(), Y0, TS)
    with pytest.raises(TypeError, match=r"`solver` must be a neuralde solver.*Instantiate it"):
        nde.solve(TERM, nde.Tsit5, Y0, TS)
    with pytest.raises(TypeError, match=r"`sensitivity` must be a neuralde sensitivity method"):
        nde.solve(TERM, nde.Tsit5(), Y0, TS, sensitivity="adjoint")
    with pytest.raises(TypeError, match=r"ODETerm\(vector_field\): expected a callable"):
        nde.ODETerm(3.0)


def test_evaluate_needs_dense_and_range():
    sol = nde.solve(TERM, nde.Tsit5(), Y0, TS)
    with pytest.raises(ValueError, match=r"needs the dense output: call solve\(..., dense=True\)"):
        sol.evaluate(0.5)
    sol = nde.solve(TERM, nde.Tsit5(), Y0, TS, dense=True)
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 1.0\]"):
        sol.evaluate(1.5)


# ------------------------------------------------------- runtime failures


def test_nonmonotonic_t_throw_and_status():
    t = jnp.array([0.0, 0.5, 0.4, 1.0])
    with pytest.raises(RuntimeError, match=r"INVALID_TIMES.*strictly increasing or strictly decreasing"):
        nde.solve(TERM, nde.Tsit5(), Y0, t).ys.block_until_ready()
    sol = nde.solve(TERM, nde.Tsit5(), Y0, t, throw=False)
    assert int(sol.status) == nde.Status.INVALID_TIMES
    assert not bool(sol.success)
    assert np.all(np.isnan(np.asarray(sol.ys)))


def test_repeated_time_is_invalid():
    sol = nde.solve(TERM, nde.Tsit5(), Y0, jnp.array([0.0, 0.5, 0.5, 1.0]), throw=False)
    assert int(sol.status) == nde.Status.INVALID_TIMES


def test_max_steps_reached():
    t = jnp.linspace(0.0, 10.0, 11)
    with pytest.raises(RuntimeError, match=r"MAX_STEPS_REACHED.*stiff"):
        nde.solve(TERM, nde.Tsit5(), Y0, t, max_steps=5, rtol=1e-10, atol=1e-10).ys.block_until_ready()
    sol = nde.solve(TERM, nde.Tsit5(), Y0, t, max_steps=5, rtol=1e-10, atol=1e-10, throw=False)
    assert int(sol.status) == nde.Status.MAX_STEPS_REACHED
    assert int(sol.stats["num_steps"] + sol.stats["num_rejected"]) == 5
    ys = np.asarray(sol.ys)
    # The values saved before the failure are right; everything after is NaN.
    reached = ~np.isnan(ys[:, 0])
    assert reached[0] and not reached[-1]
    k = np.argmin(reached)
    assert np.all(reached[:k]) and np.all(np.isnan(ys[k:]))
    np.testing.assert_allclose(ys[:k], np.exp(-np.asarray(t[:k]))[:, None] * np.asarray(Y0), rtol=1e-8)


def test_nonfinite_state_blowup():
    # y' = y^2, y(0) = 1 blows up at t = 1.
    term = nde.ODETerm(lambda t, y, a: y**2)
    t = jnp.array([0.0, 0.5, 0.9, 1.5, 2.0])
    sol = nde.solve(term, nde.Tsit5(), jnp.array([1.0]), t, throw=False)
    assert int(sol.status) in (nde.Status.STEP_SIZE_TOO_SMALL, nde.Status.NONFINITE_STATE, nde.Status.MAX_STEPS_REACHED)
    ys = np.asarray(sol.ys)[:, 0]
    np.testing.assert_allclose(ys[:3], 1.0 / (1.0 - np.asarray(t[:3])), rtol=1e-5)
    assert np.all(np.isnan(ys[3:]))


def test_nan_vector_field_reports_nonfinite():
    term = nde.ODETerm(lambda t, y, a: jnp.where(t > 0.3, jnp.nan, -y))
    sol = nde.solve(term, nde.Tsit5(), Y0, jnp.linspace(0.0, 1.0, 6), throw=False)
    assert int(sol.status) == nde.Status.NONFINITE_STATE
    assert np.all(np.isnan(np.asarray(sol.ys)[2:]))
    with pytest.raises(RuntimeError, match=r"NONFINITE_STATE.*NaN or infinite"):
        nde.solve(term, nde.Tsit5(), Y0, jnp.linspace(0.0, 1.0, 6)).ys.block_until_ready()
    # Fixed steps: reported at the first non-finite step.
    sol = nde.solve(term, nde.RK4(), Y0, jnp.linspace(0.0, 1.0, 6), dt0=0.1, throw=False)
    assert int(sol.status) == nde.Status.NONFINITE_STATE


def test_nan_initial_state():
    sol = nde.solve(TERM, nde.Tsit5(), jnp.array([jnp.nan, 1.0]), TS, throw=False)
    assert int(sol.status) == nde.Status.NONFINITE_STATE
    assert np.isnan(np.asarray(sol.ys)[-1]).all()


def test_throw_under_jit_and_vmap():
    @jax.jit
    def run(y0):
        return nde.solve(TERM, nde.Tsit5(), y0, jnp.linspace(0.0, 10.0, 3), max_steps=3).ys

    with pytest.raises(RuntimeError, match=r"MAX_STEPS_REACHED"):
        jax.vmap(run)(jnp.ones((2, 2))).block_until_ready()


def test_status_messages_name_causes():
    for status in nde.Status:
        assert isinstance(status.message, str) and len(status.message) > 20
    sol = nde.solve(TERM, nde.Tsit5(), Y0, TS, throw=False, max_steps=1)
    assert "max_steps" in sol.message


def test_eqx_module_field_type_error_names_argument():
    # An eqx.Module vector field returning the wrong dtype is reported like any other.
    class Field(eqx.Module):
        w: jax.Array

        def __call__(self, t, y, args):
            return (self.w * y).astype(jnp.float16)

    with pytest.raises(TypeError, match=r"dtype float16.*float64"):
        nde.solve(nde.ODETerm(Field(jnp.ones(2))), nde.Tsit5(), Y0, TS)


def test_tolerance_below_precision_warns():
    with pytest.warns(UserWarning, match=r"rtol=1e-10 is below what float32 can resolve"):
        nde.solve(TERM, nde.Tsit5(), jnp.ones(2, jnp.float32), TS, rtol=1e-10, atol=1e-10, throw=False)
