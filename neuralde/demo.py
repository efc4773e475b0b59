"""Fit a neural ODE to a spiral: the example of the DiffEqFlux.jl README, in neuralde.

The data are 30 points, evenly spaced on ``t`` in ``[0, 1.5]``, of the solution of

    du/dt = (u**3) @ A,   A = [[-0.1, 2.0], [-2.0, -0.1]],   u(0) = (2, 0),

computed with ``nde.solve`` at tight tolerance. The model is a `nde.NeuralODE`
whose vector field is a small MLP applied to ``u**3`` (DiffEqFlux's
``Chain(x -> x.^3, Dense(2, 50, tanh), Dense(50, 2))``); it is trained with
Adam on the sum of squared errors, differentiating straight through the Tsit5
solver (`nde.ReverseMode`). A progress line shows the loss during training;
at the end a PNG compares the data with the fitted trajectory, both against
``t`` and in the phase plane, next to the loss history, and a closing sentence
says what was learned: how far the model's trajectory and vector field are from
the true ones.

Run it with::

    python -m neuralde.demo [--iters N] [--out PATH] [--seed S]

``NEURALDE_DEMO_QUICK=1`` in the environment cuts the default number of
iterations for smoke tests. Plotting needs matplotlib
(``pip install "neuralde[examples]"``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional, Sequence, TextIO

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import neuralde as nde

DEFAULT_ITERS = 800
QUICK_ITERS = 30

A_TRUE = [[-0.1, 2.0], [-2.0, -0.1]]
U0 = [2.0, 0.0]
T_SPAN = (0.0, 1.5)
NUM_TIMES = 30


# ------------------------------------------------------------------ problem


def true_field(t, u, A):
    return (u**3) @ A


def make_data(ts: jax.Array, u0: jax.Array) -> jax.Array:
    """The true spiral at ``ts``, solved far more accurately than the model
    will be, so that the data carry no visible solver error."""
    A = jnp.asarray(A_TRUE, dtype=u0.dtype)
    # As tight as the precision allows: a tolerance below machine epsilon
    # cannot be met, and in float32 the step size would collapse chasing it.
    tol = max(1e-10, float(jnp.finfo(u0.dtype).eps))
    sol = nde.solve(nde.ODETerm(true_field), nde.Tsit5(), u0, ts, args=A, rtol=tol, atol=tol)
    return sol.ys


class CubicMLPField(eqx.Module):
    """``f(t, u) = mlp(u**3)``: the cube feeds the network the same nonlinearity
    as the true dynamics, as in the DiffEqFlux example."""

    mlp: eqx.nn.MLP

    def __init__(self, *, key: jax.Array):
        # Equinox creates parameters in the default float dtype (float64 when
        # jax_enable_x64 is on), which matches the dtype of the state below;
        # neuralde insists that the field's output dtype equals y0's.
        self.mlp = eqx.nn.MLP(2, 2, width_size=50, depth=1, activation=jnp.tanh, key=key)

    def __call__(self, t, u, args):
        return self.mlp(u**3)


# ----------------------------------------------------------------- progress


class ProgressLine:
    """One line on a terminal, redrawn in place with a carriage return:
    ``training [#####-----] 150/300  loss 1.23e-01``.

    Redraws are throttled so that printing never costs more than the fast
    training steps it reports on.
    """

    def __init__(self, total: int, stream: Optional[TextIO] = None, width: int = 30, interval: float = 0.1):
        self.total = total
        # Looked up now, not at import, so that redirecting sys.stderr works.
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.interval = interval
        self._last = -float("inf")

    def update(self, done: int, loss: float, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        filled = int(round(self.width * done / max(self.total, 1)))
        bar = "#" * filled + "-" * (self.width - filled)
        digits = len(str(self.total))
        self.stream.write(f"\rtraining [{bar}] {done:{digits}d}/{self.total}  loss {loss:.2e}")
        self.stream.flush()

    def close(self, done: int, loss: float) -> None:
        self.update(done, loss, force=True)
        self.stream.write("\n")
        self.stream.flush()


# ----------------------------------------------------------------- training


def sse_loss(model: nde.NeuralODE, u0: jax.Array, data: jax.Array) -> jax.Array:
    return jnp.sum((model(u0) - data) ** 2)


def train(
    model: nde.NeuralODE, u0: jax.Array, data: jax.Array, iters: int, *, lr: float = 0.05, progress: bool = True
) -> tuple[nde.NeuralODE, list[float]]:
    """Adam on the sum of squared errors; returns the trained model and the
    loss before each step, followed by the loss of the final model.
    ``progress=False`` draws no progress line."""
    # Cosine decay: a large step early on to find the spiral quickly, a small
    # one at the end to settle into the minimum instead of rattling around it.
    schedule = optax.cosine_decay_schedule(lr, decay_steps=max(iters, 1), alpha=0.05)
    optim = optax.adam(schedule)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(sse_loss)(model, u0, data)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    losses: list[float] = []
    line = ProgressLine(iters) if progress else None
    for i in range(iters):
        model, opt_state, loss = step(model, opt_state)
        losses.append(float(loss))
        if line is not None:
            line.update(i + 1, losses[-1])
    losses.append(float(eqx.filter_jit(sse_loss)(model, u0, data)))
    if line is not None:
        line.close(iters, losses[-1])
    return model, losses


def field_error(field: CubicMLPField, us: jax.Array) -> float:
    """Relative RMS error of the learned vector field against the true one at
    the states ``us`` (e.g. the data): how well the dynamics were learned,
    not just the trajectory."""
    A = jnp.asarray(A_TRUE, dtype=us.dtype)
    learned = jax.vmap(lambda u: field(0.0, u, None))(us)
    true = jax.vmap(lambda u: true_field(0.0, u, A))(us)
    return float(jnp.sqrt(jnp.sum((learned - true) ** 2) / jnp.sum(true**2)))


# ----------------------------------------------------------------- plotting


def plot_fit(
    path: str,
    ts: np.ndarray,
    data: np.ndarray,
    fine_ts: np.ndarray,
    fine_pred: np.ndarray,
    losses: Sequence[float],
) -> str:
    """Draw the data against the fitted trajectory (components against t, and
    the phase plane) and the loss history to ``path``; return its absolute path.

    Raises ModuleNotFoundError if matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")  # render to file only: no display needed
    import matplotlib.pyplot as plt

    fig = figure_fit(ts, data, fine_ts, fine_pred, losses)
    path = os.path.abspath(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figure_fit(ts: np.ndarray, data: np.ndarray, fine_ts: np.ndarray, fine_pred: np.ndarray, losses: Sequence[float]):
    """The figure of `plot_fit` (a matplotlib Figure), e.g. to show in a notebook."""
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_phase, ax_loss) = plt.subplots(
        1, 3, figsize=(14, 4.3), gridspec_kw={"width_ratios": [1.4, 1.0, 0.9]}
    )
    for k, colour in enumerate(("tab:blue", "tab:orange")):
        ax_t.plot(ts, data[:, k], "o", color=colour, ms=4, label=f"data $u_{k + 1}$")
        ax_t.plot(fine_ts, fine_pred[:, k], "-", color=colour, lw=1.8, label=f"neural ODE $u_{k + 1}$")
    # Headroom above the curves for the legend, so that it hides no data.
    ax_t.set_ylim(data.min() - 0.3, data.max() + 1.0)
    ax_t.set(xlabel="t", ylabel="u(t)", title="Trajectory")
    ax_t.legend(fontsize="small", ncol=2, loc="upper center")

    ax_phase.plot(data[:, 0], data[:, 1], "o", color="k", ms=4, label="data")
    ax_phase.plot(fine_pred[:, 0], fine_pred[:, 1], "-", color="tab:red", lw=1.8, label="neural ODE")
    ax_phase.plot(*data[0], "s", color="tab:green", ms=7, label="$u(0)$")
    ax_phase.set(xlabel="$u_1$", ylabel="$u_2$", title="Phase plane")
    ax_phase.set_aspect("equal", adjustable="datalim")
    ax_phase.legend(fontsize="small")

    ax_loss.semilogy(np.arange(len(losses)), losses, color="tab:purple")
    ax_loss.set(xlabel="iteration", ylabel="sum of squared errors", title=f"Loss (final {losses[-1]:.2e})")
    ax_loss.grid(True, which="major", alpha=0.3)

    fig.suptitle(r"neuralde: neural ODE fitted to $du/dt = (u^3) A$")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------- main


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    quick = os.environ.get("NEURALDE_DEMO_QUICK", "") not in ("", "0")
    parser = argparse.ArgumentParser(
        prog="python -m neuralde.demo",
        description="Fit a neural ODE to the DiffEqFlux spiral and plot the fit.",
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=QUICK_ITERS if quick else DEFAULT_ITERS,
        help=f"Adam iterations (default {DEFAULT_ITERS}; {QUICK_ITERS} with NEURALDE_DEMO_QUICK=1)",
    )
    parser.add_argument("--out", default="neuralde_demo.png", help="where to write the PNG (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the network initialisation (default: 0)")
    parser.add_argument("--lr", type=float, default=0.05, help="peak Adam learning rate (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f"--iters must be at least 1; got {args.iters}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the demo; return ``{"initial_loss", "final_loss", "losses", "seconds",
    "trajectory_error", "field_error", "png"}``.

    ``trajectory_error`` is the largest distance between the trained model's
    trajectory and the true one on ``[0, 1.5]``; ``field_error`` the relative
    RMS error of the learned vector field at the data (see `field_error`).
    ``png`` is the absolute path of the figure, or ``None`` if matplotlib is
    not installed (a message then says how to get it).
    """
    args = _parse_args(argv)
    start = time.perf_counter()

    # Explicit default dtype everywhere: float32 normally, float64 under
    # jax_enable_x64, and always the same for the state and the network.
    dtype = jnp.result_type(float)
    ts = jnp.linspace(*T_SPAN, NUM_TIMES, dtype=dtype)
    u0 = jnp.asarray(U0, dtype=dtype)
    data = make_data(ts, u0)

    field = CubicMLPField(key=jax.random.PRNGKey(args.seed))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(field, eqx.is_inexact_array)))
    print(
        f"neuralde demo: fit a neural ODE du/dt = MLP(u^3) ({n_params} parameters) to {NUM_TIMES} samples\n"
        f"of the spiral du/dt = (u^3) A on t in [{T_SPAN[0]}, {T_SPAN[1]}], with {args.iters} Adam steps, "
        "differentiating through the Tsit5 solver."
    )
    model = nde.NeuralODE(field, ts, solver=nde.Tsit5(), sensitivity=nde.ReverseMode(), rtol=1e-5, atol=1e-5)
    model, losses = train(model, u0, data, args.iters, lr=args.lr)
    seconds = time.perf_counter() - start
    print(
        f"loss (sum of squared errors) {losses[0]:.4e} -> {losses[-1]:.4e}, "
        f"{losses[0] / max(losses[-1], 1e-300):.0f}x smaller, after {args.iters} iterations ({seconds:.1f} s)"
    )

    # The trained field on a fine grid, so that the plotted curve is the
    # model's trajectory rather than straight lines between the save times.
    fine_ts = jnp.linspace(*T_SPAN, 300, dtype=dtype)
    fine = nde.NeuralODE(model.field, fine_ts, solver=nde.Tsit5(), rtol=1e-5, atol=1e-5)
    fine_pred = fine(u0)
    trajectory_error = float(jnp.max(jnp.linalg.norm(fine_pred - make_data(fine_ts, u0), axis=-1)))
    result: dict[str, Any] = {
        "initial_loss": losses[0],
        "final_loss": losses[-1],
        "losses": losses,
        "seconds": seconds,
        "trajectory_error": trajectory_error,
        "field_error": field_error(model.field, data),
        "png": None,
    }
    try:
        result["png"] = plot_fit(
            args.out, np.asarray(ts), np.asarray(data), np.asarray(fine_ts), np.asarray(fine_pred), losses
        )
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        print(
            'matplotlib is not installed, so no figure was drawn. Install it with: pip install "neuralde[examples]"',
            file=sys.stderr,
        )
    else:
        print(f"figure written to {result['png']}")
    print(_what_was_learned(result, args.iters))
    return result


def _what_was_learned(result: dict[str, Any], iters: int) -> str:
    radius = float(np.linalg.norm(U0))
    summary = (
        f"the model's trajectory deviates from the true spiral (radius {radius:.0f} at t = 0) by at most "
        f"{result['trajectory_error']:.3f} on [{T_SPAN[0]}, {T_SPAN[1]}], and its vector field differs from "
        f"the true (u^3) A by {100 * result['field_error']:.0f}% (relative RMS) at the data."
    )
    if result["trajectory_error"] < 0.05 * radius:
        return f"Learned: from {NUM_TIMES} samples alone, the network found the dynamics: " + summary
    return (
        f"After {iters} iterations the fit is still rough: {summary} "
        f"Run longer (the default is {DEFAULT_ITERS} iterations) for a close fit."
    )


if __name__ == "__main__":
    sys.exit(0 if main()["png"] is not None else 1)
