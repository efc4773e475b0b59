from __future__ import annotations

import functools
from typing import ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._controller import rms_norm
from .._terms import ODETerm, SDETerm
from .base import AbstractSensitivity, closure_convert_term, is_symbolic_zero, unwrap_primals, zero_tangents


class BacksolveAdjoint(AbstractSensitivity):
    """Continuous adjoint (`jax.custom_vjp`): memory independent of the number
    of steps.

    The backward pass solves the augmented system

        dy/dt = f(t, y, theta),  da/dt = -a^T df/dy,  dg/dt = -a^T df/dtheta

    from ``t[-1]`` back to ``t[0]`` with the forward solver and tolerances, one
    `jax.vjp` of the vector field per evaluation, adding each save time's
    cotangent to ``a`` as it is passed and restarting ``y`` from the forward
    solution there (Chen et al. 2018, "Neural ordinary differential
    equations"; Rackauckas et al. 2019, "DiffEqFlux.jl"). ``theta`` is ``args``
    and every floating array of the term, closed-over arrays included (by
    closure conversion). The result is ``dL/dy0 = a(t0)``, ``dL/dtheta =
    g(t0)``, and for the save times ``dL/dt_i = <dL/dy_i, f(t_i, y_i)>``.

    The step-size controller of the backward solve uses a mixed norm: the
    largest of the RMS errors of ``y``, ``a`` and ``g`` (so that the many
    components of a network's ``g`` cannot dilute the others). With
    ``seminorm=True`` (the default) ``g`` is left out, which is valid because
    ``g`` never feeds back into the dynamics and saves backward steps
    (Kidger, Chen & Lyons 2021, "'Hey, that's not an ODE': faster ODE adjoints
    via seminorms"). ``seminorm=False`` controls ``g`` as well.

    The gradient is that of the exact solution, approximated to the solver's
    tolerance; it is not the derivative of the computed solution (use
    `CheckpointAdjoint` for that), and it fails when the state cannot be
    recovered backwards (chaotic or stiff dynamics over long spans).
    Gradients through `Solution.evaluate` (dense output) are not supported.

    For an `SDETerm` this is the stochastic adjoint (Li et al. 2020): the
    state and its adjoint are solved backwards along the same Brownian path,
    in Stratonovich form, by the Stratonovich Heun method; see
    `neuralde.sensitivity.sde_backsolve`. The save times get no gradient there
    (a Brownian path has no time derivative).

    For a `DDETerm` the adjoint is an advanced delay equation, solved
    backwards by a method of steps; the state, which a delay equation cannot
    recover backwards, is read from the forward solve's dense output (memory
    grows with the number of steps there); the vector field must read ``h`` at
    ``t`` minus constant lags. See `neuralde.sensitivity.dde_backsolve`.

    With an implicit solver (`Kvaerno5`, ...) the backward solve is implicit
    too; ``g`` is marked as quadrature, so the Newton matrix has the size of
    ``(y, a)`` whatever the number of parameters. That does not make stiff
    problems safe: recovering a stiff state backwards is ill-posed (ROBER: the
    gradient matches finite differences on [0, 1e-3], the backward solve fails
    on [1, 10] and the error says so), where `CheckpointAdjoint` is exact.
    """

    seminorm: bool = True

    def run(self, build, inputs):
        if isinstance(inputs[0], SDETerm):
            from . import sde_backsolve

            return sde_backsolve.run(self, build, inputs)
        if hasattr(inputs[0], "history"):
            from . import dde_backsolve

            return dde_backsolve.run(self, build, inputs)
        term, y0, args, ts, rtol, atol, dt0 = inputs
        term = closure_convert_term(term, ts[0], y0, args)
        dyn, static = eqx.partition((term, y0, args, ts, rtol, atol, dt0), eqx.is_array)
        seminorm = self.seminorm
        # Set by fwd (which builds the forward program anyway), read by bwd.
        settings = {}

        def program(d, **overrides):
            return build(eqx.combine(d, static), **overrides)

        @jax.custom_vjp
        def solve(d):
            return program(d).run_while()

        def fwd(d):
            # With symbolic zeros, the primals arrive wrapped (value, perturbed).
            d, _ = unwrap_primals(d)
            prog = program(d)
            settings["throw"] = prog.throw
            out = prog.run_while()
            return out, (d, out[0][0])

        def bwd(res, ct_out):
            d, ys = res
            ct_ys, theta, theta_rest, rtol_v, atol_v, dt0_v = backward_inputs(d, static, ys, ct_out)
            term_d, y0_d, args_d, ts_d, rtol_d, atol_d, dt0_d = d
            term_s, _, args_s, _, _, _, _ = static

            def field(t, y, th):
                term_, args_ = eqx.combine(th, theta_rest, (term_s, args_s))
                return term_.vf(t, y, args_)

            def augmented(t, z, th):
                y, a, _ = z
                fy, vjp = jax.vjp(lambda y_, th_: field(t, y_, th_), y, th)
                a_y, a_th = vjp(a)
                neg = lambda tree: jtu.tree_map(jnp.negative, tree)  # noqa: E731
                return fy, neg(a_y), neg(a_th)

            aug_term = _AdjointTerm(augmented)
            # Mixed norm: the largest RMS among the state, its adjoint and the
            # parameter adjoint, so that a large parameter channel cannot dilute
            # the others; the seminorm leaves the parameter channel out.
            def norm(z):
                parts = [rms_norm(z[0]), rms_norm(z[1])]
                if not seminorm and jtu.tree_leaves(z[2]):
                    parts.append(rms_norm(z[2]))
                return functools.reduce(jnp.maximum, parts)

            n = ts_d.shape[0]

            def segment_program(a, g, i, dt0):
                a = jtu.tree_map(lambda a_, c: a_ + c[i], a, ct_ys)
                y_i = jtu.tree_map(lambda y: y[i], ys)
                seg_ts = jnp.stack([ts_d[i], ts_d[i - 1]])
                return y_i, build((aug_term, (y_i, a, g), theta, seg_ts, rtol_v, atol_v, dt0),
                                  dense=False, progress=False, error_norm=norm)

            def segment(carry, i):
                # Each segment starts with the step size the previous one
                # proposed (no initial-step estimate, two augmented evaluations,
                # per save time); the first with the usual estimate (or dt0).
                a, g, dt = carry
                y_i, prog = segment_program(a, g, i, dt)
                ((zs, _), (_, status)), packed = prog.run_while(return_carry=True)
                _, a1, g1 = jtu.tree_map(lambda z: z[-1], zs)
                # dL/dt_i through y_i = y(t_i): <dL/dy_i, f(t_i, y_i)>.
                f_i = field(ts_d[i], y_i, theta)
                ct_t = _dot(jtu.tree_map(lambda c: c[i], ct_ys), f_i)
                return (a1, g1, prog.step_size(packed)), (ct_t, status)

            a0 = jtu.tree_map(jnp.zeros_like, y0_d)
            g0 = jtu.tree_map(jnp.zeros_like, theta)
            first = segment_program(a0, g0, n - 1, dt0_v)[1]
            dt_first = first.step_size(first.packed)
            (a, g, _), (ct_t_rest, statuses) = lax.scan(segment, (a0, g0, dt_first), jnp.arange(n - 1, 0, -1))
            if settings["throw"]:
                # A failed backward solve leaves NaN in the gradient: say why.
                a, g, ct_t_rest = eqx.error_if((a, g, ct_t_rest), jnp.any(statuses != 0), _BACKWARD_FAILED)
            ct_t0 = -_dot(a, field(ts_d[0], y0_d, theta))
            ct_ts = jnp.concatenate([ct_t0[None], ct_t_rest[::-1]]).astype(ts_d.dtype)
            ct_y0 = jtu.tree_map(lambda a_, c: a_ + c[0], a, ct_ys)

            ct_term, ct_args = eqx.combine(g, zero_tangents(theta_rest))
            ct_d = (ct_term, ct_y0, ct_args, ct_ts, zero_tangents(rtol_d), zero_tangents(atol_d), zero_tangents(dt0_d))
            return (ct_d,)

        solve.defvjp(fwd, bwd, symbolic_zeros=True)
        return solve(dyn)


