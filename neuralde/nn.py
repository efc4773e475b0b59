"""Neural differential equations as Equinox modules."""
from __future__ import annotations

from typing import Any, Callable, Optional

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._solve import solve
from ._terms import DDETerm, ODETerm, SDETerm, _check_lags
from .sensitivity import AbstractSensitivity, CheckpointAdjoint
from .solvers import SRIW1, AbstractSolver, MethodOfSteps, Tsit5


def _static_times(t) -> tuple:
    # The save times are fixed data of the layer, not trainable parameters:
    # keep them out of the pytree leaves that optimisers update.
    arr = np.asarray(t)
    if arr.ndim != 1:
        raise ValueError(f"`t` must be a 1-D array of save times; got shape {arr.shape}.")
    return tuple(float(x) for x in arr)


# The keyword arguments of `solve` that a layer passes through unchanged; the
# rest (term, y0, t, args, solver, sensitivity, rtol, atol) it sets itself.
_PASS_THROUGH = ("dt0", "adaptive", "max_steps", "dense", "throw", "progress")


def _solve_options(layer: str, options: dict) -> tuple:
    unknown = sorted(set(options) - set(_PASS_THROUGH))
    if unknown:
        raise TypeError(
            f"{layer}(...) got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"it takes the solve options {', '.join(_PASS_THROUGH)}."
        )
    # Stored as a static, hashable tuple: they select the compiled program.
    return tuple(sorted(options.items()))


class NeuralODE(eqx.Module):
    """``dy/dt = field(t, y, args)`` as a layer: ``model(y0, args=None)``
    returns the states at ``t`` (leading axis ``len(t)``, the structure of ``y0``).

    ``field`` is any callable ``field(t, y, args)``, usually an `eqx.Module`
    whose floating-point arrays are the trained parameters; ``t``, the solver,
    the sensitivity method and the tolerances are static (never trained).
    Keyword arguments of `neuralde.solve` that the layer does not set itself
    (``dt0``, ``adaptive``, ``max_steps``, ``dense``, ``throw``, ``progress``)
    are taken at construction and passed to every solve.

    Batches: ``jax.vmap(model)(y0_batch)``. Training: any Equinox/Optax loop,
    e.g. ``eqx.filter_value_and_grad(loss)(model, ...)``; gradients reach the
    field's parameters, ``y0`` and ``args`` under every sensitivity method.
    To evaluate a trained field at other times or tolerances, build a new layer
    around it: ``NeuralODE(model.field, new_t, rtol=1e-3)``.
    """

    field: Callable
    t: tuple = eqx.field(static=True)
    solver: AbstractSolver = eqx.field(static=True)
    sensitivity: AbstractSensitivity = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    solve_kwargs: tuple = eqx.field(static=True)

    def __init__(
        self,
        field: Callable,
        t: Any,
        solver: Optional[AbstractSolver] = None,
        sensitivity: Optional[AbstractSensitivity] = None,
        rtol: float = 1e-6,
        atol: float = 1e-6,
        **solve_kwargs: Any,
    ):
        if not callable(field):
            raise TypeError(f"NeuralODE(field, ...): `field` must be callable f(t, y, args); got {type(field).__name__}.")
        self.field = field
        self.t = _static_times(t)
        self.solver = Tsit5() if solver is None else solver
        self.sensitivity = CheckpointAdjoint() if sensitivity is None else sensitivity
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.solve_kwargs = _solve_options("NeuralODE", solve_kwargs)

    def __call__(self, y0: Any, args: Any = None) -> Any:
        sol = solve(
            ODETerm(self.field), self.solver, y0, jnp.asarray(self.t), args=args,
            sensitivity=self.sensitivity, rtol=self.rtol, atol=self.atol, **dict(self.solve_kwargs),
        )
        return sol.ys


class NeuralSDE(eqx.Module):
    """The Itô SDE ``dy = drift(t, y, args) dt + diffusion(t, y, args) dW`` as
    a layer: ``model(y0, key, args=None)`` returns the states at ``t`` on the
    Brownian path drawn from ``key`` (leading axis ``len(t)``).

    ``drift`` and ``diffusion`` are callables, usually `eqx.Module`s whose
    parameters are trained; ``noise`` is as in `SDETerm` (``noise_dim`` for
    ``"general"`` goes in the keyword arguments). Ensembles:
    ``jax.vmap(lambda k: model(y0, k))(jax.random.split(key, n))``. Gradients
    are those of the computed path for the fixed key (`CheckpointAdjoint` by
    default; `ReverseMode` and `ForwardMode` also work; `BacksolveAdjoint`
    is the stochastic adjoint, memory O(1) in the steps, approximate to its
    backward solve's step). ``rtol``/``atol`` default to 1e-3: a strong
    error of 1e-6 takes SRIW1 thousands of steps per path. Extra keyword
    arguments (``max_steps``, ``adaptive``, ``throw``...) are passed on.
    """

    drift: Callable
    diffusion: Callable
    t: tuple = eqx.field(static=True)
    noise: str = eqx.field(static=True)
    solver: AbstractSolver = eqx.field(static=True)
    sensitivity: Optional[AbstractSensitivity] = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    dt0: Optional[float] = eqx.field(static=True)
    noise_dim: Optional[int] = eqx.field(static=True)
    solve_kwargs: tuple = eqx.field(static=True)

    def __init__(self, drift, diffusion, t, noise="diagonal", solver=None, sensitivity=None, rtol=1e-3,
                 atol=1e-3, dt0=None, noise_dim=None, **solve_kwargs):
        # Validates drift, diffusion, noise and noise_dim now rather than at the first call.
        SDETerm(drift, diffusion, noise, noise_dim)
        self.drift = drift
        self.diffusion = diffusion
        self.t = _static_times(t)
        self.noise = noise
        self.solver = SRIW1() if solver is None else solver
        self.sensitivity = sensitivity
        self.rtol = rtol
        self.atol = atol
        self.dt0 = dt0
        self.noise_dim = noise_dim
        self.solve_kwargs = _solve_options("NeuralSDE", solve_kwargs)

    def __call__(self, y0, key, args: Any = None):
        term = SDETerm(self.drift, self.diffusion, self.noise, self.noise_dim)
        sol = solve(
            term, self.solver, y0, jnp.asarray(self.t), args=args, key=key, sensitivity=self.sensitivity,
            rtol=self.rtol, atol=self.atol, dt0=self.dt0, **dict(self.solve_kwargs),
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
        self.solve_kwargs = _solve_options("NeuralDDE", solve_kwargs)

    def __call__(self, y0, args: Any = None):
        lags = self.field.lags if self.lags is None else self.lags
        sol = solve(
            DDETerm(self.field, self.history, lags), self.solver, y0, jnp.asarray(self.t), args=args,
            sensitivity=self.sensitivity, rtol=self.rtol, atol=self.atol, **dict(self.solve_kwargs),
        )
        return sol.ys
