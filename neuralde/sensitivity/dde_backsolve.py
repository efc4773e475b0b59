"""`BacksolveAdjoint` for delay equations: the continuous adjoint of a DDE.

For ``y'(t) = f(t, y(t), h, theta)`` on ``[t0, T]`` with ``f`` reading the past
through ``h(t - tau_j)`` (constant lags ``tau_j``) and a loss
``L = sum_i l_i(y(t_i))``, the adjoint ``lam`` solves, backwards from
``lam(T+) = 0``, the *advanced* delay equation

    lam'(t) = -(df/dy)(t)^T lam(t) - sum_j (df/dh_j)(t + tau_j)^T lam(t + tau_j)

(the second term only where ``t + tau_j <= T``), jumping by ``dl_i/dy`` at each
save time ``t_i``; then ``dL/dy0 = lam(t0+)`` and ``dL/dtheta =
int lam^T df/dtheta dt`` over ``[t0, T]``, the history's own dependence on
``theta`` included (where ``f`` reads ``h(s)`` at ``s <= t0``). See
Bellen & Zennaro, "Numerical Methods for Delay Differential Equations" (OUP
2003), and for the adjoint of a delay equation e.g. Calver & Enright,
"Numerical methods for computing sensitivities for ODEs and DDEs", Numer.
Algorithms 74 (2017) 1101-1117.

A delay equation cannot be solved backwards for its state: ``y(t)`` needs
``y(t - tau)``, which lies further back. The backward pass therefore reads
the state from the forward solve's dense output (``solve`` keeps it for this;
memory grows with the number of steps, like ``dense=True``) -- the
"interpolating" form of the continuous adjoint (SciMLSensitivity's
``InterpolatingAdjoint``). The gradient approximates that of the exact
solution to the solver's accuracy; it is not the derivative of the computed
solution (`CheckpointAdjoint` gives that).

The backward solve is itself a method of steps, in reversed time:

* its grid is the forward solve's step ends, the save times, and every save
  time minus every lag (where the advanced term jumps, because ``lam`` jumps
  at the save times), so that no step crosses a discontinuity of ``lam`` or
  of its derivative that the forward grid does not already resolve;
* one explicit Runge--Kutta step of Dormand & Prince's fifth-order pair per
  interval (without error control: the forward grid was chosen for the
  solution, whose smoothness the adjoint shares between those points);
* ``lam(t + tau_j)`` from the cubic Hermite interpolant of the intervals
  already done (the values and slopes at their ends); an interval longer
  than the smallest lag reads inside itself, and is first taken with the
  previous slope extrapolated and then retaken twice with its own
  interpolant (fixed-point iteration, as the forward solver does);
* ``(df/dh_j)(s)^T lam(s)`` from one `jax.vjp` of ``f`` at ``s = t + tau_j``
  whose ``h`` returns the forward dense output plus a zero perturbation per
  call: the perturbation's cotangent is that call's term. The lags are read
  off the calls (``t`` minus the time each call asked for) and checked: a
  vector field that reads ``h`` at times other than ``t`` minus a constant is
  refused by an error at run time.

The save times get the gradient of ``y(t_i)`` along the solution; ``t0``
also that of where the history ends.
"""
from __future__ import annotations

import itertools

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._interpolation import evaluate_polynomial
from .._tableaus import DOPRI5
from .backsolve import _BACKWARD_FAILED, _dot, backward_inputs
from .base import closure_convert_term, unwrap_primals, zero_tangents

#: Grid points at every save time minus every sum of up to this many lags.
_SUMS = 3

_NOT_CONSTANT_LAGS = (
    "BacksolveAdjoint on a delay equation: the vector field reads `h` at a time that is not `t` minus a "
    "constant lag (e.g. h(t / 2)). The continuous adjoint here assumes every call is h(t - lag) with a "
    "constant lag; use CheckpointAdjoint() (the default) or ReverseMode() for this vector field."
)


def _tree_add(a, b):
    return jtu.tree_map(jnp.add, a, b)


def _tree_scale(tree, s):
    return jtu.tree_map(lambda x: x * s.astype(x.dtype), tree)


