"""Terms: the user's differential equation, as a pytree so that any arrays it
holds (for example the parameters of an `eqx.Module` vector field) are leaves
that gradients reach."""
from __future__ import annotations

from typing import Any, Callable

import equinox as eqx


class AbstractTerm(eqx.Module):
    """Base class of the differential-equation terms."""


class ODETerm(AbstractTerm):
    """An ordinary differential equation ``dy/dt = vector_field(t, y, args)``.

    ``vector_field`` returns a pytree with the structure, shapes and dtypes of
    ``y``. It may be any callable; if it is an ``eqx.Module`` its floating-point
    arrays are differentiated by every sensitivity method.
    """

    vector_field: Callable[[Any, Any, Any], Any]

    def __init__(self, vector_field: Callable[[Any, Any, Any], Any]):
        if not callable(vector_field):
            raise TypeError(
                "ODETerm(vector_field): expected a callable f(t, y, args) returning dy/dt; "
                f"got {type(vector_field).__name__}."
            )
        self.vector_field = vector_field

    def vf(self, t, y, args):
        return self.vector_field(t, y, args)
