"""Stiff problems: neuralde Kvaerno3/Kvaerno5 against diffrax Kvaerno3/Kvaerno5
and scipy's Radau and BDF, in one interleaved run.

    python benchmarks/bench_stiff.py [--rounds 5] [--repeats 5] [--plot]

Problems (E. Hairer & G. Wanner, Solving ODEs II, IV.1 and IV.10), each saved
only at its final time:

* ROBER on [0, 1e5], y0 = (1, 0, 0), rtol = 1e-6, atol = 1e-10;
* Van der Pol y'' = mu (1 - y^2) y' - y with mu = 1000 on [0, 3000],
  y0 = (2, 0), rtol = atol = 1e-6;
* HIRES on [0, 321.8122], rtol = 1e-6, atol = 1e-10.

Columns: ``solve ms`` is the median over ``--rounds`` interleaved rounds (every
solver in every round, so that all see the same machine load) of the median of
``--repeats`` calls of one jitted solve (scipy: one call of ``solve_ivp``, its
default finite-difference Jacobian); ``steps`` accepted, ``rejected`` (scipy
does not report rejections: ``-``); ``err`` is ``max_i |y_i - ref_i| / (|ref_i| +
atol)`` at the final time, against scipy Radau at rtol = 1e-12 with the
analytic Jacobian; ``ratio`` is the time relative to neuralde Kvaerno5 on the
same problem. Each row is also printed as a JSON line.

``--plot``: work--precision diagram (error against solve time, rtol from 1e-4
to 1e-10 with atol/rtol fixed per problem) written to
``benchmarks/results/stiff_work_precision.png``; the JAX solvers take the
tolerances as arrays, so they compile once.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def rober(xp, t, y, _):
    y1, y2, y3 = y[0], y[1], y[2]
    return xp.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 3e7 * y2**2 - 1e4 * y2 * y3, 3e7 * y2**2])


def rober_jac(t, y):
    _y1, y2, y3 = y
    return np.array([[-0.04, 1e4 * y3, 1e4 * y2], [0.04, -6e7 * y2 - 1e4 * y3, -1e4 * y2], [0.0, 6e7 * y2, 0.0]])


def vdp(xp, t, y, _):
    return xp.stack([y[1], 1000.0 * (1 - y[0] ** 2) * y[1] - y[0]])


def vdp_jac(t, y):
    return np.array([[0.0, 1.0], [-2000.0 * y[0] * y[1] - 1, 1000.0 * (1 - y[0] ** 2)]])


def hires(xp, t, y, _):
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    r = 280.0 * y6 * y8
    return xp.stack([
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007, 1.71 * y1 - 8.75 * y2,
        -10.03 * y3 + 0.43 * y4 + 0.035 * y5, 8.32 * y2 + 1.71 * y3 - 1.12 * y4,
        -1.745 * y5 + 0.43 * y6 + 0.43 * y7, -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
        r - 1.81 * y7, -r + 1.81 * y7,
    ])


# name: (field, analytic Jacobian for the reference or None, y0, t1, rtol, atol)
PROBLEMS = {
    "ROBER": (rober, rober_jac, [1.0, 0.0, 0.0], 1e5, 1e-6, 1e-10),
    "VdP mu=1000": (vdp, vdp_jac, [2.0, 0.0], 3000.0, 1e-6, 1e-6),
    "HIRES": (hires, None, [1.0, 0, 0, 0, 0, 0, 0, 0.0057], 321.8122, 1e-6, 1e-10),
}


def _scipy(field, y0, t1, rtol, atol, method, jac=None):
    from scipy.integrate import solve_ivp

    return solve_ivp(lambda t, y: np.asarray(field(np, t, y, None)), (0.0, t1), np.asarray(y0, float),
                     method=method, rtol=rtol, atol=atol, jac=jac)


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def build_solvers(jax, jnp, nde, diffrax, field, y0, t1):
    """name -> fn(rtol, atol) returning (y1, steps, rejected) as numpy."""
    y0j = jnp.asarray(y0, jnp.float64)
    ts = jnp.array([0.0, t1])
    out = {}

    def nde_fn(solver):
        @jax.jit
        def run(rtol, atol):
            sol = nde.solve(nde.ODETerm(lambda t, y, a: field(jnp, t, y, a)), solver, y0j, ts, rtol=rtol, atol=atol,
                            max_steps=100_000, throw=False)
            return sol.ys[-1], sol.stats["num_steps"], sol.stats["num_rejected"]

        return run

    def dfx_fn(solver):
        @jax.jit
        def run(rtol, atol):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, a: field(jnp, t, y, a)), solver, 0.0, t1, None, y0j,
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=100_000, throw=False,
            )
            return sol.ys[-1], sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"]

        return run

    out["neuralde Kvaerno5"] = nde_fn(nde.Kvaerno5())
    out["neuralde Kvaerno3"] = nde_fn(nde.Kvaerno3())
    if diffrax is not None:
        out["diffrax Kvaerno5"] = dfx_fn(diffrax.Kvaerno5())
        out["diffrax Kvaerno3"] = dfx_fn(diffrax.Kvaerno3())

    def wrap_jax(run):
        def call(rtol, atol):
            y, s, r = run(jnp.asarray(rtol), jnp.asarray(atol))
            y = np.asarray(jax.block_until_ready(y))
            return y, int(s), int(r)

        return call

    out = {k: wrap_jax(v) for k, v in out.items()}
    for method in ("Radau", "BDF"):
        def call(rtol, atol, method=method):
            sol = _scipy(field, y0, t1, rtol, atol, method)
            return sol.y[:, -1], len(sol.t) - 1, -1

        out[f"scipy {method}"] = call
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (machine noise)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per solver per round")
    parser.add_argument("--plot", action="store_true", help="work-precision plot over rtol 1e-4..1e-10")
    ns = parser.parse_args()

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    import neuralde as nde

    try:
        import diffrax
    except ImportError:
        diffrax = None
        print("diffrax not installed: pip install '.[bench]'")
    import scipy

    print(f"jax {jax.__version__}, diffrax {getattr(diffrax, '__version__', '-')}, scipy {scipy.__version__}, "
          f"neuralde {nde.__version__}")
    all_rows = []
    plot_data = {}
    for pname, (field, jac, y0, t1, rtol, atol) in PROBLEMS.items():
        ref = _scipy(field, y0, t1, 1e-12, 1e-14 * atol / rtol if atol < rtol else 1e-14, "Radau", jac).y[:, -1]
        solvers = build_solvers(jax, jnp, nde, diffrax, field, y0, t1)
        rows = {}
        for name, fn in solvers.items():
            t0 = time.perf_counter()
            y, steps, rej = fn(rtol, atol)
            err = float(np.max(np.abs(y - ref) / (np.abs(ref) + atol)))
            rows[name] = {"problem": pname, "solver": name, "compile_s": time.perf_counter() - t0, "steps": steps,
                          "rejected": rej, "err": err, "samples": []}
        for _ in range(ns.rounds):
            for name, fn in solvers.items():
                reps = ns.repeats if not name.startswith("scipy") else max(1, ns.repeats // 2)
                rows[name]["samples"].append(_median_time(lambda fn=fn, rtol=rtol, atol=atol: fn(rtol, atol), reps))
        base = float(np.median(rows["neuralde Kvaerno5"]["samples"]))
        print(f"\n{pname}: t1={t1:g}, rtol={rtol:g}, atol={atol:g}")
        print(f"{'solver':20s} {'compile s':>9s} {'solve ms':>9s} {'steps':>6s} {'rejected':>8s} {'err':>9s} {'ratio':>6s}")
        for r in rows.values():
            r["solve_ms"] = 1e3 * float(np.median(r.pop("samples")))
            r["ratio"] = r["solve_ms"] / (1e3 * base)
            rej = "-" if r["rejected"] < 0 else str(r["rejected"])
            print(f"{r['solver']:20s} {r['compile_s']:9.2f} {r['solve_ms']:9.2f} {r['steps']:6d} {rej:>8s} "
                  f"{r['err']:9.1e} {r['ratio']:6.2f}")
            all_rows.append(r)
        if ns.plot:
            curves = {}
            for name, fn in solvers.items():
                pts = []
                for rt in 10.0 ** -np.arange(4, 11):
                    at = rt * atol / rtol
                    y, _, _ = fn(rt, at)
                    t_med = _median_time(lambda fn=fn, rt=rt, at=at: fn(rt, at), 3 if not name.startswith("scipy") else 1)
                    pts.append((float(np.max(np.abs(y - ref) / (np.abs(ref) + at))), t_med))
                curves[name] = pts
            plot_data[pname] = curves
    print()
    for r in all_rows:
        print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()}))
    if ns.plot:
        _plot(plot_data)


def _plot(plot_data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plot_data), figsize=(5 * len(plot_data), 4))
    for ax, (pname, curves) in zip(np.atleast_1d(axes), plot_data.items()):
        for name, pts in curves.items():
            err, t = np.array(pts).T
            ax.loglog(t * 1e3, np.maximum(err, 1e-16), "o-" if "neuralde" in name else "s--", label=name, ms=3)
        ax.set_title(pname)
        ax.set_xlabel("solve time (ms)")
        ax.set_ylabel("error at t1 (scaled)")
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(os.path.dirname(__file__), "results", "stiff_work_precision.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
