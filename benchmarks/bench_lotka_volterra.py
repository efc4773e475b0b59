"""Lotka--Volterra, Tsit5, rtol = atol = 1e-6, 101 save times on [0, 10]:
neuralde against diffrax (and jax.experimental.ode.odeint, Dopri5) in one run.

    python benchmarks/bench_lotka_volterra.py [--repeats 300] [--rounds 5] [--float32] [--grad]

With ``--grad``: one jitted ``value_and_grad`` of ``sum(ys**2)`` w.r.t. ``p``
for each of neuralde's four gradient methods and diffrax's three adjoints
(compile time, run time, ratio, and the relative difference of the gradient
to neuralde's CheckpointAdjoint). Otherwise, for each library: compile time (first call, including tracing),
steady-state time of one jitted solve (median over interleaved rounds of
repeated calls, so that all libraries see the same machine load), steps
(accepted + rejected), max error against scipy DOP853 at rtol = atol = 1e-13,
and the ratios to neuralde. Absolute times depend on the machine and its load;
the ratios are what to compare.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _block(out)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _block(out):
    import jax

    jax.tree_util.tree_map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per library per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (machine noise)")
    parser.add_argument("--float32", action="store_true", help="solve in float32 instead of float64")
    parser.add_argument("--grad", action="store_true",
                        help="time one jitted value_and_grad of sum(ys**2) w.r.t. p for every gradient method")
    ns = parser.parse_args()

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", not ns.float32)
    dtype = jnp.float32 if ns.float32 else jnp.float64
    import neuralde as nde

    p = jnp.array([1.5, 1.0, 3.0, 1.0], dtype)
    u0 = jnp.array([1.0, 1.0], dtype)
    ts = jnp.linspace(0.0, 10.0, 101, dtype=dtype)
    rtol = atol = 1e-6

    def lv(t, u, p):
        x, y = u[0], u[1]
        a, b, d, g = p[0], p[1], p[2], p[3]
        return jnp.stack([a * x - b * x * y, -d * y + g * x * y])

    from scipy.integrate import solve_ivp

    def lv_numpy(t, u):  # float64 whatever the solve's dtype: the reference must not inherit float32 noise
        x, y = u
        return np.array([1.5 * x - x * y, -3.0 * y + x * y])

    ref = solve_ivp(lv_numpy, (0.0, 10.0), np.array([1.0, 1.0]), method="DOP853", rtol=1e-13, atol=1e-13,
                    t_eval=np.linspace(0.0, 10.0, 101)).y.T

    rows = []
    if ns.grad:
        return _grad_table(ns, jax, jnp, nde, lv, u0, p, ts, rtol, atol)

    @jax.jit
    def nde_solve(u0, p):
        sol = nde.solve(nde.ODETerm(lv), nde.Tsit5(), u0, ts, args=p, rtol=rtol, atol=atol)
        return sol.ys, sol.stats["num_steps"] + sol.stats["num_rejected"]

    rows.append(_prepare("neuralde Tsit5", nde_solve, u0, p, ref))

    try:
        import diffrax

        @jax.jit
        def dfx_solve(u0, p):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lv), diffrax.Tsit5(), ts[0], ts[-1], None, u0, args=p,
                saveat=diffrax.SaveAt(ts=ts), stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                adjoint=diffrax.RecursiveCheckpointAdjoint(),
            )
            return sol.ys, sol.stats["num_steps"]

        rows.append(_prepare("diffrax Tsit5", dfx_solve, u0, p, ref))
    except ImportError:
        print("diffrax not installed: pip install '.[bench]'")

    from jax.experimental.ode import odeint

    @jax.jit
    def ode_solve(u0, p):
        return odeint(lambda u, t, p: lv(t, u, p), u0, ts, p, rtol=rtol, atol=atol), jnp.array(-1)

    rows.append(_prepare("jax odeint (Dopri5)", ode_solve, u0, p, ref))

    samples = {r["name"]: [] for r in rows}
    for _ in range(ns.rounds):
        for r in rows:
            samples[r["name"]].append(_time(lambda: r["fn"](u0, p), ns.repeats))
    for r in rows:
        r["solve"] = float(np.median(samples[r["name"]]))

    base = rows[0]
    print(f"\nLotka-Volterra, rtol=atol={rtol}, 101 save points, {jnp.dtype(dtype).name}, jax {jax.__version__}")
    print(f"{'library':24s} {'compile s':>10s} {'solve ms':>10s} {'steps':>6s} {'max err':>9s} {'time ratio':>11s} {'steps ratio':>11s}")
    for r in rows:
        steps = r["steps"] if r["steps"] >= 0 else float("nan")
        print(f"{r['name']:24s} {r['compile']:10.3f} {1e3 * r['solve']:10.4f} {steps:6.0f} {r['err']:9.2e} "
              f"{r['solve'] / base['solve']:11.2f} {steps / base['steps']:11.3f}")


def _grad_table(ns, jax, jnp, nde, lv, u0, p, ts, rtol, atol):
    """value_and_grad of sum(ys**2) w.r.t. p: neuralde's methods and diffrax's adjoints."""
    def nde_loss(sensitivity):
        def loss(p):
            return jnp.sum(nde.solve(nde.ODETerm(lv), nde.Tsit5(), u0, ts, args=p, rtol=rtol, atol=atol,
                                     sensitivity=sensitivity).ys ** 2)
        return loss

    losses = {
        "neuralde CheckpointAdjoint": nde_loss(nde.CheckpointAdjoint()),
        "neuralde ReverseMode": nde_loss(nde.ReverseMode()),
        "neuralde ForwardMode": nde_loss(nde.ForwardMode()),
        "neuralde BacksolveAdjoint": nde_loss(nde.BacksolveAdjoint()),
    }
    try:
        import diffrax

        def dfx_loss(adjoint):
            def loss(p):
                sol = diffrax.diffeqsolve(
                    diffrax.ODETerm(lv), diffrax.Tsit5(), ts[0], ts[-1], None, u0, args=p,
                    saveat=diffrax.SaveAt(ts=ts), stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                    adjoint=adjoint, max_steps=4096,
                )
                return jnp.sum(sol.ys ** 2)
            return loss

        losses["diffrax RecursiveCheckpointAdjoint"] = dfx_loss(diffrax.RecursiveCheckpointAdjoint())
        losses["diffrax DirectAdjoint"] = dfx_loss(diffrax.DirectAdjoint())
        losses["diffrax BacksolveAdjoint"] = dfx_loss(diffrax.BacksolveAdjoint())
    except ImportError:
        print("diffrax not installed: pip install '.[bench]'")

    rows = []
    for name, loss in losses.items():
        fn = jax.jit(jax.value_and_grad(loss))
        t0 = time.perf_counter()
        value, grad = fn(p)
        _block(grad)
        rows.append(dict(name=name, fn=fn, compile=time.perf_counter() - t0, grad=np.asarray(grad)))
    samples = {r["name"]: [] for r in rows}
    for _ in range(ns.rounds):
        for r in rows:
            samples[r["name"]].append(_time(lambda: r["fn"](p), max(ns.repeats // 10, 10)))
    ref = rows[0]["grad"]
    base = float(np.median(samples[rows[0]["name"]]))
    print(f"\nvalue_and_grad w.r.t. p of sum(ys**2), Lotka-Volterra, rtol=atol={rtol}, 101 save points, "
          f"jax {jax.__version__}")
    print(f"{'method':36s} {'compile s':>10s} {'grad ms':>9s} {'ratio':>7s} {'rel. diff of grad':>18s}")
    for r in rows:
        t = float(np.median(samples[r["name"]]))
        diff = float(np.max(np.abs(r["grad"] - ref)) / np.max(np.abs(ref)))
        print(f"{r['name']:36s} {r['compile']:10.2f} {1e3 * t:9.3f} {t / base:7.2f} {diff:18.1e}")


def _prepare(name, fn, u0, p, ref):
    t0 = time.perf_counter()
    out = fn(u0, p)
    _block(out)
    compile_time = time.perf_counter() - t0
    ys, steps = out
    err = float(np.max(np.abs(np.asarray(ys) - ref)))
    return dict(name=name, fn=fn, compile=compile_time, steps=int(steps), err=err)


if __name__ == "__main__":
    main()
