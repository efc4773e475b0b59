"""Delay equations: run and compile times of solves and gradients (issue #8).

    python benchmarks/bench_dde.py [--rounds 5] [--base DIR] [--no-save]

No Python peer solves delay equations (diffrax, torchdiffeq and
`jax.experimental.ode` do not), so this script measures neuralde against
itself: ``--base DIR`` adds the same cases from another checkout, imported as
the package ``neuralde_base`` from ``DIR``, timed in the same interleaved
rounds, so that a change can be judged by its ratios. To make one::

    mkdir -p /tmp/base && git archive <rev> neuralde | tar -x -C /tmp/base
    mv /tmp/base/neuralde /tmp/base/neuralde_base

Cases (float64 unless said):

* ``LV``: DiffEqFlux.jl's delay Lotka-Volterra (lag 0.1, history 1,
  u0 = (1, 1), p = (2.2, 1.0, 2.0, 0.4)) on [0, 10], saved every 0.1,
  MethodOfSteps(Tsit5()), rtol = atol = 1e-6: the solve, and the gradient of
  sum((u - 1)^2) w.r.t. p with CheckpointAdjoint (the default), ReverseMode
  and (without ``--base``) BacksolveAdjoint. Most of its steps are longer than the lag (fixed-point
  corrections).
* ``LV small``: the same gradient with ``max_history=16, max_steps=256``,
  where CheckpointAdjoint checkpoints every step and both its loops compile
  as one kernel each.
* ``neural``: a neural DDE y' = MLP(y(t), y(t - 0.5)) (MLP 4-32-32-2, tanh,
  float32) for 32 initial states under `jax.vmap` on [0, 3], 31 save points,
  rtol = atol = 1e-5: the solve, and the gradient of the sum of squares
  w.r.t. the MLP.

The compile column is the first call (trace, XLA compile and one run).
"""
from __future__ import annotations

import argparse
import sys

import _harness as H  # noqa: E402  (sets XLA_FLAGS before jax is imported)
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

jax.config.update("jax_enable_x64", True)

TS_LV = jnp.linspace(0.0, 10.0, 101)
P_LV = jnp.array([2.2, 1.0, 2.0, 0.4])


def delay_lv(t, u, h, p):
    x, y = u[0], u[1]
    return jnp.stack([(p[0] - p[1] * y) * h(t - 0.1)[0], (p[2] * x - p[3]) * y])


class DelayedMLP(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, h, args):
        return self.mlp(jnp.concatenate([y, h(t - 0.5)]))


def cases_for(nde, label, backsolve=True):
    cases = []

    def lv_solve(p, sensitivity=None, max_history=128, max_steps=4096):
        term = nde.DDETerm(delay_lv, lambda s, p: jnp.ones(2), (0.1,))
        return nde.solve(term, nde.MethodOfSteps(nde.Tsit5(), max_history=max_history), jnp.ones(2), TS_LV,
                         args=p, rtol=1e-6, atol=1e-6, max_steps=max_steps, sensitivity=sensitivity)

    fwd = jax.jit(lambda p: lv_solve(p).ys)
    cases.append(H.Case(f"{label} LV solve", lambda: fwd(P_LV)))
    grads = [("LV grad CheckpointAdjoint", None, {}), ("LV grad ReverseMode", nde.ReverseMode(), {}),
             ("LV small grad CheckpointAdjoint", None, {"max_history": 16, "max_steps": 256})]
    if backsolve:
        grads.append(("LV grad BacksolveAdjoint", nde.BacksolveAdjoint(), {}))
    for title, sens, sizes in grads:
        grad = jax.jit(jax.grad(lambda p, s=sens, kw=sizes: jnp.sum((lv_solve(p, s, **kw).ys - 1.0) ** 2)))
        cases.append(H.Case(f"{label} {title}", lambda g=grad: g(P_LV)))

    field = DelayedMLP(eqx.nn.MLP(4, 2, 32, 2, activation=jnp.tanh, key=jr.PRNGKey(0), dtype=jnp.float32))
    params, static = eqx.partition(field, eqx.is_array)
    ts = jnp.linspace(0.0, 3.0, 31, dtype=jnp.float32)
    y0s = jr.normal(jr.PRNGKey(1), (32, 2), dtype=jnp.float32)
    history = lambda s, a: jnp.full((2,), 0.1, jnp.float32)  # noqa: E731

    def batch(prm):
        term = nde.DDETerm(eqx.combine(prm, static), history, (0.5,))
        one = lambda y0: nde.solve(term, nde.MethodOfSteps(nde.Tsit5()), y0, ts, rtol=1e-5, atol=1e-5).ys  # noqa
        return jax.vmap(one)(y0s)

    nfwd = jax.jit(batch)
    ngrad = jax.jit(jax.grad(lambda prm: jnp.sum(batch(prm) ** 2)))
    cases.append(H.Case(f"{label} neural vmap solve (f32)", lambda: nfwd(params)))
    cases.append(H.Case(f"{label} neural vmap grad (f32)", lambda: ngrad(params)))
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--base", default=None, help="a directory holding another checkout as neuralde_base")
    parser.add_argument("--no-save", action="store_true")
    opts = parser.parse_args(argv)

    import neuralde

    # (BacksolveAdjoint on delay equations is new: left out when comparing
    # against a checkout that may not have it.)
    cases = cases_for(neuralde, "neuralde", backsolve=not opts.base)
    if opts.base:
        sys.path.insert(0, opts.base)
        import neuralde_base

        base_cases = cases_for(neuralde_base, "base", backsolve=False)
        # Interleave each case with its base twin in the table.
        cases = [c for pair in zip(cases, base_cases) for c in pair]
    H.warm_up()
    H.run_cases(cases, rounds=opts.rounds)
    extra = ()
    if opts.base:
        for c, twin in zip(cases[::2], cases[1::2]):
            c.extra["time/base"] = c.time_s / twin.time_s
            c.extra["compile/base"] = c.compile_s / twin.compile_s
        extra = ("time/base", "compile/base")
    H.report("DDE", "delay equations: solves and gradients (MethodOfSteps(Tsit5()))", cases, extra_cols=extra,
             settings={"rounds": opts.rounds, "base": opts.base}, save=not opts.no_save)


if __name__ == "__main__":
    main()
