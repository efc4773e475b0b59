"""Ensembles of stochastic Lotka--Volterra paths at matched strong error:
neuralde against diffrax and torchsde in one run.

    du = (a x - b x y, -d y + g x y) dt + 0.1 u dW   (diagonal Itô noise),
    p = (1.5, 1, 3, 1), u0 = (1, 1), t in [0, 10], float64.

    python benchmarks/bench_sde.py [--target 1e-2] [--paths 100 10000] [--rounds 2] [--quick] [--no-save]
    python benchmarks/bench_sde.py --tree [--tree-paths 10000] [--no-save]

``--tree``: the Brownian trees alone: 64 queries (W and H over [s, s + 0.01]
on [0, 10], 2 channels) per path for ``--tree-paths`` paths (vmap), neuralde's
tree (``_brownian.increment``: two descents per query, as without a solver's
cache) against diffrax's VirtualBrownianTree with SpaceTimeLevyArea at the
same resolution, 12/16/20 levels; microseconds per query, best of 3 rounds.

Strong error of a configuration: the mean over ``--calib`` paths (default 100)
of max_i |u_i(10) - u_ref,i(10)|, where u_ref is the same library's solution
on the *same Brownian path* with fine fixed steps (neuralde: SRIW1, dt =
10/2^13; diffrax: ItoMilstein, dt = 10/2^13 on the same VirtualBrownianTree;
torchsde: srk, dt = 10/2^13 on the same BrownianInterval). For every method a
sweep over its step size (fixed-step methods) or tolerance (adaptive ones)
picks the cheapest configuration whose strong error is at most ``--target``;
that configuration is then timed on ensembles of ``--paths`` paths, with the
libraries interleaved round by round (median over rounds). Methods:

* neuralde: SRIW1 (adaptive, rtol = atol = tol, and fixed dt) and
  EulerMaruyama (fixed dt), each path its own solve under ``jax.vmap``; and
  SRIW1 (adaptive and fixed, "shared steps") with the ensemble as one state
  of shape (paths, 2), one step sequence and one Brownian tree of that shape
  (its reference: the same batched state at the fine step, on the same tree),
  as torchsde solves it;
* diffrax 0.7: Euler and ItoMilstein (fixed dt), and HalfSolver(ItoMilstein)
  with a PIDController (adaptive, step doubling: diffrax's only adaptive Itô
  option for this noise), all on a VirtualBrownianTree with tol = 10/2^20
  (the resolution of neuralde's 20-level tree; the reference uses the same
  tree, since the path depends on tol);
* torchsde 0.2.6: srk (Rößler's SRI, fixed dt and adaptive), torch
  2.13 CPU with ``torch.set_num_threads(1)``, the ensemble as one batch.

Output: one table and one JSON line per (method, paths). Compile times are
excluded from the timings (reported separately for the JAX libraries).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

T = 10.0
P = (1.5, 1.0, 3.0, 1.0)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def make_neuralde(jax, jnp):
    import neuralde as nde

    def drift(t, u, p):
        # Components on the last axis: one path of shape (2,) or a batch of shape (paths, 2).
        x, y = u[..., 0], u[..., 1]
        return jnp.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y], axis=-1)

    term = nde.SDETerm(drift, lambda t, u, p: 0.1 * u, noise="diagonal")
    ts = jnp.array([0.0, T])
    u0 = jnp.array([1.0, 1.0])
    p = jnp.array(P)

    def runner(solver, adaptive):
        @jax.jit
        def run(keys, x):
            def one(k):
                if adaptive:
                    sol = nde.solve(term, solver, u0, ts, args=p, rtol=x, atol=x, key=k, max_steps=100_000,
                                    throw=False)
                else:
                    sol = nde.solve(term, solver, u0, ts, args=p, dt0=x, adaptive=False, key=k, max_steps=100_000,
                                    throw=False)
                return sol.ys[-1], sol.stats["num_steps"] + sol.stats["num_rejected"]

            return jax.vmap(one)(keys)

        return run

    def shared_runner(solver, adaptive):
        """The ensemble as one state of shape (paths, 2): one step sequence
        (the error norm is taken over every path) and one Brownian tree of that
        shape, drawn from the first key; torchsde's batch does the same."""
        @jax.jit
        def run(keys, x):
            u0b = jnp.ones((keys.shape[0], 2))
            kw = dict(rtol=x, atol=x) if adaptive else dict(dt0=x, adaptive=False)
            sol = nde.solve(term, solver, u0b, ts, args=p, key=keys[0], max_steps=100_000, throw=False, **kw)
            return sol.ys[-1], jnp.broadcast_to(sol.stats["num_steps"] + sol.stats["num_rejected"], keys.shape[:1])

        return run

    return {
        "neuralde SRIW1 (adaptive)": (runner(nde.SRIW1(), True), True),
        "neuralde SRIW1 (adaptive, shared steps)": (shared_runner(nde.SRIW1(), True), True),
        "neuralde SRIW1 (fixed)": (runner(nde.SRIW1(), False), False),
        "neuralde SRIW1 (fixed, shared steps)": (shared_runner(nde.SRIW1(), False), False),
        "neuralde EulerMaruyama": (runner(nde.EulerMaruyama(), False), False),
    }, runner(nde.SRIW1(), False), shared_runner(nde.SRIW1(), False)


