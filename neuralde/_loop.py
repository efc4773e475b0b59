"""The integration loop, written once.

One iteration attempts one step: solver step -> error estimate -> controller ->
accept or reject -> save. The loop is parameterised by

* the solver (`neuralde.solvers`), which only knows how to take one step, and
* the loop kind:
  - ``"while"``: a plain `lax.while_loop`; the points of ``t`` that an accepted
    step passes are filled in by a small inner `lax.while_loop` on the step's
    dense-output polynomial (no step is shortened to hit a save time). Used for
    the forward pass of every method that does not backpropagate through the
    loop, and for forward-mode derivatives. On small problems XLA:CPU
    compiles it as one kernel (`neuralde._single_kernel`).
  - ``"bounded"``: nested `lax.scan`s (see `bounded_while_loop`) that
    reverse-mode autodiff can traverse; blocks of iterations are skipped with
    `lax.cond` once the solve has finished, so the cost follows the steps
    actually taken. Each iteration either takes a step or saves one pending
    point of ``t``; its body is wrapped in `jax.checkpoint`, and the output
    buffers are written outside the checkpoint, so reverse mode stores one small
    carry per iteration rather than every intermediate value or the buffers.

Time runs forward inside the loop: for decreasing ``t`` the loop integrates in
``s = -t`` with the vector field negated (`Problem`).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from . import _progress
from . import _brownian
from ._controller import PIController, all_finite, initial_step, scaled_error
from ._interpolation import DenseHistory, evaluate_polynomial
from ._single_kernel import single_kernel
from ._solution import Status
from .solvers.base import StepInfo

# A fixed-step attempt that the solver reports as failed (a Newton iteration
# that did not converge) cannot be retried with a smaller step.
_FAILED_FIXED_STATUS = Status.STEP_SIZE_TOO_SMALL


class Problem:
    """What a solver step sees of the user's problem, in the loop's forward time
    ``s = direction * t``. Later families extend it (Brownian increments for
    SDEs, the dense history for delay equations)."""

    def __init__(self, term, args, direction, rtol=None, atol=None, span=None, reverse_steps=False,
                 vjp_steps=False, tree_restart=False, adaptive=True):
        self.term = term
        self.args = args
        self.direction = direction
        # The solve's tolerances, for solvers with inner iterations (the Newton
        # iteration of implicit methods stops relative to them).
        self.rtol = rtol
        self.atol = atol
        #: (s_start, s_end): the loop-time interval of the solve.
        self.span = span
        #: Whether the loop reads the steps' dense-output polynomials (solvers
        #: may skip computing them when it does not).
        self.dense_output = True
        #: Whether the steps are differentiated in reverse mode (`LoopConfig`):
        #: a loop inside a step must then be made of scans.
        self.reverse_steps = reverse_steps
        #: Whether the steps are differentiated by `jax.vjp` alone, never
        #: `jax.jvp` (`LoopConfig`): such a loop may then be a `custom_vjp`
        #: (`stored_while_loop`).
        self.vjp_steps = vjp_steps
        #: Whether the Brownian tree's caches keep their nodes, so that each
        #: descent reuses the previous one's top levels and stops where its
        #: point is a node's boundary (`_brownian.PointCache`): where the step
        #: times are shared -- outside a `jax.vmap` that `solve` sees (a
        #: `vmap` over keys alone is not one), or with fixed steps. Lanes of
        #: adaptive steps scatter in time, and would skip little.
        self.tree_restart = tree_restart
        #: Whether the steps are chosen by error control: a solver whose step
        #: can fail (a Newton iteration) cannot be retried shorter without it.
        self.adaptive = adaptive

    def vf(self, s, y):
        d = self.direction
        out = self.term.vf(d * s, y, self.args)
        return jtu.tree_map(lambda o: d.astype(o.dtype) * o, out)

    # --- SDEs (`SDETerm`; solved forward in time only, `solve` checks) ---

    def diffusion(self, s, y):
        return self.term.g(s, y, self.args)

    def brownian(self, s0, s1, y):
        """``(dW, H)`` over ``[s0, s1]``: the Brownian increment and its
        space-time Lévy area, laid out for ``term.noise_product``. The path is
        fixed by the term's seed and the span; it is data, not differentiated."""
        t0, t1, s0, s1 = lax.stop_gradient((*self.span, s0, s1))
        n = self.term.noise_size(y)
        dw, h = _brownian.increment(self.term.seed, t0, t1, s0, s1, n, self.term.brownian_levels, s0.dtype)
        return self.term.shape_noise(dw, y), self.term.shape_noise(h, y)

    def brownian_start(self, s0, y):
        """The Brownian tree's cache of time ``s0`` (a solver's state), so that
        each step descends the tree once, for its new end (`brownian_step`)."""
        t0, t1, s0 = lax.stop_gradient((*self.span, s0))
        return _brownian.point(self.term.seed, t0, t1, s0, self.term.noise_size(y), self.term.brownian_levels,
                               s0.dtype, keep_nodes=self.tree_restart)

    def brownian_step(self, cache, s1, y):
        """``(dW, H, cache of s1)`` over ``[s0, s1]`` from the cache of ``s0``."""
        # The cache is data (the path), carried in the loop's float carry: no
        # derivative flows through it, so none is traced through the descent.
        t0, t1, s1, cache = lax.stop_gradient((*self.span, s1, cache))
        dw, h, cache1 = _brownian.increment_from(self.term.seed, t0, t1, cache, s1, self.term.noise_size(y),
                                                 self.term.brownian_levels, s1.dtype)
        return self.term.shape_noise(dw, y), self.term.shape_noise(h, y), cache1