def _where(pred, a, b):
    return jtu.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def _hermite(lo, hi, v_lo, v_hi, d_lo, d_hi, x):
    """The cubic through ``(lo, v_lo)``, ``(hi, v_hi)`` with slopes ``d_lo``,
    ``d_hi`` at ``x`` (pytrees of values and slopes)."""
    h = hi - lo
    safe = jnp.where(h > 0, h, 1)
    th = (x - lo) / safe
    h00 = (1 + 2 * th) * (1 - th) ** 2
    h10 = th * (1 - th) ** 2
    h01 = th**2 * (3 - 2 * th)
    h11 = th**2 * (th - 1)
    return jtu.tree_map(
        lambda a, b, da, db: (h00 * a + h01 * b + (h10 * da + h11 * db) * safe).astype(a.dtype),
        v_lo, v_hi, d_lo, d_hi)


def run(sens, build, inputs):
    term, y0, args, ts, rtol, atol, dt0 = inputs
    # Refuses arrays the field closes over that an outer transformation traces.
    term = closure_convert_term(term, ts[0], y0, args)
    dyn, static = eqx.partition((term, y0, args, ts, rtol, atol, dt0), eqx.is_array)
    user_dense = build.config.dense
    settings = {}

    def program(d):
        # The backward pass reads the forward solution between save times.
        return build(eqx.combine(d, static), dense=True)

    @jax.custom_vjp
    def solve(d):
        return program(d).run_while()

    def fwd(d):
        d, _ = unwrap_primals(d)
        prog = program(d)
        settings["throw"] = prog.throw
        out = prog.run_while()
        return out, (d, out[0][0], out[0][1])

    def bwd(res, ct_out):
        d, ys, hist = res
        ct_ys, theta, theta_rest, _, _, _ = backward_inputs(d, static, ys, ct_out)
        grads = _backward(d, static, hist, ct_ys, theta, theta_rest, settings["throw"])
        return (grads,)

    solve.defvjp(fwd, bwd, symbolic_zeros=True)
    (ys, hist), ints = solve(dyn)
    return (ys, hist if user_dense else None), ints


