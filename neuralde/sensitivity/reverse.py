from __future__ import annotations

import equinox as eqx
import jax

from .base import AbstractSensitivity, closure_convert_term


class ReverseMode(AbstractSensitivity):
    """Reverse-mode autodiff straight through the solver's operations.

    When the solve is differentiated, it runs as a bounded nested scan
    (`neuralde._loop.bounded_while_loop`) with finished blocks skipped, so the
    work follows the steps actually taken; each iteration is checkpointed, so
    reverse mode stores one carry (state, FSAL derivative, last step's
    interpolant) per iteration, allocated for ``max_steps`` iterations. When it
    is not differentiated, the same steps run in a plain `lax.while_loop`
    (faster, no buffers): a `jax.custom_jvp` whose rule is the JVP of the
    bounded loop switches between the two. The derivative is exact for the
    computed solution; `jax.jvp` works too.
    """

    def run(self, build, inputs):
        term, y0, args, ts, *rest = inputs
        # Closed-over arrays must be explicit inputs of the custom_jvp function,
        # or their derivatives could not reach them.
        term = closure_convert_term(term, ts[0], y0, args)
        dyn, static = eqx.partition((term, y0, args, ts, *rest), eqx.is_array)

        @jax.custom_jvp
        def solve(d):
            return build(eqx.combine(d, static)).run_while()

        @solve.defjvp
        def rule(primals, tangents):
            return jax.jvp(lambda d: build(eqx.combine(d, static)).run_bounded(), primals, tangents)

        return solve(dyn)
