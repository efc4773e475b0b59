"""Compile-time regressions: how much program a standard solve traces, and that
repeated solves do not retrace.

Compile time follows the size of the traced program (tracing and XLA's passes
are roughly linear in it), so a bound on the size catches the usual
regressions -- an unrolled loop, a stage or step traced once more, a
transformation applied twice -- without timing anything (timings live in
benchmarks/). Sizes are counted on a fixed problem: Lotka--Volterra, Tsit5,
11 save times, float64. The bounds are the sizes measured when the test was
written (jax 0.10.2) plus about 30% headroom; if a deliberate change needs
more, measure it (``python tests/test_compile.py`` prints the sizes) and say
why in the commit that raises the bound.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax._src import core as jax_core

import neuralde as nde

# measured (jax 0.10.2): solve 746 equations / 76.4k characters of StableHLO
# (831 / 80.2k on 2026-12-06); CheckpointAdjoint gradient 2959 equations /
# 278k characters, 2922 / 260k since its loop of steps alone with saves after
# each step (2026-11-23), 2370 / 234k since the backward pass builds its
# programs without the initial step selection (2026-12-06). With 4 checkpoint
# slots (strided, segments recomputed): 4672 / 441k while the recomputation was
# a second copy of the step-or-save iteration, 2635 / 270k since it runs
# through the backward step's own primal (2026-12-06). A delay equation's
# CheckpointAdjoint gradient (the largest program the tests compile): 10412 /
# 1275k while the backward steps' corrections loop was a peeled attempt and a
# scan of conds, 7444 / 767k since it is a `stored_while_loop` (2026-12-07).
BOUNDS = {
    "solve": {"eqns": 970, "hlo_chars": 100_000},
    "grad": {"eqns": 3000, "hlo_chars": 300_000},
    "grad-strided": {"eqns": 3400, "hlo_chars": 350_000},
    "grad-delay": {"eqns": 9700, "hlo_chars": 1_000_000},
}


def lotka_volterra(t, u, p):
    return jnp.stack([p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]])


TS = jnp.linspace(0.0, 10.0, 11)
U0 = jnp.array([1.0, 1.0])
P = jnp.array([1.5, 1.0, 3.0, 1.0])


def _solve(u0, p):
    return nde.solve(nde.ODETerm(lotka_volterra), nde.Tsit5(), u0, TS, args=p).ys


def _grad(p, sensitivity=nde.CheckpointAdjoint()):
    def loss(p):
        return jnp.sum(nde.solve(nde.ODETerm(lotka_volterra), nde.Tsit5(), U0, TS, args=p,
                                 sensitivity=sensitivity).ys ** 2)

    return jax.grad(loss)(p)


def _grad_strided(p):
    return _grad(p, nde.CheckpointAdjoint(checkpoints=4))


def delayed_lotka_volterra(t, u, h, p):
    return jnp.stack([p[0] * h(t - 1.0)[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]])


def _grad_delay(p):
    term = nde.DDETerm(delayed_lotka_volterra, lambda s, p: jnp.ones_like(U0), (1.0,))

    def loss(p):
        solver = nde.MethodOfSteps(nde.Tsit5(), max_history=32)
        return jnp.sum(nde.solve(term, solver, U0, TS, args=p, max_steps=256).ys ** 2)

    return jax.grad(loss)(p)


def count_equations(jaxpr) -> int:
    """Equations of a jaxpr, those of every sub-jaxpr (loop bodies, branches,
    custom rules) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for sub in jax_core.jaxprs_in_params(eqn.params):
            n += count_equations(sub)
    return n


def program_size(name):
    fn = {"solve": _solve, "grad": _grad, "grad-strided": _grad_strided, "grad-delay": _grad_delay}[name]
    args = (U0, P) if name == "solve" else (P,)
    traced = jax.jit(fn).trace(*args)  # traced once for both counts
    eqns = count_equations(traced.jaxpr.jaxpr)
    hlo_chars = len(traced.lower().as_text())
    return {"eqns": eqns, "hlo_chars": hlo_chars}


@pytest.mark.parametrize("name", list(BOUNDS))
def test_program_size_bounded(name):
    size = program_size(name)
    bound = BOUNDS[name]
    # A floor too, so that the counter itself cannot silently break (say, a
    # JAX change that hides sub-jaxprs from it) and pass every time.
    assert size["eqns"] > 200 and size["hlo_chars"] > 20_000, size
    assert size["eqns"] <= bound["eqns"], f"{name}: {size['eqns']} jaxpr equations > bound {bound['eqns']}"
    assert size["hlo_chars"] <= bound["hlo_chars"], (
        f"{name}: {size['hlo_chars']} characters of StableHLO > bound {bound['hlo_chars']}")


def test_repeated_solves_trace_once():
    """New tolerances, initial values, parameters and dt0 reuse the compiled
    solve: the vector field is traced during the first call only."""
    traces = []

    def field(t, u, p):
        traces.append(1)
        return lotka_volterra(t, u, p)

    term = nde.ODETerm(field)
    sol = nde.solve(term, nde.Tsit5(), U0, TS, args=P, rtol=1e-6, atol=1e-6)
    first = len(traces)
    assert first > 0
    for rtol, atol, u0, p in [(1e-5, 1e-7, U0 * 1.1, P), (3e-4, 1e-4, U0 * 0.9, P * 1.01), (1e-8, 1e-9, U0, P)]:
        new = nde.solve(term, nde.Tsit5(), u0, TS, args=p, rtol=rtol, atol=atol)
        assert int(new.status) == 0
    assert len(traces) == first, f"retraced: {len(traces) - first} extra traces of the vector field"
    # The new tolerances took effect in the reused program (the last solve had
    # the initial values of the first and 1e-8 instead of 1e-6).
    assert int(new.stats["num_steps"]) > int(sol.stats["num_steps"])
    assert float(jnp.max(jnp.abs(new.ys - sol.ys))) > 0


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    for name in BOUNDS:
        print(name, program_size(name))