class LoopConfig(NamedTuple):
    """Static settings of one solve."""

    solver: Any
    controller: PIController
    adaptive: bool
    max_steps: int
    dense: bool
    progress: bool
    #: Raise (True) or only report failures; adjoints read it for their backward solves.
    throw: bool = True
    #: Optional norm of the scaled error pytree (default: RMS over every
    #: element); the adjoint solve uses a mixed norm or seminorm.
    error_norm: Any = None
    #: How many `jax.vmap` lanes the solve stands for (seen by `solve` on
    #: ``y0`` and ``args``; 1 outside `vmap`): the loops mask finished lanes
    #: by it.
    lanes: int = 1
    #: The lanes counted for buffer sizes: also those of a `vmap` over an
    #: SDE's keys alone (an ensemble), which ``lanes`` leaves out (the loops
    #: run as for one solve) but which each hold their own buffers.
    buffer_lanes: int = 1
    #: Whether the `jax.vmap` that batches ``y0`` or ``args`` is the innermost
    #: transformation `solve` is called under (`_solve._lanes_innermost`): its
    #: shared inputs' cotangents are then sums over the lanes, which
    #: `CheckpointAdjoint`'s backward steps may form inside their products.
    lanes_innermost: bool = False
    #: False: the initial carry's step size (with ``dt0=None``) is a zero
    #: placeholder, not the initial step selection, which evaluates the vector
    #: field: for a backward pass that needs the step functions and the
    #: derivative of the initial carry (the step size has none), not its value.
    initial_step: bool = True
    #: True where the steps are differentiated in reverse mode (`ReverseMode`'s
    #: loop, `CheckpointAdjoint`'s backward steps): a solver's loops inside a
    #: step must then be fixed-length scans, which reverse mode can traverse;
    #: elsewhere they may be `lax.while_loop`s, which stop when they are done.
    reverse_steps: bool = False
    #: True where the steps are differentiated by `jax.vjp` and never by
    #: `jax.jvp` (`CheckpointAdjoint`'s backward steps, inside its own
    #: `custom_vjp`): a loop inside a step may then be a `stored_while_loop`.
    #: `ReverseMode`'s loop can be forward-differentiated (forward over
    #: reverse) and keeps scans.
    vjp_steps: bool = False


class _Core(NamedTuple):
    t: jax.Array
    y: Any
    dt: jax.Array
    solver_state: Any
    err_prev: jax.Array
    rejected_last: jax.Array
    save_idx: jax.Array
    num_steps: jax.Array
    num_rejected: jax.Array
    num_fevals: jax.Array
    status: jax.Array
    last: Any  # (t0, y0, coeffs) of the last accepted step, for saving
    extra: tuple = ()  # the solver's own counters (`AbstractSolver.stat_names`)


def _pack(core: _Core):
    """The carry of the while loops, with the scalars gathered into two small
    arrays: every separate buffer of a loop carry costs a copy each time the
    inner loop is entered, which dominated saving at many times."""
    floats = jnp.stack([core.t, core.dt, core.err_prev, core.last[0]])
    ints = jnp.stack([core.save_idx, core.num_steps, core.num_rejected, core.num_fevals, core.status,
                      core.rejected_last.astype(jnp.int32), *core.extra])
    return floats, ints, core.y, core.solver_state, core.last[1], core.last[2]


def _unpack(packed) -> _Core:
    floats, ints, y, solver_state, last_y0, last_coeffs = packed
    return _Core(
        t=floats[0], y=y, dt=floats[1], solver_state=solver_state, err_prev=floats[2],
        rejected_last=ints[5].astype(bool), save_idx=ints[0], num_steps=ints[1], num_rejected=ints[2],
        num_fevals=ints[3], status=ints[4], last=(floats[3], last_y0, last_coeffs),
        extra=tuple(ints[6 + i] for i in range(ints.shape[0] - 6)),
    )


class _Flat:
    """A pytree of arrays as one flat array per dtype (the leaves raveled and
    concatenated), and back. A while loop over the flat form carries a few
    buffers instead of one per leaf: XLA writes each leaf of a loop's output
    with its own kernel, and on small states those kernels, not the
    arithmetic, are the cost of an iteration."""

    def __init__(self, tree):
        leaves, self.treedef = jtu.tree_flatten(tree)
        self.dtypes = []
        self.layout = []  # per leaf: (group, offset, shape)
        sizes = []
        for x in leaves:
            dt = jnp.result_type(x)
            if dt not in self.dtypes:
                self.dtypes.append(dt)
                sizes.append(0)
            g = self.dtypes.index(dt)
            self.layout.append((g, sizes[g], jnp.shape(x)))
            sizes[g] += math.prod(jnp.shape(x))

    def flatten(self, tree):
        leaves = jtu.tree_leaves(tree)
        groups = [[] for _ in self.dtypes]
        for x, (g, _, _) in zip(leaves, self.layout):
            groups[g].append(jnp.ravel(x))
        return tuple(jnp.concatenate(p) if len(p) > 1 else p[0] for p in groups)

    def unflatten(self, flat):
        leaves = [lax.slice_in_dim(flat[g], o, o + math.prod(shape)).reshape(shape) for g, o, shape in self.layout]
        return jtu.tree_unflatten(self.treedef, leaves)


