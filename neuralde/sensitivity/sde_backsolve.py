"""The stochastic adjoint: `BacksolveAdjoint` for SDEs.

The gradient of a loss of an Itô SDE's path, for a fixed Brownian path, comes
from solving the adjoint system backwards in time along the same path (Li,
Wong, Chen & Duvenaud 2020, "Scalable gradients for stochastic differential
equations", AISTATS; Kidger et al. 2021, "Neural SDEs as infinite-dimensional
GANs"). Written in Stratonovich form, the forward SDE

    dy = b~(t, y) dt + G(t, y) o dW,   b~ = b - c,   c_i = 1/2 sum_jk G_kj dG_ij/dy_k

(``b`` the Itô drift, ``c`` the Itô--Stratonovich correction) is a
differential equation driven by the path ``(t, W(t))`` that obeys the chain
rule, so its adjoint is the ODE adjoint with the increment
``Phi(y) = b~(y) dt + G(y) dW`` in place of ``f(y) dt``:

    dy = Phi(y),   da = -a^T dPhi/dy,   dg = -a^T dPhi/dtheta,

all three run backwards from ``t[-1]`` to ``t[0]`` along the same path
(``dt < 0``, ``dW = W(t + dt) - W(t)``), ``a`` picking up each save time's
cotangent as it passes, ``y`` restarted from the forward solution there. One
`jax.vjp` of ``Phi`` per stage gives both adjoints.

The backward system is integrated with the Stratonovich Heun method (the
trapezoidal rule with an Euler predictor; strong order 1 for commutative
noise, 1/2 in general), adaptive with the Euler--Heun difference as its error
estimate where the forward solve was adaptive, with the forward's ``dt0``
otherwise. The Brownian path is the forward solve's tree, queried at the
backward steps' times.

The correction ``c`` needs derivatives of the diffusion: none for additive
noise, one `jax.jvp` for scalar noise, one per noise channel for general
noise, and the diagonal of the diffusion's Jacobian for diagonal noise (one
forward-mode pass per component of ``y``: the components' diffusions may
depend on the whole state).
"""
from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree

from .. import _brownian
from .._controller import all_finite, rms_norm, scaled_error
from .._solution import Status
from .backsolve import backward_inputs
from .base import closure_convert_term, unwrap_primals, zero_tangents


def _diffusion_and_correction(term, t, y, args):
    """``(G, c)``: the diffusion at ``(t, y)`` and the Itô--Stratonovich drift
    correction ``c`` (the structure of ``y``), the diffusion evaluated once
    (`jax.linearize`: its primal, then its derivative applied as needed)."""
    noise = term.noise
    if noise == "additive":
        return term.g(t, y, args), jtu.tree_map(jnp.zeros_like, y)
    if noise == "scalar":
        g, dg = jax.linearize(lambda y_: term.g(t, y_, args), y)
        return g, jtu.tree_map(lambda x: 0.5 * x, dg(g))
    flat, unravel = ravel_pytree(y)
    if noise == "diagonal":
        g, dg = jax.linearize(lambda f: ravel_pytree(term.g(t, unravel(f), args))[0], flat)
        jac = jax.vmap(dg)(jnp.eye(flat.shape[0], dtype=flat.dtype))  # row k: dG/dy_k
        return unravel(g), unravel(0.5 * g * jnp.diagonal(jac))
    # general: G is (y.size, m); c = 1/2 sum_j (dG_:j/dy) G_:j.
    G, dG = jax.linearize(lambda f: term.g(t, unravel(f), args), flat)
    # Row j: (dG/dy) G_:j, a (size, m) matrix, of which column j counts.
    c = jnp.einsum("jij->i", jax.vmap(dG, in_axes=1)(G.astype(flat.dtype)))
    return G, unravel((0.5 * c).astype(flat.dtype))


def _increment(term, t, y, args, dt, dw):
    """``Phi = (b - c) dt + G dW`` at ``(t, y)`` for a step ``dt``, ``dW``."""
    b = term.vf(t, y, args)
    G, c = _diffusion_and_correction(term, t, y, args)
    gdw = term.noise_product(G, dw, y)
    return jtu.tree_map(lambda b_, c_, n_: (b_ - c_) * dt.astype(b_.dtype) + n_, b, c, gdw)


