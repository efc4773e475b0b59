"""Dense output: the polynomial of one step, and the history of all steps.

Every solver describes the solution on an accepted step ``[t0, t0 + h]`` by
``y(t0 + theta h) = y0 + sum_j coeffs[j] theta^(j+1)``, with ``coeffs`` a pytree
whose leaves have a leading axis of the polynomial's degree. The same form is
used for saving at ``t``, for `Solution.evaluate` and (later) for the history
of delay equations.
"""
from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu


def evaluate_polynomial(y0, coeffs, theta):
    """``y0 + sum_j coeffs[j] theta^(j+1)`` by Horner's rule, leaf by leaf."""

    def leaf(y0_leaf, c_leaf):
        th = theta.astype(c_leaf.dtype)
        acc = c_leaf[-1]
        for j in range(c_leaf.shape[0] - 2, -1, -1):
            acc = c_leaf[j] + th * acc
        return y0_leaf + th * acc

    return jtu.tree_map(leaf, y0, coeffs)


class DenseHistory(eqx.Module):
    """The piecewise-polynomial solution of a whole solve.

    ``ts`` has ``max_steps + 1`` entries: the step boundaries (in the solver's
    forward time) followed by ``+inf`` for the unused slots, so that a binary
    search finds the step of any time; ``y0s`` and ``coeffs`` have a leading
    axis of ``max_steps``; ``num_steps`` counts the filled steps.
    """

    ts: jax.Array
    y0s: Any
    coeffs: Any
    num_steps: jax.Array

    def evaluate(self, s):
        n = self.num_steps
        idx = jnp.searchsorted(self.ts, s, side="left") - 1
        idx = jnp.clip(idx, 0, jnp.maximum(n - 1, 0))
        t0 = self.ts[idx]
        t1 = self.ts[idx + 1]
        inside = (n > 0) & (s >= self.ts[0]) & (s <= self.ts[n])
        # Outside (or with no step, t1 = +inf padding) the result is NaN by the
        # `where` below; evaluate the unselected branch at safe numbers so that
        # its zero cotangent never meets an inf (0 * inf = NaN in gradients).
        theta = jnp.where(inside, (jnp.where(inside, s, t0) - t0) / jnp.where(inside, t1 - t0, 1), 0)
        y0 = jtu.tree_map(lambda x: x[idx], self.y0s)
        coeffs = jtu.tree_map(lambda x: x[idx], self.coeffs)
        out = evaluate_polynomial(y0, coeffs, theta)
        return jtu.tree_map(lambda x: jnp.where(inside, x, jnp.nan), out)
