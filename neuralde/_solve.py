"""`solve`: validate, normalise dtypes, hand the loop to the sensitivity method,
package the `Solution`."""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Optional

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._controller import PIController
from ._loop import LoopConfig, build_program
from ._single_kernel import batched_innermost
from ._solution import Solution, status_messages
from ._brownian import seed_from_key
from ._terms import AbstractTerm, DDETerm, SDETerm
from .sensitivity import AbstractSensitivity, BacksolveAdjoint, CheckpointAdjoint, ReverseMode
from .solvers import AbstractSolver
from .solvers.delay import DEFAULT_HISTORY, MethodOfSteps


def solve(
    term: AbstractTerm,
    solver: AbstractSolver,
    y0: Any,
    t: Any,
    *,
    args: Any = None,
    sensitivity: Optional[AbstractSensitivity] = CheckpointAdjoint(),
    rtol: float = 1e-6,
    atol: float = 1e-6,
    dt0: Optional[float] = None,
    adaptive: bool = True,
    max_steps: int = 4096,
    key: Any = None,
    dense: bool = False,
    throw: bool = True,
    progress: bool = False,
) -> Solution:
    """Solve a differential equation and return the state at every time in ``t``.

    Args:
        term: the equation, e.g. ``ODETerm(f)`` with ``f(t, y, args)``.
        solver: e.g. ``Tsit5()``; must fit the term.
        y0: initial state: an array of any shape or a pytree of arrays. Its
            floating dtype (float32/float64) is the dtype of the solve; integer
            states are converted to the default float dtype.
        t: 1-D save times, strictly increasing or strictly decreasing; ``t[0]``
            is the initial and ``t[-1]`` the final time.
        args: any pytree passed to the vector field; differentiable.
        sensitivity: how gradients are computed: `CheckpointAdjoint()` (the
            default; ``None`` means the same), `ReverseMode()`, `ForwardMode()`
            or `BacksolveAdjoint()`. The two adjoints are reverse-mode rules
            (`jax.custom_vjp`); when `solve` is called under forward-mode
            differentiation (`jax.jvp`, `jax.jacfwd`, `jax.linearize`; not
            the outer `jax.jacfwd` of `jax.hessian`, which differentiates the
            custom rule itself: see `_autodiff_sensitivity`), it differentiates
            the steps taken directly instead, as `ForwardMode` does. A
            transformation applied outside a `jax.jit` (or `lax.scan`,
            `jax.checkpoint`, ...) that encloses `solve` is not visible to it:
            for `jax.jvp(jax.jit(f))` pass ``sensitivity=ForwardMode()`` or
            ``ReverseMode()`` explicitly, or apply `jax.jit` outside `jax.jvp`
            (`jax.jit(lambda x: jax.jvp(f, ...))`).
        rtol, atol: tolerances of the adaptive step-size controller.
        dt0: initial step (adaptive solvers; chosen automatically if ``None``) or
            the fixed step (fixed-step solvers, ``adaptive=False``). Its sign is
            ignored: the direction comes from ``t``.
        adaptive: ``False`` takes fixed steps of ``dt0`` with any solver.
        max_steps: bound on the number of steps, accepted plus rejected.
        key: a `jax.random` key; required for an `SDETerm` (the Brownian path
            is a deterministic function of it and of ``t[0]``, ``t[-1]``);
            ignored by other terms.
        dense: keep the dense output for `Solution.evaluate`.
        throw: raise a runtime error if the solve fails (otherwise only
            ``Solution.status`` reports it).
        progress: show a meter of the fraction of ``[t0, t1]`` done.
    """
    if sensitivity is None:
        sensitivity = CheckpointAdjoint()
    _check_types(term, solver, sensitivity)
    t = _as_times(t)
    if isinstance(term, SDETerm):
        term = _attach_key(term, solver, sensitivity, key, t)
    y0 = _as_state(y0)
    if isinstance(term, DDETerm):
        _check_delay(term, t, y0, args)
    _check_values(rtol, atol, dt0, max_steps)
    adaptive = bool(adaptive) and solver.adaptive
    if adaptive:
        _warn_unreachable_tolerance(rtol, _time_dtype(y0))
    if not adaptive and dt0 is None:
        if solver.adaptive:
            raise ValueError(
                "`dt0` is required with adaptive=False: it is the fixed step size. "
                f"Got dt0=None for {type(solver).__name__}()."
            )
        raise ValueError(
            f"`dt0` is required: {type(solver).__name__}() is a fixed-step solver and dt0 is its step "
            "size. Pass e.g. dt0=0.01, or use an adaptive solver such as Tsit5()."
        )
    if isinstance(term, DDETerm) and not adaptive:
        solver = _history_for_fixed_steps(solver, term, dt0)
    # Numbers become (weakly typed) arrays so that a new tolerance or step size
    # does not recompile the solve.
    rtol, atol = _as_scalar(rtol), _as_scalar(atol)
    dt0 = None if dt0 is None else _as_scalar(dt0)
    sensitivity = _autodiff_sensitivity(sensitivity)
    return _solve_jit(
        term, solver, y0, t, args, sensitivity, rtol, atol, dt0,
        adaptive=adaptive, max_steps=int(max_steps), dense=bool(dense), throw=bool(throw),
        progress=bool(progress), lanes=_vmap_lanes((y0, args)), buffer_lanes=_vmap_lanes((y0, args, key)),
        lanes_innermost=_lanes_innermost((y0, args, key)),
    )


