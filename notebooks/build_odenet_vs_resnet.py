"""Build (and execute) notebooks/odenet_vs_resnet.ipynb.

    python notebooks/build_odenet_vs_resnet.py            # full run, writes the committed notebook
    python notebooks/build_odenet_vs_resnet.py --quick    # NEURALDE_NOTEBOOK_QUICK=1, writes a temp copy

Needs `pip install nbformat nbclient ipykernel` (not dependencies of neuralde).
"""
from __future__ import annotations

from _build import PREAMBLE, NotebookBuilder

nb = NotebookBuilder("odenet_vs_resnet", __doc__)
md, code = nb.md, nb.code

md(r"""
# ODE-Net versus ResNet on a toy regression

The toy problem of the neural-ODE chapter of the *Deep Implicit Layers* tutorial (Duvenaud,
Johnson and Kolter, NeurIPS 2020), in neuralde and Equinox: fit $y = x^3 + 0.1\,x$ from 10 points
evenly spaced in $[-2, 2]$ with

* a **ResNet**: three residual blocks $h \leftarrow h + \mathrm{MLP}(h)$ sharing one MLP
  (1 → 20 → 1, tanh), i.e. three explicit Euler steps of a fixed vector field;
* an **ODE-Net**: $\dot h = \mathrm{MLP}(h, t)$ (2 → 20 → 1, tanh; the time is an input) from
  $t = 0$ to $t = 1$ — "infinitely many layers" — solved by Tsit5 at `rtol = atol = 1e-3`.

Both are trained with Adam on the mean squared error, batched over the inputs with `jax.vmap`.
Then we look inside: how the hidden state moves through the layers (depth), and what changing the
solver tolerance at **test time** buys or costs. `NEURALDE_NOTEBOOK_QUICK=1` trains for fewer
iterations and times fewer repetitions.
""")

code(PREAMBLE + r"""
inputs = jnp.linspace(-2.0, 2.0, 10)[:, None]  # (10, 1): a batch of 1-D inputs
targets = inputs**3 + 0.1 * inputs


class ResNet(eqx.Module):
    mlp: eqx.nn.MLP
    depth: int = eqx.field(static=True)

    def activations(self, x):
        hs = [x]
        for _ in range(self.depth):
            hs.append(hs[-1] + self.mlp(hs[-1]))
        return jnp.stack(hs)  # (depth + 1, 1)

    def __call__(self, x):
        return self.activations(x)[-1]


class Dynamics(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, h, args):
        return self.mlp(jnp.concatenate([h, jnp.reshape(t, (1,))]))


class ODENet(eqx.Module):
    ode: nde.NeuralODE

    def __call__(self, x):
        return self.ode(x)[-1]  # the state at t = 1


resnet = ResNet(eqx.nn.MLP(1, 1, 20, 1, activation=jnp.tanh, key=jr.PRNGKey(0)), depth=3)
odenet = ODENet(nde.NeuralODE(Dynamics(eqx.nn.MLP(2, 1, 20, 1, activation=jnp.tanh, key=jr.PRNGKey(1))),
                              jnp.array([0.0, 1.0]), rtol=1e-3, atol=1e-3))
count = lambda m: sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_inexact_array)))
print(f"parameters: ResNet {count(resnet)}, ODE-Net {count(odenet)}")
""")

md(r"""
## Training

The same loop for both models: the loss maps the model over the batch with `jax.vmap`, and one
jitted step takes `eqx.filter_value_and_grad` and an Adam update.
""")

code(r"""
def mse(model):
    return jnp.mean((jax.vmap(model)(inputs) - targets) ** 2)


def fit(model, iters, lr=1e-2):
    optimiser = optax.adam(lr)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state):
        value, grads = eqx.filter_value_and_grad(mse)(model)
        updates, opt_state = optimiser.update(grads, opt_state)
        return eqx.apply_updates(model, updates), opt_state, value

    history = []
    for _ in range(iters):
        model, opt_state, value = step(model, opt_state)
        history.append(float(value))
    history.append(float(mse(model)))
    return model, history


iters = 200 if QUICK else 1000
histories, seconds = {}, {}
for name, model in [("ResNet", resnet), ("ODE-Net", odenet)]:
    t0 = time.perf_counter()
    trained, histories[name] = fit(model, iters)
    seconds[name] = time.perf_counter() - t0
    if name == "ResNet":
        resnet = trained
    else:
        odenet = trained
    print(f"{name:8s} MSE {histories[name][0]:.3e} -> {histories[name][-1]:.3e} "
          f"({iters} Adam steps, {seconds[name]:.1f} s with compilation)")
""")

code(r"""
grid = jnp.linspace(-2.5, 2.5, 101)[:, None]
fig, (ax_fit, ax_loss) = plt.subplots(1, 2, figsize=(12, 4))
ax_fit.plot(inputs, targets, "ok", label="training data")
ax_fit.plot(grid, grid**3 + 0.1 * grid, ":", color="gray", label="$x^3 + 0.1x$")
ax_fit.plot(grid, jax.vmap(resnet)(grid), label="ResNet")
ax_fit.plot(grid, jax.vmap(odenet)(grid), label="ODE-Net")
ax_fit.set(xlabel="x", ylabel="y", title="predictions (training range [-2, 2])")
ax_fit.legend(fontsize="small")
for name, h in histories.items():
    ax_loss.semilogy(h, label=name)
ax_loss.set(xlabel="Adam iteration", ylabel="MSE", title="training loss")
ax_loss.legend()
fig.tight_layout()
plt.show()
""")

