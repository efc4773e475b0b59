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

from .base import AbstractSensitivity, closure_convert_term, zero_tangents

# With checkpoints=None, store every iteration while that takes at most this
# many bytes; beyond it, store O(sqrt(iterations)) checkpoints.
_EVERY_STEP_BYTES = 32 * 2**20


class CheckpointAdjoint(AbstractSensitivity):
    """Discrete adjoint of the steps actually taken, recomputed from
    checkpoints (`jax.custom_vjp`).

    The forward pass is a plain `lax.while_loop` of step-or-save iterations
    that stores the loop carry (state, FSAL derivative, last step's
    interpolant, counters) every ``K`` iterations. The backward pass walks the
    segments between checkpoints in reverse: it recomputes a segment's carries
    from its checkpoint, then applies `jax.vjp` of one iteration (the step, or
    the interpolation to a save time) from the last to the first, feeding in
    the cotangents of the saved values. It differentiates exactly the
    operations `ReverseMode` differentiates, so the two gradients agree to
    round-off, with respect to ``y0``, ``args``, the save times and every
    floating array of the term (closed-over arrays included, by closure
    conversion).

    Memory and work, with ``N = max_steps + len(t)`` (the bound on iterations)
    and ``C`` checkpoints of one carry (about ``(degree + 3) * y.size``
    numbers for the explicit solvers): ``C + N / C`` carries are stored, and
    the backward pass recomputes the forward iterations once more. With
    ``checkpoints=None``, ``C = N`` (every iteration, nothing recomputed
    twice) while that needs at most 32 MiB, otherwise ``C = sqrt(N)``, so a
    large state (a batch of 16k x 64 floats) never costs ``max_steps`` copies
    of itself. Pass ``checkpoints=k`` to choose.

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

    def segment_length(self, max_iters: int, carry_bytes: int) -> int:
        if self.checkpoints is not None:
            return max(1, math.ceil(max_iters / min(self.checkpoints, max_iters)))
        if max_iters * carry_bytes <= _EVERY_STEP_BYTES:
            return 1
        return max(1, math.ceil(math.sqrt(max_iters)))

    def run(self, build, inputs):
        term, y0, args, ts, *rest = inputs
        term = closure_convert_term(term, ts[0], y0, args)
        dyn, static = eqx.partition((term, y0, args, ts, *rest), eqx.is_array)

        def program(d):
            return build(eqx.combine(d, static))

        @jax.custom_vjp
        def solve(d):
            return program(d).run_while()

        def fwd(d):
            prog = program(d)
            n_max = prog.max_iters
            carry_bytes = sum(x.size * x.dtype.itemsize for x in jtu.tree_leaves(prog.packed))
            seg = self.segment_length(n_max, carry_bytes)
            n_ckpt = math.ceil(n_max / seg)
            ckpts = jtu.tree_map(lambda x: jnp.zeros((n_ckpt,) + x.shape, x.dtype), prog.packed)

            def body(c):
                # ``it`` counts the loop's iterations; it stays unbatched under
                # `jax.vmap` (the loop runs while any lane is active, see
                # `_masked_iteration`), so the checkpoint writes are in place.
                packed, ys, dense, it, ckpts = c
                slot = jnp.minimum(it // seg, n_ckpt - 1)
                if seg == 1:  # every iteration is a checkpoint
                    keep = lambda b, x: x  # noqa: E731
                else:
                    keep = lambda b, x: jnp.where(  # noqa: E731
                        it % seg == 0, x, lax.dynamic_index_in_dim(b, slot, 0, keepdims=False))
                ckpts = jtu.tree_map(lambda b, x: lax.dynamic_update_index_in_dim(b, keep(b, x), slot, 0), ckpts, packed)
                step_index = prog.step_index(packed)
                packed, save_at, save_val, step = _masked_iteration(prog, packed)
                ys, dense = prog.apply_writes(ys, dense, step_index, save_at, save_val, step)
                prog.report(packed)
                return packed, ys, dense, it + 1, ckpts

            prog.start()
            packed, ys, dense, n_iter, ckpts = lax.while_loop(
                lambda c: eqxi.unvmap_any(prog.cond(c[0])), body,
                (prog.packed, prog.ys, prog.dense, jnp.asarray(0, jnp.int32), ckpts)
            )
            out = prog.finalize(packed, ys, dense)
            return out, (d, ckpts, n_iter)

        def bwd(res, ct_out):
            d, ckpts, n_iter = res
            (ct_ys, ct_hist), _ = ct_out
            prog = program(d)
            n_save = prog.n_save
            carry_bytes = sum(x.size * x.dtype.itemsize for x in jtu.tree_leaves(prog.packed))
            seg = self.segment_length(prog.max_iters, carry_bytes)
            n_ckpt = jtu.tree_leaves(ckpts)[0].shape[0]
            dense = prog.dense is not None
            max_steps = prog.max_iters - n_save

            def iterate(packed, d):
                return _masked_iteration(program(d), packed)

            def one_back(packed, ct_packed, ct_d):
                step_index = prog.step_index(packed)
                (_, save_at, _, step), vjp_fn = jax.vjp(iterate, packed, d)
                ok_save = save_at < n_save
                ct_save = jtu.tree_map(
                    lambda c: jnp.where(ok_save, c[jnp.minimum(save_at, n_save - 1)], 0).astype(c.dtype), ct_ys
                )
                if dense:
                    ok = step.accept & (step_index < max_steps)
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
                ct_p, ct_dd = vjp_fn((ct_packed, zero_tangents(save_at), ct_save, ct_step))
                # A masked (finished) lane passes its carry through unchanged. Its
                # discarded iteration may still have made inf/NaN partials (a step
                # of length zero), which a zero cotangent turns into NaN: select
                # the pass-through cotangent instead of relying on 0 * inf.
                active = prog.cond(packed)
                ct_p = jtu.tree_map(lambda a, b: a if _is_float0(a) else jnp.where(active, a, b), ct_p, ct_packed)
                ct_dd = jtu.tree_map(lambda a: a if _is_float0(a) else jnp.where(active, a, jnp.zeros_like(a)), ct_dd)
                return ct_p, jtu.tree_map(_add, ct_d, ct_dd)

            def single(c):
                # Every iteration was checkpointed: one VJP per loop iteration,
                # no recomputation, no inner loop or guard.
                k, ct_packed, ct_d = c
                p = jtu.tree_map(lambda b: b[k], ckpts)
                return (k - 1, *one_back(p, ct_packed, ct_d))

            def segment(c):
                k, ct_packed, ct_d = c
                first = k * seg
                count = jnp.minimum(seg, n_iter - first)
                start = jtu.tree_map(lambda b: b[k], ckpts)

                def recompute(p, j):
                    nxt = lax.cond(j < count, lambda q: _masked_iteration(prog, q)[0], lambda q: q, p)
                    return nxt, p

                if seg == 1:
                    # Every iteration was checkpointed: nothing to recompute.
                    carries = jtu.tree_map(lambda x: x[None], start)
                else:
                    _, carries = lax.scan(recompute, start, jnp.arange(seg))

                def back(j, c2):
                    jj = seg - 1 - j

                    def run(c2):
                        p = jtu.tree_map(lambda b: b[jj], carries)
                        return one_back(p, *c2)

                    return lax.cond(jj < count, run, lambda c2: c2, c2)

                ct_packed, ct_d = lax.fori_loop(0, seg, back, (ct_packed, ct_d))
                return k - 1, ct_packed, ct_d

            n_seg = (n_iter + seg - 1) // seg
            ct_packed0 = zero_tangents(prog.packed)
            ct_d0 = zero_tangents(d)
            _, ct_packed, ct_d = lax.while_loop(
                lambda c: c[0] >= 0, single if seg == 1 else segment,
                (jnp.minimum(n_seg, n_ckpt) - 1, ct_packed0, ct_d0),
            )

            # The initial carry, the first saved value (y0 itself) and the
            # first step boundary depend on the inputs directly.
            def initial(d):
                p = program(d)
                first = jtu.tree_map(lambda y: y[0], p.ys)
                return p.packed, first, (p.dense[0][0] if dense else None)

            _, vjp_init = jax.vjp(initial, d)
            ct_first = jtu.tree_map(lambda c: c[0], ct_ys)
            ct_t0 = ct_hist.ts[0] if dense else None
            (ct_di,) = vjp_init((ct_packed, ct_first, ct_t0))
            return (jtu.tree_map(_add, ct_d, ct_di),)

        solve.defvjp(fwd, bwd)
        return solve(dyn)


def _masked_iteration(prog, packed):
    """One iteration where the loop condition holds, else nothing.

    The forward loop runs while *any* lane of a `jax.vmap` is active
    (`equinox.internal.unvmap_any`, the device diffrax uses too) and finished
    lanes are masked here. Under `vmap` a while loop with a batched condition
    would otherwise select every carry element -- the checkpoint buffer
    included, a copy of ``max_steps`` carries per iteration -- and index it
    with a batched counter (a scatter). Outside `vmap` the condition always
    holds where this runs and the mask is a select on the small carry."""
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