@eqx.filter_jit
def _solve_jit(term, solver, y0, t, args, sensitivity, rtol, atol, dt0, *, adaptive, max_steps, dense, throw, progress,
               lanes=1, buffer_lanes=1, lanes_innermost=False):
    time_dtype = _time_dtype(y0)
    ts = t.astype(time_dtype)
    _check_vector_field(term, ts[0], y0, args)
    if isinstance(term, SDETerm):
        _check_diffusion(term, ts[0], y0, args)
        ts = eqx.error_if(ts, ts[-1] < ts[0], "SDEs are solved forward in time: `t` must be increasing.")
    if dt0 is not None:
        dt0 = jnp.abs(jnp.asarray(dt0, time_dtype))
    config = LoopConfig(
        solver=solver,
        controller=_controller_for(solver),
        adaptive=adaptive,
        max_steps=max_steps,
        dense=dense,
        progress=progress,
        throw=throw,
        lanes=lanes,
        buffer_lanes=buffer_lanes,
        lanes_innermost=lanes_innermost and buffer_lanes > 1,
    )

    def build(inputs, **overrides):
        term_, y0_, args_, ts_, rtol_, atol_, dt0_ = inputs
        return build_program(term_, y0_, args_, ts_, rtol_, atol_, dt0_, config=config._replace(**overrides))

    build.config = config  # what a sensitivity method may read (e.g. whether the user asked for dense output)

    (ys, history), (stats, status) = sensitivity.run(build, (term, y0, args, ts, rtol, atol, dt0))
    # Counters and status are integers: no derivative (a custom rule may still
    # attach zero tangents to them, which the error check cannot take).
    stats, status = lax.stop_gradient((stats, status))
    if throw:
        ys, status = eqx.branched_error_if((ys, status), status != 0, status, status_messages())
    direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(time_dtype)
    return Solution(ts=ts, ys=ys, stats=stats, status=status, dense_history=history, direction=direction)


def _controller_for(solver) -> PIController:
    beta1, beta2 = solver.pi_coefficients
    return PIController(beta1=beta1, beta2=beta2)


def _vmap_lanes(tree) -> int:
    """How many lanes of enclosing `jax.vmap`s the solve stands for (1 outside
    `vmap`; the product over nested ones), read off the batching tracers of
    ``y0`` and ``args``. Only buffer sizes depend on it. A `vmap` outside a
    `jax.jit` that encloses the solve is not visible here (the jitted function
    is traced for one lane): it counts 1."""
    try:
        from jax._src.interpreters.batching import BatchTracer
    except ImportError:  # pragma: no cover - JAX internals moved
        return 1
    lanes = 1
    for x in jtu.tree_leaves(tree):
        n = 1
        while isinstance(x, BatchTracer):
            dim, val = getattr(x, "batch_dim", None), getattr(x, "val", None)
            if val is None:  # pragma: no cover - JAX internals moved
                break
            if isinstance(dim, int):
                n *= val.shape[dim]
            x = val
        lanes = max(lanes, n)
    return lanes


