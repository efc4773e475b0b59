"""The result of a solve, and the status codes that say how it ended."""
from __future__ import annotations

import enum
from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._interpolation import DenseHistory


class Status(enum.IntEnum):
    """How a solve ended. ``Solution.status`` holds one of these codes (as an
    integer array, so that it can be returned from `jax.jit` and batched by
    `jax.vmap`); ``Status(int(sol.status)).message`` explains it."""

    SUCCESS = 0
    MAX_STEPS_REACHED = 1
    STEP_SIZE_TOO_SMALL = 2
    NONFINITE_STATE = 3
    INVALID_TIMES = 4
    HISTORY_OVERFLOW = 5

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.SUCCESS: "The solve reached the final time.",
    Status.MAX_STEPS_REACHED: (
        "The solver used up `max_steps` steps (accepted + rejected) before reaching the final "
        "time. If the step size collapsed while the solution changes slowly, the problem is "
        "probably stiff: use an implicit (stiff) solver such as `Kvaerno5()` (or `Kvaerno3()` at loose "
        "tolerances) instead of an explicit one; or `rtol`/`atol` "
        "may be below what the state's dtype can resolve (float32 resolves ~1e-7 relative). Otherwise "
        "raise `max_steps`, loosen `rtol`/`atol`, or shorten the time span."
    ),
    Status.STEP_SIZE_TOO_SMALL: (
        "The step size fell below the resolution of the time variable, so the solve cannot "
        "advance. The solution may blow up in finite time or have a discontinuity here; check "
        "the vector field, loosen `rtol`/`atol`, or use float64 for the state. With an explicit solver "
        "on a stiff problem, use an implicit one such as `Kvaerno5()`; with an implicit solver, its "
        "Newton iteration kept failing: check the vector field's Jacobian (it must be differentiable "
        "with `jax.jacfwd`) or raise `max_newton_iters`."
    ),
    Status.NONFINITE_STATE: (
        "The state or the vector field became NaN or infinite and no smaller step avoided it. "
        "Check the vector field and its parameters (and `y0`) for division by zero, overflow "
        "or a finite-time blow-up; rescale the problem or use float64."
    ),
    Status.INVALID_TIMES: (
        "`t` must be strictly increasing or strictly decreasing (no repeated or out-of-order "
        "times); sort it and remove duplicates."
    ),
    Status.HISTORY_OVERFLOW: (
        "The delay solver's history buffer is full: more steps than `max_history` fall within "
        "the largest lag, so the past the vector field reads would be lost. Pass a larger "
        "MethodOfSteps(solver, max_history=...), or loosen `rtol`/`atol`."
    ),
}


def status_messages() -> list[str]:
    """The messages indexed by status code (for `equinox.branched_error_if`)."""
    return [f"neuralde.solve failed ({s.name}): {s.message}" for s in Status]


class Solution(eqx.Module):
    """What `neuralde.solve` returns.

    Attributes:
        ts: the save times ``t``.
        ys: the state at every save time, leading axis ``len(t)``, the pytree
            structure of ``y0``. Entries past a failure are NaN.
        stats: integer counters: ``num_steps`` (accepted), ``num_rejected``,
            ``num_fevals`` (and for implicit solvers ``num_jacobians``,
            ``num_newton_iters``).
        status: a `Status` code (integer array).
    """

    ts: jax.Array
    ys: Any
    stats: dict
    status: jax.Array
    dense_history: Optional[DenseHistory] = None
    direction: Any = None

    @property
    def success(self) -> jax.Array:
        """``status == Status.SUCCESS``."""
        return self.status == Status.SUCCESS

    @property
    def message(self) -> str:
        """A sentence explaining ``status`` (needs a concrete, unbatched status)."""
        return Status(int(self.status)).message

    def evaluate(self, t) -> Any:
        """The dense-output state at time(s) ``t`` in ``[t[0], t[-1]]``.

        ``t`` may be a scalar or an array; the result has ``t``'s shape in front of
        each leaf of the state. Needs ``solve(..., dense=True)``. Times outside the
        solved interval, or past a failure, give NaN.
        """
        if self.dense_history is None:
            raise ValueError(
                "Solution.evaluate needs the dense output: call solve(..., dense=True)."
            )
        t = jnp.asarray(t)
        if not isinstance(t, jax.core.Tracer) and t.size > 0:
            lo, hi = jnp.minimum(self.ts[0], self.ts[-1]), jnp.maximum(self.ts[0], self.ts[-1])
            if not isinstance(lo, jax.core.Tracer) and bool(jnp.any((t < lo) | (t > hi))):
                raise ValueError(
                    f"Solution.evaluate(t): t must lie in [{float(lo)}, {float(hi)}], the "
                    f"solved interval; got values from {float(jnp.min(t))} to {float(jnp.max(t))}."
                )
        s = (self.direction * t).astype(self.dense_history.ts.dtype)
        flat = jnp.ravel(s)
        out = jax.vmap(self.dense_history.evaluate)(flat)
        return jtu.tree_map(lambda x: x.reshape(s.shape + x.shape[1:]), out)