def _backward(d, static, hist, ct_ys, theta, theta_rest, throw):
    term_d, y0_d, args_d, ts_d, rtol_d, atol_d, dt0_d = d
    term_s, _, args_s, _, _, _, _ = static
    tdt = ts_d.dtype
    t0, t_end = ts_d[0], ts_d[-1]
    full_term = eqx.combine(term_d, term_s)
    lags = lax.stop_gradient(jnp.stack([jnp.asarray(lag, tdt) for lag in full_term.lags]))
    min_lag = jnp.min(lags)
    eps = jnp.finfo(tdt).eps
    scale = jnp.maximum(jnp.maximum(jnp.abs(t0), jnp.abs(t_end)), t_end - t0)
    merge = 256 * eps * scale  # grid points closer than this are one
    nudge = 16 * eps * scale  # which side of a grid point a stage's end reads

    n_steps = hist.num_steps

    def dense_y(s, side=0.0):
        """The forward solution at ``s``; at a step end, the step above it
        (``side`` +1) or below (-1) -- which matters for the slope."""
        s = _near_clip(s, t0, t_end, nudge)
        idx = jnp.searchsorted(hist.ts, s + side * nudge, side="left") - 1
        idx = jnp.clip(idx, 0, jnp.maximum(n_steps - 1, 0))
        lo, hi = hist.ts[idx], hist.ts[idx + 1]
        theta = (s - lo) / jnp.where(hi > lo, hi - lo, 1)
        pick = lambda tree: jtu.tree_map(lambda x: x[idx], tree)  # noqa: E731
        return evaluate_polynomial(pick(hist.y0s), pick(hist.coeffs), theta)

    def field(t, y, th, deltas, queries, side=0.0):
        """``f(t, y, h, args)`` with ``h`` the forward solution (the history
        before ``t0``) plus ``deltas[j]`` at the ``j``-th call, whose time is
        appended to ``queries``."""
        term_, args_ = eqx.combine(th, theta_rest, (term_s, args_s))

        def h(s):
            j = len(queries)
            s = jnp.asarray(s, tdt)
            queries.append(s)
            v_hist = jtu.tree_map(lambda v, y_: jnp.asarray(v, y_.dtype),
                                  term_.history(_near_clip(s, -jnp.inf, t0, nudge), args_), y0_d)
            # (``side``: from which side of a step end, or of t0, a stage at the
            # end of an interval reads -- that of the interval.)
            out = _where(s + side * nudge <= t0, v_hist, dense_y(s, side))
            # (Added on either side of t0: the call that asks for a time t >= t0
            # may round to just below it.)
            return out if deltas is None else _tree_add(out, deltas[j])

        return term_.vector_field(t, y, h, args_)

    counted = []
    jax.eval_shape(lambda: field(t0, y0_d, theta, None, counted))
    n_calls = len(counted)
    zeros_y = jtu.tree_map(jnp.zeros_like, y0_d)
    zero_deltas = tuple(zeros_y for _ in range(n_calls))

    # --- the grid: forward step ends, save times, save times minus lags ----
    # lam jumps at the save times; its slope where t + lag reaches one, its
    # second derivative a lag earlier, ... (as a solution's discontinuities
    # propagate forwards): sums of up to three lags keep the fifth-order steps
    # at fourth order or better where they cross one.
    sums = jnp.stack([sum(lags[i] for i in combo) for k in range(1, _SUMS + 1)
                      for combo in itertools.combinations_with_replacement(range(lags.shape[0]), k)])
    shifted = (ts_d[:, None] - sums[None, :]).reshape(-1)
    pts = jnp.concatenate([hist.ts.astype(tdt), ts_d, jnp.where(shifted > t0, shifted, jnp.inf)])
    pts = jnp.where((pts >= t0) & (pts <= t_end), pts, jnp.inf)
    pts = jnp.sort(pts)
    gap = jnp.diff(pts, prepend=-jnp.inf)
    keep = jnp.isfinite(pts) & (gap > merge) & ((t_end - pts > merge) | (pts == t_end))
    grid = jnp.sort(jnp.where(keep, pts, jnp.inf))
    n_pts = jnp.sum(keep)
    width = grid.shape[0] - 1
    # Each save time's cotangent jumps lam at the grid point nearest to it.
    right = jnp.clip(jnp.searchsorted(grid, ts_d), 1, width)
    nearest = jnp.where(jnp.abs(grid[right] - ts_d) < jnp.abs(ts_d - grid[right - 1]), right, right - 1)
    jumps = jtu.tree_map(lambda c: jnp.zeros((width + 1,) + c.shape[1:], c.dtype).at[nearest].add(c), ct_ys)

    zeros_rec = jtu.tree_map(lambda y: jnp.zeros((width,) + y.shape, y.dtype), y0_d)
    # Per interval [grid[k], grid[k+1]]: lam and its slope at both ends (from inside).
    records0 = (zeros_rec, zeros_rec, zeros_rec, zeros_rec)

    def lam_at(x, key, records, k, current):
        """lam at ``x`` (``key``: ``x`` moved off a grid point towards the
        interval asked for): zero past ``T``, the current interval's
        polynomial below its top ``grid[k + 1]``, else the done intervals'."""
        v_lo, v_hi, d_lo, d_hi = records
        i = jnp.clip(jnp.searchsorted(grid, key, side="right") - 1, 0, width - 1)
        pick = lambda r: jtu.tree_map(lambda z: z[i], r)  # noqa: E731
        done = _hermite(grid[i], grid[i + 1], pick(v_lo), pick(v_hi), pick(d_lo), pick(d_hi), x)
        if current is None:  # every interval done
            out = done
        else:
            c_lo, c_hi, c_vlo, c_vhi, c_dlo, c_dhi = current
            cur = _hermite(c_lo, c_hi, c_vlo, c_vhi, c_dlo, c_dhi, x)
            out = _where(key < grid[k + 1], cur, done)
        return _where(key > t_end, zeros_y, out)

    def advanced_terms(t, side, offsets, records, k, current):
        """Per call ``j``: ``(df/dh_j)(s)^T lam(s)`` at ``s = t + offsets[j]``
        (a leading axis of calls), and whether a call asked for a time other
        than ``t`` (a lag that is not constant)."""
        s_all = t + offsets
        lam_s = jax.vmap(lambda s: lam_at(s, s + side * nudge, records, k, current))(s_all)

        def one(s, lam_):
            s_c = jnp.clip(s, t0, t_end)
            y_s = dense_y(s_c, side)

            def g(deltas):
                queries = []
                out = field(s_c, y_s, theta, deltas, queries, side)
                return out, jnp.stack(queries)

            _, vjp_s, q_s = jax.vjp(g, zero_deltas, has_aux=True)
            (c,) = vjp_s(lam_)
            return c, q_s

        cs, q_s = jax.vmap(one)(s_all, lam_s)
        # Call j at s = t + offset_j must ask for t again (constant lags).
        miss = jnp.abs(jnp.diagonal(q_s) - t) > 1e3 * eps * scale
        rho = jtu.tree_map(lambda *z: jnp.stack([x[j] for j, x in enumerate(z)]), *cs)
        return rho, jnp.any((s_all <= t_end) & miss)

    def direct_terms(t, side, lam):
        """``(df/dy)^T lam``, ``(df/dtheta)^T lam`` at ``t`` and the times the
        calls of ``h`` asked for."""
        def direct(y, th):
            queries = []
            out = field(t, y, th, None, queries, side)
            return out, jnp.stack(queries) if queries else jnp.zeros((0,), tdt)

        _, vjp, q_t = jax.vjp(direct, dense_y(t, side), theta, has_aux=True)
        a_y, a_th = vjp(lam)
        return a_y, a_th, q_t

    def rhs(t, side, lam, records, k, current):
        """dlam/dt and -(dmu/dt) at ``t``; ``side`` -1/+1 when ``t`` is the
        interval's top/bottom end (0 inside); and whether a call's time was
        not ``t`` minus a constant lag."""
        a_y, a_th, q_t = direct_terms(t, side, lam)
        bad = jnp.asarray(False)
        if n_calls:
            rho, bad = advanced_terms(t, side, t - q_t, records, k, current)
            a_y = _tree_add(a_y, jtu.tree_map(lambda z: jnp.sum(z, axis=0), rho))
        return jtu.tree_map(jnp.negative, a_y), a_th, bad

    tab = DOPRI5
    n_st = tab.b.shape[0]
    a_tab = jnp.asarray(tab.a, tdt)
    c_tab = jnp.asarray(tab.c, tdt)
    b_tab = tab.b

    def interval(k, lam_b, records):
        """One step from ``b = grid[k + 1]`` down to ``a = grid[k]``, ``lam_b``
        the value at ``b`` from below."""
        a, b = grid[k], grid[k + 1]
        h = b - a
        k1, m1, bad1 = rhs(b, -1.0, lam_b, records, k, (a, b) + (lam_b,) * 2 + (zeros_y,) * 2)
        stack0 = lambda x: jnp.zeros((n_st,) + x.shape, x.dtype).at[0].set(x)  # noqa: E731
        ks0, ms0 = jtu.tree_map(stack0, k1), jtu.tree_map(stack0, m1)

        def stages(current):
            def stage(i, carry):
                ks, ms, bad = carry
                row = a_tab[i]
                lam_i = jtu.tree_map(lambda lb, kk: lb - h * jnp.tensordot(row.astype(kk.dtype), kk, axes=1),
                                     lam_b, ks)
                side = jnp.where(c_tab[i] == 1, 1.0, 0.0).astype(tdt)
                k_i, m_i, bad_i = rhs(b - c_tab[i] * h, side, lam_i, records, k, current)
                put = lambda z, x: z.at[i].set(x)  # noqa: E731
                return jtu.tree_map(put, ks, k_i), jtu.tree_map(put, ms, m_i), bad | bad_i

            ks, ms, bad = lax.fori_loop(1, n_st, stage, (ks0, ms0, bad1))
            weights = lambda z, sign: sign * h * sum(  # noqa: E731
                float(b_tab[i]) * z[i] for i in range(n_st) if b_tab[i] != 0)
            lam_a = jtu.tree_map(lambda lb, kk: lb + weights(kk, -1).astype(lb.dtype), lam_b, ks)
            mu_inc = jtu.tree_map(lambda mm: weights(mm, 1).astype(mm.dtype), ms)
            # The last stage is at ``a`` with the step's solution (FSAL): its slope.
            return lam_a, jtu.tree_map(lambda kk: kk[-1], ks), mu_inc, bad

        # First with the slope at b extrapolated (lam linear on the interval),
        # then, if the interval is longer than the smallest lag (it reads
        # inside itself), twice more with its own interpolant.
        needs = h > min_lag

        def again(carry):
            it, lam_a, d_a, _, _ = carry
            first = it == 0
            lam_a = _where(first, _tree_add(lam_b, _tree_scale(k1, -h)), lam_a)
            d_a = _where(first, k1, d_a)
            return (it + 1,) + stages((a, b, lam_a, lam_b, d_a, k1))

        def more(carry):
            return (carry[0] == 0) | (needs & (carry[0] < 3))

        init = (jnp.asarray(0), lam_b, k1, jtu.tree_map(jnp.zeros_like, m1), jnp.asarray(False))
        _, lam_a, d_a, mu_inc, bad = lax.while_loop(more, again, init)
        return lam_a, d_a, k1, mu_inc, bad

    def body(carry):
        k, lam, mu, records, bad = carry
        lam_a, d_a, d_b, mu_inc, bad_k = interval(k, lam, records)
        v_lo, v_hi, d_lo, d_hi = records
        put = lambda r, v: jtu.tree_map(lambda z, x: z.at[k].set(x), r, v)  # noqa: E731
        records = (put(v_lo, lam_a), put(v_hi, lam), put(d_lo, d_a), put(d_hi, d_b))
        lam_next = _tree_add(lam_a, jtu.tree_map(lambda z: z[k], jumps))
        return k - 1, lam_next, _tree_add(mu, mu_inc), records, bad | bad_k

    lam_top = jtu.tree_map(lambda z: z[n_pts - 1], jumps)
    mu0 = jtu.tree_map(jnp.zeros_like, theta)
    k_last = n_pts - 2
    _, lam0, mu, records, bad = lax.while_loop(
        lambda c: c[0] >= 0, body, (k_last, lam_top, mu0, records0, jnp.asarray(False)))
    # lam0 = lam(t0-): the jump of the save at t0 included.
    lam0_plus = _tree_add(lam0, jtu.tree_map(lambda z: -z[0], jumps))

    # Save times: dL/dt_i = <dL/dy_i, y'(t_i)>; for t0 also minus <lam, f>
    # and the shift of where the history ends (history(t0) - y0 becomes read).
    def slope(t):
        return field(t, dense_y(t, -1.0), theta, None, [], -1.0)

    f_ts = jax.vmap(slope)(ts_d)
    ct_ts = jax.vmap(lambda c, f: _dot(c, f))(ct_ys, f_ts)
    f0 = field(t0, y0_d, theta, None, [], 1.0)
    ct_t0 = -_dot(lam0_plus, f0)
    if n_calls:
        # Where call j switches from the history to the solution, t0 + lag_j,
        # h jumps by y0 - history(t0) (when they differ), and that point moves
        # with t0 and with the lag: dL/d(switch) = <lam, f(h_j = history(t0))
        # - f(h_j = y0)> there (the difference, not a derivative: f may be
        # nonlinear in h).
        def queries_of(th):
            queries = []
            field(t0, y0_d, th, None, queries, 1.0)
            return jnp.stack(queries)

        q_0, vjp_q = jax.vjp(queries_of, theta)
        hist0 = jtu.tree_map(lambda v, y_: jnp.asarray(v, y_.dtype),
                             full_term.history(t0, eqx.combine(args_d, args_s)), y0_d)
        gap0 = jtu.tree_map(jnp.subtract, hist0, y0_d)
        weights = []
        for j in range(n_calls):
            s_j = t0 + (t0 - q_0[j])
            s_c = jnp.minimum(s_j, t_end)
            lam_j = lam_at(s_c, s_c + nudge, records, jnp.asarray(-1), None)
            y_j = dense_y(s_c, 1.0)
            jumped = tuple(gap0 if i == j else zeros_y for i in range(n_calls))
            change = jtu.tree_map(jnp.subtract, field(s_c, y_j, theta, jumped, [], 1.0),
                                  field(s_c, y_j, theta, zero_deltas, [], 1.0))
            weights.append(jnp.where(s_j <= t_end, _dot(lam_j, change), 0.0))
        w = jnp.stack(weights)
        ct_t0 = ct_t0 + jnp.sum(w)

        # The switch time is t0 + lag_j = t0 - (q_j - t): it moves by -dq_j/dtheta.
        (mu_switch,) = vjp_q(-w.astype(q_0.dtype))
        mu = _tree_add(mu, mu_switch)
    ct_ts = ct_ts.at[0].set(ct_t0).astype(tdt)

    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves((lam0, mu))]))
    if throw:
        lam0, mu = eqx.error_if((lam0, mu), bad, _NOT_CONSTANT_LAGS)
        lam0, mu = eqx.error_if((lam0, mu), ~finite, _BACKWARD_FAILED)
    else:
        nan = jnp.where(bad, jnp.nan, 0.0)
        lam0, mu = jtu.tree_map(lambda x: x + nan.astype(x.dtype), (lam0, mu))

    ct_term, ct_args = eqx.combine(mu, zero_tangents(theta_rest))
    return (ct_term, lam0, ct_args, ct_ts, zero_tangents(rtol_d), zero_tangents(atol_d), zero_tangents(dt0_d))


def _near_clip(s, lo, hi, margin):
    """``s`` clipped to ``[lo, hi]``, except within ``margin`` of it: a time
    that rounding put just outside keeps its derivative (a plain clip has none
    there), and one far outside never reaches a polynomial or a history
    function at a time it was not written for."""
    c = jnp.clip(s, lo, hi)
    return jnp.where(jnp.abs(s - c) <= margin, s, c)