def _lanes_innermost(tree) -> bool:
    """Whether the innermost transformation `solve` is called under is a
    `jax.vmap` that batches a leaf of ``tree`` (``y0``, ``args``, an SDE's
    ``key``: an ensemble of paths). Then any
    differentiation is of the batched solve as a whole (`jax.grad` of a
    `jax.vmap`, or a `jax.jit` around the `vmap`): the cotangent of an input
    the lanes share is the sum of theirs. Not under `jax.vmap` of `jax.grad`,
    where the linearisation is innermost and each lane keeps its own. False
    if JAX's internals moved."""
    return any(batched_innermost(x) for x in jtu.tree_leaves(tree))


class _DirectForward(AbstractSensitivity):
    """The solve's while loop with no custom rule: JAX's forward mode goes
    through the steps actually taken, one tangent per direction (the
    derivative `ForwardMode` computes, without building the whole Jacobian
    first). What `_autodiff_sensitivity` runs a custom-VJP sensitivity as under
    forward-mode differentiation only; the loop cannot be reverse-differentiated."""

    def run(self, build, inputs):
        return build(inputs).run_while()


def _autodiff_modes() -> tuple:
    """The automatic-differentiation transformations `solve` is called under,
    innermost first: ``"fwd"`` for `jax.jvp` (also inside `jax.jacfwd`);
    ``"rev"`` for the linearisation of `jax.grad`/`jax.vjp`/`jax.jacrev` (a
    `LinearizeTrace` with ``is_vjp``, which is transposed); ``"lin"`` for that
    of `jax.linearize` (a `LinearizeTrace` without, whose linear function is
    evaluated forwards). Read off JAX's trace stack: `jax.vmap`s between them
    are skipped; the walk stops at the first other
    trace (a `jax.jit`, `lax.scan`, `jax.checkpoint`, ... being traced: what
    encloses it is unknown here, and its trace is cached and reused under any
    transformation). Empty outside any, or if JAX's internals moved."""
    try:
        from jax._src import core as jax_core
        from jax._src.interpreters.ad import JVPTrace, LinearizeTrace
        from jax._src.interpreters.batching import BatchTrace
    except ImportError:  # pragma: no cover - JAX internals moved
        return ()
    modes = []
    trace = getattr(getattr(jax_core, "trace_ctx", None), "trace", None)
    while trace is not None:
        if isinstance(trace, JVPTrace):
            modes.append("fwd")
        elif isinstance(trace, LinearizeTrace):
            modes.append("rev" if getattr(trace, "is_vjp", True) else "lin")
        elif not isinstance(trace, BatchTrace):
            break
        trace = getattr(trace, "parent_trace", None)
    return tuple(modes)


def _autodiff_sensitivity(sensitivity):
    """The sensitivity method that can take the transformations `solve` is
    called under. `CheckpointAdjoint` and `BacksolveAdjoint` are `jax.custom_vjp`
    rules, which JAX cannot differentiate in forward mode. Under `jax.jvp`s
    only (`jax.jacfwd` included) the plain loop (`_DirectForward`) runs
    instead. When a reverse-mode linearisation is innermost and no other one
    is further out (`jax.grad`, `jax.jacrev`, and
    forward over reverse: `jax.hessian`, `jax.jvp(jax.grad(f))`), the custom
    rule stays: its forward and backward passes are ordinary JAX code, which
    the outer forward-mode transformations differentiate. Any other mix with a
    forward mode (reverse over forward, `jax.grad(jax.jvp(...))`; two reverse
    modes and a forward one; `jax.linearize`, whose linearisation of a
    `while_loop` JAX cannot make) runs `ReverseMode`, whose bounded loop is
    differentiable to any order. Without a forward mode nothing changes (reverse
    over reverse, `jax.grad(jax.grad(...))`, is not supported by the custom
    rules; pass ``sensitivity=ReverseMode()`` for it).

    A transformation counts whether or not it differentiates this solve's
    inputs (a closed-over traced array is not visible from here): an unrelated
    `jax.jvp` further out only costs the plain loop or `ReverseMode`."""
    if not isinstance(sensitivity, (CheckpointAdjoint, BacksolveAdjoint)):
        return sensitivity
    modes = _autodiff_modes()
    if "fwd" not in modes and "lin" not in modes:
        return sensitivity
    if all(m == "fwd" for m in modes):
        return _DirectForward()
    if modes[0] == "rev" and all(m == "fwd" for m in modes[1:]):
        return sensitivity
    return ReverseMode()


