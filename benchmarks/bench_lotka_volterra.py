"""W1 and W2: Lotka--Volterra, neuralde against its peers in one run.

    python benchmarks/bench_lotka_volterra.py [--rounds 5] [--budget 0.3] [--only W1|W2] [--no-save]

W1 (solve): dx/dt = a x - b x y, dy/dt = -d y + g x y with p = (a, b, d, g) =
(1.5, 1, 3, 1), u0 = (1, 1), t in [0, 10], 101 save points, rtol = atol =
1e-6, float64. One jitted solve returning the 101 states: neuralde Tsit5,
diffrax Tsit5 (PIDController, its default I controller, SaveAt(ts)),
jax.experimental.ode.odeint (Dopri5), torchdiffeq dopri5 (CPU, one thread),
scipy solve_ivp RK45; "max err" against scipy DOP853 at rtol = atol = 1e-13.

W2 (gradient): the gradient of L(p) = sum_i sum_k (u_k(t_i) - 1)^2 over the
101 save points and both components, at p = (2.2, 1.0, 2.0, 0.4), same u0,
times and tolerances, one jitted ``value_and_grad`` per method: neuralde's four
sensitivities, diffrax's RecursiveCheckpointAdjoint, DirectAdjoint,
BacksolveAdjoint and ForwardMode (``jax.jacfwd``, gradient only), odeint (its
continuous adjoint), torchdiffeq (backprop through the solver, and
odeint_adjoint). "rel err" is ``|g - g_fd| / |g_fd|`` (2-norm) against central
differences (step 1e-4 p_k) of L computed with scipy DOP853 at rtol = atol =
1e-12.

The floor column divides by the same number of vector-field evaluations as
neuralde's solve (its ``stats["num_fevals"]``) in a bare ``lax.fori_loop``
(W1) or a ``lax.scan`` under ``value_and_grad`` (W2); see `_harness`.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

P_SOLVE = (1.5, 1.0, 3.0, 1.0)
P_GRAD = (2.2, 1.0, 2.0, 0.4)
RTOL = ATOL = 1e-6


def lv(t, u, p):
    import jax.numpy as jnp

    x, y = u[0], u[1]
    a, b, d, g = p[0], p[1], p[2], p[3]
    return jnp.stack([a * x - b * x * y, -d * y + g * x * y])


def _scipy_solution(p, rtol, atol, method="DOP853"):
    from scipy.integrate import solve_ivp

    a, b, d, g = p

    def f(t, u):
        x, y = u
        return np.array([a * x - b * x * y, -d * y + g * x * y])

    sol = solve_ivp(f, (0.0, 10.0), np.array([1.0, 1.0]), method=method, rtol=rtol, atol=atol,
                    t_eval=np.linspace(0.0, 10.0, 101))
    return sol


def fd_gradient(p, h_rel=1e-4):
    """Central differences of L with a tight scipy solve: the W2 reference."""
    p = np.asarray(p, float)

    def loss(q):
        return float(np.sum((_scipy_solution(q, 1e-12, 1e-12).y - 1.0) ** 2))

    g = np.zeros_like(p)
    for k in range(p.size):
        h = h_rel * max(abs(p[k]), 1.0)
        e = np.zeros_like(p)
        e[k] = h
        g[k] = (loss(p + e) - loss(p - e)) / (2 * h)
    return g


def w1(ns):
    import jax
    import jax.numpy as jnp

    import neuralde as nde

    p = jnp.array(P_SOLVE)
    u0 = jnp.array([1.0, 1.0])
    ts = jnp.linspace(0.0, 10.0, 101)
    ref = _scipy_solution(P_SOLVE, 1e-13, 1e-13).y.T
    cases = []

    @jax.jit
    def nde_solve(u0, p):
        sol = nde.solve(nde.ODETerm(lv), nde.Tsit5(), u0, ts, args=p, rtol=RTOL, atol=ATOL)
        return sol.ys, sol.stats["num_fevals"]

    cases.append(H.Case("neuralde Tsit5", lambda: nde_solve(u0, p)))
    nfev = cases[0].nfev = int(H.first_call(cases[0])[1])

    import diffrax

    @jax.jit
    def dfx_solve(u0, p):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lv), diffrax.Tsit5(), ts[0], ts[-1], None, u0, args=p,
            saveat=diffrax.SaveAt(ts=ts), stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL))
        return sol.ys

    cases.append(H.Case("diffrax Tsit5", lambda: dfx_solve(u0, p)))

    from jax.experimental.ode import odeint

    ode_solve = jax.jit(lambda u0, p: odeint(lambda u, t, p: lv(t, u, p), u0, ts, p, rtol=RTOL, atol=ATOL))
    cases.append(H.Case("jax odeint (Dopri5)", lambda: ode_solve(u0, p)))

    torch = H.torch_threads()
    if torch is not None:
        import torchdiffeq

        tp = torch.tensor(P_SOLVE, dtype=torch.float64)
        tu0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
        tts = torch.linspace(0.0, 10.0, 101, dtype=torch.float64)

        def tf(t, u):
            x, y = u[0], u[1]
            return torch.stack([tp[0] * x - tp[1] * x * y, -tp[2] * y + tp[3] * x * y])

        def torch_solve():
            with torch.no_grad():
                return torchdiffeq.odeint(tf, tu0, tts, rtol=RTOL, atol=ATOL, method="dopri5")

        cases.append(H.Case("torchdiffeq dopri5 (1 thread)", torch_solve, kind="torch"))
    cases.append(H.Case("scipy solve_ivp RK45", lambda: _scipy_solution(P_SOLVE, RTOL, ATOL, "RK45").y, kind="python"))
    cases.append(H.Case("floor: nfev x vf in fori_loop", H.floor_forward(lv, u0, p, nfev)))

    H.run_cases(cases, rounds=ns.rounds, budget_s=ns.budget)
    for c in cases:
        if c.name.startswith("floor"):
            continue
        out = c.output[0] if isinstance(c.output, tuple) else c.output
        out = np.asarray(out.detach().numpy() if hasattr(out, "detach") else out)
        out = out.T if out.shape == (2, 101) else out
        c.extra["max_err"] = float(np.max(np.abs(out - ref)))
    return H.report("W1", "Lotka-Volterra solve, Tsit5/Dopri5, rtol=atol=1e-6, 101 saves, float64", cases,
                    floor="floor: nfev x vf in fori_loop", extra_cols=("max_err",),
                    settings=dict(p=P_SOLVE, u0=(1, 1), t=(0, 10), n_save=101, rtol=RTOL, atol=ATOL),
                    save=not ns.no_save)


def w2(ns):
    import jax
    import jax.numpy as jnp

    import diffrax
    import neuralde as nde

    p = jnp.array(P_GRAD)
    u0 = jnp.array([1.0, 1.0])
    ts = jnp.linspace(0.0, 10.0, 101)
    g_fd = fd_gradient(P_GRAD)

    def nde_loss(sens):
        def loss(p):
            sol = nde.solve(nde.ODETerm(lv), nde.Tsit5(), u0, ts, args=p, rtol=RTOL, atol=ATOL, sensitivity=sens)
            return jnp.sum((sol.ys - 1.0) ** 2), sol.stats["num_fevals"]
        return loss

    def dfx_loss(adjoint):
        def loss(p):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lv), diffrax.Tsit5(), ts[0], ts[-1], None, u0, args=p,
                saveat=diffrax.SaveAt(ts=ts), stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
                adjoint=adjoint, max_steps=4096)
            return jnp.sum((sol.ys - 1.0) ** 2)
        return loss

    from jax.experimental.ode import odeint

    def odeint_loss(p):
        return jnp.sum((odeint(lambda u, t, p: lv(t, u, p), u0, ts, p, rtol=RTOL, atol=ATOL) - 1.0) ** 2)

    cases = []

    def add(name, fn, **kw):
        cases.append(H.Case(name, lambda: fn(p), **kw))

    for name, sens in [("CheckpointAdjoint", nde.CheckpointAdjoint()), ("ReverseMode", nde.ReverseMode()),
                       ("ForwardMode", nde.ForwardMode()), ("BacksolveAdjoint", nde.BacksolveAdjoint())]:
        add(f"neuralde {name}", jax.jit(jax.value_and_grad(nde_loss(sens), has_aux=True)))
    # neuralde's count of evaluations (forward solve) sets the floor.
    nfev = int(H.first_call(cases[0])[0][1])
    for c in cases[:4]:
        c.nfev = nfev
    add("diffrax RecursiveCheckpointAdjoint",
        jax.jit(jax.value_and_grad(dfx_loss(diffrax.RecursiveCheckpointAdjoint()))))
    add("diffrax DirectAdjoint", jax.jit(jax.value_and_grad(dfx_loss(diffrax.DirectAdjoint()))))
    add("diffrax BacksolveAdjoint", jax.jit(jax.value_and_grad(dfx_loss(diffrax.BacksolveAdjoint()))))
    add("diffrax ForwardMode (jacfwd)", jax.jit(jax.jacfwd(dfx_loss(diffrax.ForwardMode()))))
    add("jax odeint (adjoint)", jax.jit(jax.value_and_grad(odeint_loss)))

    torch = H.torch_threads()
    if torch is not None:
        import torchdiffeq

        tu0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
        tts = torch.linspace(0.0, 10.0, 101, dtype=torch.float64)

        class LV(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.p = torch.nn.Parameter(torch.tensor(P_GRAD, dtype=torch.float64))

            def forward(self, t, u):
                p = self.p
                x, y = u[0], u[1]
                return torch.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y])

        model = LV()

        def torch_grad(solver):
            def run():
                model.p.grad = None
                ys = solver(model, tu0, tts, rtol=RTOL, atol=ATOL, method="dopri5")
                loss = torch.sum((ys - 1.0) ** 2)
                loss.backward()
                return loss.detach(), model.p.grad.detach().clone()
            return run

        cases.append(H.Case("torchdiffeq backprop (1 thread)", torch_grad(torchdiffeq.odeint), kind="torch"))
        cases.append(H.Case("torchdiffeq adjoint (1 thread)", torch_grad(torchdiffeq.odeint_adjoint), kind="torch"))

    cases.append(H.Case("floor: nfev x vf, scan + grad",
                        H.floor_grad(lv, u0, p, nfev, lambda y: jnp.sum((y - 1.0) ** 2))))
    H.run_cases(cases, rounds=ns.rounds, budget_s=ns.budget)
    for c in cases:
        if c.name.startswith("floor"):
            continue
        out = c.output
        g = out[1] if isinstance(out, tuple) else out
        if c.name.startswith("neuralde ForwardMode"):
            c.nfev = None  # one solve carries 4 tangents: not comparable
        g = np.asarray(g.numpy() if hasattr(g, "numpy") else g, float)
        c.extra["rel_err"] = float(np.linalg.norm(g - g_fd) / np.linalg.norm(g_fd))
    return H.report("W2", "Lotka-Volterra gradient of sum((u(t_i)-1)^2) w.r.t. p, rtol=atol=1e-6, float64",
                    cases, floor="floor: nfev x vf, scan + grad", extra_cols=("rel_err",),
                    settings=dict(p=P_GRAD, u0=(1, 1), t=(0, 10), n_save=101, rtol=RTOL, atol=ATOL,
                                  g_fd=g_fd.tolist()), save=not ns.no_save)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over rounds)")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per case per round")
    parser.add_argument("--only", choices=["W1", "W2"], help="run one workload")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    ns = parser.parse_args(argv)
    import jax

    jax.config.update("jax_enable_x64", True)
    H.warm_up()
    if ns.only in (None, "W1"):
        w1(ns)
    if ns.only in (None, "W2"):
        w2(ns)


if __name__ == "__main__":
    main()
