from __future__ import annotations

import math
from typing import Optional

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._single_kernel import single_kernel
from .base import (AbstractSensitivity, closure_convert_term, instantiate_zero, is_symbolic_zero, unwrap_primals,
                   zero_tangents)

# With checkpoints=None, checkpoint every step while the buffer (every
# `jax.vmap` lane's) takes at most _EVERY_STEP_BYTES; beyond it, as many slots
# as fit in _SLOT_BYTES, and at least O(sqrt(steps)).
_EVERY_STEP_BYTES = 16 * 2**20
_SLOT_BYTES = 4 * 2**20


class CheckpointAdjoint(AbstractSensitivity):
    """Discrete adjoint of the steps actually taken, recomputed from
    checkpoints (`jax.custom_vjp`).

    The forward pass is a `lax.while_loop` of step attempts that stores the
    loop carry (state, FSAL derivative, step size, counters) before each
    attempt, or before every ``S``-th (below); after an accepted step a small
    inner loop saves the points of ``t`` the step passed, from its
    polynomial. The backward pass applies `jax.vjp` of one step attempt,
    recomputed from its carry, from the last attempt to the first, the
    cotangents of the points it saved added to those of its polynomial. A
    point of ``t`` costs no iteration of either loop. When ``t`` is not
    differentiated (and no delay breakpoint moves the steps), every time in
    the loop is a constant, and the backward steps differentiate the states
    and the differentiated inputs only.

    It differentiates exactly the operations `ReverseMode` differentiates, so
    the two gradients agree to round-off, with respect to ``y0``, ``args``,
    the save times and every floating array of the term (closed-over arrays
    included, by closure conversion).

    Memory and work: the forward loop keeps ``C`` checkpoint slots of one
    carry each (the state, the solver's own state -- for the explicit pairs
    the FSAL derivative, so ``2 * y.size`` numbers -- and a few scalars).
    It checkpoints every step until the
    slots are full, then drops every other checkpoint and goes on with every
    2nd step, then every 4th, ... (the stride ``S`` doubles). The backward
    pass walks the segments of ``S`` steps between checkpoints from the last
    to the first: it recomputes a segment's carries from its checkpoint into
    a buffer (``S`` more carries), then walks them in reverse. Recomputation
    and walk run the backward step's own primal (the transposition skipped
    while recomputing), so the compiled program holds one copy of the step
    for both. A solve that fits in ``C`` steps is never recomputed, and a
    longer one is recomputed once, whatever its number of steps. An adaptive
    solve that strides also records every attempt's time and step size (two
    scalars per attempt, ``max_steps`` of them), and the recomputation replays
    them: recomputed in another kernel, a carry rounds differently, and the
    step-size controller would carry the difference on (an SDE's accept/reject
    sequence drifts off the forward pass's within a few attempts).

    With ``checkpoints=None``, ``C = max_steps`` (every step, no stride) while
    the buffer takes at most 16 MiB, counting every lane of a `jax.vmap` that
    `solve` is called under (a `vmap` over an SDE's keys included); otherwise as many slots as fit in 4 MiB, and at
    least about ``sqrt(max_steps)`` (so that slots and segment together hold
    about ``2 sqrt(max_steps)`` carries: a batch of 16k x 64 floats never
    costs ``max_steps`` copies of itself). The buffer is allocated whole at
    every call, and 256 lanes of ``max_steps`` carries of a small state (100
    MB) would cost more to allocate than a short solve costs to run. Pass
    ``checkpoints=C`` to choose.

    When the solve is not differentiated, it runs the fast save-driven while
    loop and stores nothing.
    """

    checkpoints: Optional[int] = None

    def __check_init__(self):
        if self.checkpoints is not None and (
            isinstance(self.checkpoints, bool) or not isinstance(self.checkpoints, (int, np.integer))
            or self.checkpoints < 1
        ):
            raise ValueError(f"CheckpointAdjoint(checkpoints=...): expected a positive integer or None; "
                             f"got {self.checkpoints!r}.")

    def plan(self, max_iters: int, carry_bytes: int):
        """``(slots, max_stride)`` for a solve of at most ``max_iters``
        steps whose carry (all `jax.vmap` lanes together) takes
        ``carry_bytes``: the number of checkpoint slots, and the largest stride
        the forward loop can reach (``slots * max_stride >= max_iters``), which
        sizes the backward pass's segment buffer."""
        max_iters = max(1, int(max_iters))
        if self.checkpoints is not None:
            slots = min(int(self.checkpoints), max_iters)
        elif max_iters * carry_bytes <= _EVERY_STEP_BYTES:
            slots = max_iters
        else:
            # At least the slots that make the fewest carries in all (slots plus
            # the backward pass's segment of ``max_stride``, a power of two:
            # about 2 sqrt(max_iters)), more if they fit in _SLOT_BYTES.
            least = min((math.ceil(max_iters / 2**e) + 2**e, math.ceil(max_iters / 2**e))
                        for e in range(max_iters.bit_length() + 1))[1]
            slots = min(max_iters, max(least, _SLOT_BYTES // max(carry_bytes, 1)))
        max_stride = 1
        while slots * max_stride < max_iters:
            max_stride *= 2
        return slots, max_stride

    def run(self, build, inputs):
        term, y0, args, ts, *rest = inputs
        term = closure_convert_term(term, ts[0], y0, args)
        dyn, static = eqx.partition((term, y0, args, ts, *rest), eqx.is_array)

        def program(d, **overrides):
            return build(eqx.combine(d, static), **overrides)

        def plan(prog):
            # ``prog`` is a `_steps_view`: its iterations are the steps.
            return self.plan(prog.max_iters, _carry_bytes(prog.packed) * prog.buffer_lanes)

        # Under the `jax.vmap` that batches the inputs, innermost (see
        # `_lanes_back_step`): the backward steps sum the shared inputs'
        # cotangents over the lanes inside their products.
        config = getattr(build, "config", None)
        sum_lanes = bool(getattr(config, "lanes_innermost", False))

        @jax.custom_vjp
        def solve(d):
            return program(d).run_while()

        # Which inputs are differentiated (`symbolic_zeros=True` tells the
        # forward rule): when the save times are not, and no breakpoint moves
        # the steps, every time in the loop is a constant and the backward
        # steps leave the times out of their vjps.
        seen = {}

        def fwd(d):
            d, mask = unwrap_primals(d)
            prog = _steps_view(program(d))
            seen["mask"] = mask
            ts_perturbed = mask[3]  # d is (term, y0, args, ts, rtol, atol, dt0)
            seen["const_times"] = not ts_perturbed and not prog.moving_steps
            return _fwd_steps(prog, d, plan(prog)[0])

        def bwd(res, ct_out):
            ct_out = jtu.tree_map(instantiate_zero, ct_out, is_leaf=is_symbolic_zero)
            # The backward pass reads the step functions, not the initial
            # carry's values (its first checkpoint holds them).
            steps_program = lambda dd: _steps_view(  # noqa: E731
                program(dd, initial_step=False, reverse_steps=True, vjp_steps=True))
            prog = steps_program(res[0])
            return _bwd_steps(steps_program, prog, res, ct_out, plan(prog)[1],
                              seen["mask"] if seen["const_times"] else None, sum_lanes)

        solve.defvjp(fwd, bwd, symbolic_zeros=True)
        return solve(dyn)


def _steps_view(prog):
    """``prog`` as the loop of steps sees it: its iterations are the steps
    (``max_iters`` is ``max_steps``: saves are made after each step, no
    iterations of their own), and its carry is without the last step's
    polynomial (which only the save iterations of `run_bounded` read), so that
    neither the checkpoints nor the backward steps hold it."""
    add, drop = prog.add_last, prog.drop_last

    def step(reduced):
        new, save_at, save_val, step_out = prog.attempt(add(reduced))
        return drop(new), save_at, save_val, step_out

    def save_passed(reduced, step_out, ys):
        new, ys = prog.save_passed(add(reduced), step_out, ys)
        return drop(new), ys

    return prog._replace(
        packed=drop(prog.packed), max_iters=prog.max_iters - prog.n_save, attempt=step, save_passed=save_passed,
        step_cond=lambda r: prog.step_cond(add(r)), step_index=lambda r: prog.step_index(add(r)),
        save_index=lambda r: prog.save_index(add(r)), report=lambda r: prog.report(add(r)),
        finalize=lambda r, ys, dense: prog.finalize(add(r), ys, dense),
    )


def _fwd_steps(prog, d, slots):
    """The forward pass: a `lax.while_loop` of step attempts that checkpoints
    the carry before each (or, past ``slots`` attempts, every ``stride``-th:
    see `CheckpointAdjoint`); after an accepted step, a small inner loop saves
    the points of ``t`` it passed. A save point costs no iteration of the
    loop, forward or backward (on small states an iteration's fixed cost, not
    its arithmetic, is what a solve spends). ``prog`` is the solve's
    `_steps_view`."""
    strided = slots < prog.max_iters
    # Strided adaptive solves also record every attempt's time and proposed
    # step (two numbers per attempt), which the backward pass's recomputation
    # replays (see `_bwd_steps`).
    record = strided and prog.adaptive

    def attempt(packed, ys, dense):
        step_index = prog.step_index(packed)
        packed, _, _, step = _masked_iteration(prog, packed)
        packed, ys = prog.save_passed(packed, step, ys)
        dense = prog.write_dense(dense, step_index, step)
        prog.report(packed)
        return packed, ys, dense

    def running(c):
        return eqxi.unvmap_any(prog.step_cond(c[0]))

    def body(c):
        # ``it`` and ``stride`` stay unbatched under `jax.vmap` (see
        # `_masked_iteration`), so the writes are in place.
        packed, ys, dense, it, stride, ckpts, times = c
        if record:
            times = lax.dynamic_update_index_in_dim(times, prog.times_of(packed), it, 0)
        if strided:
            due = it % stride == 0
            slot = jnp.minimum(it // stride, slots - 1)
            ckpts = jtu.tree_map(
                lambda b, x: lax.dynamic_update_index_in_dim(
                    b, jnp.where(due, x, lax.dynamic_index_in_dim(b, slot, 0, keepdims=False)), slot, 0),
                ckpts, packed)
        else:
            ckpts = jtu.tree_map(
                lambda b, x: lax.dynamic_update_index_in_dim(b, x, jnp.minimum(it, slots - 1), 0), ckpts, packed)
        return (*attempt(packed, ys, dense), it + 1, stride, ckpts, times)

    def full(c):
        it, stride = c[3], c[4]
        return (it % stride == 0) & (it // stride >= slots)

    half = (slots + 1) // 2

    def epoch(c):
        # Attempts at one stride until the slots are full (or the solve ends);
        # a full buffer first keeps every other checkpoint, moved down in
        # place, and doubles the stride. A loop of its own, not a branch in
        # every attempt: a `cond` with the buffer as operand would copy it in
        # and out.
        packed, ys, dense, it, stride, ckpts, times = c
        compact = full(c)
        move = lambda m, ck: jtu.tree_map(  # noqa: E731
            lambda b: lax.dynamic_update_index_in_dim(b, b[2 * m], m, 0), ck)
        ckpts = lax.fori_loop(0, jnp.where(compact, half, 0), move, ckpts)
        stride = jnp.where(compact, 2 * stride, stride)
        return lax.while_loop(lambda c: running(c) & ~full(c), body, (packed, ys, dense, it, stride, ckpts, times))

    def loop(packed, ys, dense):
        # The checkpoint buffer is made inside: as an input it would be a
        # large constant, which `single_kernel` does not take.
        ckpts = jtu.tree_map(lambda x: jnp.zeros((slots,) + x.shape, x.dtype), packed)
        times = None
        if record:
            tdt = prog.times_of(packed)
            times = jnp.zeros((prog.max_iters,) + tdt.shape, tdt.dtype)
        init = (packed, ys, dense, jnp.asarray(0, jnp.int32), jnp.asarray(1, jnp.int32), ckpts, times)
        return lax.while_loop(running, epoch if strided else body, init)

    prog.start()
    # One CPU kernel where `single_kernel` can, as the backward loop below;
    # not when strided: the backward pass recomputes carries, and it and this
    # loop, compiled in one program, round alike (see `_bwd_steps`).
    run = (lambda f, *a: f(*a)) if strided else single_kernel
    packed, ys, dense, n_iter, stride, ckpts, times = run(loop, prog.packed, prog.ys, prog.dense)
    return prog.finalize(packed, ys, dense), (d, ckpts, n_iter, stride, prog.save_index(packed), times)


def _bwd_steps(steps_program, prog, res, ct_out, max_stride, const_mask=None, sum_lanes=False):
    """The backward pass of `_fwd_steps`: the step attempts in reverse, each
    recomputed from its checkpoint, with the cotangents of the points it saved
    added to those of its polynomial. ``const_mask`` (when the loop's times
    are constants): which leaves of ``d`` are differentiated; the steps' vjps
    then take only those and the states.

    Strided (``max_stride > 1``): the segments between checkpoints, from the
    last to the first. One loop per segment first recomputes the segment's
    carries from its checkpoint into a buffer, then walks them in reverse;
    both phases run the same iteration, the primal of the backward step
    (`_back_step` with ``refill``), so the program holds one copy of the step
    for both, its transposition skipped while refilling."""
    d, ckpts, n_iter, stride, last_saved, times = res
    (ct_ys, ct_hist), _ = ct_out
    s_save = prog.save_times
    first = jtu.tree_map(lambda b: b[0], ckpts)
    back_step = _back_step(steps_program, prog, d, const_mask, sum_lanes)

    def walk(ckpts, ct0):
        def back(c):
            # Attempt ``i`` saved the points ``[save_index(ckpts[i]), nxt)``.
            i, nxt, ct_packed, ct_d, ct_s = c
            p = jtu.tree_map(lambda b: b[i], ckpts)
            i0 = prog.save_index(p)
            _, ct_p, ct_d, ct_s = back_step(p, ct_packed, ct_d, ct_ys, ct_hist, first, (i0, nxt, ct_s))
            return i - 1, i0, ct_p, ct_d, ct_s

        return lax.while_loop(lambda c: c[0] >= 0, back, ct0)

    def segments(ckpts, ct0):
        # The carries of the segment being walked, and one spare row that the
        # walk's (discarded) primal carries are written to.
        carries0 = jtu.tree_map(lambda x: jnp.zeros((max_stride + 1,) + x.shape, x.dtype), first)

        def segment(c):
            k, nxt, ct_packed, ct_d, ct_s, carries = c
            count = jnp.minimum(stride, n_iter - k * stride)
            carries = jtu.tree_map(lambda b, x: lax.dynamic_update_index_in_dim(b, x[k], 0, 0), carries, ckpts)

            def inner(w):
                # Iterations ``0 .. count - 2`` refill carries ``1 .. count - 1``;
                # then ``count - 1 .. 2 count - 2`` walk carries ``count - 1 .. 0``.
                n, nxt, ct_packed, ct_d, ct_s, carries = w
                refill = n < count - 1
                j = jnp.where(refill, n, 2 * count - 2 - n)
                p = jtu.tree_map(lambda b: b[j], carries)
                if times is not None:
                    # The attempt's time and step as the forward loop had them.
                    # Recomputed in another kernel, a carry rounds differently,
                    # and an adaptive step size carries the difference on; an
                    # SDE's accept/reject sequence then drifts from the forward
                    # pass's within a few steps (gradients off by 10-30%, or
                    # NaN from a step of length zero).
                    p = prog.with_times(p, times[k * stride + j])
                i0 = prog.save_index(p)
                new, ct_packed, ct_d, ct_s = back_step(p, ct_packed, ct_d, ct_ys, ct_hist, first, (i0, nxt, ct_s),
                                                       refill)
                dest = jnp.where(refill, j + 1, max_stride)
                carries = jtu.tree_map(lambda b, x: lax.dynamic_update_index_in_dim(b, x, dest, 0), carries, new)
                return n + 1, jnp.where(refill, nxt, i0), ct_packed, ct_d, ct_s, carries

            _, nxt, ct_packed, ct_d, ct_s, carries = lax.while_loop(
                lambda w: w[0] < 2 * count - 1, inner, (jnp.asarray(0, jnp.int32), nxt, ct_packed, ct_d, ct_s, carries))
            return k - 1, nxt, ct_packed, ct_d, ct_s, carries

        n_segments = (n_iter + stride - 1) // stride
        _, nxt, ct_packed, ct_d, ct_s = ct0
        out = lax.while_loop(lambda c: c[0] >= 0, segment, (n_segments - 1, nxt, ct_packed, ct_d, ct_s, carries0))
        return out[:5]

    ct0 = (n_iter - 1, last_saved, zero_tangents(prog.packed), zero_tangents(d), jnp.zeros_like(s_save))
    if max_stride > 1:
        # Not a single kernel: carries recomputed in a kernel compiled apart
        # from the forward loop's round differently, and the step sizes --
        # computed from error estimates that cancel to about ``rtol`` -- carry
        # the difference on, amplified (gradients then differ from
        # ReverseMode's by 1e-11 at rtol 1e-8, 1e-8 at rtol 1e-12). Compiled
        # in one program with the forward loop they round alike.
        _, _, ct_packed, ct_d, ct_s = segments(ckpts, ct0)
    else:
        # One CPU kernel where `single_kernel` can; the checkpoints, which the
        # forward loop computed, are passed beside its packed inputs.
        _, _, ct_packed, ct_d, ct_s = single_kernel(walk, ct0, produced=ckpts)

    return (jtu.tree_map(_add, ct_d, _initial_cotangents(steps_program, prog.dense is not None, d, ct_packed, ct_ys,
                                                          ct_hist, ct_s, sum_lanes)),)


def _initial_cotangents(program, dense, d, ct_packed, ct_ys, ct_hist, ct_s=None, sum_lanes=False):
    """The cotangent of ``d`` through what depends on the inputs directly:
    the initial carry, the first saved value (``y0`` itself), the first step
    boundary of the dense history, and (``ct_s`` given) the loop's save
    times. ``sum_lanes``: as the backward steps' (`_lanes_back_step`), the
    shared leaves' cotangents summed over the lanes here."""
    def initial(dd):
        p = program(dd)
        out = (p.packed, jtu.tree_map(lambda y: y[0], p.ys), p.dense[0][0] if dense else None)
        return out if ct_s is None else (*out, p.save_times)

    cts = (ct_packed, jtu.tree_map(lambda c: c[0], ct_ys), ct_hist.ts[0] if dense else None)
    cts = cts if ct_s is None else (*cts, ct_s)
    if sum_lanes:
        return _vjp_summing_lanes(initial, d, cts)
    _, vjp_init = jax.vjp(initial, d)
    (ct_d,) = vjp_init(cts)
    return ct_d


def _vjp_summing_lanes(fn, d, cts):
    """``jax.vjp(fn, d)[1](cts)[0]``, where under the `jax.vmap` of the lanes
    (innermost, see `_lanes_back_step`) the cotangent of a leaf of ``d`` that
    the lanes share is their sum, formed inside the transposed operations, and
    is returned unbatched."""
    def plain(d, ct_floats):
        out, vjp_fn = jax.vjp(fn, d)
        return _float_leaves(vjp_fn(_merge_floats(out, ct_floats))[0])

    call = jax.custom_batching.custom_vmap(plain)

    @call.def_vmap
    def _rule(n, in_batched, d, ct_floats):
        b_d, b_c = in_batched
        d_axes = jtu.tree_map(lambda b: 0 if b else None, b_d)
        ct_floats = [c if b else jnp.broadcast_to(c, (n,) + jnp.shape(c)) for c, b in zip(ct_floats, b_c)]
        out, vjp_fn = jax.vjp(lambda dd: jax.vmap(fn, in_axes=(d_axes,))(dd), d)
        ct = _float_leaves(vjp_fn(_merge_floats(out, ct_floats))[0])
        return ct, _float_flags(d, b_d)

    return _merge_floats(d, call(d, _float_leaves(cts)))


def _back_step(program, prog, d, const_mask=None, sum_lanes=False):
    """``(packed, ct_packed, ct_d, ct_ys, ct_hist, first, saves, refill=None)
    -> (new, ct_packed_in, ct_d, ct_s)``: the cotangents of one step attempt's
    inputs (the carry ``packed`` and the solve's inputs ``d``) from those of
    its outputs, ``ct_d`` accumulated.

    ``saves = (i0, i1, ct_s)`` says which points of ``t`` the attempt saved
    after its step: their cotangents (in ``ct_ys``) go to the step's
    polynomial and their times' to ``ct_s`` (the loop save times'), which is
    returned updated. ``const_mask`` (outside `jax.vmap`): the loop's times
    are constants and the mask says which leaves of ``d`` are differentiated;
    the vjps leave out the times (the carry's, the save times, the step ends)
    and the other leaves, whose cotangents are zero.

    ``refill`` (a boolean scalar, unbatched): the primal is computed outside
    any branch and ``new`` is the carry after the attempt (its saves passed,
    as the forward loop's); where ``refill`` holds, the transposition is
    skipped and the cotangents pass through. Without ``refill``, ``new`` is
    None and, outside `jax.vmap`, primal and transposition sit in one branch
    taken where the attempt ran.

    A lane whose condition is false (finished, or masked under `jax.vmap`)
    passes its cotangent through. Its iteration is replayed from the initial
    carry ``first`` with zero cotangents, never from its final state: a step of
    length zero there may have non-finite partials (0/0 in a stochastic step),
    which a zero cotangent would turn into NaN.
    """
    max_steps, dense = prog.max_iters, prog.dense is not None

    def out_cotangents(save_at, save_val, step, step_index, ct_packed, ct_hist, active):
        if dense:
            ok = active & step.accept & (step_index < max_steps)
            i = jnp.minimum(step_index, max_steps - 1)
            ct_step = step._replace(
                accept=zero_tangents(step.accept),
                t0=jnp.zeros_like(step.t0),
                t1=jnp.where(ok, ct_hist.ts[i + 1], 0).astype(step.t1.dtype),
                y0=jtu.tree_map(lambda c: jnp.where(ok, c[i], 0).astype(c.dtype), ct_hist.y0s),
                y1=jtu.tree_map(jnp.zeros_like, step.y1),
                coeffs=jtu.tree_map(lambda c: jnp.where(ok, c[i], 0).astype(c.dtype), ct_hist.coeffs),
            )
        else:
            ct_step = zero_tangents(step)
        ct_new = jtu.tree_map(lambda c: jnp.where(active, c, jnp.zeros_like(c)), ct_packed)
        return ct_new, zero_tangents(save_at), zero_tangents(save_val), ct_step

    def with_saves(outs, step, ct_ys, saves, active, pr=prog):
        # The points ``[i0, i1)`` saved on this step's polynomial (``pr``: the
        # program whose save times and polynomial are read).
        ct_new, ct_at, ct_save, ct_step = outs
        i0, i1, ct_s = saves
        s_save = pr.save_times

        def one(j, acc):
            ct_step, ct_s = acc
            ct_j = jtu.tree_map(lambda c: c[j], ct_ys)
            if const_mask is not None:
                # Constant times: the polynomial's states and coefficients only.
                _, vjp_fn = jax.vjp(
                    lambda y0, y1, c: pr.interpolate_step(s_save[j], step._replace(y0=y0, y1=y1, coeffs=c)),
                    step.y0, step.y1, step.coeffs)
                c_y0, c_y1, c_c = vjp_fn(ct_j)
                c_step = zero_tangents(step)._replace(y0=c_y0, y1=c_y1, coeffs=c_c)
                return jtu.tree_map(_add, ct_step, c_step), ct_s
            _, vjp_fn = jax.vjp(pr.interpolate_step, s_save[j], step)
            c_s, c_step = vjp_fn(ct_j)
            ct_s = lax.dynamic_update_index_in_dim(ct_s, ct_s[j] + c_s, j, 0)
            return jtu.tree_map(_add, ct_step, c_step), ct_s

        ct_step, ct_s = lax.fori_loop(i0, jnp.where(active, i1, i0), one, (ct_step, ct_s))
        return (ct_new, ct_at, ct_save, ct_step), ct_s

    def primal(packed, d, masked):
        # ``(outs, vjp_fn)`` of one attempt, ``masked`` as the forward loop's.
        if const_mask is None:
            return jax.vjp(lambda p, dd: _masked_iteration(program(dd), p) if masked
                           else program(dd).attempt(p), packed, d)
        times, states = prog.split_times(packed)
        d_var, d_const = eqx.partition(d, const_mask)

        def fn(states, d_var):
            p = prog.join_times(times, states)
            pr = program(eqx.combine(d_var, d_const))
            return _masked_iteration(pr, p) if masked else pr.attempt(p)

        outs, vjp_states = jax.vjp(fn, states, d_var)

        def vjp_fn(cts):
            ct_states, ct_var = vjp_states(cts)
            return prog.join_times(zero_tangents(times), ct_states), eqx.combine(ct_var, zero_tangents(d_const))

        return outs, vjp_fn

    def step_cts(outs, step_index, ct_packed, ct_ys, ct_hist, saves, active, pr=prog):
        # The cotangents of one attempt's outputs (``pr``: see `with_saves`),
        # and the save times' updated.
        _, save_at, save_val, step = outs
        cts = out_cotangents(save_at, save_val, step, step_index, ct_packed, ct_hist, active)
        return with_saves(cts, step, ct_ys, saves, active, pr)

    def transpose(outs, vjp_fn, step_index, ct_packed, ct_d, ct_ys, ct_hist, saves, active):
        cts, ct_s = step_cts(outs, step_index, ct_packed, ct_ys, ct_hist, saves, active)
        ct_p, ct_dd = vjp_fn(cts)
        return ct_p, jtu.tree_map(_add, ct_d, ct_dd), ct_s

    def after(outs, packed, active, pr=prog):
        # The carry the forward loop went on with: the attempt's, its saves
        # passed (a lane that did not run keeps ``packed``).
        new, _, _, step = outs
        new = pr.save_passed(new, step, None)[0]
        return jtu.tree_map(lambda a, b: jnp.where(active, a, b), new, packed)

    def branch(pred, run, ct_packed, ct_d, ct_s, *operands):
        # ``lax.cond(pred, run, pass-through)`` over the cotangents, where
        # ``run(ct_packed, ct_s, *operands) -> (ct_packed_in, ct_dd, ct_s)``
        # gives the step's own cotangent ``ct_dd`` of ``d``. Only inexact
        # leaves cross the branch (float0 leaves cannot), and ``ct_dd`` is
        # added to the running sum here: passing the sum through the branch
        # copied every parameter's cotangent in and out at every step (+20% on
        # W3s's training step). The zeros are made inside the branches, not
        # passed in (made outside the loop, they would be a buffer copied in
        # at every step just the same).
        def taken(ct_pf, ct_s, *operands):
            ct_p, ct_dd, ct_s = run(_merge_floats(ct_packed, ct_pf), ct_s, *operands)
            return _float_leaves(ct_p), _float_leaves(ct_dd), ct_s

        def passed(ct_pf, ct_s, *operands):
            return ct_pf, _float_leaves(zero_tangents(d)), ct_s

        ct_pf, ct_df, ct_s = lax.cond(pred, taken, passed, _float_leaves(ct_packed), ct_s, *operands)
        return _merge_floats(ct_packed, ct_pf), jtu.tree_map(_add, ct_d, _merge_floats(d, ct_df)), ct_s

    def back_unbatched(packed, ct_packed, ct_d, ct_ys, ct_hist, saves):
        # Outside `jax.vmap` (as `solve` sees it): primal and transposition in
        # one branch, taken where the attempt ran. The vjp of a `cond` in the
        # iteration would carry the union of both branches' residuals out of a
        # forward `cond` into a transposed one -- dozens of scalar buffers, each
        # a copy per iteration, which cost more than the arithmetic on small
        # states. (Under a `vmap` `solve` cannot see, the branch becomes a
        # select of the results: an unselected branch's non-finite values are
        # discarded, not multiplied by zero.)
        def run(ct_packed, ct_s, packed):
            outs, vjp_fn = primal(packed, d, False)
            return transpose(outs, vjp_fn, prog.step_index(packed), ct_packed, zero_tangents(d), ct_ys, ct_hist,
                             (saves[0], saves[1], ct_s), True)

        ct_p, ct_d, ct_s = branch(prog.step_cond(packed), run, ct_packed, ct_d, saves[2], packed)
        return None, ct_p, ct_d, ct_s

    lanes_steps = {}

    def back(packed, ct_packed, ct_d, ct_ys, ct_hist, first, saves, refill=None):
        if sum_lanes:
            has_refill = refill is not None
            if has_refill not in lanes_steps:
                lanes_steps[has_refill] = _lanes_back_step(program, prog, const_mask, has_refill, primal, step_cts,
                                                           after)
            new, ct_pf, ct_df, ct_s = lanes_steps[has_refill](
                packed, first, d, _float_leaves(ct_packed), ct_ys, ct_hist, saves[0], saves[1], saves[2],
                jnp.asarray(False) if refill is None else refill)
            ct_d = jtu.tree_map(_add, ct_d, _merge_floats(d, ct_df))
            return new, _merge_floats(ct_packed, ct_pf), ct_d, ct_s
        if refill is None and prog.buffer_lanes == 1:
            return back_unbatched(packed, ct_packed, ct_d, ct_ys, ct_hist, saves)
        active = prog.step_cond(packed)
        if prog.buffer_lanes == 1:
            # Every carry the backward pass recomputes or walks is one the
            # forward loop stepped from. (Not under a `jax.vmap` over an SDE's
            # keys alone, which `lanes` does not count: its paths finish at
            # different iterations, and a finished path's zero-length step
            # has non-finite partials.)
            safe = packed
        else:
            safe = jtu.tree_map(lambda a, b: jnp.where(active, a, b), packed, first)
        step_index = prog.step_index(safe)
        outs, vjp_fn = primal(safe, d, prog.buffer_lanes > 1)

        def run(ct_packed, ct_s, ct_d=None):
            # ``ct_d`` None: the step's own cotangent of ``d`` (see `branch`).
            ct_d = zero_tangents(d) if ct_d is None else ct_d
            ct_p, ct_d, ct_s = transpose(outs, vjp_fn, step_index, ct_packed, ct_d, ct_ys, ct_hist,
                                         (saves[0], saves[1], ct_s), active)
            ct_p = jtu.tree_map(lambda a, b: a if _is_float0(a) else jnp.where(active, a, b), ct_p, ct_packed)
            return ct_p, ct_d, ct_s

        if refill is None:
            return (None, *run(ct_packed, saves[2], ct_d))
        ct_p, ct_d, ct_s = branch(~refill, run, ct_packed, ct_d, saves[2])
        return after(outs, packed, active), ct_p, ct_d, ct_s

    return back


def _lanes_back_step(program, prog, const_mask, has_refill, primal, step_cts, after):
    """One lane's backward step (`_back_step` under `jax.vmap`) as a
    `jax.custom_batching.custom_vmap` function whose batching rule
    differentiates the *batched* step attempt, so that the cotangent of an
    input every lane shares (a neural field's weights) is summed over the
    lanes inside the transposed products -- ``x^T delta``, one matrix product
    -- instead of one outer product per lane accumulated in a per-lane buffer
    (W4's vmapped gradient: a 256 x 64 x 64 cotangent read and written at
    every step).

    Used only where that sum is the derivative wanted: ``solve`` found the
    `jax.vmap` that batches its inputs innermost among the transformations
    it is called under (`_solve._lanes_innermost`), so the lanes are those of
    a batched primal whose shared inputs' cotangent is the sum over them
    (`jax.grad` of a `jax.vmap`), never those of a `jax.vmap` of gradients,
    where each lane keeps its own. The rule is applied by the innermost batch
    trace, which in the backward pass is that `jax.vmap`'s (an outer `vmap`,
    such as `jax.jacrev`'s over cotangents, batches the rule's result as usual).

    Signature: ``(packed, first, d, ct_packed_floats, ct_ys, ct_hist, i0, i1,
    ct_s, refill) -> (new, ct_packed_floats, ct_d_floats, ct_s)``: the float
    leaves of the cotangents only (`_float_leaves`), ``ct_d_floats`` the
    step's own cotangent of ``d``; ``new`` (with ``has_refill``) the carry
    after the attempt, else None."""

    def prepare(lanes, d):
        # A lane that is not active steps from the initial carry (see
        # `_back_step`).
        packed, first = lanes
        pr = program(d)
        active = pr.step_cond(packed)
        safe = jtu.tree_map(lambda a, b: jnp.where(active, a, b), packed, first)
        return active, safe, pr.step_index(safe)

    def lane(packed, first, d, ct_pf, ct_ys, ct_hist, i0, i1, ct_s, refill):
        pr = program(d)
        ct_packed = _merge_floats(packed, ct_pf)
        active, safe, step_index = prepare((packed, first), d)
        outs, vjp_fn = primal(safe, d, True)

        def run(ct_pf, ct_s):
            cts, ct_s = step_cts(outs, step_index, _merge_floats(packed, ct_pf), ct_ys, ct_hist, (i0, i1, ct_s),
                                 active, pr)
            ct_p, ct_dd = vjp_fn(cts)
            ct_p = jtu.tree_map(lambda a, b: a if _is_float0(a) else jnp.where(active, a, b), ct_p, ct_packed)
            return _float_leaves(ct_p), _float_leaves(ct_dd), ct_s

        return _finish(run, ct_pf, ct_s, refill, d, lambda: after(outs, packed, active, pr))

    def _finish(run, ct_pf, ct_s, refill, d, new_carry):
        if not has_refill:
            return (None, *run(ct_pf, ct_s))
        # Refilling a segment's carries: the transposition is skipped.
        passed = lambda ct_pf, ct_s: (ct_pf, _float_leaves(zero_tangents(d)), ct_s)  # noqa: E731
        return (new_carry(), *lax.cond(refill, passed, run, ct_pf, ct_s))

    step = jax.custom_batching.custom_vmap(lane)

    @step.def_vmap
    def _rule(n, in_batched, packed, first, d, ct_pf, ct_ys, ct_hist, i0, i1, ct_s, refill):
        b_d = in_batched[2]
        d_axes = jtu.tree_map(lambda b: 0 if b else None, b_d)
        df_batched = _float_flags(d, b_d)

        def batched(out):  # every output per lane, but the shared inputs' cotangents
            new, ct_pf, ct_df, ct_s = out
            return (jtu.tree_map(lambda _: True, new), [True] * len(ct_pf), list(df_batched),
                    jtu.tree_map(lambda _: True, ct_s))

        if in_batched[9]:
            # (Not from `_bwd_steps`' loops, whose counters the lanes share;
            # were it batched, every lane would hold the same flag.)
            refill = refill[0]
        # Every other operand with its lane axis in front.
        lanes_of = lambda x, b: jtu.tree_map(  # noqa: E731
            lambda x, b: x if b else jnp.broadcast_to(x, (n,) + jnp.shape(x)), x, b)
        packed, first, ct_pf, ct_ys, ct_hist, i0, i1, ct_s = (
            lanes_of(x, b) for x, b in zip((packed, first, ct_pf, ct_ys, ct_hist, i0, i1, ct_s),
                                           (in_batched[k] for k in (0, 1, 3, 4, 5, 6, 7, 8))))
        V = lambda f: jax.vmap(f, in_axes=(0, d_axes))  # noqa: E731  (lane arrays, then d)

        active, safe, step_index = V(prepare)((packed, first), d)
        outs, vjp_fn = _batched_primal(program, prog, const_mask, safe, d, d_axes)

        def run(ct_pf, ct_s):
            def lane_cts(lanes, d):
                outs1, step_index1, ct_pf1, ct_ys1, ct_hist1, i01, i11, ct_s1, active1, packed1 = lanes
                return step_cts(outs1, step_index1, _merge_floats(packed1, ct_pf1), ct_ys1, ct_hist1,
                                (i01, i11, ct_s1), active1, program(d))

            cts, ct_s = V(lane_cts)((outs, step_index, ct_pf, ct_ys, ct_hist, i0, i1, ct_s, active, packed), d)
            ct_p, ct_dd = vjp_fn(cts)
            ct_packed = jax.vmap(_merge_floats)(packed, ct_pf)
            ct_p = jtu.tree_map(lambda a, b: a if _is_float0(a) else jax.vmap(jnp.where)(active, a, b), ct_p,
                                ct_packed)
            return _float_leaves(ct_p), _float_leaves(ct_dd), ct_s

        def new_carry():
            return V(lambda lanes, d: after(lanes[0], lanes[1], lanes[2], program(d)))((outs, packed, active), d)

        out = _finish(run, ct_pf, ct_s, refill, d, new_carry)
        return out, batched(out)

    return step


def _batched_primal(program, prog, const_mask, safe, d, d_axes):
    """``(outs, vjp_fn)`` of the masked step attempt of every lane at once
    (``safe``: the carries, lane axis in front; ``d`` batched along
    ``d_axes``): the vjp of the batched attempt, whose cotangent of a shared
    leaf of ``d`` is summed over the lanes. With ``const_mask``, as
    `_back_step`'s ``primal``: the times and the undifferentiated leaves of
    ``d`` are left out of the vjp."""
    def one(p, dd):
        return _masked_iteration(program(dd), p)

    if const_mask is None:
        return jax.vjp(lambda p, dd: jax.vmap(one, in_axes=(0, d_axes))(p, dd), safe, d)
    times, states = prog.split_times(safe)  # (structure only: a tuple's parts)
    d_var, d_const = eqx.partition(d, const_mask)

    def fn(states, d_var):
        return jax.vmap(lambda t, s, dd: one(prog.join_times(t, s), dd), in_axes=(0, 0, d_axes))(
            times, states, eqx.combine(d_var, d_const))

    outs, vjp_states = jax.vjp(fn, states, d_var)

    def vjp_fn(cts):
        ct_states, ct_var = vjp_states(cts)
        return prog.join_times(zero_tangents(times), ct_states), eqx.combine(ct_var, zero_tangents(d_const))

    return outs, vjp_fn


def _float_flags(tree, flags):
    """``flags`` (a bool per leaf of ``tree``) at the leaves `_float_leaves`
    keeps of ``tree``'s cotangent."""
    return [b for x, b in zip(jtu.tree_leaves(tree), jtu.tree_leaves(flags)) if not _is_float0(zero_tangents(x))]


def _float_leaves(tree):
    """The inexact leaves of a cotangent tree (float0 leaves cannot cross a
    `lax.cond`)."""
    return [x for x in jtu.tree_leaves(tree) if not _is_float0(x)]


def _merge_floats(like, floats):
    """``like``'s cotangent tree with its inexact leaves from ``floats`` and
    float0 zeros elsewhere."""
    leaves, treedef = jtu.tree_flatten(zero_tangents(like))
    it = iter(floats)
    return jtu.tree_unflatten(treedef, [x if _is_float0(x) else next(it) for x in leaves])


def _carry_bytes(packed) -> int:
    """Bytes of one loop carry of one lane."""
    return sum(x.size * x.dtype.itemsize for x in jtu.tree_leaves(packed))


def _masked_iteration(prog, packed):
    """One step attempt where the loop condition holds, else nothing.

    The forward loop runs while *any* lane of a `jax.vmap` is active
    (`equinox.internal.unvmap_any`, the device diffrax uses too) and finished
    lanes are masked here. Under `vmap` a while loop with a batched condition
    would otherwise select every carry element -- the checkpoint buffer
    included, a copy of ``max_steps`` carries per iteration -- and index it
    with a batched counter (a scatter). Outside `vmap` the condition always
    holds where this runs and the mask is a select on the small carry."""
    active = prog.step_cond(packed)
    new, save_at, save_val, step = prog.attempt(packed)
    new = jtu.tree_map(lambda a, b: jnp.where(active, a, b), new, packed)
    return new, save_at, save_val, step._replace(accept=step.accept & active)


def _is_float0(a):
    return getattr(a, "dtype", None) == jax.dtypes.float0


def _add(a, b):
    if getattr(a, "dtype", None) == jax.dtypes.float0:
        return a
    return a + b
