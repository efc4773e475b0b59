"""A virtual Brownian tree: Brownian increments and space-time Lévy areas over
any interval, generated on demand from a key.

The path over ``[t0, t1]`` is a deterministic function of ``(seed, t0, t1)``:
the same queries give the same numbers, any query can be repeated (rejected
steps, the backward pass of a checkpointed adjoint), and the answers are
consistent under subdivision, ``W(s, u) + W(u, t) = W(s, t)``, because every
query is a difference of one underlying path.

Construction (Gaines & Lyons 1997, "Variable step size control in the
numerical solution of stochastic differential equations", SIAM J. Appl. Math.
57(5); Foster 2020, "Numerical approximation of SDEs with high order
accuracy", DPhil thesis, Oxford; Jelinčič, Tang, Li, Kidger & Foster 2023,
"Single-seed generation of Brownian paths and integrals for adaptive and high
order SDE solvers"). Time is rescaled to ``[0, 1]`` and the unit interval is
cut dyadically ``levels`` times. Every node ``[a, a + h]`` of the tree carries
its increment ``W`` and its space-time Lévy area

    H = (1/h) ∫_a^{a+h} (W_{a,r} - (r - a)/h W) dr,

which are independent with ``W ~ N(0, h)``, ``H ~ N(0, h/12)``. Its two halves
follow from ``(W, H)`` and two fresh standard normals ``z1, z2`` drawn from a
counter-based hash of ``(seed, node)``:

    x  = sqrt(h)/4 z1,            y  = -x/2 + sqrt(h/48) z2,
    W1 = W/2 + 3H/2 + x,          W2 = W/2 - 3H/2 - x,
    H1 = H/4 + y,                 H2 = H/4 - x - y.

(Derivation: the halves' ``(W1, H1, W2, H2)`` are independent with variances
``(h/2, h/24, h/2, h/24)`` and satisfy ``W = W1 + W2``,
``H = (H1 + H2)/2 + (W1 - W2)/4``; the formulas are the Gaussian conditional
law of the halves given ``(W, H)``: mean by regression, the two-dimensional
residual by a Cholesky factor. ``tests/test_brownian.py`` checks the joint
covariances by Monte Carlo.) Every dyadic node down to the leaves therefore
has exactly the law of Brownian motion.

Below the leaves (length ``delta = (t1 - t0) 2^-levels``) the path is the
conditional mean given the leaf's ``(W, H)``: ``W(a + theta delta) - W(a) =
theta W + 6 theta (1 - theta) H``, a quadratic whose integral reproduces the
leaf's ``H`` exactly. Resolution: off the dyadic points, ``W`` misses a
conditional variance of at most ``delta/16`` (standard deviation
``sqrt(delta)/4``); with the default ``levels=24`` on ``[0, 10]`` that is a
standard deviation of 1.6e-4·sqrt(1e-3)... concretely ``sqrt(10 · 2^-24)/4 =
1.9e-4`` in a ``W`` whose own scale over a step of 1e-3 is 3e-2, i.e. a relative
variance deficit below 1e-4 for any step longer than ``1e3 delta``. Solvers see
the exact path they are driven by (the strong error tests measure against the
exact solution along this same path), so the deficit only affects the law,
not the convergence.

Queries ``(W, H)`` over ``[s, t]`` descend the tree once for both ends
(``levels`` iterations, two hashes per level). Each end accumulates only the
pieces that lie inside ``[s, t]`` (the tail ``[s, m]`` and the head ``[m, t]``
around the node where the two ends part), so nothing is computed as the
difference of two large numbers: ``H`` over a short step keeps its relative
precision in float32.
"""
from __future__ import annotations

import math

import jax
import jax.lax as lax
import jax.numpy as jnp
from jax.extend.random import threefry_2x32
from jax.scipy.special import ndtri

#: Default depth of the tree: leaves of (t1 - t0) * 2^-24.
DEFAULT_LEVELS = 24


def seed_from_key(key) -> jax.Array:
    """Two uint32 words that seed the tree, from any `jax.random` key (typed
    or legacy uint32)."""
    return jax.random.bits(key, (2,), jnp.uint32)


def _normals(seed, node, n, dtype):
    """``2 x n`` standard normals for tree node ``node`` (a counter-based hash
    of ``(seed, node, j)``: no key splitting, any node in any order)."""
    count = jnp.concatenate([jnp.full((n,), node, jnp.uint32), jnp.arange(n, dtype=jnp.uint32)])
    bits = threefry_2x32(seed, count).reshape(2, n)
    if jnp.dtype(dtype).itemsize >= 8:
        u = (bits.astype(dtype) + 0.5) * 2.0**-32
    else:
        u = ((bits >> 8).astype(dtype) + 0.5) * 2.0**-24
    return ndtri(u)


def _split(seed, node, h, W, H, dtype):
    """The two halves ``(W1, H1), (W2, H2)`` of node ``node`` (length ``h``)."""
    z = _normals(seed, node, W.shape[0], dtype)
    x = (jnp.sqrt(h) / 4) * z[0]
    y = -x / 2 + jnp.sqrt(h / 48) * z[1]
    return (W / 2 + 1.5 * H + x, H / 4 + y), (W / 2 - 1.5 * H - x, H / 4 - x - y)


