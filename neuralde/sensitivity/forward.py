from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.custom_derivatives import SymbolicZero
from jax.flatten_util import ravel_pytree

from .base import AbstractSensitivity, closure_convert_term, zero_tangents


class ForwardMode(AbstractSensitivity):
    """Forward-mode sensitivities: the tangents are carried through the same
    `lax.while_loop` as the solution (discrete forward sensitivity analysis).

    Under `jax.jvp` / `jax.jacfwd` the input directions that are not
    symbolically zero are stacked into one batch of tangents and pushed through
    a single solve; the output tangent is the resulting Jacobian applied to the
    input tangent. Because that last product is linear, the same rule also
    serves `jax.grad`/`jax.vjp`: reverse mode transposes the product, having
    built the Jacobian column by column in forward mode. Cost and memory grow
    with the number of differentiated scalars, so this is the method for few
    parameters (below ~100); closed-over arrays of the vector field are found
    by closure conversion and differentiated too.
    """

    def run(self, build, inputs):
        term, y0, args, ts, *rest = inputs
        term = closure_convert_term(term, ts[0], y0, args)
        dyn, static = eqx.partition((term, y0, args, ts, *rest), eqx.is_array)

        def call(d):
            return build(eqx.combine(d, static)).run_while()

        @jax.custom_jvp
        def solve_fwd(d):
            return call(d)

        def rule(primals, tangents):
            (d,), (td,) = primals, tangents
            leaves, treedef = jtu.tree_flatten(d)
            tleaves = treedef.flatten_up_to(td)
            active = [
                i
                for i, (x, tx) in enumerate(zip(leaves, tleaves))
                if jnp.issubdtype(jnp.result_type(x), jnp.inexact) and not isinstance(tx, SymbolicZero)
            ]
            if not active:
                out = call(d)
                return out, zero_tangents(out)
            flat, unravel = ravel_pytree([leaves[i] for i in active])

            def g(v):
                new = list(leaves)
                for i, x in zip(active, unravel(v)):
                    new[i] = x
                floats, ints = call(treedef.unflatten(new))
                return floats, ints

            def push(direction):
                floats, tangent, ints = jax.jvp(g, (flat,), (direction,), has_aux=True)
                return floats, ints, tangent

            basis = jnp.eye(flat.size, dtype=flat.dtype)
            floats, ints, columns = jax.vmap(push, out_axes=(None, None, -1))(basis)
            t_flat, _ = ravel_pytree([tleaves[i] for i in active])
            t_floats = jtu.tree_map(lambda col: col @ t_flat.astype(col.dtype), columns)
            return (floats, ints), (t_floats, zero_tangents(ints))

        solve_fwd.defjvp(rule, symbolic_zeros=True)
        return solve_fwd(dyn)
