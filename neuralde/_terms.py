"""Terms: the user's differential equation, as a pytree so that any arrays it
holds (for example the parameters of an `eqx.Module` vector field) are leaves
that gradients reach."""
from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax.tree_util as jtu
import numpy as np
from jax.flatten_util import ravel_pytree


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


_NOISE_TYPES = ("diagonal", "scalar", "additive", "general")


class SDETerm(AbstractTerm):
    """An Itô stochastic differential equation
    ``dy = drift(t, y, args) dt + diffusion(t, y, args) dW``.

    ``noise`` says how ``diffusion`` meets the Brownian motion ``W``:

    * ``"diagonal"``: ``diffusion`` returns the structure of ``y``; one
      independent Brownian motion per component, ``dy_i = ... + g_i dW_i``.
    * ``"scalar"``: ``diffusion`` returns the structure of ``y``; one Brownian
      motion shared by every component, ``dy_i = ... + g_i dW``.
    * ``"additive"``: like ``"diagonal"``, but ``diffusion`` must not depend on
      ``y`` (it may depend on ``t`` and ``args``); `SRA1` exploits this.
    * ``"general"``: ``diffusion`` returns a matrix of shape ``(y.size,
      noise_dim)`` (``y`` raveled), driven by ``noise_dim`` independent
      Brownian motions.

    The Brownian path comes from the ``key`` given to `neuralde.solve`, through
    a virtual Brownian tree over ``[t[0], t[-1]]`` (`neuralde._brownian`) whose
    leaves are ``2**-brownian_levels`` of the span.
    """

    drift: Callable[[Any, Any, Any], Any]
    diffusion: Callable[[Any, Any, Any], Any]
    noise: str = eqx.field(static=True)
    noise_dim: Any = eqx.field(static=True)
    brownian_levels: int = eqx.field(static=True)
    #: Two uint32 words seeding the Brownian tree; set by `solve` from its key.
    seed: Any = None

    def __init__(self, drift, diffusion, noise: str = "diagonal", noise_dim=None, *, brownian_levels: int = 20,
                 seed=None):
        for name, fn in (("drift", drift), ("diffusion", diffusion)):
            if not callable(fn):
                raise TypeError(f"SDETerm({name}=...): expected a callable {name}(t, y, args); got {type(fn).__name__}.")
        if noise not in _NOISE_TYPES:
            raise ValueError(f"SDETerm(noise=...): expected one of {', '.join(map(repr, _NOISE_TYPES))}; got {noise!r}.")
        if noise == "general":
            if isinstance(noise_dim, bool) or not isinstance(noise_dim, (int, np.integer)) or noise_dim < 1:
                raise ValueError(
                    "SDETerm(noise='general') needs `noise_dim`, the number of independent Brownian motions (a "
                    f"positive integer; diffusion returns shape (y.size, noise_dim)); got noise_dim={noise_dim!r}."
                )
            noise_dim = int(noise_dim)
        elif noise_dim is not None:
            raise ValueError(
                f"SDETerm(noise={noise!r}) takes no `noise_dim` (it is implied by the noise type; only "
                f"noise='general' needs it); got noise_dim={noise_dim!r}."
            )
        if isinstance(brownian_levels, bool) or not isinstance(brownian_levels, (int, np.integer)) or not (
                1 <= brownian_levels <= 30):
            raise ValueError(f"SDETerm(brownian_levels=...): expected an integer in [1, 30]; got {brownian_levels!r}.")
        self.drift = drift
        self.diffusion = diffusion
        self.noise = noise
        self.noise_dim = noise_dim
        self.brownian_levels = int(brownian_levels)
        self.seed = seed

    def vf(self, t, y, args):
        return self.drift(t, y, args)

    def g(self, t, y, args):
        return self.diffusion(t, y, args)

    def noise_size(self, y) -> int:
        """Number of independent Brownian motions for a state like ``y``."""
        if self.noise in ("diagonal", "additive"):
            return sum(int(np.prod(leaf.shape)) for leaf in jtu.tree_leaves(y))
        if self.noise == "scalar":
            return 1
        return self.noise_dim

    def shape_noise(self, flat, y):
        """A flat vector of ``noise_size(y)`` numbers (an increment, or any
        coefficient built from increments) in the layout `noise_product`
        expects: the structure of ``y`` (diagonal/additive), a scalar
        (scalar), a ``(noise_dim,)`` vector (general)."""
        if self.noise in ("diagonal", "additive"):
            _, unravel = ravel_pytree(y)
            return unravel(flat)
        if self.noise == "scalar":
            return flat[0]
        return flat

    def noise_product(self, g, dw, y):
        """``g dW`` in the structure of ``y``: ``g`` from ``diffusion``, ``dw``
        laid out by `shape_noise`."""
        if self.noise in ("diagonal", "additive"):
            return jtu.tree_map(lambda a, b: a * b.astype(a.dtype), g, dw)
        if self.noise == "scalar":
            return jtu.tree_map(lambda a: a * dw.astype(a.dtype), g)
        flat_y, unravel = ravel_pytree(y)
        return unravel((g @ dw.astype(g.dtype)).astype(flat_y.dtype))

    def with_seed(self, seed) -> "SDETerm":
        return SDETerm(self.drift, self.diffusion, self.noise, self.noise_dim,
                       brownian_levels=self.brownian_levels, seed=seed)


def _check_lags(lags):
    """``lags`` as a tuple of scalars (numbers or arrays, so that gradients
    reach them); concrete values must be positive and finite."""
    import jax

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

    ``h(s)`` for ``s < t0`` is ``history(s)``. At ``t0`` itself it is the
    side of the step asking: ``history(t0)`` for a step that ends at
    ``t0 + lag``, ``y0`` (the solution's limit from the right) for one that
    starts there (its first stage recomputed, not reused from the step
    before), so that when ``y0`` differs from ``history(t0)`` -- the solution's
    derivative then jumps at ``t0 + lag``, where the steps land -- neither the
    solution nor its derivative with respect to ``y0`` loses an order.
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