# --------------------------------------------------------------------- checks


def _check_types(term, solver, sensitivity):
    if not isinstance(term, AbstractTerm):
        hint = " Wrap the function: nde.ODETerm(f)." if callable(term) else ""
        raise TypeError(f"`term` must be a neuralde term such as ODETerm(f); got {type(term).__name__}.{hint}")
    if not isinstance(solver, AbstractSolver):
        hint = " Instantiate it: e.g. Tsit5() rather than Tsit5." if isinstance(solver, type) else ""
        raise TypeError(f"`solver` must be a neuralde solver such as Tsit5(); got {solver!r}.{hint}")
    kind = type(term).__name__
    if kind == "DDETerm" and "DDETerm" not in solver.term_kinds:
        raise TypeError(
            f"`solver` must be MethodOfSteps(...) for a DDETerm; got {type(solver).__name__}(). "
            f"Wrap the ODE solver: MethodOfSteps({type(solver).__name__}())."
        )
    if "DDETerm" in solver.term_kinds and kind != "DDETerm":
        raise TypeError(
            f"`solver` MethodOfSteps(...) solves delay equations (DDETerm); got a {kind}. "
            "Pass the wrapped solver itself, e.g. Tsit5(), for an ODETerm."
        )
    if kind not in solver.term_kinds and not any(k in solver.term_kinds for k in _base_names(term)):
        raise TypeError(
            f"{type(solver).__name__}() cannot solve a {kind}: it accepts {', '.join(solver.term_kinds)}."
        )
    if not isinstance(sensitivity, AbstractSensitivity):
        hint = " Instantiate it: e.g. ReverseMode() rather than ReverseMode." if isinstance(sensitivity, type) else ""
        raise TypeError(
            f"`sensitivity` must be a neuralde sensitivity method such as CheckpointAdjoint() or ReverseMode(); "
            f"got {sensitivity!r}.{hint}"
        )


def _base_names(obj):
    return [c.__name__ for c in type(obj).__mro__]


def _as_times(t):
    if isinstance(t, (list, tuple)):
        t = np.asarray(t)
    if not hasattr(t, "shape") or not hasattr(t, "dtype"):
        raise TypeError(f"`t` must be a 1-D array of save times; got {type(t).__name__}.")
    if t.ndim != 1:
        raise ValueError(
            f"`t` must be a 1-D array of save times (t[0] initial, t[-1] final); got shape {tuple(t.shape)}. "
            "To solve over [t0, t1] only, pass jnp.array([t0, t1])."
        )
    if t.shape[0] < 2:
        raise ValueError(
            f"`t` needs at least 2 times (the initial and the final time); got {t.shape[0]}. "
            "Pass e.g. jnp.array([t0, t1])."
        )
    if not jnp.issubdtype(t.dtype, jnp.floating):
        if not jnp.issubdtype(t.dtype, jnp.integer):
            raise TypeError(f"`t` must hold real numbers; got dtype {t.dtype}.")
        t = jnp.asarray(t, dtype=jnp.result_type(float))
    return jnp.asarray(t)


def _as_state(y0):
    leaves, treedef = jtu.tree_flatten(y0)
    if not leaves:
        raise ValueError(f"`y0` must contain at least one array; got {y0!r}.")
    out = []
    for leaf in leaves:
        if isinstance(leaf, (str, bytes)) or not (hasattr(leaf, "dtype") or isinstance(leaf, (int, float, complex, bool))):
            raise TypeError(f"`y0` must be an array or a pytree of arrays; found a leaf of type {type(leaf).__name__}.")
        x = jnp.asarray(leaf)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            x = x.astype(jnp.result_type(float))
        out.append(x)
    return jtu.tree_unflatten(treedef, out)


def _as_scalar(x):
    if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool):
        return jnp.asarray(float(x))
    return x


