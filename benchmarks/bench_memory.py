"""W7: peak memory of ONE jitted `value_and_grad` of a neural ODE as the span grows
10x, for every neuralde sensitivity and diffrax's adjoints in one run (issues #3, #8).

    python benchmarks/bench_memory.py [--spans 10 30 100] [--steps-per-time 40] [--quick] [--rss] [--float32]
                                      [--no-save]

The tables are also appended to ``benchmarks/results/W7_<cpu|gpu>.json``.

Problem: y of shape (64, 16) (a batch of 64 states of size 16), float64,
``dy/dt = R y - 0.01 y + 0.1 tanh(W2 tanh(W1 y + b1) + b2)`` with R a rotation
of frequency 1..2 in each of the 8 coordinate pairs and an MLP 16 -> 64 -> 16
(2128 parameters). The rotation keeps the solution moving, so the number of
steps grows in proportion to the span, and the light damping with the bounded
MLP term keeps the gradient finite over long spans (an untrained MLP field on
its own blows up). Loss ``sum(y(T)**2)`` with save times ``[0, T]``; gradient
with respect to y0 and the MLP's parameters (passed as ``args``). Tsit5,
rtol = atol = 1e-6 in both libraries (diffrax: `PIDController`, its default I
controller; neuralde: its PI controller).

Memory figure: XLA's compiled-memory analysis,
``jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes``:
the bytes of every temporary buffer the compiled program allocates (loop
carries, the per-iteration residuals reverse mode stores, checkpoint buffers),
after XLA has reused buffers whose lifetimes do not overlap. It is the peak
working memory on top of the inputs and outputs (here 20 kB each;
``peak_memory_in_bytes`` is not meaningful on CPU). It is
exact and free of allocator noise, but it is a property of the *compiled
program*: XLA's shapes are static, so every buffer is sized for ``max_steps``
(the bound on iterations), never for the steps a given span actually takes.
Hence two tables:

A. the same ``max_steps`` for every span (``steps_per_time * max(spans)``,
   4000 by default) and one executable per method, with T a runtime input:
   memory cannot change with T for any method; the table shows each method's
   level for that budget, the steps actually taken, and the gradient check.
B. ``max_steps = steps_per_time * T`` (400, 1200, 4000 by default), what a
   user must raise as the span grows: here ReverseMode grows with the span
   (one stored carry per possible iteration, ``max_steps + len(t)`` rounded up
   up to the product of its nested scans' lengths: 448/1210/4096 slots
   here, 8.3x for 10x the budget), CheckpointAdjoint(checkpoints=k)
   grows as max_steps/k, CheckpointAdjoint() as sqrt(max_steps) once its
   every-step buffer would pass 16 MiB (below that it stores every step,
   like ReverseMode, so it can *drop* as the span grows), diffrax's
   RecursiveCheckpointAdjoint as log(max_steps), the continuous adjoints not
   at all.

Steps are accepted + rejected (neuralde ``num_steps + num_rejected``, diffrax
``num_steps``). "grad rel.diff" is the largest over the spans of
``|g - g_ref| / |g_ref|`` (2-norm over all gradient entries), with g_ref from
neuralde ReverseMode at the same span: CheckpointAdjoint must match it to
round-off; the continuous adjoints and diffrax (different steps) to about the
tolerance.

ForwardMode is compiled (memory only) but not run: under `jax.grad` it pushes
one tangent per differentiated scalar (1024 + 2128 here) through the solve,
about half a minute for T = 1 on a 2-core CPU; its memory follows the number
of inputs, not ``max_steps``.

``--rss`` adds, for table A, the growth of the process's peak resident memory
during one execution (VmHWM reset through /proc/self/clear_refs; Linux only):
it confirms that the large XLA buffers are really touched, but reads ~0 for
buffers of a few tens of MB, which the allocator serves from memory it already
holds. Compiles (22 of 6-20 s) dominate the run time: about 3 minutes on a
2-core CPU; 1.5 with ``--quick``, which prints table A only and skips
ForwardMode.
"""
from __future__ import annotations

import argparse
import math
import re
import time

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MB = 2.0**20


