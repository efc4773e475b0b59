"""How a solve is differentiated.

A sensitivity method owns the loop primitive and the gradient rule. `solve`
hands it ``build(inputs)``, a pure function of
``inputs = (term, y0, args, ts, rtol, atol, dt0)`` returning the solve as a
`neuralde._loop.Program` (initial carry, one step attempt, the
ready-made loops, finalisation to ``(floats, ints)``); the method decides which
loop runs and how derivatives pass through it.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from .._terms import SDETerm


class AbstractSensitivity(eqx.Module):
    def run(self, build, inputs):
        raise NotImplementedError


def zero_tangents(tree):
    """Zero (co)tangents for ``tree``: zeros for inexact leaves, float0 zeros for
    integer and boolean leaves (as JAX expects of custom rules); ``None`` stays."""

    def leaf(x):
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(jnp.shape(x), dtype=jax.dtypes.float0)

    return jtu.tree_map(leaf, tree)


def unwrap_primals(d):
    """``(values, perturbed)`` of a custom-VJP forward rule's inputs under
    ``symbolic_zeros=True``: the arrays, and a matching tree of booleans that
    say which of them are differentiated."""
    is_primal = lambda x: isinstance(x, CustomVJPPrimal)  # noqa: E731
    return (jtu.tree_map(lambda x: x.value, d, is_leaf=is_primal),
            jtu.tree_map(lambda x: x.perturbed, d, is_leaf=is_primal))


def is_symbolic_zero(x):
    return isinstance(x, SymbolicZero)


def instantiate_zero(ct):
    """A symbolic zero cotangent as an array of zeros (float0 for integers)."""
    if not isinstance(ct, SymbolicZero):
        return ct
    if ct.aval.dtype == jax.dtypes.float0:
        return np.zeros(ct.aval.shape, jax.dtypes.float0)
    return jnp.zeros(ct.aval.shape, ct.aval.dtype)


class _ConvertedField(eqx.Module):
    """A function ``f(t, y, args)`` whose closed-over arrays were hoisted into
    ``consts`` (see `closure_convert_term`). Non-array leaves of ``args``
    (strings, flags, callables) stay static, baked into ``fn``."""

    fn: object = eqx.field(static=True)
    consts: tuple

    def __call__(self, t, y, args):
        return self.fn(t, y, eqx.filter(args, eqx.is_array), *self.consts)


def _convert(f, t0, y0, args):
    args_dyn, args_static = eqx.partition(args, eqx.is_array)
    fn, consts = jax.closure_convert(lambda t, y, a: f(t, y, eqx.combine(a, args_static)), t0, y0, args_dyn)
    return _ConvertedField(fn=fn, consts=tuple(consts))


class _ConvertedTerm(eqx.Module):
    """An ODE term whose vector field is a `_ConvertedField`."""

    field: _ConvertedField

    def vf(self, t, y, args):
        return self.field(t, y, args)


def closure_convert_term(term, t0, y0, args):
    """Hoist every array the vector field closes over (including the parameters
    of an `eqx.Module` field and tracers of an outer transformation) into
    explicit inputs, so that a custom derivative rule differentiates them
    instead of silently treating them as constants."""
    if isinstance(term, SDETerm):
        # Drift and diffusion are converted separately; the seed of the
        # Brownian path stays a (non-differentiable, integer) leaf of the term.
        return SDETerm(_convert(term.drift, t0, y0, args), _convert(term.diffusion, t0, y0, args), term.noise,
                       term.noise_dim, brownian_levels=term.brownian_levels, seed=term.seed)
    if hasattr(term, "history"):
        args_dyn, args_static = eqx.partition(args, eqx.is_array)
        return _check_delay_closure(term, t0, y0, args_dyn, args_static)
    return _ConvertedTerm(field=_convert(term.vf, t0, y0, args))


def _check_delay_closure(term, t0, y0, args_dyn, args_static):
    """A `DDETerm`'s functions receive ``h``, a function, which closure
    conversion cannot take as an input: the term is kept as it is, its arrays
    being pytree leaves. Arrays it closes over that are traced by an outer
    transformation would be missed by a custom derivative rule: refuse them."""

    term_dyn, term_static = eqx.partition(term, eqx.is_array)

    def field(t, y, a, td):
        a = eqx.combine(a, args_static)
        tm = eqx.combine(td, term_static)
        return tm.vector_field(t, y, lambda s: tm.history(s, a), a)

    # Only what is neither an argument nor a leaf of the term is a constant.
    _, consts = jax.closure_convert(field, t0, y0, args_dyn, term_dyn)
    if any(isinstance(c, jax.core.Tracer) for c in consts):
        raise ValueError(
            "The DDETerm's vector field or history closes over an array that is being differentiated "
            "or batched (a traced value that is not an argument). Pass it through `args`, or hold it in "
            "an eqx.Module vector field, so that its gradient is not lost."
        )
    return term