def _history_for_fixed_steps(solver, term, dt0):
    """`MethodOfSteps(max_history=None)` sized for fixed steps of ``dt0``: a
    window of the largest lag holds about ``max(lags) / dt0`` steps (and a few
    more where breakpoints cut one), which a convergence study with small
    steps would overflow (status ``HISTORY_OVERFLOW``) in the default buffer.
    Only where ``dt0`` and the lags are known numbers; a ``max_history`` the
    caller chose is kept."""
    if not isinstance(solver, MethodOfSteps) or solver.max_history is not None or not _concrete(dt0) \
            or not all(_concrete(x) for x in term.lags):
        return solver
    step = abs(float(np.asarray(dt0)))
    lag = max(abs(float(np.asarray(x))) for x in term.lags)
    if not (step > 0 and math.isfinite(lag / step)):
        return solver
    need = math.ceil(lag / step) + 2 * len(term.lags) + 4
    return dataclasses.replace(solver, max_history=max(DEFAULT_HISTORY, need))


def _concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _check_values(rtol, atol, dt0, max_steps):
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is None:
            raise ValueError(f"`{name}` must be a positive number; got None.")
        if _concrete(tol):
            arr = np.asarray(tol)
            if arr.ndim != 0:
                raise ValueError(f"`{name}` must be a scalar; got shape {arr.shape}.")
            if not np.isfinite(arr) or arr <= 0:
                raise ValueError(f"`{name}` must be positive and finite; got {name}={arr.item()!r}.")
    if _concrete(dt0):
        arr = np.asarray(dt0)
        if arr.ndim != 0 or not np.isfinite(arr) or arr == 0:
            raise ValueError(f"`dt0` must be a non-zero finite scalar step size (or None); got dt0={dt0!r}.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive integer; got {max_steps!r}.")


def _warn_unreachable_tolerance(rtol, dtype):
    if not _concrete(rtol):
        return
    eps = float(jnp.finfo(dtype).eps)
    if float(np.asarray(rtol)) < eps:
        warnings.warn(
            f"rtol={float(np.asarray(rtol)):g} is below what {jnp.dtype(dtype).name} can resolve (machine epsilon "
            f"{eps:.1e}): rounding noise will look like error and the step size may collapse. Use rtol >= "
            f"{10 * eps:.0e}, or a float64 state (jax.config.update('jax_enable_x64', True)).",
            stacklevel=3,
        )


def _time_dtype(y0):
    dtypes = [jnp.finfo(leaf.dtype).dtype for leaf in jtu.tree_leaves(y0)]
    return jnp.result_type(*dtypes)


def _describe(tree):
    return jtu.tree_map(lambda x: f"{x.dtype}{list(x.shape)}", tree)


def _check_vector_field(term, t0, y0, args):
    out = _abstract_call(term.vf, args, t0, y0)
    want_def = jtu.tree_structure(y0)
    got_def = jtu.tree_structure(out)
    if want_def != got_def:
        raise ValueError(
            "The vector field must return the same pytree structure as `y0`; "
            f"y0 is {_describe(y0)} but the vector field returned {_describe(out)}."
        )
    for path, want, got in zip(_leaf_paths(y0), jtu.tree_leaves(y0), jtu.tree_leaves(out)):
        if tuple(want.shape) != tuple(got.shape):
            raise ValueError(
                f"The vector field returned shape {tuple(got.shape)} for {path}, but `y0` has shape "
                f"{tuple(want.shape)} there; dy/dt must have the shape of y."
            )
    _check_dtypes(out, y0, "vector field", "dy/dt")


def _leaf_paths(y0):
    return [jtu.keystr(p) or "y" for p, _ in jtu.tree_flatten_with_path(y0)[0]]


def _check_dtypes(out, y0, who, what):
    """``out`` (the structure of ``y0``) has ``y0``'s dtypes, leaf by leaf."""
    for path, want, got in zip(_leaf_paths(y0), jtu.tree_leaves(y0), jtu.tree_leaves(out)):
        if want.dtype != got.dtype:
            raise TypeError(
                f"The {who} returned dtype {got.dtype} for {path}, but `y0` has dtype {want.dtype}; "
                f"{what} must have the dtype of y. Cast the output (e.g. .astype(y.dtype)) or create y0 "
                f"with dtype {got.dtype}."
            )