def _piece(W, H, delta, ta, tb):
    """(increment, time integral of the path relative to its start) over the
    fraction ``[ta, tb]`` of a leaf of length ``delta`` with ``(W, H)``."""

    def p(th):
        return th * W + 6 * th * (1 - th) * H

    def q(th):
        return delta * (th * th / 2 * W + (3 * th * th - 2 * th * th * th) * H)

    pa = p(ta)
    return p(tb) - pa, q(tb) - q(ta) - delta * (tb - ta) * pa


def unit_increment(seed, us, ut, n: int, levels: int = DEFAULT_LEVELS, dtype=jnp.float64):
    """``(W, H)`` of a standard Brownian motion on ``[0, 1]`` over ``[us, ut]``
    (``0 <= us <= ut <= 1``), each of shape ``(n,)``."""
    if not 1 <= levels <= 30:
        raise ValueError(f"`levels` must be between 1 and 30; got {levels}.")
    scale = 2.0**levels
    us = jnp.clip(jnp.asarray(us, dtype), 0, 1)
    ut = jnp.clip(jnp.asarray(ut, dtype), 0, 1)

    def locate(u):
        x = u * scale
        i = jnp.clip(jnp.floor(x), 0, scale - 1)
        return i.astype(jnp.uint32), x - i

    i_s, th_s = locate(us)
    i_t, th_t = locate(ut)
    # Node 0 holds the root's (W, H); node k >= 1 the split of heap node k.
    z = _normals(seed, jnp.uint32(0), n, dtype)
    W0, H0 = z[0], z[1] / math.sqrt(12.0)
    zero = jnp.zeros((n,), dtype)
    one = jnp.uint32(1)

    def level(l, c):
        node_s, node_t, (Ws, Hs), (Wt, Ht), (SW, SI, SL), (PW, PI, PL), diverged = c
        h = jnp.asarray(2.0, dtype) ** (-l.astype(dtype))
        m = h / 2
        shift = (levels - 1 - l).astype(jnp.uint32)
        bit_s = ((i_s >> shift) & one).astype(bool)
        bit_t = ((i_t >> shift) & one).astype(bool)
        (Ls, Rs) = _split(seed, node_s, h, Ws, Hs, dtype)
        (Lt, Rt) = _split(seed, node_t, h, Wt, Ht, dtype)
        # The lower end keeps the sibling to its right once the ends have
        # parted (it lies inside [s, t]); the upper end the sibling to its left.
        add_s = diverged & ~bit_s
        W2, H2 = Rs
        I2 = m * (H2 + W2 / 2)
        SW, SI, SL = (jnp.where(add_s, W2 + SW, SW), jnp.where(add_s, I2 + SI + SL * W2, SI),
                      jnp.where(add_s, m + SL, SL))
        add_t = diverged & bit_t
        W1, H1 = Lt
        I1 = m * (H1 + W1 / 2)
        PW, PI, PL = (jnp.where(add_t, PW + W1, PW), jnp.where(add_t, PI + I1 + m * PW, PI),
                      jnp.where(add_t, PL + m, PL))
        Ws, Hs = jnp.where(bit_s, Rs[0], Ls[0]), jnp.where(bit_s, Rs[1], Ls[1])
        Wt, Ht = jnp.where(bit_t, Rt[0], Lt[0]), jnp.where(bit_t, Rt[1], Lt[1])
        node_s = 2 * node_s + bit_s.astype(jnp.uint32)
        node_t = 2 * node_t + bit_t.astype(jnp.uint32)
        return node_s, node_t, (Ws, Hs), (Wt, Ht), (SW, SI, SL), (PW, PI, PL), diverged | (bit_s != bit_t)

    init = (one, one, (W0, H0), (W0, H0), (zero, zero, jnp.zeros((), dtype)), (zero, zero, jnp.zeros((), dtype)),
            jnp.asarray(False))
    _, _, (Ws, Hs), (Wt, Ht), (SW, SI, SL), (PW, PI, PL), diverged = lax.fori_loop(
        0, levels, level, init)
    delta = jnp.asarray(1.0 / scale, dtype)
    # Ends in different leaves: [s, leaf end] ++ suffix ++ prefix ++ [leaf start, t].
    Wa, Ia = _piece(Ws, Hs, delta, th_s, jnp.ones((), dtype))
    Wa, Ia, La = Wa + SW, Ia + SI + SL * Wa, delta * (1 - th_s) + SL
    Wb, Ib = _piece(Wt, Ht, delta, jnp.zeros((), dtype), th_t)
    Wb, Ib, Lb = PW + Wb, PI + Ib + delta * th_t * PW, PL + delta * th_t
    W_far, I_far, len_far = Wa + Wb, Ia + Ib + Lb * Wa, La + Lb
    # Both ends in one leaf.
    W_near, I_near = _piece(Ws, Hs, delta, th_s, th_t)
    len_near = delta * (th_t - th_s)
    W = jnp.where(diverged, W_far, W_near)
    I = jnp.where(diverged, I_far, I_near)
    length = jnp.where(diverged, len_far, len_near)
    safe = jnp.where(length > 0, length, 1)
    H = jnp.where(length > 0, I / safe - W / 2, 0)
    return W, H


def increment(seed, t0, t1, s, t, n: int, levels: int = DEFAULT_LEVELS, dtype=jnp.float64):
    """``(W, H)`` over ``[s, t]`` of the Brownian motion on ``[t0, t1]``
    seeded by ``seed``: arrays of shape ``(n,)`` (independent components)."""
    span = t1 - t0
    us = (s - t0) / span
    ut = (t - t0) / span
    W, H = unit_increment(seed, us, ut, n, levels, dtype)
    root = jnp.sqrt(span).astype(dtype)
    return root * W, root * H
