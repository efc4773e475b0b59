from __future__ import annotations

from .base import AbstractSensitivity


class ReverseMode(AbstractSensitivity):
    """Reverse-mode autodiff straight through the solver's operations.

    The loop is a bounded nested scan (`neuralde._loop.bounded_while_loop`) with
    finished blocks skipped, so the work follows the steps actually taken; each
    iteration is checkpointed, so reverse mode stores one carry (state, FSAL
    derivative, last step's interpolant) per iteration, allocated for
    ``max_steps`` iterations. Exact derivative of the computed solution; also
    supports `jax.jvp`.
    """

    def run(self, integrate, inputs):
        return integrate(inputs, "bounded")
