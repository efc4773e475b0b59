"""Shared benchmark conventions: timing, interleaving, the floor, tables, JSON.

Every benchmark script builds a list of `Case`s (one per library or method)
and hands them to `run_cases`, which

1. calls each case once and times that first call as its *compile time*
   (tracing + XLA compilation + one execution; for PyTorch and scipy, which do
   not compile, the first call's time is reported as "warm-up" and is not a
   compile time);
2. runs ``rounds`` interleaved rounds: in every round each case is timed for
   about ``budget_s`` seconds (at least ``min_repeats`` calls), and the round's
   figure is the median of those calls; the reported time is the median over
   rounds. Interleaving means all libraries see the same machine load, so the
   ratios are meaningful even where the absolute times drift 2-4x on a shared
   machine;
3. prints a table (time, ratio to the baseline case, ratio to the floor,
   compile time and its ratio, vector-field evaluations, an accuracy column)
   and one JSON line per case, and appends the whole run (date, device,
   versions) to a JSON file in ``benchmarks/results/``.

The *floor* of a workload is the same number of vector-field evaluations as
the baseline (neuralde) solve makes, chained in a bare `lax.fori_loop`
(``y <- y + h f(t, y)``), or for gradients a `lax.scan` of them under
`jax.value_and_grad`: the cost of the evaluations alone, without any solver.
``time / floor`` is then the solver's overhead factor.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

# One thread for XLA on the CPU, as for PyTorch (`torch_threads`): the ratios
# then compare the libraries' work rather than how their ops split over cores,
# and they survive a loaded machine (multi-threaded ops stall when another
# process holds a core). Must be set before jax is imported; a user-set
# XLA_FLAGS is kept as it is. No effect on GPU kernels.
if "XLA_FLAGS" not in os.environ and os.environ.get("NEURALDE_BENCH_THREADS", "1") == "1":
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

# NEURALDE_BENCH_RESULTS redirects the JSON files (e.g. on a remote machine).
RESULTS_DIR = os.environ.get("NEURALDE_BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                       "results")


@dataclass
class Case:
    """One timed callable. ``fn()`` runs the whole timed operation and returns
    something `block` can wait on. ``kind`` is "jax" (first call = compile),
    "torch" or "python" (first call = warm-up)."""

    name: str
    fn: Callable[[], Any]
    kind: str = "jax"
    nfev: Optional[int] = None
    extra: dict = field(default_factory=dict)
    # filled in by run_cases
    first_s: float = float("nan")
    times: list = field(default_factory=list)
    output: Any = None

    @property
    def time_s(self) -> float:
        return float(np.median(self.times)) if self.times else float("nan")

    @property
    def compile_s(self) -> float:
        if self.kind != "jax":
            return float("nan")
        return max(self.first_s - self.time_s, 0.0)


def block(out):
    """Wait for JAX arrays (and CUDA tensors) in ``out``."""
    import jax

    def leaf(x):
        if hasattr(x, "block_until_ready"):
            x.block_until_ready()
        elif type(x).__module__.startswith("torch"):
            _torch_sync()
        return x

    jax.tree_util.tree_map(leaf, out)
    return out


def _torch_sync():
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:  # pragma: no cover
        pass


def _time_calls(fn, budget_s, min_repeats, max_repeats):
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < max_repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def first_call(case, verbose=True):
    """Call ``case`` once, timing it (compile time for JAX cases); keeps the
    output (e.g. to read the number of evaluations before building the floor)."""
    t0 = time.perf_counter()
    case.output = block(case.fn())
    case.first_s = time.perf_counter() - t0
    if verbose:
        print(f"  first call {case.name:44s} {case.first_s:8.3f} s", flush=True)
    return case.output


def warm_up():
    """Compile and run a small program that uses what every JAX case uses (the
    CPU client, the tracing and lowering of loops, their derivatives, an Optax
    update), so that the first case a script times -- neuralde's, which the
    others' floors are built from -- does not pay the process's one-time
    costs in its compile time. Call it once before the first case."""
    import jax
    import jax.numpy as jnp

    def loss(w):
        def body(c, _):
            return c + 0.1 * jnp.tanh(c @ w), None

        y = jax.lax.scan(body, jnp.ones((3, 2)), None, length=3)[0]
        start = (0, jax.lax.stop_gradient(jnp.sum(y)))
        n = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 0.5), start)[1]
        return jnp.sum(y ** 2) + n

    w = jnp.eye(2)
    try:
        import optax

        opt = optax.adam(1e-3)

        @jax.jit
        def step(w, state):
            g = jax.grad(loss)(w)
            updates, state = opt.update(g, state, w)
            return optax.apply_updates(w, updates), state

        block(step(w, opt.init(w)))
    except ImportError:
        block(jax.jit(jax.grad(loss))(w))


def run_cases(cases, *, rounds=5, budget_s=0.3, min_repeats=3, max_repeats=2000, verbose=True):
    """Compile (first call) every case not called yet, then time them all in
    interleaved rounds."""
    for c in cases:
        if np.isnan(c.first_s):
            first_call(c, verbose)
    for _ in range(rounds):
        for c in cases:
            c.times.append(_time_calls(c.fn, budget_s, min_repeats, max_repeats))
    return cases


# ------------------------------------------------------------------ the floor


def floor_forward(vf, y0, args, n: int, t0=0.0, h=1e-3):
    """A jitted function running ``n`` evaluations of ``vf`` chained in a bare
    `lax.fori_loop` (``y <- y + h vf(t, y, args)``)."""
    import jax
    import jax.numpy as jnp
    import jax.tree_util as jtu

    @jax.jit
    def run(y0, args):
        def body(i, y):
            t = jnp.asarray(t0, jtu.tree_leaves(y)[0].dtype) + h * i
            f = vf(t, y, args)
            return jtu.tree_map(lambda a, b: a + jnp.asarray(h, a.dtype) * b, y, f)

        return jax.lax.fori_loop(0, n, body, y0)

    return lambda: run(y0, args)


def floor_grad(vf, y0, args, n: int, loss, h=1e-3):
    """``value_and_grad`` w.r.t. ``args`` (and ``y0``) of ``loss(y_n)`` with
    ``y_n`` from ``n`` chained evaluations in a `lax.scan` (reverse mode stores
    one state per evaluation): the floor of a gradient."""
    import jax
    import jax.numpy as jnp
    import jax.tree_util as jtu

    def chained(y0, args):
        def body(y, i):
            t = jnp.asarray(h, jtu.tree_leaves(y)[0].dtype) * i
            f = vf(t, y, args)
            return jtu.tree_map(lambda a, b: a + jnp.asarray(h, a.dtype) * b, y, f), None

        y, _ = jax.lax.scan(body, y0, jnp.arange(n))
        return loss(y)

    run = jax.jit(jax.value_and_grad(chained, argnums=(0, 1)))
    return lambda: run(y0, args)


# ------------------------------------------------------------------ metadata


def environment() -> dict:
    import jax

    def version(mod):
        try:
            m = __import__(mod)
            return getattr(m, "__version__", "?")
        except Exception:
            return None

    dev = jax.devices()[0]
    device = f"{dev.platform}: {getattr(dev, 'device_kind', '')}".strip()
    if dev.platform == "cpu":
        device += f" ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "host": platform.node(),
        "python": platform.python_version(),
        "neuralde_commit": commit,
        "versions": {m: version(m) for m in ("neuralde", "jax", "jaxlib", "equinox", "diffrax", "optax", "torch",
                                             "torchdiffeq", "scipy", "numpy")},
        "x64": bool(jax.config.jax_enable_x64),
    }


# ------------------------------------------------------------------ reporting


def report(workload: str, title: str, cases, *, baseline: Optional[str] = None, floor: Optional[str] = None,
           extra_cols=(), settings: Optional[dict] = None, save: bool = True) -> dict:
    """Print the table and JSON lines; append to ``benchmarks/results/<workload>.json``.

    ``baseline``: the case the ratios divide by (default: the first);
    ``floor``: the floor case's name (excluded from the ratio to itself);
    ``extra_cols``: keys of ``Case.extra`` to print (e.g. "rel_err")."""
    by_name = {c.name: c for c in cases}
    base = by_name[baseline] if baseline else cases[0]
    floor_case = by_name.get(floor) if floor else None
    env = environment()
    print(f"\n{workload}: {title}")
    print(f"  {env['device']}; jax {env['versions']['jax']}; {env['date']}")
    hdr = f"{'case':44s} {'time ms':>10s} {'/' + _short(base.name):>12s} {'/floor':>7s} {'compile s':>10s} " \
          f"{'c/' + _short(base.name):>10s} {'nfev':>6s}"
    for col in extra_cols:
        hdr += f" {col:>10s}"
    print(hdr)
    rows = []
    for c in cases:
        ratio = c.time_s / base.time_s
        fl = c.time_s / floor_case.time_s if floor_case is not None and c is not floor_case else float("nan")
        cr = c.compile_s / base.compile_s if base.compile_s > 0 else float("nan")
        line = (f"{c.name:44s} {1e3 * c.time_s:10.4g} {ratio:12.3f} {_f(fl, 7, 2)} {_f(c.compile_s, 10, 3)} "
                f"{_f(cr, 10, 3)} {c.nfev if c.nfev is not None else '-':>6}")
        for col in extra_cols:
            v = c.extra.get(col)
            line += f" {v:10.2e}" if isinstance(v, float) else f" {str(v) if v is not None else '-':>10s}"
        print(line)
        rows.append({
            "workload": workload, "case": c.name, "time_s": c.time_s, "round_times_s": c.times,
            "ratio_to_baseline": ratio, "ratio_to_floor": None if np.isnan(fl) else fl,
            "compile_s": None if np.isnan(c.compile_s) else c.compile_s,
            "first_call_s": c.first_s, "nfev": c.nfev, **{k: _jsonable(v) for k, v in c.extra.items()},
        })
    for r in rows:
        print("JSON " + json.dumps(r))
    result = {"workload": workload, "title": title, "baseline": base.name, "floor": floor,
              "settings": settings or {}, **env, "rows": rows}
    if save:
        save_result(result)
    return result


def save_result(result: dict, env: Optional[dict] = None):
    """Append ``result`` (with the environment: date, device, versions) to
    ``benchmarks/results/<workload>_<cpu|gpu>.json``."""
    if env is None and "date" not in result:
        result = {**result, **environment()}
    os.makedirs(RESULTS_DIR, exist_ok=True)
    platform_tag = "gpu" if not result["device"].startswith("cpu") else "cpu"
    path = os.path.join(RESULTS_DIR, f"{result['workload']}_{platform_tag}.json")
    history = []
    if os.path.exists(path):
        with open(path) as f:
            history = json.load(f)
    history.append(result)
    with open(path, "w") as f:
        json.dump(history, f, indent=1)
    print(f"  results appended to {os.path.relpath(path)}")
    return path


def _short(name):
    return name.split()[0][:10]


def _f(x, w, d):
    return f"{x:{w}.{d}f}" if x is not None and np.isfinite(x) else f"{'-':>{w}s}"


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def torch_threads():
    """PyTorch on one thread on CPU (the issue's convention: the peers' CPU
    numbers must not come from extra cores the JAX ones do not use)."""
    try:
        import torch

        torch.set_num_threads(1)
        return torch
    except ImportError:
        return None