def make_diffrax(jax, jnp):
    import diffrax

    p = jnp.array(P)

    def drift(t, u, args):
        x, y = u[0], u[1]
        return jnp.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y])

    # One tree resolution for every run and the reference (a VirtualBrownianTree's
    # path depends on its tol): T/2^20, the depth of neuralde's tree (20 levels).
    bm_tol = T / 2**20

    def runner(solver, adaptive):
        @jax.jit
        def run(keys, x):
            def one(k):
                bm = diffrax.VirtualBrownianTree(0.0, T, tol=bm_tol, shape=(2,), key=k)
                terms = diffrax.MultiTerm(diffrax.ODETerm(drift),
                                          diffrax.ControlTerm(lambda t, u, a: jnp.diag(0.1 * u), bm))
                if adaptive:
                    ctrl = diffrax.PIDController(rtol=x, atol=x)
                    dt0 = 0.01
                else:
                    ctrl = diffrax.ConstantStepSize()
                    dt0 = x
                sol = diffrax.diffeqsolve(terms, solver, 0.0, T, dt0, jnp.array([1.0, 1.0]), stepsize_controller=ctrl,
                                          max_steps=200_000, throw=False)
                return sol.ys[-1], sol.stats["num_steps"] + sol.stats.get("num_rejected_steps", 0)

            return jax.vmap(one)(keys)

        return run

    return {
        "diffrax Euler": (runner(diffrax.Euler(), False), False),
        "diffrax ItoMilstein": (runner(diffrax.ItoMilstein(), False), False),
        "diffrax HalfSolver(ItoMilstein) (adaptive)": (
            runner(diffrax.HalfSolver(diffrax.ItoMilstein()), True), True),
    }, runner(diffrax.ItoMilstein(), False)


def make_torchsde():
    import torch
    import torchsde

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)

    class LV(torch.nn.Module):
        noise_type = "diagonal"
        sde_type = "ito"

        def f(self, t, u):
            x, y = u[:, 0], u[:, 1]
            return torch.stack([P[0] * x - P[1] * x * y, -P[2] * y + P[3] * x * y], dim=1)

        def g(self, t, u):
            return 0.1 * u

    sde = LV()

    def solve(n, x, adaptive, seed=0, reference=False):
        """One batch of ``n`` paths at tolerance (adaptive) or step ``x``; with
        ``reference``, also the same paths at step T / 2^13."""
        bm = torchsde.BrownianInterval(0.0, T, size=(n, 2), levy_area_approximation="space-time", entropy=seed,
                                       dtype=torch.float64)
        u0 = torch.ones(n, 2)
        ts = torch.tensor([0.0, T])
        with torch.no_grad():
            if adaptive:
                out = torchsde.sdeint(sde, u0, ts, bm=bm, method="srk", dt=0.01, adaptive=True, rtol=x, atol=x)
            else:
                out = torchsde.sdeint(sde, u0, ts, bm=bm, method="srk", dt=x)
            ref = torchsde.sdeint(sde, u0, ts, bm=bm, method="srk", dt=T / 2**13) if reference else None
        return out[-1].numpy(), (ref[-1].numpy() if reference else None), bm

    def run(n, x, adaptive, seed=0):
        out, _, bm = solve(n, x, adaptive, seed)
        return out, bm

    def with_ref(n, x, adaptive, seed=0):
        out, ref, _ = solve(n, x, adaptive, seed, reference=True)
        return out, ref

    return run, with_ref


