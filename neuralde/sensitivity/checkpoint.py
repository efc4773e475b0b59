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

# With checkpoints=None, checkpoint every iteration while the buffer (every
# `jax.vmap` lane's) takes at most _EVERY_STEP_BYTES; beyond it, as many slots
# as fit in _SLOT_BYTES, and at least O(sqrt(iterations)).
_EVERY_STEP_BYTES = 16 * 2**20
_SLOT_BYTES = 4 * 2**20


class CheckpointAdjoint(AbstractSensitivity):
    """Discrete adjoint of the steps actually taken, recomputed from
    checkpoints (`jax.custom_vjp`).

    Small problems (a checkpoint of every iteration fits in 16 MiB, counting
    every lane of a `jax.vmap` that `solve` is called under): the forward pass
    is a `lax.while_loop` of step attempts alone that stores the loop carry
    before each attempt; after an accepted step a small inner loop saves the
    points of ``t`` the step passed, from its polynomial. The backward pass
    applies `jax.vjp` of one step attempt, recomputed from its checkpoint,
    from the last attempt to the first, the cotangents of the points it saved
    added to those of its polynomial. A point of ``t`` costs no iteration of
    the main loop either way. When ``t`` is not differentiated (and no delay
    breakpoint moves the steps), every time in the loop is a constant, and
    the backward steps differentiate the states and the differentiated inputs
    only.

    Otherwise the forward pass is a `lax.while_loop` of step-or-save
    iterations that stores the loop carry (state, FSAL derivative, last step's
    interpolant, counters) every ``K`` iterations. The backward pass walks the
    segments between checkpoints in reverse: it recomputes a segment's carries
    from its checkpoint, then applies `jax.vjp` of one iteration (the step, or
    the interpolation to a save time) from the last to the first, feeding in
    the cotangents of the saved values.

    Either way it differentiates exactly the
    operations `ReverseMode` differentiates, so the two gradients agree to
    round-off, with respect to ``y0``, ``args``, the save times and every
    floating array of the term (closed-over arrays included, by closure
    conversion).

    Memory and work: the forward loop keeps ``C`` checkpoint slots of one
    carry each (about ``(degree + 3) * y.size`` numbers for the explicit
    solvers). It checkpoints every iteration until the slots are full, then
    drops every other checkpoint and goes on with every 2nd iteration, then
    every 4th, ... (the stride ``S`` doubles). The backward pass recomputes
    each segment of ``S`` iterations from its checkpoint (``S`` more carries)
    and walks it in reverse. A solve that fits in ``C`` iterations is never
    recomputed, and a longer one is recomputed once, whatever its number of
    steps.

    With ``checkpoints=None``, ``C = N = max_steps + len(t)`` (the bound on
    iterations: every iteration, no stride) while the buffer takes at most 16
    MiB, counting every lane of a `jax.vmap` that `solve` is called under;
    otherwise as many slots as fit in 4 MiB, and at least about ``sqrt(N)`` (so
    that slots and segment together hold about ``2 sqrt(N)`` carries: a batch
    of 16k x 64 floats never costs ``max_steps`` copies of itself). The
    buffer is allocated whole at every call, and 256 lanes of ``N`` carries of
    a small state (100 MB) would cost more to allocate than a short solve
    costs to run. Pass ``checkpoints=C`` to choose.

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
        iterations whose carry (all `jax.vmap` lanes together) takes
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

    def _steps_only(self, prog) -> bool:
        """Whether the forward pass is a loop of steps alone, each
        checkpointed (`_fwd_steps`): when the plan checkpoints every
        iteration."""
        slots, _ = self.plan(prog.max_iters, _carry_bytes(prog.packed) * prog.lanes)
        return slots >= prog.max_iters

    def run(self, build, inputs):
        term, y0, args, ts, *rest = inputs
        term = closure_convert_term(term, ts[0], y0, args)
        dyn, static = eqx.partition((term, y0, args, ts, *rest), eqx.is_array)

        def program(d, **overrides):
            return build(eqx.combine(d, static), **overrides)

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
            prog = program(d)
            seen["mask"] = mask
            ts_perturbed = mask[3]  # d is (term, y0, args, ts, rtol, atol, dt0)
            seen["const_times"] = not ts_perturbed and not prog.moving_steps
            if self._steps_only(prog):
                return _fwd_steps(program, d)
            slots, _ = self.plan(prog.max_iters, _carry_bytes(prog.packed) * prog.lanes)
            ckpts = jtu.tree_map(lambda x: jnp.zeros((slots,) + x.shape, x.dtype), prog.packed)

            half = (slots + 1) // 2

            def body(c):
                # One iteration. ``it`` counts the loop's iterations; it and
                # ``stride`` stay unbatched under `jax.vmap` (the loop runs
                # while any lane is active, see `_masked_iteration`), so the
                # writes are in place.
                packed, ys, dense, it, stride, ckpts = c
                due = it % stride == 0
                slot = jnp.minimum(it // stride, slots - 1)
                ckpts = jtu.tree_map(
                    lambda b, x: lax.dynamic_update_index_in_dim(
                        b, jnp.where(due, x, lax.dynamic_index_in_dim(b, slot, 0, keepdims=False)), slot, 0),
                    ckpts, packed)
                step_index = prog.step_index(packed)
                packed, save_at, save_val, step = _masked_iteration(prog, packed)
                ys, dense = prog.apply_writes(ys, dense, step_index, save_at, save_val, step)
                prog.report(packed)
                return packed, ys, dense, it + 1, stride, ckpts

            def running(c):
                return eqxi.unvmap_any(prog.cond(c[0]))

            def full(c):
                it, stride = c[3], c[4]
                return (it % stride == 0) & (it // stride >= slots)

            def epoch(c):
                # Iterations at one stride until the slots are full (or the
                # solve ends); a full buffer first keeps every other
                # checkpoint, moved down in place, and doubles the stride. A
                # loop of its own, not a branch in every iteration: a `cond`
                # with the buffer as operand would copy it in and out.
                packed, ys, dense, it, stride, ckpts = c
                compact = full(c)
                move = lambda m, ck: jtu.tree_map(  # noqa: E731
                    lambda b: lax.dynamic_update_index_in_dim(b, b[2 * m], m, 0), ck)
                ckpts = lax.fori_loop(0, jnp.where(compact, half, 0), move, ckpts)
                stride = jnp.where(compact, 2 * stride, stride)
                return lax.while_loop(lambda c: running(c) & ~full(c), body,
                                      (packed, ys, dense, it, stride, ckpts))

            prog.start()
            one = jnp.asarray(1, jnp.int32)
            packed, ys, dense, n_iter, stride, ckpts = lax.while_loop(
                running, epoch, (prog.packed, prog.ys, prog.dense, jnp.asarray(0, jnp.int32), one, ckpts))
            out = prog.finalize(packed, ys, dense)
            return out, (d, ckpts, n_iter, stride)

        def bwd(res, ct_out):
            ct_out = jtu.tree_map(instantiate_zero, ct_out, is_leaf=is_symbolic_zero)
            if self._steps_only(program(res[0])):
                return _bwd_steps(program, res, ct_out, seen["mask"] if seen["const_times"] else None)
            d, ckpts, n_iter, stride = res
            (ct_ys, ct_hist), _ = ct_out
            prog = program(d)
            n_save = prog.n_save
            _, max_stride = self.plan(prog.max_iters, _carry_bytes(prog.packed) * prog.lanes)
            dense = prog.dense is not None
            max_steps = prog.max_iters - n_save

            # The initial carry: a lane that has finished replays its iteration
            # from here instead of from its final state (see `_back_step`).
            first = jtu.tree_map(lambda b: b[0], ckpts)
            back_step = _back_step(program, prog, n_save, max_steps, dense)

            def one_back(packed, ct_packed, ct_d):
                ct_p, ct_dd, _ = back_step(packed, ct_packed, d, ct_ys, ct_hist, first)
                return ct_p, jtu.tree_map(_add, ct_d, ct_dd)

            def segment(c):
                # Segment ``k`` (from the last to the first): its carries are
                # recomputed from checkpoint ``k`` into one buffer, which the
                # inner loop then walks in reverse. Nested loops, no branch
                # with the buffer as operand (a `cond` would copy it in and out).
                k, ct_packed, ct_d, carries = c
                count = jnp.minimum(stride, n_iter - k * stride)
                start = jtu.tree_map(lambda b: b[k], ckpts)
                carries = jtu.tree_map(lambda b, x: lax.dynamic_update_index_in_dim(b, x, 0, 0), carries, start)

                def fill(m, bufs):
                    nxt = _masked_iteration(prog, jtu.tree_map(lambda b: b[m], bufs))[0]
                    return jtu.tree_map(lambda b, x: lax.dynamic_update_index_in_dim(b, x, m + 1, 0), bufs, nxt)

                carries = lax.fori_loop(0, count - 1, fill, carries)

                def walk(w):
                    j, ct_packed, ct_d = w
                    return (j - 1, *one_back(jtu.tree_map(lambda b: b[j], carries), ct_packed, ct_d))

                _, ct_packed, ct_d = lax.while_loop(lambda w: w[0] >= 0, walk, (count - 1, ct_packed, ct_d))
                return k - 1, ct_packed, ct_d, carries

            ct_packed0 = zero_tangents(prog.packed)
            ct_d0 = zero_tangents(d)
            # The carries of the segment being walked: one buffer for the pass.
            carries0 = jtu.tree_map(lambda x: jnp.zeros((max_stride,) + x.shape, x.dtype), first)
            n_segments = (n_iter + stride - 1) // stride
            _, ct_packed, ct_d, _ = lax.while_loop(
                lambda c: c[0] >= 0, segment, (n_segments - 1, ct_packed0, ct_d0, carries0))

            return (jtu.tree_map(_add, ct_d, _initial_cotangents(program, d, ct_packed, ct_ys, ct_hist)),)

        solve.defvjp(fwd, bwd, symbolic_zeros=True)
        return solve(dyn)



def _steps_view(prog):
    """``prog`` as the loop of steps alone sees it: its carry without the last
    step's polynomial (which only the save iterations read; this loop saves
    from each step's own outputs), so that neither the checkpoints nor the
    backward steps hold it."""
    add, drop = prog.add_last, prog.drop_last

    def step(reduced):
        new, save_at, save_val, step_out = prog.branches[1](add(reduced))
        return drop(new), save_at, save_val, step_out

    def save_passed(reduced, step_out, ys):
        new, ys = prog.save_passed(add(reduced), step_out, ys)
        return drop(new), ys

    return prog._replace(
        packed=drop(prog.packed), branches=(None, step), save_passed=save_passed,
        step_cond=lambda r: prog.step_cond(add(r)), step_index=lambda r: prog.step_index(add(r)),
        save_index=lambda r: prog.save_index(add(r)), report=lambda r: prog.report(add(r)),
        finalize=lambda r, ys, dense: prog.finalize(add(r), ys, dense),
    )


def _fwd_steps(program, d):
    """The forward pass of steps alone: a `lax.while_loop` of step attempts
    that checkpoints the carry before each; after an accepted step, a small
    inner loop saves the points of ``t`` it passed. A save point costs no
    iteration of the loop, forward or backward (on small states an
    iteration's fixed cost, not its arithmetic, is what a solve spends)."""
    prog = _steps_view(program(d))
    max_steps = prog.max_iters - prog.n_save

    def body(c):
        # ``it`` stays unbatched under `jax.vmap` (see `_masked_iteration`).
        packed, ys, dense, it, ckpts = c
        ckpts = jtu.tree_map(
            lambda b, x: lax.dynamic_update_index_in_dim(b, x, jnp.minimum(it, max_steps - 1), 0), ckpts, packed)
        step_index = prog.step_index(packed)
        packed, _, _, step = _masked_iteration(prog, packed, steps_only=True)
        packed, ys = prog.save_passed(packed, step, ys)
        dense = prog.write_dense(dense, step_index, step)
        prog.report(packed)
        return packed, ys, dense, it + 1, ckpts

    def loop(packed, ys, dense):
        # The checkpoint buffer is made inside: as an input it would be a
        # large constant, which `single_kernel` does not take.
        ckpts = jtu.tree_map(lambda x: jnp.zeros((max_steps,) + x.shape, x.dtype), packed)
        return lax.while_loop(lambda c: eqxi.unvmap_any(prog.step_cond(c[0])), body,
                              (packed, ys, dense, jnp.asarray(0, jnp.int32), ckpts))

    prog.start()
    # One CPU kernel where `single_kernel` can, as the backward loop below.
    packed, ys, dense, n_iter, ckpts = single_kernel(loop, prog.packed, prog.ys, prog.dense)
    return prog.finalize(packed, ys, dense), (d, ckpts, n_iter, prog.save_index(packed))


def _bwd_steps(program, res, ct_out, const_mask=None):
    """The backward pass of `_fwd_steps`: the step attempts in reverse, each
    recomputed from its checkpoint, with the cotangents of the points it saved
    added to those of its polynomial. ``const_mask`` (when the loop's times
    are constants): which leaves of ``d`` are differentiated; the steps' vjps
    then take only those and the states."""
    d, ckpts, n_iter, last_saved = res
    (ct_ys, ct_hist), _ = ct_out
    steps_program = lambda dd: _steps_view(program(dd))  # noqa: E731
    prog = steps_program(d)
    max_steps = prog.max_iters - prog.n_save
    s_save = prog.save_times
    first = jtu.tree_map(lambda b: b[0], ckpts)
    back_step = _back_step(steps_program, prog, prog.n_save, max_steps, prog.dense is not None, steps_only=True,
                           const_mask=const_mask)

    def loop(ckpts, ct0):
        def back(c):
            # Attempt ``i`` saved the points ``[save_index(ckpts[i]), nxt)``.
            i, nxt, ct_packed, ct_d, ct_s = c
            p = jtu.tree_map(lambda b: b[i], ckpts)
            i0 = prog.save_index(p)
            ct_p, ct_dd, ct_s = back_step(p, ct_packed, d, ct_ys, ct_hist, first, (i0, nxt, ct_s))
            return i - 1, i0, ct_p, jtu.tree_map(_add, ct_d, ct_dd), ct_s

        return lax.while_loop(lambda c: c[0] >= 0, back, ct0)

    ct0 = (n_iter - 1, last_saved, zero_tangents(prog.packed), zero_tangents(d), jnp.zeros_like(s_save))
    # One CPU kernel where `single_kernel` can; the checkpoints, which the
    # forward loop computed, are passed beside its packed inputs.
    _, _, ct_packed, ct_d, ct_s = single_kernel(loop, ct0, produced=ckpts)

    return (jtu.tree_map(_add, ct_d, _initial_cotangents(steps_program, d, ct_packed, ct_ys, ct_hist, ct_s)),)


def _initial_cotangents(program, d, ct_packed, ct_ys, ct_hist, ct_s=None):
    """The cotangent of ``d`` through what depends on the inputs directly:
    the initial carry, the first saved value (``y0`` itself), the first step
    boundary of the dense history, and (``ct_s`` given) the loop's save
    times."""
    dense = program(d).dense is not None

    def initial(dd):
        p = program(dd)
        out = (p.packed, jtu.tree_map(lambda y: y[0], p.ys), p.dense[0][0] if dense else None)
        return out if ct_s is None else (*out, p.save_times)

    _, vjp_init = jax.vjp(initial, d)
    cts = (ct_packed, jtu.tree_map(lambda c: c[0], ct_ys), ct_hist.ts[0] if dense else None)
    (ct_d,) = vjp_init(cts if ct_s is None else (*cts, ct_s))
    return ct_d


def _back_step(program, prog, n_save, max_steps, dense, steps_only=False, const_mask=None):
    """``(packed, ct_packed, d, ct_ys, ct_hist, first, saves) -> (ct_packed_in,
    ct_d, ct_s)``: the cotangents of one iteration's inputs from those of its
    outputs.

    ``steps_only``: the iteration is a step attempt alone (`_fwd_steps`) and
    ``saves = (i0, i1, ct_s)`` says which points of ``t`` it saved after the
    step: their cotangents (in ``ct_ys``) go to the step's polynomial and
    their times' to ``ct_s`` (the loop save times'), which is returned
    updated. Otherwise ``saves`` and the returned ``ct_s`` are None.
    ``const_mask`` (steps only, outside `jax.vmap`): the loop's times are
    constants and the mask says which leaves of ``d`` are differentiated; the
    vjps leave out the times (the carry's, the save times, the step ends) and
    the other leaves, whose cotangents are zero.

    A lane whose condition is false (finished, or masked under `jax.vmap`)
    passes its cotangent through. Its iteration is replayed from the initial
    carry ``first`` with zero cotangents, never from its final state: a step of
    length zero there may have non-finite partials (0/0 in a stochastic step),
    which a zero cotangent would turn into NaN.
    """
    s_save = prog.save_times

    def out_cotangents(save_at, save_val, step, step_index, ct_packed, ct_ys, ct_hist, active):
        if steps_only:
            ct_save = zero_tangents(save_val)
        else:
            ok_save = active & (save_at < n_save)
            ct_save = jtu.tree_map(
                lambda c: jnp.where(ok_save, c[jnp.minimum(save_at, n_save - 1)], 0).astype(c.dtype), ct_ys)
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
        return ct_new, zero_tangents(save_at), ct_save, ct_step

    def with_saves(outs, step, ct_ys, saves, active):
        # The points ``[i0, i1)`` saved on this step's polynomial.
        if not steps_only:
            return outs, None
        ct_new, ct_at, ct_save, ct_step = outs
        i0, i1, ct_s = saves

        def one(j, acc):
            ct_step, ct_s = acc
            ct_j = jtu.tree_map(lambda c: c[j], ct_ys)
            if const_mask is not None:
                # Constant times: the polynomial's states and coefficients only.
                _, vjp_fn = jax.vjp(
                    lambda y0, y1, c: prog.interpolate_step(s_save[j], step._replace(y0=y0, y1=y1, coeffs=c)),
                    step.y0, step.y1, step.coeffs)
                c_y0, c_y1, c_c = vjp_fn(ct_j)
                c_step = zero_tangents(step)._replace(y0=c_y0, y1=c_y1, coeffs=c_c)
                return jtu.tree_map(_add, ct_step, c_step), ct_s
            _, vjp_fn = jax.vjp(prog.interpolate_step, s_save[j], step)
            c_s, c_step = vjp_fn(ct_j)
            ct_s = lax.dynamic_update_index_in_dim(ct_s, ct_s[j] + c_s, j, 0)
            return jtu.tree_map(_add, ct_step, c_step), ct_s

        ct_step, ct_s = lax.fori_loop(i0, jnp.where(active, i1, i0), one, (ct_step, ct_s))
        return (ct_new, ct_at, ct_save, ct_step), ct_s

    def branch_back(index):
        # The cotangents through one branch alone (1: save, 2: step), its
        # forward recomputed and transposed in one place.
        def back(packed, ct_float, d, ct_ys, ct_hist, saves):
            ct_packed = _merge_floats(prog.packed, ct_float)
            step_index = prog.step_index(packed)
            if const_mask is None:
                (_, save_at, save_val, step), vjp_fn = jax.vjp(lambda p, dd: program(dd).branches[index - 1](p),
                                                               packed, d)
            else:
                times, states = prog.split_times(packed)
                d_var, d_const = eqx.partition(d, const_mask)

                def fn(states, d_var):
                    return program(eqx.combine(d_var, d_const)).branches[index - 1](prog.join_times(times, states))

                (_, save_at, save_val, step), vjp_states = jax.vjp(fn, states, d_var)

                def vjp_fn(outs):
                    ct_states, ct_var = vjp_states(outs)
                    ct_p = prog.join_times(zero_tangents(times), ct_states)
                    return ct_p, eqx.combine(ct_var, zero_tangents(d_const))
            outs = out_cotangents(save_at, save_val, step, step_index, ct_packed, ct_ys, ct_hist, True)
            outs, ct_s = with_saves(outs, step, ct_ys, saves, True)
            ct_p, ct_d = vjp_fn(outs)
            return _float_leaves(ct_p), ct_d, ct_s

        return back

    def skip(packed, ct_float, d, ct_ys, ct_hist, saves):
        return ct_float, zero_tangents(d), (saves[2] if steps_only else None)

    def back_unbatched(packed, ct_packed, d, ct_ys, ct_hist, saves):
        # Outside `jax.vmap` (as `solve` sees it): one `switch` over whole
        # backward branches. The vjp of the iteration's own `cond` would carry
        # the union of both branches' residuals out of a forward `cond` into a
        # transposed one -- dozens of scalar buffers, each a copy per iteration,
        # which cost more than the arithmetic on small states. (Under a `vmap`
        # `solve` cannot see, the switch becomes a select of the results: an
        # unselected branch's non-finite values are discarded, not multiplied
        # by zero.)
        operands = (packed, _float_leaves(ct_packed), d, ct_ys, ct_hist, saves)
        if steps_only:
            ct_p, ct_d, ct_s = lax.cond(prog.step_cond(packed), branch_back(2), skip, *operands)
        else:
            ct_p, ct_d, ct_s = lax.switch(prog.kind(packed), [skip, branch_back(1), branch_back(2)], *operands)
        return _merge_floats(ct_packed, ct_p), ct_d, ct_s

    def back(packed, ct_packed, d, ct_ys, ct_hist, first, saves=None):
        if prog.lanes == 1:
            return back_unbatched(packed, ct_packed, d, ct_ys, ct_hist, saves)
        active = (prog.step_cond if steps_only else prog.cond)(packed)
        safe = jtu.tree_map(lambda a, b: jnp.where(active, a, b), packed, first)
        step_index = prog.step_index(safe)
        (_, save_at, save_val, step), vjp_fn = jax.vjp(
            lambda p, dd: _masked_iteration(program(dd), p, steps_only), safe, d)
        outs = out_cotangents(save_at, save_val, step, step_index, ct_packed, ct_ys, ct_hist, active)
        outs, ct_s = with_saves(outs, step, ct_ys, saves, active)
        ct_p, ct_d = vjp_fn(outs)
        ct_p = jtu.tree_map(lambda a, b: a if _is_float0(a) else jnp.where(active, a, b), ct_p, ct_packed)
        return ct_p, ct_d, ct_s

    return back


def _float_leaves(tree):
    """The inexact leaves of a cotangent tree (float0 leaves cannot cross a
    `lax.switch`)."""
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


def _masked_iteration(prog, packed, steps_only=False):
    """One iteration where the loop condition holds, else nothing.

    The forward loop runs while *any* lane of a `jax.vmap` is active
    (`equinox.internal.unvmap_any`, the device diffrax uses too) and finished
    lanes are masked here. Under `vmap` a while loop with a batched condition
    would otherwise select every carry element -- the checkpoint buffer
    included, a copy of ``max_steps`` carries per iteration -- and index it
    with a batched counter (a scatter). Outside `vmap` the condition always
    holds where this runs and the mask is a select on the small carry."""
    if steps_only:
        active = prog.step_cond(packed)
        new, save_at, save_val, step = prog.branches[1](packed)
    else:
        active = prog.cond(packed)
        new, save_at, save_val, step = prog.iteration(packed)
    new = jtu.tree_map(lambda a, b: jnp.where(active, a, b), new, packed)
    save_at = jnp.where(active, save_at, prog.n_save)
    return new, save_at, save_val, step._replace(accept=step.accept & active)


def _is_float0(a):
    return getattr(a, "dtype", None) == jax.dtypes.float0


def _add(a, b):
    if getattr(a, "dtype", None) == jax.dtypes.float0:
        return a
    return a + b
