"""Single-kernel smoke run: every configuration compiled with and without the
single-kernel mark (`neuralde._single_kernel`), each in its own process (a
failure of XLA:CPU's single-kernel emitter aborts the process, and is reported
here instead of ending the run), with the largest relative difference of the
results.

    python benchmarks/single_kernel_smoke.py [NAME ...]

Output: one line per configuration, ``name | marked? | difference``: the
largest absolute difference of the results over their largest magnitude.
Run it after upgrading jax/jaxlib: the mark relies on what that emitter handles.
"""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import neuralde as nde  # noqa: E402

def lv(t, u, p):
    return jnp.stack([p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]])


def rober(t, y, k):
    return jnp.stack([-k[0] * y[0] + k[2] * y[1] * y[2], k[0] * y[0] - k[1] * y[1] ** 2 - k[2] * y[1] * y[2],
                      k[1] * y[1] ** 2])


TS = jnp.linspace(0.0, 5.0, 21)
U0 = jnp.array([1.0, 1.0])
P = jnp.array([1.5, 1.0, 3.0, 1.0])
K = jnp.array([0.04, 3e7, 1e4])
Y_ROBER = jnp.array([1.0, 0.0, 0.0])
CK = nde.CheckpointAdjoint()


def loss_fn(field=lv, y0=U0, ts=TS, sens=CK, **kw):
    def loss(p):
        sol = nde.solve(nde.ODETerm(field), nde.Tsit5(), y0, ts, args=p, rtol=1e-7, atol=1e-7, sensitivity=sens, **kw)
        return jnp.sum(jnp.nan_to_num(jax.tree_util.tree_leaves(sol.ys)[0]) ** 2)

    return loss


def stiff(solver, k, ts=jnp.array([0.0, 1.0]), **kw):
    return nde.solve(nde.ODETerm(rober), solver, Y_ROBER, ts, args=k, rtol=1e-6, atol=1e-10, **kw).ys


def mlp(sizes, dtype=jnp.float64, key=0):
    rng = np.random.default_rng(key)
    return [(jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(a), (a, b)), dtype), jnp.asarray(rng.normal(0.0, 0.1, b), dtype))
            for a, b in zip(sizes[:-1], sizes[1:])]


def mlp_field(t, y, params):
    for i, (w, b) in enumerate(params):
        y = y @ w + b
        y = jnp.tanh(y) if i < len(params) - 1 else y
    return y


def mlp_loss(y0=jnp.array([0.5, -0.3]), sens=CK, **kw):
    def loss(p):
        sol = nde.solve(nde.ODETerm(mlp_field), nde.Tsit5(), y0, TS[:5].astype(y0.dtype), args=p, sensitivity=sens,
                        **kw)
        return jnp.sum(sol.ys ** 2)

    return loss