def _peak_rss_mb():
    with open("/proc/self/status") as f:
        status = f.read()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    return hwm, rss


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=float, nargs="+", default=[10.0, 30.0, 100.0], help="final times T")
    parser.add_argument("--steps-per-time", type=int, default=40,
                        help="max_steps = this * T (table B) and * max(spans) (table A); ~7 are needed")
    parser.add_argument("--checkpoints", type=int, default=8, help="k of the CheckpointAdjoint(checkpoints=k) row")
    parser.add_argument("--quick", action="store_true", help="table A only, no ForwardMode")
    parser.add_argument("--rss", action="store_true", help="also measure peak-RSS growth per execution (Linux)")
    parser.add_argument("--float32", action="store_true", help="solve in float32 instead of float64")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/W7_*.json")
    ns = parser.parse_args()
    t_start = time.perf_counter()

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", not ns.float32)
    dtype = jnp.float32 if ns.float32 else jnp.float64
    import diffrax

    import neuralde as nde

    spans = sorted(ns.spans)
    rtol = atol = 1e-6
    batch, dim, width = 64, 16, 64
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = (
        (jax.random.normal(k1, (dim, width)) / math.sqrt(dim)).astype(dtype),
        jnp.zeros(width, dtype),
        (jax.random.normal(k2, (width, dim)) / math.sqrt(width)).astype(dtype),
        jnp.zeros(dim, dtype),
    )
    y0 = jax.random.normal(k3, (batch, dim)).astype(dtype)
    omega = jnp.linspace(1.0, 2.0, dim // 2, dtype=dtype)

    def field(t, y, p):
        w1, b1, w2, b2 = p
        x1, x2 = y[:, 0::2], y[:, 1::2]
        rotation = jnp.stack([omega * x2, -omega * x1], axis=-1).reshape(y.shape)
        return rotation - 0.01 * y + 0.1 * jnp.tanh(jnp.tanh(y @ w1 + b1) @ w2 + b2)

    def neuralde_loss(sensitivity, max_steps):
        def loss(y0, p, T):
            sol = nde.solve(nde.ODETerm(field), nde.Tsit5(), y0, jnp.stack([jnp.zeros_like(T), T]), args=p,
                            rtol=rtol, atol=atol, max_steps=max_steps, sensitivity=sensitivity)
            return jnp.sum(sol.ys[-1] ** 2), sol.stats["num_steps"] + sol.stats["num_rejected"]

        return loss

    def diffrax_loss(adjoint, max_steps):
        def loss(y0, p, T):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field), diffrax.Tsit5(), jnp.zeros_like(T), T, None, y0, args=p,
                saveat=diffrax.SaveAt(t1=True), stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                adjoint=adjoint, max_steps=max_steps,
            )
            return jnp.sum(sol.ys[-1] ** 2), sol.stats["num_steps"]

        return loss

    k = ns.checkpoints
    methods = [  # (name, loss factory, run it?)
        ("neuralde ReverseMode", lambda m: neuralde_loss(nde.ReverseMode(), m), True),
        ("neuralde CheckpointAdjoint()", lambda m: neuralde_loss(nde.CheckpointAdjoint(), m), True),
        (f"neuralde CheckpointAdjoint({k})", lambda m: neuralde_loss(nde.CheckpointAdjoint(checkpoints=k), m), True),
        ("neuralde BacksolveAdjoint", lambda m: neuralde_loss(nde.BacksolveAdjoint(), m), True),
        ("diffrax RecursiveCheckpoint", lambda m: diffrax_loss(diffrax.RecursiveCheckpointAdjoint(), m), True),
        ("diffrax BacksolveAdjoint", lambda m: diffrax_loss(diffrax.BacksolveAdjoint(), m), True),
        ("diffrax DirectAdjoint", lambda m: diffrax_loss(diffrax.DirectAdjoint(), m), True),
    ]
    if not ns.quick:
        methods.append(("neuralde ForwardMode *", lambda m: neuralde_loss(nde.ForwardMode(), m), False))

    def compile_grad(loss):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        t0 = time.perf_counter()
        compiled = fn.lower(y0, params, jnp.asarray(spans[-1], dtype)).compile()
        return compiled, time.perf_counter() - t0, compiled.memory_analysis().temp_size_in_bytes / MB

    def execute(compiled, T):
        if ns.rss:
            _reset_peak_rss()
            _, rss_before = _peak_rss_mb()
        (_, steps), grads = compiled(y0, params, jnp.asarray(T, dtype))
        grads = jax.block_until_ready(grads)
        flat = np.concatenate([np.ravel(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads)])
        rss = _peak_rss_mb()[0] - rss_before if ns.rss else float("nan")
        if not np.all(np.isfinite(flat)):
            raise FloatingPointError(f"non-finite gradient at T={T}")
        return int(steps), flat, rss

    max_steps_a = ns.steps_per_time * int(math.ceil(spans[-1]))
    budgets_b = [ns.steps_per_time * int(math.ceil(T)) for T in spans]

    # Table A: one executable per method (max_steps_a), every span executed.
    rows = []
    for name, make, run in methods:
        compiled, t_compile, temp = compile_grad(make(max_steps_a))
        row = dict(name=name, run=run, temp_a=temp, compile=[t_compile], steps=[], grads=[], rss=[])
        if run:
            for T in spans:
                steps, flat, rss = execute(compiled, T)
                row["steps"].append(steps)
                row["grads"].append(flat)
                row["rss"].append(rss)
        rows.append(row)
        print(f"  compiled {name:32s} (max_steps={max_steps_a}) in {t_compile:5.1f} s", flush=True)

    ref = rows[0]
    for row in rows:
        if row["run"]:
            row["rel"] = max(np.linalg.norm(g - r) / np.linalg.norm(r) for g, r in zip(row["grads"], ref["grads"]))

    # Table B: max_steps sized to each span; the largest span reuses table A's executable.
    if not ns.quick:
        for row, (name, make, run) in zip(rows, methods):
            row["temp_b"] = []
            for T, budget in zip(spans, budgets_b):
                if budget == max_steps_a:
                    row["temp_b"].append(row["temp_a"])
                    continue
                compiled, t_compile, temp = compile_grad(make(budget))
                row["compile"].append(t_compile)
                row["temp_b"].append(temp)
                if run:  # the budget must suffice (throw=True raises otherwise) and change nothing
                    steps, flat, _ = execute(compiled, T)
                    i = spans.index(T)
                    assert steps == row["steps"][i] and np.allclose(flat, row["grads"][i], rtol=1e-12, atol=0), name
                print(f"  compiled {name:32s} (max_steps={budget}) in {t_compile:5.1f} s", flush=True)

    span_cols = "".join(f"{'T=' + _fmt(T):>10s}" for T in spans)
    steps_hdr = "steps " + "/".join(_fmt(T) for T in spans)
    print(f"\nPeak working memory (MB) of one jitted value_and_grad: XLA temp_size_in_bytes. "
          f"y {batch}x{dim}, MLP {dim}-{width}-{dim}, Tsit5, rtol=atol={rtol}, save t=[0,T], "
          f"{jnp.dtype(dtype).name}, jax {jax.__version__}, diffrax {diffrax.__version__}")
    print(f"\nA. max_steps = {max_steps_a} for every span (one executable per method, T a runtime input)")
    rss_hdr = f" {'RSS MB ' + '/'.join(_fmt(T) for T in spans):>22s}" if ns.rss else ""
    print(f"{'method':33s}{span_cols} {'growth':>7s} {'/ReverseMode':>12s} {steps_hdr:>22s} {'grad rel.diff':>14s}"
          f"{rss_hdr}")
    for row in rows:
        cells = "".join(f"{row['temp_a']:10.2f}" for _ in spans)
        steps = "/".join(str(s) for s in row["steps"]) if row["run"] else "not run"
        rel = (f"{row['rel']:14.1e}" if row is not ref else f"{'(reference)':>14s}") if row["run"] else f"{'-':>14s}"
        rss = (f" {'/'.join(f'{r:.0f}' for r in row['rss']):>22s}" if row["run"] else f" {'-':>22s}") if ns.rss else ""
        print(f"{row['name']:33s}{cells} {1.0:7.2f} {row['temp_a'] / ref['temp_a']:12.3f} {steps:>22s} {rel}{rss}")

    if not ns.quick:
        print(f"\nB. max_steps = {ns.steps_per_time} * T = {'/'.join(str(b) for b in budgets_b)} "
              f"(the budget grows with the span)")
        print(f"{'method':33s}{span_cols} {'growth':>7s} {'/ReverseMode':>12s}")
        for row in rows:
            cells = "".join(f"{t:10.2f}" for t in row["temp_b"])
            print(f"{row['name']:33s}{cells} {row['temp_b'][-1] / row['temp_b'][0]:7.2f} "
                  f"{row['temp_b'][-1] / ref['temp_b'][-1]:12.3f}")
        print("\n* ForwardMode: compiled only (memory), not run: one tangent per input scalar "
              f"({y0.size} + {sum(p.size for p in params)}) makes it minutes per gradient here.")
    if not ns.no_save:
        import _harness as H

        H.save_result({
            "workload": "W7", "title": "peak working memory (XLA temp_size_in_bytes, MB) of one jitted value_and_grad",
            "settings": dict(batch=batch, dim=dim, width=width, spans=spans, rtol=rtol, atol=atol,
                             max_steps_a=max_steps_a, budgets_b=budgets_b, dtype=jnp.dtype(dtype).name),
            "rows": [{"case": r["name"], "temp_mb_a": r["temp_a"], "temp_mb_b": r.get("temp_b"),
                      "steps": r["steps"], "grad_rel_diff": r.get("rel"), "compile_s": r["compile"]} for r in rows],
        })
    print(f"growth = last span / first span; /ReverseMode = at T={_fmt(spans[-1])}. "
          f"Compiles: {sum(sum(r['compile']) for r in rows):.0f} s; total {time.perf_counter() - t_start:.0f} s.")


def _fmt(x):
    return f"{x:g}"


if __name__ == "__main__":
    main()