class _Step(NamedTuple):
    accept: jax.Array
    t0: jax.Array
    t1: jax.Array
    y0: Any
    y1: Any
    coeffs: Any


def _tree_where(pred, a, b):
    return jtu.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def _interpolate(s, t0, t1, y0, y1, coeffs):
    if coeffs is None:
        # No polynomial (saves at the ends of the span only): ``s`` is the
        # step's end.
        return y1
    # Before the first step t1 == t0 (an unselected save under `jax.vmap`,
    # where `cond` becomes `select`): divide by a safe span so that no 0/0
    # reaches the value or, through zero cotangents, the gradients.
    span = t1 - t0
    moved = span != 0
    theta = jnp.where(moved, (s - t0) / jnp.where(moved, span, 1), 0)
    val = evaluate_polynomial(y0, coeffs, theta)
    # The end of a step is the step's own solution, not its interpolant's
    # rounding of it; its derivative is the polynomial's, which accounts for a
    # step end that moves with the inputs (a delay's breakpoint).
    end = jtu.tree_map(lambda y, v: lax.stop_gradient(y) + (v - lax.stop_gradient(v)), y1, val)
    return _tree_where(s == t1, end, val)


def _write(buffers, idx, values, valid=True):
    """``buffers[idx] = values`` where ``valid`` (else unchanged). A dynamic-update
    of one row: XLA does it in place, where a scatter with dropped indices
    copies the buffer on CPU."""

    def leaf(b, v):
        i = jnp.clip(idx, 0, b.shape[0] - 1)
        if valid is not True:
            v = jnp.where(valid, v, lax.dynamic_index_in_dim(b, i, 0, keepdims=False))
        return lax.dynamic_update_index_in_dim(b, v.astype(b.dtype), i, 0)

    return jtu.tree_map(leaf, buffers, values)


def bounded_while_loop(cond_fun, body_fun, init, max_iters: int, guard_leaf: bool = True):
    """``lax.while_loop`` semantics, at most ``max_iters`` iterations, built from
    nested `lax.scan`s so that reverse-mode autodiff works.

    The iterations are split into ``depth`` levels of ``base`` each
    (``base**depth >= max_iters``); every level checks ``cond_fun`` first and
    skips its whole block with `lax.cond` when the loop has finished, so the
    cost follows the iterations actually run (outside `jax.vmap`, where `cond`
    becomes `select`). ``body_fun`` must handle its own checkpointing of
    expensive parts; its carry may hold buffers that only receive writes.
    """
    lengths = _level_lengths(max_iters)

    def leaf(carry):
        return lax.cond(cond_fun(carry), body_fun, lambda c: c, carry)

    # ``guard_leaf=False``: the body checks ``cond_fun`` itself (inside its own
    # checkpoint, so that loop-invariant inputs are not stored per iteration).
    fn = leaf if guard_leaf else body_fun
    for length in lengths:
        fn = _make_block(fn, length, cond_fun)
    return fn(init)


def stored_while_loop(cond_fun, body_fun, init, max_iters: int):
    """``lax.while_loop`` semantics, at most ``max_iters`` iterations, with a
    reverse-mode derivative (`jax.custom_vjp`; `jax.vjp` only, no `jax.jvp`)
    that stores the carry before each iteration and walks back through them,
    one iteration's vjp at a time.

    One copy of ``body_fun`` forward and one of its vjp backward, and nothing
    for the iterations not run: `bounded_while_loop`'s scans allocate (and in
    reverse mode fill) residuals for every slot, run or not, and a peeled first
    iteration doubles the program. Each iteration is recomputed once backward
    (its carry is stored, not its intermediate values). For loops of a few
    iterations inside a step that is differentiated with `jax.vjp` alone
    (`CheckpointAdjoint`'s backward steps)."""
    leaves, treedef = jtu.tree_flatten(init)
    inexact = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]

    def split(flat):
        return [x for x, f in zip(flat, inexact) if f], [x for x, f in zip(flat, inexact) if not f]

    def merge(floats, others):
        floats, others = iter(floats), iter(others)
        return [next(floats) if f else next(others) for f in inexact]

    def flat_body(flat):
        return jtu.tree_leaves(body_fun(jtu.tree_unflatten(treedef, flat)))

    # Every value ``body_fun`` closes over becomes an explicit input: those
    # that may carry derivatives because a `custom_vjp` cannot differentiate
    # its closure, the others (integers, booleans) because the backward pass
    # may run outside the trace that made them (`CheckpointAdjoint`'s lanes
    # rule transposes a `jax.vmap` after leaving it).
    closed = jax.make_jaxpr(flat_body)(leaves)
    const_inexact = [jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in closed.consts]

    def body(flat, consts, fixed):
        consts, fixed = iter(consts), iter(fixed)
        return jax.core.eval_jaxpr(closed.jaxpr, [next(consts) if f else next(fixed) for f in const_inexact], *flat)

    def run(consts, fixed, flat, store):
        def cond(c):
            return (c[0] < max_iters) & cond_fun(jtu.tree_unflatten(treedef, c[1]))

        def step(c):
            n, flat, stored = c
            if store:
                stored = [lax.dynamic_update_index_in_dim(s, x, n, 0) for s, x in zip(stored, flat)]
            return n + 1, body(flat, consts, fixed), stored

        stored = [jnp.zeros((max_iters,) + jnp.shape(x), jnp.result_type(x)) for x in flat] if store else []
        return lax.while_loop(cond, step, (jnp.asarray(0, jnp.int32), list(flat), stored))

    @jax.custom_vjp
    def loop(consts, fixed, floats, others):
        return run(consts, fixed, merge(floats, others), False)[1]

    def fwd(consts, fixed, floats, others):
        n, flat, stored = run(consts, fixed, merge(floats, others), True)
        return flat, (consts, fixed, n, stored)

    def bwd(res, ct_flat):
        consts, fixed, n, stored = res
        ct_floats = split(ct_flat)[0]
        zero_consts = [jnp.zeros_like(c) for c in consts]

        def back(c):
            i, ct_floats, ct_consts = c
            floats, others = split([lax.dynamic_index_in_dim(s, i, 0, keepdims=False) for s in stored])
            _, vjp = jax.vjp(lambda fl, cs: split(body(merge(fl, others), cs, fixed))[0], floats, consts)
            ct_in, ct_c = vjp(ct_floats)
            return i - 1, ct_in, [a + b for a, b in zip(ct_consts, ct_c)]

        _, ct_floats, ct_consts = lax.while_loop(lambda c: c[0] >= 0, back, (n - 1, ct_floats, zero_consts))
        return ct_consts, [None] * len(fixed), ct_floats, [None] * len(split(stored)[1])

    loop.defvjp(fwd, bwd)
    floats, others = split(leaves)
    consts = [c for c, f in zip(closed.consts, const_inexact) if f]
    fixed = [c for c, f in zip(closed.consts, const_inexact) if not f]
    return jtu.tree_unflatten(treedef, loop(consts, fixed, floats, others))


