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


def _check_lags(lags):
    """``lags`` as a tuple of scalars (numbers or arrays, so that gradients
    reach them); concrete values must be positive and finite."""
    import jax
    import numpy as np

    if isinstance(lags, (int, float)) or (hasattr(lags, "shape") and getattr(lags, "ndim", 1) == 0):
        lags = (lags,)
    if hasattr(lags, "shape") and getattr(lags, "ndim", 0) == 1:
        lags = tuple(lags[i] for i in range(lags.shape[0]))
    if not isinstance(lags, (tuple, list)) or len(lags) == 0:
        raise ValueError(f"DDETerm(lags=...): expected a non-empty tuple of positive delays, e.g. (1.0,); got {lags!r}.")
    out = []
    for i, lag in enumerate(lags):
        if isinstance(lag, bool) or not (isinstance(lag, (int, float, np.integer, np.floating)) or hasattr(lag, "shape")):
            raise TypeError(f"DDETerm(lags=...): lags[{i}] must be a real number or scalar array; got {lag!r}.")
        if hasattr(lag, "shape") and getattr(lag, "ndim", 0) != 0:
            raise ValueError(f"DDETerm(lags=...): lags[{i}] must be a scalar; got shape {tuple(lag.shape)}.")
        if not isinstance(lag, jax.core.Tracer):
            value = float(np.asarray(lag))
            if not np.isfinite(value) or value <= 0:
                raise ValueError(
                    f"DDETerm(lags=...): every lag must be positive and finite (the method of steps needs "
                    f"y(t - lag) from the past); got lags[{i}]={value!r}."
                )
        out.append(float(lag) if isinstance(lag, (int, float, np.integer, np.floating)) else lag)
    return tuple(out)


class DDETerm(AbstractTerm):
    """A delay differential equation with constant lags,
    ``dy/dt = vector_field(t, y(t), h, args)`` for ``t > t0``, where ``h(s)``
    is the state at a past time ``s <= t``: ``history(s, args)`` for
    ``s <= t0`` and the solution's own dense output after ``t0``.

    ``lags`` is a tuple of the positive constant delays the vector field uses
    (``h(t - lag)``). They tell the solver where the derivative jumps that
    start at ``t0`` propagate to (``t0`` plus sums of lags), so that it steps
    onto those points, and how much past it must keep. A lag given as an array
    (e.g. a trained parameter also read by the vector field through ``args``)
    is differentiable. Solve with ``MethodOfSteps(solver)``.

    ``h(t0)`` is ``history(t0)``. When ``y0`` differs from it, the solution's
    derivative jumps at ``t0 + lag``, and the first stage of the step that
    starts there reads ``history(t0)`` rather than ``y0`` (the value from the
    left); adaptive steps absorb this by shortening, fixed steps lose
    accuracy: prefer a history that meets ``y0``.
    """

    vector_field: Callable[[Any, Any, Any, Any], Any]
    history: Callable[[Any, Any], Any]
    lags: tuple

    def __init__(self, vector_field, history, lags):
        if not callable(vector_field):
            raise TypeError(
                "DDETerm(vector_field, history, lags): `vector_field` must be a callable f(t, y, h, args) "
                f"returning dy/dt; got {type(vector_field).__name__}."
            )
        if not callable(history):
            raise TypeError(
                "DDETerm(vector_field, history, lags): `history` must be a callable history(s, args) giving "
                f"the state at times s <= t0; got {type(history).__name__}. For a constant history use "
                "e.g. lambda s, args: y0."
            )
        self.vector_field = vector_field
        self.history = history
        self.lags = _check_lags(lags)

    def vf(self, t, y, args):
        # Outside a delay solver only the user's history is known; the loop
        # uses this for shape checks and the initial step-size guess.
        return self.vector_field(t, y, lambda s: self.history(s, args), args)