md(r"""
## Activations over depth

For a grid of inputs, the hidden state after each layer. The ResNet moves each input in three
discrete jumps. The ODE-Net's state moves continuously in "depth" $t \in [0, 1]$: we evaluate the
same trained vector field with 50 save times, batched over the inputs with `jax.vmap`. As the
trajectories of an ODE cannot cross, the ODE-Net can only represent maps that preserve the order
of its 1-D inputs — fine here, since $x^3 + 0.1x$ is increasing.
""")

code(r"""
starts = jnp.linspace(-2.0, 2.0, 15)[:, None]
depth_t = jnp.linspace(0.0, 1.0, 50)
res_acts = np.asarray(jax.vmap(resnet.activations)(starts))[..., 0]  # (15, 4)
ode_layer = nde.NeuralODE(odenet.ode.field, depth_t, rtol=1e-3, atol=1e-3)
ode_acts = np.asarray(jax.vmap(ode_layer)(starts))[..., 0]  # (15, 50)

fig, (ax_r, ax_o) = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for k in range(len(starts)):
    ax_r.plot(range(resnet.depth + 1), res_acts[k], "o-", color=plt.cm.viridis(k / (len(starts) - 1)))
    ax_o.plot(depth_t, ode_acts[k], "-", color=plt.cm.viridis(k / (len(starts) - 1)))
ax_r.set(xlabel="layer", ylabel="hidden state", title="ResNet: 3 discrete layers", xticks=range(4))
ax_o.set(xlabel="depth t", title="ODE-Net: continuous depth")
fig.tight_layout()
plt.show()
""")

md(r"""
## Changing the tolerance at test time

The ODE-Net was trained at `rtol = atol = 1e-3`, but its depth is not fixed: at test time we can
ask the solver for more or less accuracy, and the number of vector-field evaluations (its
effective depth) follows. `nde.solve` takes tolerances as traced arrays, so one compiled function
serves every tolerance. We predict 200 test inputs (one `vmap`) and compare with the same model
solved at `1e-10`.
""")

code(r"""
test_x = jnp.linspace(-2.0, 2.0, 200)[:, None]


@eqx.filter_jit
def predict(field, x, tol):
    def one(x0):
        sol = nde.solve(nde.ODETerm(field), nde.Tsit5(), x0, jnp.array([0.0, 1.0]), rtol=tol, atol=tol)
        return sol.ys[-1], sol.stats["num_fevals"]

    return jax.vmap(one)(x)


field = odenet.ode.field
reference, _ = predict(field, test_x, jnp.asarray(1e-10))
tolerances = [1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8]
rows = []
for tol in tolerances:
    # An array, not a Python float: filter_jit would treat a float as static and recompile per value.
    tol_array = jnp.asarray(tol)
    out, nfev = jax.block_until_ready(predict(field, test_x, tol_array))
    best = float("inf")
    for _ in range(5 if QUICK else 30):
        t0 = time.perf_counter()
        jax.block_until_ready(predict(field, test_x, tol_array))
        best = min(best, time.perf_counter() - t0)
    rows.append(dict(tol=tol, nfev=float(jnp.mean(nfev)), ms=1e3 * best,
                     solver_err=float(jnp.max(jnp.abs(out - reference))),
                     mse=float(jnp.mean((out - (test_x**3 + 0.1 * test_x)) ** 2))))

print(f"{'rtol=atol':>9s} {'f-evals':>8s} {'time (ms)':>10s} {'max |y - y_1e-10|':>18s} {'test MSE':>10s}")
for r in rows:
    print(f"{r['tol']:9.0e} {r['nfev']:8.1f} {r['ms']:10.3f} {r['solver_err']:18.2e} {r['mse']:10.2e}")
""")

code(r"""
fig, ax = plt.subplots(figsize=(6, 4))
ax.loglog([r["nfev"] for r in rows], [r["solver_err"] for r in rows], "o-", label="error vs 1e-10 solve")
ax.loglog([r["nfev"] for r in rows], [r["mse"] for r in rows], "s--", label="test MSE vs $x^3 + 0.1x$")
for r in rows:
    ax.annotate(f"{r['tol']:.0e}", (r["nfev"], r["solver_err"]), textcoords="offset points", xytext=(4, 4),
                fontsize=8)
ax.set(xlabel="vector-field evaluations per input", ylabel="error", title="ODE-Net: accuracy vs cost at test time")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize="small")
plt.show()
""")

md(r"""
## What we learned

* Both models fit the toy data; the ResNet has a fixed depth of three steps, the ODE-Net chooses
  its own number of steps through the adaptive solver.
* The ODE-Net's activations are continuous trajectories that never cross; the ResNet's jump.
* At test time the tolerance trades cost for precision: looser tolerances need fewer vector-field
  evaluations and less time, tighter ones more. The test error against $x^3 + 0.1x$ stops
  improving once the solver error falls below the model's own fitting error: a tolerance tighter
  than the training tolerance buys nothing, while a much looser one changes the predictions.
""")

code(r"""
print(f"This notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s (quick mode: {QUICK}).")
""")

if __name__ == "__main__":
    nb.main()