def _level_lengths(max_iters: int, base: int = 16) -> list:
    """Scan lengths of the nested levels: about ``base`` each, with a product
    of at least ``max_iters`` and as little padding as possible (reverse mode
    allocates one carry per slot)."""
    max_iters = max(int(max_iters), 1)
    depth = max(1, math.ceil(math.log(max_iters) / math.log(base) - 1e-12))
    lengths = [max(1, math.ceil(max_iters ** (1.0 / depth)))] * depth
    for i in range(depth):
        others = math.prod(lengths[:i] + lengths[i + 1:])
        lengths[i] = max(1, math.ceil(max_iters / others))
    return lengths


def _make_block(inner, base, cond_fun):
    def block(carry):
        return lax.scan(lambda c, _: (inner(c), None), carry, None, length=base)[0]

    # Under `jax.vmap` a batched condition would turn this `cond` into a
    # `select` that runs every block; the block runs while any lane is active
    # instead (its iterations mask the finished lanes themselves).
    return lambda carry: lax.cond(eqxi.unvmap_any(cond_fun(carry)), block, lambda c: c, carry)


def build_program(term, y0, args, ts, rtol, atol, dt0, *, config: LoopConfig) -> "Program":
    """Set up one solve: its initial carry and the functions that advance it."""
    solver = config.solver
    controller = config.controller
    adaptive = config.adaptive
    max_steps = config.max_steps
    time_dtype = ts.dtype
    eps = jnp.finfo(time_dtype).eps

    direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(time_dtype)
    s_save = direction * ts
    n_save = ts.shape[0]
    s_start, s_end = s_save[0], s_save[-1]
    span = s_end - s_start
    valid_times = jnp.all(s_save[1:] > s_save[:-1])
    problem = Problem(term, args, direction, rtol, atol, span=(s_start, s_end),
                      reverse_steps=config.reverse_steps, vjp_steps=config.vjp_steps,
                      tree_restart=config.lanes == 1 or not adaptive, adaptive=adaptive)
    # Times the steps must land on (None for ODE solvers: no code is traced).
    breakpoints = solver.breakpoints(problem, s_start)

    solver_state = solver.init(problem, s_start, y0)
    num_fevals = solver.init_fevals
    if dt0 is None and not config.initial_step:
        dt = jnp.zeros((), time_dtype)
    elif dt0 is None:
        f0 = solver_state if getattr(solver, "tableau", None) is not None and solver.tableau.fsal else None
        if f0 is None:
            f0 = problem.vf(s_start, y0)
            num_fevals += 1
        dt = initial_step(problem.vf, s_start, y0, f0, solver.error_order, rtol, atol, span)
        num_fevals += 1
    else:
        dt = jnp.asarray(dt0, time_dtype)
    dt = lax.stop_gradient(dt)

    finite0 = all_finite(y0) & all_finite(solver_state) & jnp.isfinite(dt)
    status = jnp.where(
        valid_times,
        jnp.where(finite0, Status.SUCCESS, Status.NONFINITE_STATE),
        Status.INVALID_TIMES,
    ).astype(jnp.int32)
    ys = jtu.tree_map(
        # (`dynamic_update_slice`, not a scatter: the backward steps rebuild
        # this in loops that `single_kernel` compiles, which takes no scatter.)
        lambda y: lax.dynamic_update_index_in_dim(jnp.full((n_save,) + y.shape, jnp.nan, y.dtype),
                                                  jnp.where(valid_times, y, jnp.nan), 0, 0),
        y0,
    )

    int32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    # Saved at the ends of the span only (``t = (t0, t1)``: a neural ODE as a
    # layer): the last save is the last step's own solution, as the last step
    # lands on ``t1``, so no step needs its dense-output polynomial. Its
    # coefficients are then left out of the carry, the checkpoints and the
    # derivatives (and the solver's computation of them is dead code).
    endpoints_only = n_save <= 2 and not config.dense and breakpoints is None
    problem.dense_output = not endpoints_only
    coeff_zeros = None if endpoints_only else jtu.tree_map(
        lambda y: jnp.zeros((solver.interp_degree,) + y.shape, y.dtype), y0)
    core = _Core(
        t=s_start,
        y=y0,
        dt=dt,
        solver_state=solver_state,
        err_prev=jnp.asarray(1.0, time_dtype),
        rejected_last=jnp.asarray(False),
        save_idx=int32(1),
        num_steps=int32(0),
        num_rejected=int32(0),
        num_fevals=int32(num_fevals),
        status=status,
        last=(s_start, y0, coeff_zeros),
        extra=tuple(int32(0) for _ in solver.stat_names),
    )

    if config.dense:
        dense = (
            lax.dynamic_update_index_in_dim(jnp.full((max_steps + 1,), jnp.inf, time_dtype), s_start, 0, 0),
            jtu.tree_map(lambda y: jnp.zeros((max_steps,) + y.shape, y.dtype), y0),
            jtu.tree_map(lambda c: jnp.zeros((max_steps,) + c.shape, c.dtype), coeff_zeros),
        )
    else:
        dense = None

    # Land on the final time rather than leave a sliver of a step: adaptive
    # steps may stretch by up to 1% (Hairer's dopri5 does the same), fixed steps
    # only by round-off.
    land_slack = 0.01 if adaptive else 1e-6
    step_to_saves = getattr(solver, "step_to_save_times", False)

    def attempt_step(core: _Core):
        t0 = core.t
        t1 = jnp.where(t0 + core.dt * (1 + land_slack) >= s_end, s_end, t0 + core.dt)
        if step_to_saves:
            # SDE solvers end their steps on the save times (see `_SDESolver`).
            nxt = s_save[jnp.minimum(jnp.searchsorted(s_save, t0, side="right"), n_save - 1)]
            t1 = jnp.where(t0 + core.dt * (1 + land_slack) >= nxt, nxt, t1)
        if breakpoints is not None:
            nxt = jnp.min(jnp.where(breakpoints > t0, breakpoints, jnp.inf))
            t1 = jnp.where(t0 + core.dt * (1 + land_slack) >= nxt, jnp.minimum(nxt, t1), t1)
        h = t1 - t0
        y1, y_err, coeffs, new_state, info = solver.step(problem, t0, h, core.y, core.solver_state)
        if endpoints_only:
            coeffs = None
        if not isinstance(info, StepInfo):
            info = StepInfo(nfev=info)
        # ``ok`` False: the solver itself failed this attempt (say, a Newton
        # iteration that did not converge); it is rejected whatever its error
        # estimate and retried with ``dt * fail_factor``.
        ok = jnp.asarray(True) if info.ok is None else info.ok
        finite = all_finite(y1)
        if adaptive:
            # Only the step-size sequence depends on the error, and it is not
            # differentiated: no derivative is traced through the norm (whose
            # square root has an infinite derivative at a zero error).
            err = scaled_error(*lax.stop_gradient((y_err, core.y, y1)), rtol, atol,
                               norm=config.error_norm).astype(time_dtype)
            finite = finite & jnp.isfinite(err)
            accept = ok & finite & (err <= 1.0)
            factor = controller.factor(err, core.err_prev, accept, core.rejected_last, finite, solver.error_order)
            if info.ok is not None:
                factor = jnp.where(ok, factor, jnp.asarray(info.fail_factor, factor.dtype))
            # The step-size sequence is not differentiated: derivatives are those
            # of the solution on the steps taken (and err^(-1/k) has no useful
            # derivative where the error vanishes).
            dt_next = lax.stop_gradient(h * factor.astype(time_dtype))
            # Too small: the next attempt could not move the time it starts from
            # (relative to the current time, not the final one: a stiff solve on
            # [0, 1e11] needs steps of 1e-6 near 0).
            too_small = ~accept & (dt_next <= 10 * eps * jnp.maximum(jnp.abs(t0), jnp.abs(t1)))
            status = jnp.where(
                too_small,
                jnp.where(finite | ~ok, Status.STEP_SIZE_TOO_SMALL, Status.NONFINITE_STATE),
                core.status,
            ).astype(jnp.int32)
            err_prev = jnp.where(accept, jnp.maximum(lax.stop_gradient(err), 1e-4), core.err_prev)
            rejected_last = ~accept
            num_rejected = core.num_rejected + (~accept).astype(jnp.int32)
        else:
            # Fixed steps cannot be retried: a failed attempt ends the solve.
            accept = ok & finite
            dt_next = core.dt
            failed_status = jnp.where(ok, Status.NONFINITE_STATE, _FAILED_FIXED_STATUS)
            status = jnp.where(accept, core.status, failed_status).astype(jnp.int32)
            err_prev = core.err_prev
            rejected_last = core.rejected_last
            num_rejected = core.num_rejected
        rejected_state = core.solver_state if info.reject_state is None else info.reject_state
        new_core = core._replace(
            t=jnp.where(accept, t1, t0),
            y=_tree_where(accept, y1, core.y),
            dt=dt_next,
            solver_state=rejected_state if new_state is None else _tree_where(accept, new_state, rejected_state),
            err_prev=err_prev,
            rejected_last=rejected_last,
            num_steps=core.num_steps + accept.astype(jnp.int32),
            num_rejected=num_rejected,
            num_fevals=core.num_fevals + _count_fevals(info.nfev),
            status=status,
            extra=tuple(c + jnp.asarray(d, jnp.int32) for c, d in zip(core.extra, info.stats)),
        )
        if info.status is not None:
            new_core = new_core._replace(
                status=jnp.where(accept & (info.status != 0), info.status, new_core.status).astype(jnp.int32))
        return new_core, _Step(accept, t0, t1, core.y, y1, coeffs)

    # Explicit methods make a fixed number of evaluations per step: count them
    # after the loop from the number of attempts instead of carrying a counter.
    static_fevals = []

    def _count_fevals(nfev):
        if isinstance(nfev, int):
            static_fevals[:] = [nfev]
            return 0
        return nfev

    def write_dense(dense, step_index, step: _Step):
        if dense is None:
            return None
        d_ts, d_y0, d_c = dense
        ok = step.accept & (step_index < max_steps)
        return (
            _write(d_ts, step_index + 1, step.t1, ok),
            _write(d_y0, step_index, step.y0, ok),
            _write(d_c, step_index, step.coeffs, ok),
        )

    def report(core):
        if config.progress:
            jax.debug.callback(_progress.update, (core.t - s_start) / span)

    def attempts(core):
        return core.num_steps + core.num_rejected

    def step_and_remember(core: _Core, dense):
        step_index = core.num_steps
        core, step = attempt_step(core)
        last = _tree_where(step.accept, (step.t0, step.y0, step.coeffs), core.last)
        return core._replace(last=last), write_dense(dense, step_index, step), step

    def interpolate_last(core, s):
        t0, y_prev, coeffs = core.last
        return _interpolate(s, t0, core.t, y_prev, core.y, coeffs)

    # --- the step-or-save iteration (bounded loop, `ReverseMode`) ---
    # One iteration either saves one pending point of ``t`` from the last
    # step's polynomial or attempts one step; writes to the output buffers are
    # returned rather than done, so that callers keep the buffers out of any
    # checkpoint or custom derivative.

    def pending(core):
        i = jnp.minimum(core.save_idx, n_save - 1)
        return (core.save_idx < n_save) & (s_save[i] <= core.t)

    def stepping(core):
        # Steps remain to be taken (saves aside).
        return (core.status == Status.SUCCESS) & (core.t < s_end) & (attempts(core) < max_steps)

    def cond_fun(packed):
        core = _unpack(packed)
        return stepping(core) | ((core.status == Status.SUCCESS) & pending(core))

    zero_y = jtu.tree_map(jnp.zeros_like, y0)

    def no_step(core):
        t0, y_prev, coeffs = core.last
        return core, _Step(jnp.asarray(False), t0, core.t, y_prev, core.y, coeffs)

    def _rewind(core):
        # A lane at the final time never takes the step computed here (it saves,
        # or it is masked under `jax.vmap`), but the step is computed and
        # differentiated with a zero cotangent: from the final time it would
        # have length zero, whose partials may be inf/NaN (0/0 in a stochastic
        # step) and turn that zero into NaN. Such a lane recomputes its last
        # step instead, a step of nonzero length with finite partials.
        at_end = core.t >= s_end
        return _tree_where(at_end, core._replace(t=core.last[0], y=core.last[1]), core)

    def save_branch(core):
        i = core.save_idx
        return core._replace(save_idx=i + 1), i, interpolate_last(core, s_save[i]), no_step(core)[1]

    def step_branch(core):
        new_core, step = attempt_step(core)
        last = _tree_where(step.accept, (step.t0, step.y0, step.coeffs), core.last)
        return new_core._replace(last=last), jnp.asarray(n_save, jnp.int32), zero_y, step

    def iteration(packed):
        core = _unpack(packed)
        save = pending(core)
        if config.lanes == 1:
            # Not under a `jax.vmap` that `solve` can see: one branch or the
            # other. (Under a `vmap` it cannot see, the `cond` below becomes a
            # `select`; correct, only slower -- see the batched version.)
            return lax.cond(save, save_iteration, step_iteration, packed)
        # Under `jax.vmap`: the step is skipped when every lane saves. The
        # predicate is unbatched (`unvmap_all`) on purpose: a `cond` with a
        # batched predicate becomes a `select` whose operands JAX guards with per-lane
        # `stop_gradient`s, which broadcasts every operand -- the vector
        # field's parameters included -- to one copy per lane (batched matrix
        # products forward, one weight gradient per lane backward). Lanes that
        # save beside lanes that step are selected here instead.
        stepped, step = lax.cond(eqxi.unvmap_all(save), no_step, lambda c: attempt_step(_rewind(c)), core)
        last = _tree_where(step.accept, (step.t0, step.y0, step.coeffs), core.last)
        stepped = stepped._replace(last=last)
        i = core.save_idx
        save_val = interpolate_last(core, s_save[jnp.minimum(i, n_save - 1)])
        core = _tree_where(save, core._replace(save_idx=i + 1), stepped)
        save_at = jnp.where(save, i, n_save).astype(jnp.int32)
        step = step._replace(accept=step.accept & ~save)
        return _pack(core), save_at, save_val, step

    def save_iteration(packed):
        core, save_at, save_val, step = save_branch(_unpack(packed))
        return _pack(core), save_at, save_val, step

    def step_iteration(packed):
        core, save_at, save_val, step = step_branch(_unpack(packed))
        return _pack(core), save_at, save_val, step

    def step_cond(packed):
        # The loop condition of a loop of steps alone, whose saves are made
        # after each step (`save_passed`).
        return stepping(_unpack(packed))

    def drop_last(packed):
        # The carry without the last step's polynomial (``last``'s state and
        # coefficients), which only the save iterations read: a loop of steps
        # alone keeps it out of its checkpoints and derivatives.
        return packed[:4]

    def add_last(reduced):
        return (*reduced, zero_y, coeff_zeros)

    def split_times(packed):
        # ``(times, rest)``: the carry's times, step size, error and counters
        # -- functions of the save times alone, or constants, for solvers
        # without breakpoints (the step-size sequence is not differentiated)
        # -- and the states.
        return packed[:2], packed[2:]

    def join_times(times, rest):
        return (*times, *rest)

    def step_size(packed):
        # The next step size the carry proposes (loop time, positive).
        return _unpack(packed).dt

    def save_index(packed):
        return _unpack(packed).save_idx

    def interpolate_step(s, step: _Step):
        # A save on ``step``'s polynomial (at its end, the step's own value).
        return _interpolate(s, step.t0, step.t1, step.y0, step.y1, step.coeffs)

    def save_passed(packed, step: _Step, ys):
        # After a step, save every point of ``t`` it passed, as the save
        # iterations would (and as `run_while` does: none once the solve has
        # failed), in a small inner loop. With ``ys=None`` nothing is written:
        # the carry alone, its save index past the points passed.
        core = _unpack(packed)
        ok = step.accept & (core.status == Status.SUCCESS)

        def cond(c):
            return ok & pending(core._replace(save_idx=c[0]))

        def body(c):
            i, ys = c
            return i + 1, (None if ys is None else _write(ys, i, interpolate_step(s_save[i], step)))

        i, ys = lax.while_loop(cond, body, (core.save_idx, ys))
        return _pack(core._replace(save_idx=i)), ys

    def apply_writes(ys, dense, step_index, save_at, save_val, step):
        ys = _write(ys, save_at, save_val, save_at < n_save)
        return ys, write_dense(dense, step_index, step)

    def run_while(return_carry=False):
        # Save-driven, as jax.experimental.ode.odeint: a scan walks the save
        # times and stacks the saved values (no output buffer in any carry); the
        # inner loop steps, with a small carry, until the save time is passed;
        # the last step's polynomial then gives the value there.
        # The loops carry the flat form of the carry (`_Flat`).
        flat = _Flat(_pack(core))

        def outer_body(carry, target):
            flat_packed, dense = carry

            def inner_cond(c):
                core = _unpack(flat.unflatten(c[0]))
                return stepping(core) & (core.t < target)

            def inner_body(c):
                core, dense, _ = step_and_remember(_unpack(flat.unflatten(c[0])), c[1])
                report(core)
                return flat.flatten(_pack(core)), dense

            flat_packed, dense = lax.while_loop(inner_cond, inner_body, (flat_packed, dense))
            core = _unpack(flat.unflatten(flat_packed))
            # A point not reached (the steps ran out, or the solve failed) is
            # NaN, as is every later one; `finalize` reports running out of
            # steps. The carry passes through unchanged.
            reached = (core.status == Status.SUCCESS) & (core.t >= target)
            value = _tree_where(reached, interpolate_last(core, target), nan_y)
            return (flat_packed, dense), value

        nan_y = jtu.tree_map(lambda y: jnp.full_like(y, jnp.nan), y0)
        start()

        def loop(init):
            return lax.scan(outer_body, init, s_save[1:])

        init = (flat.flatten(_pack(core)), dense)
        # One CPU kernel where `single_kernel` can (not with a dense history,
        # whose initial buffers are beyond its bound on packed inputs).
        (flat_packed, dense_out), saved = single_kernel(loop, init)
        packed = flat.unflatten(flat_packed)
        ys_out = jtu.tree_map(lambda first, rest: jnp.concatenate([first[:1], rest]), ys, saved)
        out = finalize(packed, ys_out, dense_out)
        return (out, packed) if return_carry else out

    def run_bounded():
        def skip(packed):
            return packed, jnp.asarray(n_save, jnp.int32), zero_y, no_step(_unpack(packed))[1]

        # The guard is inside the checkpoint: the checkpoint's residuals are then
        # exactly its inputs, and scan hoists the loop-invariant ones (the
        # vector field's parameters) instead of storing them every iteration.
        def guarded(p):
            # As in `iteration`: an unbatched predicate, and under `jax.vmap`
            # the lanes that have finished are masked by selection.
            active = cond_fun(p)
            if config.lanes == 1:
                return lax.cond(active, iteration, skip, p)
            out = lax.cond(eqxi.unvmap_any(active), iteration, skip, p)
            return _tree_where(active, out, skip(p))

        checkpointed = jax.checkpoint(guarded, prevent_cse=False)

        def body_fun(carry):
            packed, ys, dense = carry
            step_index = _unpack(packed).num_steps
            packed, save_at, save_val, step = checkpointed(packed)
            ys, dense = apply_writes(ys, dense, step_index, save_at, save_val, step)
            report(_unpack(packed))
            return packed, ys, dense

        start()
        packed, ys_out, dense_out = bounded_while_loop(
            lambda c: cond_fun(c[0]), body_fun, (_pack(core), ys, dense), max_steps + n_save, guard_leaf=False
        )
        return finalize(packed, ys_out, dense_out)

    def start():
        if config.progress:
            jax.debug.callback(_progress.update, jnp.zeros((), time_dtype))

    def finalize(packed, ys, dense):
        core = _unpack(packed)
        if config.progress:
            jax.debug.callback(_progress.finish, (core.t - s_start) / span)
        status = jnp.where((core.status == Status.SUCCESS) & (core.t < s_end), Status.MAX_STEPS_REACHED, core.status)
        stats = {
            "num_steps": core.num_steps,
            "num_rejected": core.num_rejected,
            "num_fevals": core.num_fevals + (static_fevals[0] * attempts(core) if static_fevals else 0),
            **dict(zip(solver.stat_names, core.extra)),
        }
        history = None
        if dense is not None:
            history = DenseHistory(ts=dense[0], y0s=dense[1], coeffs=dense[2], num_steps=core.num_steps)
        return (ys, history), (stats, status.astype(jnp.int32))

    return Program(
        packed=_pack(core), ys=ys, dense=dense, n_save=n_save, max_iters=max_steps + n_save, throw=config.throw,
        lanes=config.lanes, buffer_lanes=max(config.lanes, config.buffer_lanes),
        attempt=step_iteration,
        step_cond=step_cond, save_passed=save_passed, save_index=save_index, interpolate_step=interpolate_step,
        save_times=s_save, write_dense=write_dense, drop_last=drop_last, add_last=add_last,
        split_times=split_times, join_times=join_times, moving_steps=breakpoints is not None, step_size=step_size,
        adaptive=adaptive, times_of=lambda p: p[0][:2], with_times=lambda p, t: (p[0].at[:2].set(t), *p[1:]),
        report=lambda p: report(_unpack(p)),
        step_index=lambda p: _unpack(p).num_steps,
        start=start, finalize=finalize, run_while=run_while, run_bounded=run_bounded,
    )


