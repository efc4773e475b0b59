"""Ensembles of SDE paths: solve many paths with `jax.vmap` over keys and
summarise them at the save times.

    sols = nde.ensemble.solve_ensemble(term, nde.SRIW1(), y0, ts, key=key, num_paths=100, rtol=1e-3)
    summary = nde.ensemble.summarize(sols.ys)        # mean, var, median, quantiles at every save time

The statistics are those of DiffEqFlux/DifferentialEquations.jl's
``EnsembleSummary`` (mean ``u``, variance ``v``, median ``med``, quantiles
``qlow``/``qhigh``, 5% and 95% by default) and ``timeseries_point_mean``
(`ensemble_mean`). Every function takes pytrees whose leaves have a leading
axis of paths (then the time axis of ``Solution.ys``), is differentiable, and
works under `jax.jit`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._solve import solve


def _check_paths(ys, need: int = 1):
    leaves = jtu.tree_leaves(ys)
    if not leaves:
        raise ValueError("expected a pytree of arrays with a leading axis of paths; got no arrays.")
    n = leaves[0].shape[0] if leaves[0].ndim else 0
    if n < need or any(leaf.ndim == 0 or leaf.shape[0] != n for leaf in leaves):
        raise ValueError(
            f"expected arrays with a leading axis of paths (at least {need}) shared by every leaf; got shapes "
            f"{[tuple(leaf.shape) for leaf in leaves]}."
        )
    return n


def ensemble_mean(ys) -> Any:
    """Mean over paths at every save time (``timeseries_point_mean``)."""
    _check_paths(ys)
    return jtu.tree_map(lambda y: jnp.mean(y, axis=0), ys)


def ensemble_var(ys, ddof: int = 1) -> Any:
    """Variance over paths at every save time (unbiased by default)."""
    _check_paths(ys, need=ddof + 1)
    return jtu.tree_map(lambda y: jnp.var(y, axis=0, ddof=ddof), ys)


def ensemble_quantile(ys, q) -> Any:
    """Quantile(s) ``q`` (in [0, 1]) over paths at every save time; for a
    sequence ``q`` the result has a leading axis ``len(q)``."""
    _check_paths(ys)
    q = jnp.asarray(q)
    if bool(jnp.any((q < 0) | (q > 1))) if not isinstance(q, jax.core.Tracer) else False:
        raise ValueError(f"`q` must lie in [0, 1]; got {q}.")
    return jtu.tree_map(lambda y: jnp.quantile(y, q, axis=0), ys)


class EnsembleSummary(NamedTuple):
    """Statistics over paths at every save time (each with the structure of
    one path's ``ys``)."""

    mean: Any
    var: Any
    std: Any
    median: Any
    qlow: Any
    qhigh: Any
    #: Standard error of the mean, ``std / sqrt(num_paths)``.
    sem: Any
    num_paths: int


def summarize(ys, quantiles=(0.05, 0.95)) -> EnsembleSummary:
    """Mean, variance, standard deviation, median, the ``quantiles`` pair and
    the standard error of the mean over paths (DiffEqFlux's
    ``EnsembleSummary``)."""
    n = _check_paths(ys, need=2)
    if len(quantiles) != 2 or not 0 <= quantiles[0] <= quantiles[1] <= 1:
        raise ValueError(f"`quantiles` must be a pair 0 <= qlow <= qhigh <= 1; got {quantiles!r}.")
    var = ensemble_var(ys)
    std = jtu.tree_map(jnp.sqrt, var)
    qs = jtu.tree_map(lambda y: jnp.quantile(y, jnp.asarray([0.5, *quantiles], y.dtype), axis=0), ys)
    return EnsembleSummary(
        mean=ensemble_mean(ys), var=var, std=std,
        median=jtu.tree_map(lambda x: x[0], qs), qlow=jtu.tree_map(lambda x: x[1], qs),
        qhigh=jtu.tree_map(lambda x: x[2], qs),
        sem=jtu.tree_map(lambda s: s / jnp.sqrt(jnp.asarray(n, s.dtype)), std), num_paths=n,
    )


def solve_ensemble(term, solver, y0, t, *, key, num_paths: int, **solve_kwargs):
    """``num_paths`` independent paths: `neuralde.solve` vmapped over
    ``jax.random.split(key, num_paths)``. Returns a batched `Solution` (every
    field with a leading axis of paths)."""
    if isinstance(num_paths, bool) or not isinstance(num_paths, int) or num_paths < 1:
        raise ValueError(f"`num_paths` must be a positive integer; got {num_paths!r}.")
    keys = jax.random.split(key, num_paths)
    return jax.vmap(lambda k: solve(term, solver, y0, t, key=k, **solve_kwargs))(keys)