# ----------------------------------------------------------------------- SDEs


def _attach_key(term, solver, sensitivity, key, t):
    """Check an SDE solve's key and noise/solver fit; return the term carrying
    the seed of its Brownian tree."""
    if key is None:
        raise ValueError(
            "`key` is required for an SDETerm: the Brownian path is generated from it. Pass e.g. "
            "key=jax.random.key(0) (the same key gives the same path)."
        )
    is_typed = hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    is_raw = hasattr(key, "dtype") and key.dtype == jnp.uint32 and tuple(key.shape) == (2,)
    if not (is_typed and key.shape == ()) and not is_raw:
        got = f"{type(key).__name__} with dtype {key.dtype} and shape {tuple(key.shape)}" if hasattr(key, "dtype") \
            else type(key).__name__
        raise TypeError(
            f"`key` must be one jax.random key (jax.random.key(0) or jax.random.PRNGKey(0)); got {got}. "
            "For an ensemble, vmap over keys: jax.vmap(lambda k: solve(..., key=k))(jax.random.split(key, n))."
        )
    noise_types = getattr(solver, "noise_types", ())
    if term.noise not in noise_types:
        raise TypeError(
            f"{type(solver).__name__}() cannot solve noise={term.noise!r}: it needs noise in "
            f"{', '.join(map(repr, noise_types))}. Use EulerMaruyama() (any noise)"
            + (", or SRA1() for additive noise." if term.noise == "additive" else ".")
        )
    if _concrete(t) and t.shape[0] >= 2 and not np.asarray(t)[-1] > np.asarray(t)[0]:
        raise ValueError("SDEs are solved forward in time: `t` must be increasing; got t[0] >= t[-1].")
    return term.with_seed(seed_from_key(key))


def _abstract_call(fn, args, *xs):
    """The output shapes of ``fn(*xs, args)``: only the arrays of ``args`` are
    abstract; strings, flags and callables in it are passed as they are."""
    args_dyn, args_static = eqx.partition(args, eqx.is_array)
    return jax.eval_shape(lambda a, *x: fn(*x, eqx.combine(a, args_static)), args_dyn, *xs)


def _same_layout(out, y0) -> bool:
    return jtu.tree_structure(out) == jtu.tree_structure(y0) and all(
        tuple(a.shape) == tuple(b.shape) for a, b in zip(jtu.tree_leaves(out), jtu.tree_leaves(y0)))


def _check_diffusion(term, t0, y0, args):
    out = _abstract_call(term.g, args, t0, y0)
    if term.noise == "general":
        size = sum(int(np.prod(leaf.shape)) for leaf in jtu.tree_leaves(y0))
        want = (size, term.noise_dim)
        if not hasattr(out, "shape") or tuple(out.shape) != want:
            got = _describe(out)
            raise ValueError(
                f"With noise='general' the diffusion must return a matrix of shape (y.size, noise_dim) = {want}; "
                f"got {got}."
            )
        dtype = jnp.result_type(*jtu.tree_leaves(y0))
        if out.dtype != dtype:
            raise TypeError(
                f"With noise='general' the diffusion returned a matrix of dtype {out.dtype}, but `y0` has dtype "
                f"{dtype}; it must have the dtype of y. Cast the output (e.g. .astype(y.dtype))."
            )
        return
    if not _same_layout(out, y0):
        raise ValueError(
            f"With noise={term.noise!r} the diffusion must return the structure and shapes of `y0` "
            f"({_describe(y0)}); got {_describe(out)}. For a (y.size, m) matrix use noise='general', noise_dim=m."
        )
    _check_dtypes(out, y0, "diffusion", "it")


def _check_delay(term, t, y0, args):
    if _concrete(t):
        t_np = np.asarray(t)
        if t_np[-1] < t_np[0]:
            raise ValueError(
                "`t` must be increasing for a DDETerm: delay equations are solved forward in time from "
                f"their history; got t from {float(t_np[0])} to {float(t_np[-1])}."
            )
    out = _abstract_call(term.history, args, t[0])
    if not _same_layout(out, y0):
        raise ValueError(
            "DDETerm `history(s, args)` must return the structure and shapes of `y0`; "
            f"y0 is {_describe(y0)} but history returned {_describe(out)}."
        )