class Program(NamedTuple):
    """One solve as data and pure functions (see `build_program`):
    ``packed``/``ys``/``dense`` are the initial carry and output buffers;
    ``attempt(packed) -> (packed, save_at, save_val, step)`` is one step
    attempt (``save_at = n_save``: it saves nothing itself). A loop of steps
    alone runs while ``step_cond`` holds, and after each step
    ``save_passed(packed, step, ys)`` saves the points of ``t`` the step
    passed (``interpolate_step(s, step)`` on its polynomial, at the loop times
    ``save_times``; ``save_index`` counts the points saved);
    ``drop_last``/``add_last`` take the last step's polynomial (which only the
    save iterations of `run_bounded` read) out of a carry and put zeros back;
    ``write_dense(dense, step_index, step)`` records an accepted step;
    ``split_times``/``join_times`` separate a carry's times and counters from
    its states (``moving_steps``: the step ends depend on more than the save
    times, as a delay equation's breakpoints on its lags); ``step_size(packed)``
    is the step a carry proposes next; ``times_of(packed)`` is a carry's
    time and proposed step as one array of two, ``with_times(packed, tdt)``
    the carry with them replaced (the same in a `drop_last` carry); ``adaptive``:
    whether the steps are chosen by error control; ``finalize`` packages the result;
    ``run_while``/``run_bounded`` are the two ready-made loops
    (``run_while(return_carry=True)`` returns the final carry too)."""

    packed: Any
    ys: Any
    dense: Any
    n_save: int
    max_iters: int
    throw: bool
    lanes: int
    buffer_lanes: int
    attempt: Any
    step_cond: Any
    save_passed: Any
    save_index: Any
    interpolate_step: Any
    save_times: Any
    write_dense: Any
    drop_last: Any
    add_last: Any
    split_times: Any
    join_times: Any
    moving_steps: bool
    step_size: Any
    adaptive: bool
    times_of: Any
    with_times: Any
    report: Any
    step_index: Any
    start: Any
    finalize: Any
    run_while: Any
    run_bounded: Any


def integrate(term, y0, args, ts, rtol, atol, dt0, *, config: LoopConfig, kind: str):
    """Solve and return ``(floats, ints)``: ``floats = (ys, dense_history or
    None)`` (differentiable), ``ints = (stats, status)``.

    ``ts`` must already have the time dtype; ``y0`` is a pytree of inexact
    arrays; ``dt0`` is ``None`` or a positive scalar. ``kind`` is ``"while"``
    or ``"bounded"`` (see the module docstring).
    """
    program = build_program(term, y0, args, ts, rtol, atol, dt0, config=config)
    if kind == "while":
        return program.run_while()
    if kind == "bounded":
        return program.run_bounded()
    raise ValueError(f"unknown loop kind {kind!r}")  # pragma: no cover - internal misuse