def backward_inputs(d, static, ys, ct_out):
    """What a backsolve rule's backward pass reads first: the save times'
    cotangents (zeros where symbolic), the differentiated arrays ``theta`` of
    ``(term, args)`` and the rest, and the tolerances and ``dt0`` (``None``
    when not given; fixed-step solvers take the same step size backwards).
    Refuses a cotangent of the dense output, which it cannot take."""
    (ct_ys, ct_hist), _ = ct_out
    used = [c for c in jtu.tree_leaves(ct_hist, is_leaf=is_symbolic_zero) if not is_symbolic_zero(c)]
    if any(jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in used):
        raise NotImplementedError(
            "BacksolveAdjoint cannot differentiate through Solution.evaluate (dense output): use "
            "CheckpointAdjoint() or ReverseMode() for that."
        )
    ct_ys = jtu.tree_map(lambda c, y: jnp.zeros_like(y) if is_symbolic_zero(c) else c, ct_ys, ys,
                         is_leaf=is_symbolic_zero)
    term_d, _, args_d, _, rtol_d, atol_d, dt0_d = d
    _, _, _, _, rtol_s, atol_s, dt0_s = static
    theta, theta_rest = eqx.partition((term_d, args_d), eqx.is_inexact_array)
    dt0_v = None if dt0_d is None and dt0_s is None else eqx.combine(dt0_d, dt0_s)
    return ct_ys, theta, theta_rest, eqx.combine(rtol_d, rtol_s), eqx.combine(atol_d, atol_s), dt0_v


_BACKWARD_FAILED = (
    "BacksolveAdjoint: the backward solve of the adjoint system failed (it hit max_steps, a step size "
    "too small, or NaN/inf), so the gradient would be NaN. Integrating the state backwards is unstable "
    "for chaotic or stiff dynamics over long spans: use CheckpointAdjoint(), which never does. "
    "(With throw=False the gradient is returned as NaN instead.)"
)


class _AdjointTerm(ODETerm):
    """The augmented system ``(y, a, g)``: ``g`` is pure quadrature (``dg/dt``
    does not depend on ``g`` and nothing depends on ``g``). Implicit solvers
    read ``quadrature_last`` and leave ``g`` out of their Newton matrix, so that
    its size is ``2 len(y)``, not ``2 len(y) + len(theta)``."""

    quadrature_last: ClassVar[bool] = True


def _dot(a, b):
    return sum(jnp.sum(x * y) for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b)))
