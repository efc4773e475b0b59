"""Build (and execute) notebooks/stiff_rober.ipynb.

    python notebooks/build_stiff_rober.py            # full run, writes the committed notebook
    python notebooks/build_stiff_rober.py --quick    # NEURALDE_NOTEBOOK_QUICK=1, writes a temp copy
    python notebooks/build_stiff_rober.py --no-execute

Needs `pip install nbformat nbclient ipykernel optax` (not dependencies of neuralde).
The cells below are the notebook's source; every number in the executed
notebook is computed by its code.
"""
from __future__ import annotations

from _build import NotebookBuilder

nb = NotebookBuilder("stiff_rober", __doc__)
md = nb.md
code = nb.code


md(r"""
# Stiff ODEs: ROBER with `Kvaerno5`, and learning its rate constants

Robertson's chemical reaction (ROBER) is the classic stiff test problem:

$$y_1' = -k_1 y_1 + k_3 y_2 y_3,\quad y_2' = k_1 y_1 - k_2 y_2^2 - k_3 y_2 y_3,\quad y_3' = k_2 y_2^2,$$

with $k = (0.04, 3\cdot 10^7, 10^4)$ and $y(0) = (1, 0, 0)$. The rate constants span nine orders of
magnitude; after a transient of about $10^{-4}$ time units the solution changes slowly, yet an explicit
method must keep its step below its stability limit ($\approx 10^{-3}$) for the whole of
$[0, 10^{5}]$ and beyond. An implicit (L-stable) method such as `nde.Kvaerno5()` takes steps as large
as the accuracy allows.

Set `NEURALDE_NOTEBOOK_QUICK=1` for a shorter run (fewer training iterations).
""")

code(r"""
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import neuralde as nde

jax.config.update("jax_enable_x64", True)
QUICK = os.environ.get("NEURALDE_NOTEBOOK_QUICK") == "1"
NOTEBOOK_START = time.perf_counter()
print(f"jax {jax.__version__}, neuralde {nde.__version__}, optax {optax.__version__}; quick mode: {QUICK}")


def rober(t, y, log_k):
    k1, k2, k3 = jnp.exp(log_k)
    y1, y2, y3 = y
    return jnp.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k2 * y2**2 - k3 * y2 * y3, k2 * y2**2])


log_k_true = jnp.log(jnp.array([0.04, 3e7, 1e4]))
y0 = jnp.array([1.0, 0.0, 0.0])
term = nde.ODETerm(rober)
""")

md(r"""
## 1. Tsit5 fails, Kvaerno5 solves

Both solvers get the same budget of `max_steps=2000` steps on $[0, 10^5]$ with 60 log-spaced save times.
With `throw=False` the failure is reported in `Solution.status`, and every saved value past the point
where the solver stopped is NaN (never a stale number).
""")

code(r"""
ts = jnp.concatenate([jnp.zeros(1), jnp.logspace(-6, 5, 60)])
kw = dict(args=log_k_true, rtol=1e-6, atol=1e-10, max_steps=2000, throw=False)
explicit = nde.solve(term, nde.Tsit5(), y0, ts, **kw)
implicit = nde.solve(term, nde.Kvaerno5(), y0, ts, **kw)
for name, sol in [("Tsit5", explicit), ("Kvaerno5", implicit)]:
    stats = {k: int(v) for k, v in sol.stats.items()}
    reached = float(ts[int(np.sum(np.isfinite(np.asarray(sol.ys[:, 0])))) - 1])
    print(f"{name:9s} status={nde.Status(int(sol.status)).name:18s} last saved time {reached:9.3g}  {stats}")
print()
print(nde.Status(int(explicit.status)).message)
""")

code(r"""
fig, ax = plt.subplots(figsize=(7, 4))
labels = ["$y_1$", "$10^4 y_2$", "$y_3$"]
factors = [1.0, 1e4, 1.0]
for i in range(3):
    ax.semilogx(ts[1:], factors[i] * implicit.ys[1:, i], "-", label=f"{labels[i]} Kvaerno5")
    ax.semilogx(ts[1:], factors[i] * explicit.ys[1:, i], "x", ms=4, color=f"C{i}", label=f"{labels[i]} Tsit5")
ax.set_xlabel("t")
ax.set_title("ROBER: Tsit5 stops where its step budget runs out")
ax.legend(fontsize=8, ncol=2)
plt.show()
""")

md(r"""
## 2. Learning the rate constants from data

We generate data with the true rates at 40 log-spaced times in $[10^{-5}, 10^{3}]$, start from rates
off by a factor of two ($e^{\pm 0.7}$) and fit the logarithms of the rates with Adam (Optax). Fitting in
log space makes the nine orders of magnitude comparable. The loss is the mean squared error with each
component scaled by its largest value (so that $y_2 \sim 10^{-5}$ counts). Gradients flow through the
implicit steps by the implicit function theorem (`CheckpointAdjoint`, the default).
""")

code(r"""
ts_data = jnp.concatenate([jnp.zeros(1), jnp.logspace(-5, 3, 40)])


def predict(log_k):
    return nde.solve(term, nde.Kvaerno5(), y0, ts_data, args=log_k, rtol=1e-7, atol=1e-11, max_steps=2000).ys


data = predict(log_k_true)
scale = jnp.max(jnp.abs(data), axis=0)


def loss(log_k):
    return jnp.mean(((predict(log_k) - data) / scale) ** 2)


optimizer = optax.adam(0.05)


@jax.jit
def train_step(log_k, opt_state):
    value, grad = jax.value_and_grad(loss)(log_k)
    updates, opt_state = optimizer.update(grad, opt_state)
    return optax.apply_updates(log_k, updates), opt_state, value


log_k = log_k_true + jnp.array([0.7, -0.7, 0.7])
log_k_start = log_k
opt_state = optimizer.init(log_k)
iterations = 100 if QUICK else 300
history = []
t0 = time.perf_counter()
for i in range(iterations):
    log_k, opt_state, value = train_step(log_k, opt_state)
    history.append(float(value))
print(f"{iterations} iterations in {time.perf_counter() - t0:.1f} s (including compilation)")
print(f"{'':10s} {'k1':>10s} {'k2':>10s} {'k3':>10s}")
for name, v in [("start", log_k_start), ("fitted", log_k), ("true", log_k_true)]:
    print(f"{name:10s} " + " ".join(f"{x:10.4g}" for x in np.exp(np.asarray(v))))
print("relative error of the fitted rates:", np.abs(np.exp(np.asarray(log_k - log_k_true)) - 1))
""")

code(r"""
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
axes[0].semilogy(history)
axes[0].set_xlabel("iteration")
axes[0].set_ylabel("loss")
fit, start = predict(log_k), predict(log_k_start)
for i in range(3):
    axes[1].semilogx(ts_data[1:], factors[i] * data[1:, i], "o", ms=3, color=f"C{i}", label=f"data {labels[i]}")
    axes[1].semilogx(ts_data[1:], factors[i] * fit[1:, i], "-", color=f"C{i}")
    axes[1].semilogx(ts_data[1:], factors[i] * start[1:, i], ":", color=f"C{i}")
axes[1].set_xlabel("t")
axes[1].set_title("data (dots), start (dotted), fitted (solid)")
axes[1].legend(fontsize=8)
plt.show()
print(f"This notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s (quick mode: {QUICK}).")
""")


if __name__ == "__main__":
    nb.main()