def configs():
    term = nde.SDETerm(lambda t, y, a: -a * y, lambda t, y, a: 0.3 * y)
    w40 = mlp([2, 40, 40, 2])
    w64 = mlp([2, 64, 64, 2], jnp.float32)
    y32 = jnp.array([0.5, -0.3], jnp.float32)

    def sde(solver, a, key, **kw):
        return nde.solve(term, solver, jnp.ones(2), TS, args=a, key=key, **kw).ys

    def pytree_field(t, y, p):
        return {"a": -p[0] * y["a"], "b": jnp.sum(y["a"]) - p[1] * y["b"]}

    f32 = dict(y0=U0.astype(jnp.float32), ts=TS.astype(jnp.float32))
    return {
        "ck grad": (jax.grad(loss_fn()), (P,)),
        "ck grad float32": (jax.grad(loss_fn(**f32)), (P.astype(jnp.float32),)),
        "ck grad pytree": (jax.grad(loss_fn(field=pytree_field, y0={"a": jnp.ones(2), "b": jnp.zeros(())})), (P,)),
        "ck vmap grad": (jax.vmap(jax.grad(loss_fn())), (jnp.stack([P, P * 1.1, P * 0.9]),)),
        "ck grad of vmap": (jax.grad(lambda p: jnp.sum(jax.vmap(lambda y0: loss_fn(y0=y0)(p))(
            jnp.stack([U0, 1.2 * U0])))), (P,)),
        "ck hessian": (jax.hessian(loss_fn(ts=jnp.linspace(0.0, 1.0, 5))), (P,)),
        "ck jacrev ys": (jax.jacrev(lambda p: nde.solve(nde.ODETerm(lv), nde.Tsit5(), U0, TS, args=p,
                                                        sensitivity=CK).ys), (P,)),
        "ck grad wrt y0 and ts": (jax.grad(lambda y0, ts: jnp.sum(nde.solve(nde.ODETerm(lv), nde.Tsit5(), y0, ts,
                                                                             args=P, sensitivity=CK).ys ** 2),
                                           argnums=(0, 1)),
                                  (U0, TS)),
        "ck dense grad": (jax.grad(loss_fn(dense=True)), (P,)),
        "ck max_steps": (jax.grad(loss_fn(max_steps=20, throw=False)), (P,)),
        "ck decreasing t": (jax.grad(loss_fn(ts=TS[::-1])), (P,)),
        "ck closed-over": (jax.grad(lambda q: loss_fn(field=lambda t, y, r: lv(t, y, P * r[0]))(q)),
                           (jnp.array([1.0, 0.0, 0.0, 0.0]),)),
        # (weighted: the plain sum of ROBER's states is conserved, its gradient 0 up to rounding)
        "ck kvaerno5 rober": (jax.grad(lambda k: jnp.sum(jnp.array([1.0, 1e4, 2.0]) * stiff(
            nde.Kvaerno5(), k, jnp.array([0.0, 1.0, 10.0]), sensitivity=CK)[-1])), (K,)),
        "kvaerno3 forward": (lambda k: stiff(nde.Kvaerno3(), k, jnp.array([0.0, 1.0, 10.0])), (K,)),
        "kvaerno5 forwardmode": (jax.jacfwd(lambda k: stiff(nde.Kvaerno5(), k, sensitivity=nde.ForwardMode())), (K,)),
        "kvaerno5 vmap": (jax.vmap(lambda k: stiff(nde.Kvaerno5(), k)), (jnp.stack([K] * 3),)),
        "backsolve grad": (jax.grad(loss_fn(sens=nde.BacksolveAdjoint())), (P,)),
        "reverse grad": (jax.grad(loss_fn(sens=nde.ReverseMode())), (P,)),
        "sde sriw1 adaptive": (lambda a: sde(nde.SRIW1(), a, jax.random.key(1), rtol=1e-3, atol=1e-3), (0.5,)),
        "sde ck grad fixed": (jax.grad(lambda a: jnp.sum(sde(nde.SRIW1(), a, jax.random.key(1), dt0=0.05,
                                                             adaptive=False, sensitivity=CK))), (0.5,)),
        "sde em vmap keys": (lambda a: jax.vmap(lambda k: sde(nde.EulerMaruyama(), a, k, dt0=0.05, adaptive=False))(
            jax.random.split(jax.random.key(0), 4)), (0.5,)),
        "all-constant ck grad": (lambda: jax.grad(loss_fn())(P), ()),
        "all-constant kvaerno": (lambda: stiff(nde.Kvaerno5(), K), ()),
        "all-constant sde": (lambda: sde(nde.SRIW1(), 0.5, jax.random.key(1), dt0=0.05, adaptive=False), ()),
        "all-constant equal tolerances f32": (lambda: nde.solve(nde.ODETerm(lv), nde.Tsit5(), U0.astype(jnp.float32),
                                                                TS.astype(jnp.float32), args=P.astype(jnp.float32),
                                                                rtol=1e-5, atol=1e-5).ys, ()),
        "no jit ck grad": ("nojit", jax.grad(loss_fn()), (P,)),
        "mlp ck grad": (jax.grad(mlp_loss()), (w40,)),
        "mlp all-constant ck grad": (lambda: jax.grad(mlp_loss())(w40), ()),
        "mlp float32 ck grad": (jax.grad(mlp_loss(y32, rtol=1e-5, atol=1e-6)), (w64,)),
        "mlp vmap ck grad": (jax.vmap(lambda y0: jax.grad(mlp_loss(y0))(w40)), (jnp.stack([U0, -U0, 0.5 * U0]),)),
        "mlp grad of vmap": (jax.grad(lambda p: sum(mlp_loss(y0)(p) for y0 in (U0, -U0))), (w40,)),
        "mlp jacfwd": (jax.jacfwd(lambda s: nde.solve(nde.ODETerm(mlp_field), nde.Tsit5(), U0, TS[:5],
                                                      args=[(w * s, b) for w, b in w40],
                                                      sensitivity=nde.ForwardMode()).ys), (1.0,)),
        "mlp backsolve grad": (jax.grad(mlp_loss(sens=nde.BacksolveAdjoint())), (w40,)),
        "mlp batch ck grad": (jax.grad(lambda p: jnp.sum(nde.solve(
            nde.ODETerm(mlp_field), nde.Tsit5(), jnp.stack([U0, -U0, 0.5 * U0, U0[::-1], -U0[::-1]]), TS[:5],
            args=p).ys ** 2)), (mlp([2, 16, 2]),)),
        "mlp batch float32 all-constant ck grad": (lambda: jax.grad(lambda p: jnp.sum(nde.solve(
            nde.ODETerm(lambda t, y, p: mlp_field(t, y ** 3, p)), nde.Tsit5(), jnp.stack([y32] * 20), TS[:5].astype(
                jnp.float32), args=p, rtol=1e-5, atol=1e-6).ys ** 2))(mlp([2, 50, 2], jnp.float32)), ()),
        "mlp batch vmap ck grad": (jax.grad(lambda p: jnp.sum(jax.vmap(lambda y0: nde.solve(
            nde.ODETerm(mlp_field), nde.Tsit5(), y0, TS[:5], args=p).ys)(jnp.stack([U0, -U0, 0.5 * U0])) ** 2)),
                                   (mlp([2, 16, 2]),)),
        "sde ck grad max_steps 512": (jax.grad(lambda a: jnp.sum(sde(nde.SRIW1(), a, jax.random.key(1), rtol=1e-2,
                                                                     atol=1e-2, max_steps=512, sensitivity=CK))),
                                      (0.5,)),
        "sde ck grad adaptive": (jax.grad(lambda a: jnp.sum(sde(nde.SRIW1(), a, jax.random.key(1), rtol=1e-2,
                                                                atol=1e-2, sensitivity=CK))), (0.5,)),
        "mlp batch forward": (lambda p: nde.solve(nde.ODETerm(mlp_field), nde.Tsit5(), jnp.stack([U0, -U0]), TS[:5],
                                                  args=p).ys, (w40,)),
        "mlp dense": (lambda p: nde.solve(nde.ODETerm(mlp_field), nde.Tsit5(), U0, TS[:5], args=p,
                                          dense=True).evaluate(0.3), (w40,)),
        "large state": (lambda a: nde.solve(nde.ODETerm(lambda t, y, a: -a * y), nde.Tsit5(),
                                            jnp.linspace(1.0, 2.0, 4096), TS[:5], args=a).ys, (0.5,)),
        "progress": (lambda p: nde.solve(nde.ODETerm(lv), nde.Tsit5(), U0, TS, args=p, progress=True).ys, (P,)),
        # Steps longer than the lag: the backward steps' corrections loop (`stored_while_loop`) inside
        # both marked loops (a small history: every step checkpointed).
        "dde ck grad": (jax.grad(lambda p: jnp.sum(nde.solve(
            nde.DDETerm(lambda t, u, h, p: lv(t, u, p) - 0.5 * h(t - 0.1), lambda s, p: U0, (0.1,)),
            nde.MethodOfSteps(nde.Tsit5(), max_history=16), U0, TS, args=p, max_steps=256,
            sensitivity=CK).ys ** 2)), (P,)),
    }


