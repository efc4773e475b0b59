"""W3, W3s, W4 and W8: neural ODEs, neuralde against diffrax, odeint and torchdiffeq in one run.

    python benchmarks/bench_neural_ode.py [--only W3 W3s W4 W8] [--rounds 5] [--budget 0.3] [--w8-batch N] [--no-save]

All float32, Tsit5 in neuralde and diffrax (diffrax: PIDController; gradients
through its default RecursiveCheckpointAdjoint), Dopri5 in odeint (gradient:
its continuous adjoint) and torchdiffeq (gradient: backprop through the
solver). neuralde uses its defaults (gradient: CheckpointAdjoint). MLP
weights are drawn once (normal, std 1/sqrt(fan_in), biases 0) and shared by
every library. Matrix products in full float32 ("highest" precision in JAX,
no TF32 in PyTorch).

W3 spiral training step (torchdiffeq's ode_demo): data from dy/dt = (y**3) A,
A = [[-0.1, 2], [-2, -0.1]], y0 = (2, 0), t = linspace(0, 25, 1000); one fixed
batch of 20 windows of 10 consecutive points (numpy seed 0); model dy/dt =
MLP(y**3), MLP 2-50-2 (tanh); loss mean |y_pred - y_true| over the batch
solved as one (20, 2) state on t[:10]; rtol 1e-5, atol 1e-6; one timed call is
value_and_grad + one Adam step (lr 1e-3; optax / torch.optim).

W3s (not one of issue #8's workloads; the neural ODE example of DiffEqFlux's
README): W3's model trained on one trajectory, y0 = (2, 0), 30 points of
linspace(0, 1.5, 30) from the same ODE; loss sum of squared errors; one timed
call is value_and_grad + one Adam step (lr 1e-2). The state is a vector, so
the MLP's products are matrix-vector (forward) and outer products (the
weights' cotangents).

W4 batched neural ODE: 256 initial states in 2-D (normal, seed 1), dy/dt =
MLP(y), MLP 2-64-64-2 (tanh), t in [0, 1] (saved at t = 1 only), rtol 1e-5,
atol 1e-6. "shared": the batch is one (256, 2) state with one step size;
"vmap": `jax.vmap` of a solve of one (2,) state (each sample its own steps;
JAX runs the lanes together until the last one finishes). Forward: the
states at t = 1; gradient: value_and_grad of mean(y(1)**2) w.r.t. the MLP.

W8 GPU: batch 16384, state 64, MLP 64-256-256-64 (tanh), t in [0, 1], rtol
1e-5, atol 1e-6, shared step; forward, and value_and_grad of mean(y(1)**2)
w.r.t. the MLP. On a CPU use e.g. ``--w8-batch 256`` to try it.

Floor: neuralde's number of vector-field evaluations (stats["num_fevals"];
for vmap, the largest over the lanes) chained in a bare `lax.fori_loop`
(forward) or `lax.scan` under value_and_grad (gradients), see `_harness`.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402


def init_mlp(sizes, seed):
    rng = np.random.default_rng(seed)
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        params.append((rng.normal(0.0, 1.0 / np.sqrt(a), (a, b)).astype(np.float32), np.zeros(b, np.float32)))
    return params


def jax_mlp(params, x):
    import jax.numpy as jnp

    for i, (w, b) in enumerate(params):
        x = x @ w + b
        if i < len(params) - 1:
            x = jnp.tanh(x)
    return x


class TorchMLP:
    def __init__(self, torch, params, device):
        self.torch = torch
        self.params = [(torch.tensor(w, device=device, requires_grad=True), torch.tensor(b, device=device,
                                                                                          requires_grad=True))
                       for w, b in params]

    def parameters(self):
        return [t for pair in self.params for t in pair]

    def __call__(self, x):
        for i, (w, b) in enumerate(self.params):
            x = x @ w + b
            if i < len(self.params) - 1:
                x = self.torch.tanh(x)
        return x


def _torch_device(torch):
    return "cuda" if torch.cuda.is_available() else "cpu"


def _jax_cases_solve(name_prefix, field, y0, params, ts, rtol, atol, loss, grad, vmap_mode=False, solve_kw=None):
    """neuralde, diffrax and odeint cases for a forward solve (states at ts[-1]) or a value_and_grad."""
    import diffrax
    import jax
    import jax.numpy as jnp
    from jax.experimental.ode import odeint

    import neuralde as nde

    def nde_solve(y0, p):
        sol = nde.solve(nde.ODETerm(field), nde.Tsit5(), y0, ts, args=p, rtol=rtol, atol=atol, **(solve_kw or {}))
        return sol.ys[-1], sol.stats["num_fevals"]

    def dfx_solve(y0, p):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Tsit5(), ts[0], ts[-1], None, y0, args=p,
                                  saveat=diffrax.SaveAt(t1=True),
                                  stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol))
        return sol.ys[-1], jnp.asarray(0)

    def ode_solve(y0, p):
        return odeint(lambda y, t, p: field(t, y, p), y0, ts, p, rtol=rtol, atol=atol)[-1], jnp.asarray(0)

    cases = []
    for lib, solve in (("neuralde Tsit5", nde_solve), ("diffrax Tsit5", dfx_solve), ("jax odeint Dopri5", ode_solve)):
        if vmap_mode:
            solve = jax.vmap(solve, in_axes=(0, None))
        if grad:
            def objective(p, solve=solve):
                yT, nfev = solve(y0, p)
                return loss(yT), jnp.max(nfev)

            fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
            cases.append(H.Case(f"{lib} {name_prefix}", lambda fn=fn: fn(params)))
        else:
            fn = jax.jit(lambda y0, p, solve=solve: (lambda out: (out[0], jnp.max(out[1])))(solve(y0, p)))
            cases.append(H.Case(f"{lib} {name_prefix}", lambda fn=fn: fn(y0, params)))
    return cases


def _nfev_of(case, grad):
    out = case.output
    return int(out[0][1]) if grad else int(out[1])


def workload_batched(ns, workload, sizes, batch, dim, seed, modes, tol=(1e-5, 1e-6), title=""):
    """W4 / W8: forward and gradient of a batched MLP neural ODE on [0, 1]."""
    import jax.numpy as jnp

    rtol, atol = tol
    params = [tuple(map(jnp.asarray, wb)) for wb in init_mlp(sizes, seed)]
    y0 = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(batch, dim)).astype(np.float32))
    ts = jnp.array([0.0, 1.0], jnp.float32)

    def field(t, y, p):
        return jax_mlp(p, y)

    def loss(yT):
        return jnp.mean(yT ** 2)

    torch = H.torch_threads()
    results = []
    for mode in modes:
        for grad in (False, True):
            label = f"{mode} {'grad' if grad else 'fwd'}"
            cases = _jax_cases_solve(label, field, y0, params, ts, rtol, atol, loss, grad, vmap_mode=(mode == "vmap"))
            nfev = _nfev_of(cases[0], grad) if H.first_call(cases[0]) is not None else None
            cases[0].nfev = nfev
            if torch is not None and mode == "shared":
                cases.append(_torch_case(torch, sizes, seed, y0, rtol, atol, grad, label))
            if grad:
                floor = H.floor_grad(field, y0, params, nfev, loss)
                fname = "floor: nfev x vf, scan + grad"
            else:
                floor = H.floor_forward(field, y0, params, nfev)
                fname = "floor: nfev x vf in fori_loop"
            cases.append(H.Case(fname, floor))
            H.run_cases(cases, rounds=ns.rounds, budget_s=ns.budget)
            results.append(H.report(
                workload, f"{title}, {label}, batch {batch}, MLP {'-'.join(map(str, sizes))}, rtol={rtol}, "
                f"atol={atol}, float32", cases, floor=fname,
                settings=dict(mode=mode, grad=grad, batch=batch, mlp=sizes, rtol=rtol, atol=atol, t=(0, 1)),
                save=not ns.no_save))
    return results


def _torch_case(torch, sizes, seed, y0, rtol, atol, grad, label):
    import torchdiffeq

    dev = _torch_device(torch)
    mlp = TorchMLP(torch, init_mlp(sizes, seed), dev)
    ty0 = torch.tensor(np.asarray(y0), device=dev)
    tts = torch.tensor([0.0, 1.0], device=dev)

    def f(t, y):
        return mlp(y)

    def run():
        if grad:
            for q in mlp.parameters():
                q.grad = None
            yT = torchdiffeq.odeint(f, ty0, tts, rtol=rtol, atol=atol, method="dopri5")[-1]
            val = torch.mean(yT ** 2)
            val.backward()
            return val.detach(), [q.grad for q in mlp.parameters()]
        with torch.no_grad():
            return torchdiffeq.odeint(f, ty0, tts, rtol=rtol, atol=atol, method="dopri5")[-1]

    return H.Case(f"torchdiffeq dopri5 {label} ({dev})", run, kind="torch")


def _spiral_data(t_np):
    """States of the spiral ODE dy/dt = (y**3) A from y0 = (2, 0) at ``t_np``."""
    from scipy.integrate import solve_ivp

    A = np.array([[-0.1, 2.0], [-2.0, -0.1]])
    return solve_ivp(lambda t, y: (y ** 3) @ A, (0, t_np[-1]), np.array([2.0, 0.0]), method="DOP853", rtol=1e-10,
                     atol=1e-10, t_eval=t_np).y.T


def _training_step(ns, workload, title, y0, ts, data, loss, lr, settings):
    """One Adam training step of ``y' = MLP(y**3)`` (MLP 2-50-2) on ``data``
    at ``ts`` from ``y0``, ``loss(pred, data)`` written for both JAX and
    PyTorch arrays: neuralde, diffrax, odeint and torchdiffeq in one run."""
    import jax
    import jax.numpy as jnp
    import optax

    import diffrax
    import neuralde as nde
    from jax.experimental.ode import odeint

    rtol, atol = 1e-5, 1e-6
    params = [tuple(map(jnp.asarray, wb)) for wb in init_mlp([2, 50, 2], 3)]
    y0, ts, data = (jnp.asarray(a, jnp.float32) for a in (y0, ts, data))

    def field(t, y, p):
        return jax_mlp(p, y ** 3)

    opt = optax.adam(lr)
    opt_state = opt.init(params)

    def make_step(solve):
        def objective(p):
            ys, nfev = solve(p)
            return loss(ys, data), nfev

        @jax.jit
        def step(p, s):
            (val, nfev), g = jax.value_and_grad(objective, has_aux=True)(p)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, val, nfev

        return lambda: step(params, opt_state)

    def nde_solve(p):
        sol = nde.solve(nde.ODETerm(field), nde.Tsit5(), y0, ts, args=p, rtol=rtol, atol=atol)
        return sol.ys, sol.stats["num_fevals"]

    def dfx_solve(p):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Tsit5(), ts[0], ts[-1], None, y0, args=p,
                                  saveat=diffrax.SaveAt(ts=ts),
                                  stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol))
        return sol.ys, 0

    def ode_solve(p):
        return odeint(lambda y, t, p: field(t, y, p), y0, ts, p, rtol=rtol, atol=atol), 0

    cases = [H.Case("neuralde Tsit5 (CheckpointAdjoint)", make_step(nde_solve)),
             H.Case("diffrax Tsit5 (RecursiveCheckpoint)", make_step(dfx_solve)),
             H.Case("jax odeint Dopri5 (adjoint)", make_step(ode_solve))]
    nfev = cases[0].nfev = int(H.first_call(cases[0])[3])

    torch = H.torch_threads()
    if torch is not None:
        import torchdiffeq

        dev = _torch_device(torch)
        mlp = TorchMLP(torch, init_mlp([2, 50, 2], 3), dev)
        topt = torch.optim.Adam(mlp.parameters(), lr=lr)
        t_y0, t_t, t_y = (torch.tensor(np.asarray(a), device=dev) for a in (y0, ts, data))

        def torch_step():
            topt.zero_grad()
            pred = torchdiffeq.odeint(lambda t, y: mlp(y ** 3), t_y0, t_t, rtol=rtol, atol=atol, method="dopri5")
            val = loss(pred, t_y)
            val.backward()
            topt.step()
            return val.detach()

        cases.append(H.Case(f"torchdiffeq dopri5 backprop ({dev})", torch_step, kind="torch"))
    fname = "floor: nfev x vf, scan + grad"
    cases.append(H.Case(fname, H.floor_grad(field, y0, params, nfev, lambda y: loss(y, jnp.zeros_like(y)))))
    H.run_cases(cases, rounds=ns.rounds, budget_s=ns.budget)
    return H.report(workload, title, cases, floor=fname, settings=dict(settings, mlp=[2, 50, 2], rtol=rtol, atol=atol),
                    save=not ns.no_save)


def w3(ns):
    t_all = np.linspace(0.0, 25.0, 1000)
    true = _spiral_data(t_all)
    rng = np.random.default_rng(0)
    s = rng.choice(1000 - 10, 20, replace=False)
    data = np.stack([true[s + i] for i in range(10)])  # (10, 20, 2)
    return _training_step(ns, "W3", "spiral neural ODE training step (value_and_grad + Adam), MLP 2-50-2 on y**3, "
                          "batch 20 x 10 times, rtol=1e-5, atol=1e-6, float32", true[s], t_all[:10], data,
                          lambda pred, y: abs(pred - y).mean(), 1e-3, dict(batch=20, n_t=10))


def w3s(ns):
    """W3s: W3's model trained on one trajectory (the neural ODE example of
    DiffEqFlux's README): a vector state, so the MLP's products are
    matrix-vector forward and outer products backward."""
    t_np = np.linspace(0.0, 1.5, 30)
    return _training_step(ns, "W3s", "spiral neural ODE training step on one trajectory (DiffEqFlux's example: "
                          "u0 = (2, 0), 30 times in [0, 1.5]; value_and_grad + Adam), MLP 2-50-2 on y**3, "
                          "rtol=1e-5, atol=1e-6, float32", np.array([2.0, 0.0]), t_np, _spiral_data(t_np),
                          lambda pred, y: ((pred - y) ** 2).sum(), 1e-2, dict(n_t=30))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="+", choices=["W3", "W3s", "W4", "W8"], default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per case per round")
    parser.add_argument("--w4-modes", nargs="+", default=["shared", "vmap"], choices=["shared", "vmap"])
    parser.add_argument("--w8-batch", type=int, default=16384)
    parser.add_argument("--no-save", action="store_true")
    ns = parser.parse_args(argv)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    torch = H.torch_threads()
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    only = ns.only or (["W3", "W3s", "W4", "W8"] if jax.devices()[0].platform == "gpu" else ["W3", "W3s", "W4"])
    H.warm_up()
    if "W3" in only:
        w3(ns)
    if "W3s" in only:
        w3s(ns)
    if "W4" in only:
        workload_batched(ns, "W4", [2, 64, 64, 2], 256, 2, 5, ns.w4_modes, title="batched neural ODE")
    if "W8" in only:
        workload_batched(ns, "W8", [64, 256, 256, 64], ns.w8_batch, 64, 7, ["shared"], title="GPU neural ODE")


if __name__ == "__main__":
    main()