def run(backsolve, build, inputs):
    """`BacksolveAdjoint.run` for an `SDETerm` (see the module docstring)."""
    term, y0, args, ts, rtol, atol, dt0 = inputs
    term = closure_convert_term(term, ts[0], y0, args)
    dyn, static = eqx.partition((term, y0, args, ts, rtol, atol, dt0), eqx.is_array)
    seminorm = backsolve.seminorm
    settings = {}

    def program(d):
        return build(eqx.combine(d, static))

    @jax.custom_vjp
    def solve(d):
        return program(d).run_while()

    def fwd(d):
        d, _ = unwrap_primals(d)
        prog = program(d)
        settings.update(throw=prog.throw, adaptive=prog.adaptive, max_steps=prog.max_iters - prog.n_save)
        out, packed = prog.run_while(return_carry=True)
        return out, (d, out[0][0], prog.step_size(packed))

    def bwd(res, ct_out):
        d, ys, h_last = res
        ct_ys, theta, theta_rest, rtol_v, atol_v, dt0_v = backward_inputs(d, static, ys, ct_out)
        term_d, y0_d, args_d, ts_d, rtol_d, atol_d, dt0_d = d
        term_s, _, args_s, _, _, _, _ = static
        adaptive, max_steps = settings["adaptive"], settings["max_steps"]
        time_dtype = ts_d.dtype
        # The step times and the path are data: no derivative flows through
        # them (under forward-over-reverse, `jax.hessian`, a tangent of the
        # step sizes would differentiate the tree's piecewise path).
        times = lax.stop_gradient(ts_d)
        span0, span1 = times[0], times[-1]
        # The backward method is of lower order than the SRI methods, and may
        # need more steps than the forward solve took.
        max_back = _BACKWARD_STEPS_FACTOR * max_steps
        tiny = 16 * jnp.finfo(time_dtype).eps * jnp.maximum(jnp.abs(span0), jnp.abs(span1))

        def unpack(th):
            return eqx.combine(th, theta_rest, (term_s, args_s))

        seed = unpack(theta)[0].seed
        n_noise = term_s.noise_size(y0_d)

        def augmented(t, z, dt, dw):
            y, a, _ = z

            def phi(y_, th_):
                term_, args_ = unpack(th_)
                return _increment(term_, t, y_, args_, dt, dw)

            fy, vjp = jax.vjp(phi, y, theta)
            a_y, a_th = vjp(a)
            neg = lambda tree: jtu.tree_map(jnp.negative, tree)  # noqa: E731
            return fy, neg(a_y), neg(a_th)

        def norm(z):
            parts = [rms_norm(z[0]), rms_norm(z[1])]
            if not seminorm and jtu.tree_leaves(z[2]):
                parts.append(rms_norm(z[2]))
            return functools.reduce(jnp.maximum, parts)

        def add(x, k):
            return jtu.tree_map(jnp.add, x, k)

        def segment(carry, i):
            a, g, h = carry
            a = add(a, jtu.tree_map(lambda c: c[i], ct_ys))
            y_i = jtu.tree_map(lambda y: y[i], ys)
            t_end = times[i - 1]

            def cond(c):
                t, _, _, _, status = c
                return (status == Status.SUCCESS) & (t > t_end)

            def backward_increments(*points):
                # W(s_k) - W(s_{k+1}) for the increasing times ``points``, the
                # increments of backward steps from s_{k+1} to s_k: one descent
                # per point, each from the previous one's cache.
                levels = term_s.brownian_levels
                cache = _brownian.point(seed, span0, span1, points[0], n_noise, levels, time_dtype)
                out = []
                for s_next in points[1:]:
                    w, _, cache = _brownian.increment_from(seed, span0, span1, cache, s_next, n_noise, levels,
                                                           time_dtype)
                    out.append(lax.stop_gradient(-w))
                return out

            def heun(t, z, t_next, dw):
                dt = t_next - t
                dw = term_s.shape_noise(dw, y0_d)
                k1 = augmented(t, z, dt, dw)
                k2 = augmented(t_next, add(z, k1), dt, dw)
                return jtu.tree_map(lambda x, p, q: x + 0.5 * (p + q), z, k1, k2)

            def body(c):
                t, z, h, n, status = c
                t_next = jnp.maximum(t - h, t_end)
                # No sliver of a step before the segment's end.
                t_next = jnp.where(t_next - t_end < 0.01 * h, t_end, t_next)
                if adaptive:
                    # Step doubling: one step against two halves on the same
                    # path; the halves are kept (their error is the smaller).
                    t_mid = 0.5 * (t + t_next)
                    dw1, dw2 = backward_increments(t_next, t_mid, t)
                    z_full = heun(t, z, t_next, dw1 + dw2)
                    z_new = heun(t_mid, heun(t, z, t_mid, dw2), t_next, dw1)
                    finite = all_finite(z_new) & all_finite(z_full)
                    err_tree = jtu.tree_map(lambda p, q: q - p, z_full, z_new)
                    err = scaled_error(err_tree, z, z_new, rtol_v, atol_v, norm)
                    accept = finite & (err <= 1.0)
                    # Local error of a strong order-1 method: O(h^1.5).
                    factor = jnp.clip(0.9 * jnp.where(err > 0, err, 1e-10) ** (-2.0 / 3.0), 0.2, 5.0)
                    factor = jnp.where(finite, factor, 0.2)
                    h_new = lax.stop_gradient(h * factor.astype(time_dtype))
                    bad = jnp.zeros((), bool)
                else:
                    z_new = heun(t, z, t_next, backward_increments(t_next, t)[0])
                    finite = all_finite(z_new)
                    accept = finite
                    h_new = h
                    bad = ~finite
                t = jnp.where(accept, t_next, t)
                z = jtu.tree_map(lambda u, v: jnp.where(accept, u, v), z_new, z)
                n = n + 1
                status = jnp.where(bad, Status.NONFINITE_STATE, status)
                status = jnp.where((status == Status.SUCCESS) & (t > t_end) & (n >= max_back),
                                   Status.MAX_STEPS_REACHED, status)
                status = jnp.where((status == Status.SUCCESS) & (t > t_end) & (h_new < tiny),
                                   Status.STEP_SIZE_TOO_SMALL, status)
                return t, z, h_new, n, status

            init = (times[i], (y_i, a, g), h, jnp.zeros((), jnp.int32), jnp.asarray(Status.SUCCESS, jnp.int32))
            _, (_, a1, g1), h1, _, status = lax.while_loop(cond, body, init)
            return (a1, g1, h1), status

        n = ts_d.shape[0]
        a0 = jtu.tree_map(jnp.zeros_like, y0_d)
        g0 = jtu.tree_map(jnp.zeros_like, theta)
        if adaptive:
            h0 = h_last if dt0_v is None else dt0_v
        else:
            h0 = dt0_v
        h0 = lax.stop_gradient(jnp.asarray(h0, time_dtype))
        (a, g, _), statuses = lax.scan(segment, (a0, g0, h0), jnp.arange(n - 1, 0, -1))
        failed = jnp.any(statuses != Status.SUCCESS)
        # What a failed backward solve leaves is no gradient: NaN, or the error
        # (naming the first failure's cause).
        a, g = jtu.tree_map(lambda x: jnp.where(failed, jnp.nan, x), (a, g))
        if settings["throw"]:
            cause = jnp.max(jnp.where(statuses != Status.SUCCESS, statuses, 0))
            index = jnp.clip(cause - 1, 0, 2)
            a, g = eqx.branched_error_if((a, g), failed, index, [
                _BACKWARD_FAILED.format(cause=f"it took {_BACKWARD_STEPS_FACTOR} x max_steps steps in one "
                                        "interval between save times", fix="raise max_steps, loosen rtol/atol, "),
                _BACKWARD_FAILED.format(cause="its step size fell below the resolution of the time span",
                                        fix="loosen rtol/atol, "),
                _BACKWARD_FAILED.format(cause="its state or adjoint became NaN or infinite",
                                        fix="take smaller steps (dt0), "),
            ])
        ct_y0 = jtu.tree_map(lambda a_, c: a_ + c[0], a, ct_ys)
        ct_term, ct_args = eqx.combine(g, zero_tangents(theta_rest))
        # A Brownian path has no time derivative: the save times get none.
        ct_d = (ct_term, ct_y0, ct_args, jnp.zeros_like(ts_d), zero_tangents(rtol_d), zero_tangents(atol_d),
                zero_tangents(dt0_d))
        return (ct_d,)

    solve.defvjp(fwd, bwd, symbolic_zeros=True)
    return solve(dyn)


#: How many times ``max_steps`` the backward solve may take per interval
#: between save times.
_BACKWARD_STEPS_FACTOR = 4

_BACKWARD_FAILED = (
    "BacksolveAdjoint: the backward solve of the stochastic adjoint system failed: {cause}, so the gradient "
    "would be NaN. To fix it: {fix}or use CheckpointAdjoint(), which differentiates the forward steps exactly and "
    "never integrates backwards. (With throw=False the gradient is returned as NaN instead.)"
)
