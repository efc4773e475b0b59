from __future__ import annotations

from .base import AbstractSensitivity


class ReverseMode(AbstractSensitivity):
    """Reverse-mode autodiff straight through the solver's operations.

    The solve runs as a bounded nested scan (`neuralde._loop.bounded_while_loop`)
    with finished blocks skipped, so the work follows the steps actually taken;
    each iteration is checkpointed (its guard inside the checkpoint, so that the
    vector field's parameters are not stored per iteration), so reverse mode
    stores one carry (state, FSAL derivative, last step's interpolant) per
    iteration, allocated for ``max_steps`` iterations. Exact derivative of the
    computed solution; `jax.jvp` works too. Closed-over arrays are
    differentiated by JAX directly.

    The bounded loop also runs when the solve is not differentiated (about 2-3x
    slower than the while loop the other methods use then). Wrapping it in a
    `jax.custom_jvp` whose primal is the while loop was tried; under
    ``jax.grad(jax.vmap(...))`` JAX then fails with "Transpose rule for
    'stop_gradient' not implemented", so the plain bounded loop it is.
    """

    def run(self, build, inputs):
        return build(inputs, reverse_steps=True).run_bounded()