def tree_bench(n_paths, save=True):
    import diffrax
    import jax
    import jax.numpy as jnp

    from neuralde import _brownian as B

    jax.config.update("jax_enable_x64", True)
    keys = jax.random.split(jax.random.key(0), n_paths)
    seeds = jax.vmap(B.seed_from_key)(keys)
    starts = jnp.linspace(0.1, 9.0, 64)

    def ours(levels):
        def one(seed):
            def body(c, s):
                W, H = B.increment(seed, 0.0, T, s, s + 0.01, 2, levels, jnp.float64)
                return c + W[0] + H[0], None
            return jax.lax.scan(body, 0.0, starts)[0]
        return jax.jit(jax.vmap(one)), seeds

    def theirs(levels):
        def one(k):
            bm = diffrax.VirtualBrownianTree(0.0, T, tol=T / 2**levels, shape=(2,), key=k,
                                             levy_area=diffrax.SpaceTimeLevyArea)
            def body(c, s):
                inc = bm.evaluate(s, s + 0.01, use_levy=True)
                return c + inc.W[0] + inc.H[0], None
            return jax.lax.scan(body, 0.0, starts)[0]
        return jax.jit(jax.vmap(one)), keys

    fns = {}
    for levels in (12, 16, 20):
        fns[f"neuralde tree, {levels} levels"] = ours(levels)
        fns[f"diffrax VirtualBrownianTree, tol 10/2^{levels}"] = theirs(levels)
    for f, a in fns.values():
        jax.block_until_ready(f(a))
    best = {k: float("inf") for k in fns}
    for _ in range(3):
        for name, (f, a) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(a))
            best[name] = min(best[name], time.perf_counter() - t0)
    rows = []
    for name, secs in best.items():
        us = secs / n_paths / starts.size * 1e6
        print(f"{name:45s} {us:8.2f} us/query")
        rows.append({"bench": "brownian_tree", "method": name, "paths": n_paths, "us_per_query": us})
        print(json.dumps(rows[-1]))
    if save:
        H.save_result({"workload": "W6tree", "rows": rows})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", action="store_true", help="time the Brownian trees alone")
    parser.add_argument("--tree-paths", type=int, default=10_000)
    parser.add_argument("--target", type=float, default=1e-2, help="strong error to match")
    parser.add_argument("--paths", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--calib", type=int, default=100, help="paths used to measure the strong error")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer sweep points, --paths 100 1000")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    ns = parser.parse_args()
    if ns.tree:
        return tree_bench(ns.tree_paths, save=not ns.no_save)
    if ns.quick:
        ns.paths = [100, 1000]
        ns.calib = min(ns.calib, 50)

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    import diffrax

    ours, our_ref, our_shared_ref = make_neuralde(jax, jnp)
    theirs, their_ref = make_diffrax(jax, jnp)
    keys = jax.random.split(jax.random.key(0), max(max(ns.paths), ns.calib))
    calib_keys = keys[: ns.calib]
    fine = T / 2**13

    # References on the same paths.
    ref_ours, _ = our_ref(calib_keys, jnp.float64(fine))
    ref_shared, _ = our_shared_ref(calib_keys, jnp.float64(fine))
    ref_dfx, _ = their_ref(calib_keys, jnp.float64(fine))
    ref_ours, ref_shared, ref_dfx = np.asarray(ref_ours), np.asarray(ref_shared), np.asarray(ref_dfx)

    # Fixed steps at least twice the reference's (T / 2^13): a step at or below
    # it would be measured against itself or a coarser solve (ItoMilstein at
    # T / 2^13 *is* diffrax's reference, error 0).
    dts = [T / 2**k for k in range(6, 13)]
    tols = [10.0 ** -k for k in np.arange(1.0, 4.01, 0.5)]
    if ns.quick:
        dts, tols = dts[::2], tols[::2]

    chosen = {}
    compile_s = {}
    for name, (run, adaptive) in {**ours, **theirs}.items():
        ref = (ref_shared if "shared" in name else ref_ours) if name.startswith("neuralde") else ref_dfx
        sweep = tols if adaptive else dts
        best = None
        for x in sweep:
            (ys, steps), secs = _timed(lambda: jax.block_until_ready(run(calib_keys, jnp.float64(x))))
            compile_s.setdefault(name, secs)
            err = float(np.mean(np.max(np.abs(np.asarray(ys) - ref), axis=-1)))
            if np.isfinite(err) and err <= ns.target:
                best = (x, err, float(np.mean(steps)))
                break
        chosen[name] = best
        print(f"calibrated {name}: {best}", flush=True)

    torch_runs = {}
    if not ns.no_torch:
        trun, twith_ref = make_torchsde()
        for name, adaptive in (("torchsde srk", False), ("torchsde srk (adaptive)", True)):
            best = None
            for x in (tols if adaptive else dts):
                ys, ref = twith_ref(ns.calib, x, adaptive)
                err = float(np.mean(np.max(np.abs(ys - ref), axis=-1)))
                if np.isfinite(err) and err <= ns.target:
                    best = (x, err, float("nan"))
                    break
            chosen[name] = best
            torch_runs[name] = (trun, adaptive)
            print(f"calibrated {name}: {best}", flush=True)

    versions = {"jax": jax.__version__, "diffrax": diffrax.__version__}
    try:
        import torch
        import torchsde
        versions.update(torch=torch.__version__, torchsde=torchsde.__version__)
    except ImportError:
        pass

    results = {}
    for n in ns.paths:
        batch = keys[:n]
        for name, (run, _) in {**ours, **theirs}.items():
            if chosen[name] is not None:  # warm (compiled for this batch size)
                jax.block_until_ready(run(batch, jnp.float64(chosen[name][0])))
        for _ in range(ns.rounds):
            for name, (run, _) in {**ours, **theirs}.items():
                if chosen[name] is None:
                    continue
                _, secs = _timed(lambda: jax.block_until_ready(run(batch, jnp.float64(chosen[name][0]))))
                results.setdefault((name, n), []).append(secs)
            for name, (trun, adaptive) in torch_runs.items():
                if chosen[name] is None:
                    continue
                _, secs = _timed(lambda: trun(n, chosen[name][0], adaptive))
                results.setdefault((name, n), []).append(secs)

    base = {n: float(np.median(results[("neuralde SRIW1 (adaptive)", n)])) for n in ns.paths
            if ("neuralde SRIW1 (adaptive)", n) in results}
    print(f"\nstrong error target {ns.target:g} at t=10 (mean over {ns.calib} paths of the max-norm error)")
    print(f"{'method':45s} {'paths':>6s} {'dt/tol':>9s} {'error':>9s} {'steps':>8s} {'time [s]':>9s} {'vs SRIW1':>9s}")
    for (name, n), secs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        x, err, steps = chosen[name]
        med = float(np.median(secs))
        ratio = med / base[n] if n in base else float("nan")
        print(f"{name:45s} {n:6d} {x:9.3g} {err:9.2e} {steps:8.0f} {med:9.3f} {ratio:9.2f}")
    rows = []
    for (name, n), secs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        x, err, steps = chosen[name]
        rows.append({"bench": "sde_lotka_volterra", "method": name, "paths": n, "dt_or_tol": float(x),
                     "strong_error": err, "mean_steps": None if np.isnan(steps) else steps,
                     "time_s": float(np.median(secs)), "times_s": secs, "target": ns.target, "versions": versions})
        print(json.dumps(rows[-1]))
    if not ns.no_save:
        H.save_result({"workload": "W6", "rows": rows, "uncalibrated": [k for k, v in chosen.items() if v is None],
                       "settings": {"target": ns.target, "calib": ns.calib, "paths": ns.paths, "rounds": ns.rounds,
                                    "quick": ns.quick}})
    print("uncalibrated (no swept setting reached the target):",
          [k for k, v in chosen.items() if v is None])


if __name__ == "__main__":
    main()
