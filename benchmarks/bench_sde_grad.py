"""W6g: the gradient of a neural SDE ensemble, neuralde against diffrax and
torchsde in one run.

    dy = f(y) dt + g(y) dW   (Itô, diagonal noise), y in R^4, t in [0, 1],
    f = MLP 4-32-4 (tanh), g(y) = 0.2 sigmoid(w * y + c) (elementwise: the
    diagonal noise every library's solvers and adjoints assume),
    256 paths from y0 = (0.5, -0.3, 0.2, 0.1), Euler-Maruyama, dt = 1/100,
    loss = mean over paths of |y(1)|^2, float32, gradient w.r.t. all of
    (f, w, c); max_steps = 108 (the 100 steps and a margin) for both JAX
    libraries, and again at their default 4096 (which sizes checkpoint
    buffers).

    python benchmarks/bench_sde_grad.py [--paths 256] [--rounds 5] [--no-torch] [--no-save]

Cases: neuralde with `CheckpointAdjoint` and `BacksolveAdjoint` (each path
its own solve under `jax.vmap` over keys, the API's ensemble pattern) and
`CheckpointAdjoint` with the ensemble as one state of shape (256, 4) (one
Brownian tree of that shape, as torchsde's batch); diffrax 0.7 Euler with
`RecursiveCheckpointAdjoint` on a `VirtualBrownianTree` (vmap over keys);
torchsde 0.2.6 `sdeint` (backpropagation through the solver) and
`sdeint_adjoint` (its stochastic adjoint, Euler backwards), torch 2.13 CPU on
one thread, the ensemble as one batch. The floor: the same number of drift
and diffusion evaluations on the (256, 4) batch in a `lax.scan` under
`jax.value_and_grad`. Each library draws its own Brownian paths, so the
gradients agree only statistically; the accuracy column is neuralde's
BacksolveAdjoint against its CheckpointAdjoint on the same paths (the
stochastic adjoint's discretisation error at this step).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

D, WIDTH, DT, STEPS = 4, 32, 0.01, 100
Y0 = (0.5, -0.3, 0.2, 0.1)


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(D, WIDTH)) / np.sqrt(D)
    w2 = rng.normal(size=(WIDTH, D)) / np.sqrt(WIDTH)
    return {"w1": w1, "b1": np.zeros(WIDTH), "w2": w2, "b2": np.zeros(D),
            "gw": rng.normal(size=D), "gc": rng.normal(size=D)}


def make_jax_cases(n_paths):
    import jax
    import jax.numpy as jnp
    import diffrax
    import neuralde as nde

    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), init_params())
    y0 = jnp.asarray(Y0, jnp.float32)
    keys = jax.random.split(jax.random.key(0), n_paths)

    def f(y, p):
        return jnp.tanh(y @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def g(y, p):
        return 0.2 * jax.nn.sigmoid(p["gw"] * y + p["gc"])

    term = nde.SDETerm(lambda t, y, p: f(y, p), lambda t, y, p: g(y, p))
    ts = jnp.array([0.0, 1.0], jnp.float32)

    def ours(sensitivity, max_steps=STEPS + 8):
        @jax.jit
        def grad(p):
            def loss(p):
                def one(k):
                    sol = nde.solve(term, nde.EulerMaruyama(), y0, ts, args=p, key=k, dt0=DT, adaptive=False,
                                    sensitivity=sensitivity, max_steps=max_steps)
                    return sol.ys[-1]

                return jnp.mean(jnp.sum(jax.vmap(one)(keys) ** 2, axis=-1))

            return jax.value_and_grad(loss)(p)

        return grad

    @jax.jit
    def ours_shared(p):
        def loss(p):
            yb = jnp.broadcast_to(y0, (n_paths, D))
            sol = nde.solve(term, nde.EulerMaruyama(), yb, ts, args=p, key=keys[0], dt0=DT, adaptive=False,
                            max_steps=STEPS + 8)
            return jnp.mean(jnp.sum(sol.ys[-1] ** 2, axis=-1))

        return jax.value_and_grad(loss)(p)

    def theirs(max_steps=STEPS + 8):
        return jax.jit(lambda p: _theirs(p, max_steps))

    def _theirs(p, max_steps):
        def loss(p):
            def one(k):
                bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=2.0 ** -20, shape=(D,), key=k)
                terms = diffrax.MultiTerm(diffrax.ODETerm(lambda t, y, a: f(y, a)),
                                          diffrax.ControlTerm(lambda t, y, a: jnp.diag(g(y, a)), bm))
                sol = diffrax.diffeqsolve(terms, diffrax.Euler(), 0.0, 1.0, DT, y0, args=p, max_steps=max_steps,
                                          adjoint=diffrax.RecursiveCheckpointAdjoint())
                return sol.ys[-1]

            return jnp.mean(jnp.sum(jax.vmap(one)(keys) ** 2, axis=-1))

        return jax.value_and_grad(loss)(p)

    def vf(t, y, p):
        return f(y, p) + g(y, p)

    floor = H.floor_grad(vf, jnp.broadcast_to(y0, (n_paths, D)), params, STEPS,
                         lambda y: jnp.mean(jnp.sum(y ** 2, axis=-1)), h=DT)
    back, check = ours(nde.BacksolveAdjoint()), ours(nde.CheckpointAdjoint())
    check_default, theirs_default, theirs_tight = ours(nde.CheckpointAdjoint(), 4096), theirs(4096), theirs()
    cases = [
        H.Case("neuralde EM CheckpointAdjoint (vmap)", lambda: check(params), nfev=2 * STEPS),
        H.Case("neuralde EM BacksolveAdjoint (vmap)", lambda: back(params), nfev=2 * STEPS),
        H.Case("neuralde EM CheckpointAdjoint (one state)", lambda: ours_shared(params), nfev=2 * STEPS),
        H.Case("diffrax Euler RecursiveCheckpoint (vmap)", lambda: theirs_tight(params), nfev=2 * STEPS),
        H.Case("neuralde EM CheckpointAdjoint (vmap, max_steps 4096)", lambda: check_default(params), nfev=2 * STEPS),
        H.Case("diffrax Euler RecursiveCheckpoint (vmap, max_steps 4096)", lambda: theirs_default(params),
               nfev=2 * STEPS),
        H.Case("floor (scan of f + g under grad)", floor, nfev=STEPS),
    ]

    def accuracy():
        (_, gb), (_, gc) = back(params), check(params)
        num = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(gb),
                                                                  jax.tree_util.tree_leaves(gc)))
        den = max(float(jnp.max(jnp.abs(b))) for b in jax.tree_util.tree_leaves(gc))
        return num / den

    return cases, accuracy, jax.__version__, diffrax.__version__


def make_torch_cases(n_paths):
    torch = H.torch_threads()
    import torchsde

    p = {k: torch.tensor(v, dtype=torch.float32) for k, v in init_params().items()}

    class SDE(torch.nn.Module):
        noise_type = "diagonal"
        sde_type = "ito"

        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Parameter(p["w1"].clone())
            self.b1 = torch.nn.Parameter(p["b1"].clone())
            self.w2 = torch.nn.Parameter(p["w2"].clone())
            self.b2 = torch.nn.Parameter(p["b2"].clone())
            self.gw = torch.nn.Parameter(p["gw"].clone())
            self.gc = torch.nn.Parameter(p["gc"].clone())

        def f(self, t, y):
            return torch.tanh(y @ self.w1 + self.b1) @ self.w2 + self.b2

        def g(self, t, y):
            return 0.2 * torch.sigmoid(self.gw * y + self.gc)

    sde = SDE()
    y0 = torch.tensor(Y0, dtype=torch.float32).repeat(n_paths, 1)
    ts = torch.tensor([0.0, 1.0])

    def run(adjoint):
        def call():
            sde.zero_grad()
            bm = torchsde.BrownianInterval(0.0, 1.0, size=(n_paths, D), dtype=torch.float32)
            if adjoint:
                ys = torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, method="euler", adjoint_method="euler", dt=DT)
            else:
                ys = torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=DT)
            loss = (ys[-1] ** 2).sum(-1).mean()
            loss.backward()
            return loss.detach()

        return call

    return [H.Case("torchsde euler sdeint (backprop)", run(False), kind="torch", nfev=2 * STEPS),
            H.Case("torchsde euler sdeint_adjoint", run(True), kind="torch", nfev=2 * STEPS)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--paths", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    ns = parser.parse_args()
    H.warm_up()
    cases, accuracy, *_ = make_jax_cases(ns.paths)
    if not ns.no_torch:
        cases += make_torch_cases(ns.paths)
    H.run_cases(cases, rounds=ns.rounds)
    err = accuracy()
    for c in cases:
        if "BacksolveAdjoint" in c.name:
            c.extra["rel_err"] = err
    H.report("W6g", f"neural SDE ensemble gradient ({ns.paths} paths, d={D}, EM dt={DT}, float32)", cases,
             floor="floor (scan of f + g under grad)", extra_cols=("rel_err",),
             settings={"paths": ns.paths, "rounds": ns.rounds}, save=not ns.no_save)


if __name__ == "__main__":
    main()