def _one(name, enabled, out_path):
    os.environ["NEURALDE_SINGLE_KERNEL"] = enabled
    cfg = configs()[name]
    if cfg[0] == "nojit":
        out, text = cfg[1](*cfg[2]), ""
    else:
        f, ops = cfg
        jf = jax.jit(f)
        text = jf.lower(*ops).compile().as_text()
        out = jf(*ops)
    leaves = [np.asarray(x, dtype=np.float64).ravel() for x in jax.tree_util.tree_leaves(out)]
    np.save(out_path, np.concatenate(leaves) if leaves else np.zeros(0))
    print("MARKED" if 'xla_cpu_small_call="true"' in text and 'inlineable="false"' in text else "plain")


def main(names):
    import tempfile

    names = names or list(configs())
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results, marks = {}, {}
            for enabled in ("1", "0"):
                path = os.path.join(tmp, f"{enabled}.npy")
                proc = subprocess.run([sys.executable, __file__, "--one", name, enabled, path], capture_output=True,
                                      text=True)
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
                    marks[enabled] = f"FAILED (exit {proc.returncode}): {tail}"
                    continue
                marks[enabled] = proc.stdout.strip().splitlines()[-1]
                results[enabled] = np.load(path)
            if len(results) < 2:
                print(f"{name} | {marks.get('1')} | {marks.get('0')}", flush=True)
                continue
            x, y = results["1"], results["0"]
            finite = np.isfinite(y)
            if not np.array_equal(np.isfinite(x), finite):
                diff = "non-finite values differ"
            elif finite.any():
                # relative to the largest value of the results (small entries
                # of a gradient differ by rounding relative to the large ones)
                diff = "%.2e" % (np.max(np.abs(x[finite] - y[finite])) / max(np.max(np.abs(y[finite])), 1e-300))
            else:
                diff = "all non-finite"
            print(f"{name} | {marks['1']} | {diff}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        _one(*sys.argv[2:5])
    else:
        main(sys.argv[1:])
