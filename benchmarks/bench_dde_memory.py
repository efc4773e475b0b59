"""Working memory of one jitted `value_and_grad` of a delay equation, as the
step budget (``max_steps``) and the history buffer (``max_history``) grow
(issue #6).

    python benchmarks/bench_dde_memory.py [--quick]

Problem: DiffEqFlux.jl's delay Lotka-Volterra (lag 0.1, history 1, u0 = (1, 1),
p = (2.2, 1.0, 2.0, 0.4)) on [0, 10], saved every 0.1, loss sum((u - 1)^2),
gradient w.r.t. p; MethodOfSteps(Tsit5()), rtol = atol = 1e-6.

Figure: XLA's compiled-memory analysis (``temp_size_in_bytes`` of the compiled
program: every temporary buffer, after buffer reuse), as in
benchmarks/bench_memory.py. The history buffer (``max_history`` past steps:
their start, end, initial state and dense coefficients) lives in the solver
state, hence in the loop carry: ReverseMode stores one carry per possible
iteration, so its memory is O(max_steps * max_history) -- linear in the step
budget for a fixed buffer, never O(max_steps^2) since the buffer keeps only
the window of one lag, not every step. CheckpointAdjoint stores every
step's carry while that fits in 16 MiB, then O(sqrt(max_steps)) of them.
"""
import argparse
import json

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)
import neuralde as nde  # noqa: E402


def delay_lv(t, u, h, p):
    x, y = u[0], u[1]
    return jnp.stack([(p[0] - p[1] * y) * h(t - 0.1)[0], (p[2] * x - p[3]) * y])


def make(sensitivity, max_steps, max_history):
    term = nde.DDETerm(delay_lv, lambda s, p: jnp.ones(2), (0.1,))
    ts = jnp.linspace(0.0, 10.0, 101)

    def loss(p):
        sol = nde.solve(term, nde.MethodOfSteps(nde.Tsit5(), max_history=max_history), jnp.ones(2), ts, args=p,
                        rtol=1e-6, atol=1e-6, max_steps=max_steps, sensitivity=sensitivity)
        return jnp.sum((sol.ys - 1.0) ** 2), sol.stats["num_steps"]

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    p = jnp.array([2.2, 1.0, 2.0, 0.4])
    configs = [(s, h) for s in ((256, 1024) if opts.quick else (256, 1024, 4096)) for h in (64,)]
    configs += [(1024, h) for h in (16, 256)]
    print(f"{'method':<20}{'max_steps':>10}{'max_history':>12}{'temp MiB':>10}{'steps':>7}")
    for name, sens in (("ReverseMode", nde.ReverseMode()), ("CheckpointAdjoint", nde.CheckpointAdjoint())):
        for max_steps, max_history in configs:
            fn = make(sens, max_steps, max_history)
            compiled = fn.lower(p).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            (_, steps), _ = compiled(p)
            print(f"{name:<20}{max_steps:>10}{max_history:>12}{temp / 2**20:>10.2f}{int(steps):>7}")
            print(json.dumps({"method": name, "max_steps": max_steps, "max_history": max_history,
                              "temp_bytes": int(temp), "num_steps": int(steps)}))


if __name__ == "__main__":
    main()
