"""Neural differential equations as Equinox modules."""
from __future__ import annotations

from typing import Any, Callable, Optional

import equinox as eqx
import numpy as np

from ._solve import solve
from ._terms import ODETerm
from .sensitivity import AbstractSensitivity
from .solvers import AbstractSolver, Tsit5


def _static_times(t) -> tuple:
    # The save times are fixed data of the layer, not trainable parameters:
    # keep them out of the pytree leaves that optimisers update.
    arr = np.asarray(t)
    if arr.ndim != 1:
        raise ValueError(f"`t` must be a 1-D array of save times; got shape {arr.shape}.")
    return tuple(float(x) for x in arr)


class NeuralODE(eqx.Module):
    """``dy/dt = field(t, y, args)`` as a layer: ``model(y0, args=None)``
    returns the states at ``t`` (leading axis ``len(t)``).

    ``field`` is any callable, usually an `eqx.Module` whose parameters are
    trained. Extra keyword arguments (``max_steps``, ``dt0``, ``adaptive``,
    ``dense``, ``throw``, ``progress``) are passed to `neuralde.solve`.
    """

    field: Callable
    t: tuple = eqx.field(static=True)
    solver: AbstractSolver = eqx.field(static=True)
    sensitivity: Optional[AbstractSensitivity] = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    solve_kwargs: tuple = eqx.field(static=True)

    def __init__(self, field, t, solver=None, sensitivity=None, rtol=1e-6, atol=1e-6, **solve_kwargs):
        if not callable(field):
            raise TypeError(f"NeuralODE(field, ...): `field` must be callable f(t, y, args); got {type(field).__name__}.")
        self.field = field
        self.t = _static_times(t)
        self.solver = Tsit5() if solver is None else solver
        self.sensitivity = sensitivity
        self.rtol = rtol
        self.atol = atol
        self.solve_kwargs = tuple(sorted(solve_kwargs.items()))

    def __call__(self, y0, args: Any = None):
        import jax.numpy as jnp

        sol = solve(
            ODETerm(self.field), self.solver, y0, jnp.asarray(self.t), args=args,
            sensitivity=self.sensitivity, rtol=self.rtol, atol=self.atol, **dict(self.solve_kwargs),
        )
        return sol.ys


class NeuralDDE(eqx.Module):
    """``dy/dt = field(t, y, h, args)`` with constant ``lags`` as a layer:
    ``model(y0, args=None)`` returns the states at ``t``; ``h(s)`` is
    ``history(s, args)`` for ``s <= t[0]`` and the solution itself after.

    ``field`` and ``history`` are any callables (usually `eqx.Module`s, whose
    parameters are trained). ``lags`` is a tuple of positive delays; given as
    arrays they are leaves of the layer and are trained too. To learn a lag,
    the field must read the same number: pass ``lags=None`` and give the field
    a ``lags`` attribute (a tuple of scalar arrays), which is then the one
    parameter both the field and the discontinuity tracking use. Extra keyword
    arguments (``max_steps``, ``dt0``, ``adaptive``, ...) go to
    `neuralde.solve`. Default solver: ``MethodOfSteps(Tsit5())``.
    """

    field: Callable
    history: Callable
    lags: Any
    t: tuple = eqx.field(static=True)
    solver: AbstractSolver = eqx.field(static=True)
    sensitivity: Optional[AbstractSensitivity] = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    solve_kwargs: tuple = eqx.field(static=True)

    def __init__(self, field, history, lags, t, solver=None, sensitivity=None, rtol=1e-6, atol=1e-6,
                 **solve_kwargs):
        from ._terms import _check_lags
        from .solvers import MethodOfSteps

        if not callable(field):
            raise TypeError(f"NeuralDDE(field, ...): `field` must be callable f(t, y, h, args); got "
                            f"{type(field).__name__}.")
        if lags is None:
            if not hasattr(field, "lags"):
                raise ValueError("NeuralDDE(lags=None) takes the lags from `field.lags`, but the field has no "
                                 "`lags` attribute; pass lags=(tau, ...).")
            _check_lags(field.lags)
        else:
            lags = _check_lags(lags)
        self.field = field
        self.history = history
        self.lags = lags
        self.t = _static_times(t)
        self.solver = MethodOfSteps(Tsit5()) if solver is None else solver
        self.sensitivity = sensitivity
        self.rtol = rtol
        self.atol = atol
        self.solve_kwargs = tuple(sorted(solve_kwargs.items()))

    def __call__(self, y0, args: Any = None):
        import jax.numpy as jnp

        from ._terms import DDETerm

        lags = self.field.lags if self.lags is None else self.lags
        sol = solve(
            DDETerm(self.field, self.history, lags), self.solver, y0, jnp.asarray(self.t), args=args,
            sensitivity=self.sensitivity, rtol=self.rtol, atol=self.atol, **dict(self.solve_kwargs),
        )
        return sol.ys
