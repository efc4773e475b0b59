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
leaf's ``H`` exactly.

Resolution: at the dyadic points ``t0 + k delta`` the path has exactly the law
of Brownian motion; between them ``W`` misses a conditional variance of at
most ``delta/16`` (standard deviation ``sqrt(delta)/4``). With ``SDETerm``'s
default of 20 levels on ``[0, 10]``, ``delta = 9.5e-6`` and that standard
deviation is ``7.7e-4``, against ``0.1`` for the increment over a step of
``0.01``: the variance of an increment over any step longer than ``1e3 delta``
is short by less than ``1e-4`` relative. Solvers are driven by exactly this
path (the strong-error tests compare with the exact solution along it), so the
resolution only bounds how far its law is from Brownian motion, not the
convergence of a solver; it matters only for steps approaching ``delta``.

Queries. Descending to a point ``u`` (one split per level, `descend`) keeps
the ``(W, H)`` of the sibling each split sets aside. The ``(W, H)`` of
``[s, t]`` is the concatenation of the siblings to the right of ``s``'s path
and to the left of ``t``'s below the level where the two paths part, and of
the two leaves' pieces (`_descend`, with the cache of ``s`` as ``left``, sums
them as each piece's increment and time integral): only pieces that lie
inside ``[s, t]`` are ever added, so nothing is computed as the difference of
two large numbers and ``H`` over a short step keeps its relative precision in
float32 (what remains is the rounding of the top-down conditioning, ~1e-3
relative, measured in the tests). A solver keeps the cache of its current
time as its state (`point`, `increment_from`): a rejected step reuses it, an
accepted one moves it to the step's end, so each step descends the tree once
rather than twice. Where the step times are shared (one solve, a `vmap` over
keys, fixed steps) the caches keep their nodes too, and a descent reuses the
previous one's splits down to the level where the points part and stops where
its point is a node's boundary: fixed steps of ``2^-k`` of the span hash about
two levels per step instead of ``levels``, adaptive ones skip the top levels
they share.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp
import equinox.internal as eqxi

#: Default depth of the tree (as `SDETerm`): leaves of (t1 - t0) * 2^-20.
DEFAULT_LEVELS = 20


def seed_from_key(key) -> jax.Array:
    """Two uint32 words that seed the tree, from any `jax.random` key (typed
    or legacy uint32)."""
    return jax.random.bits(key, (2,), jnp.uint32)


# Threefry-2x32's rotation constants, for even and odd groups of four rounds
# (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as 1, 2,
# 3", SC'11; the Skein family's constants), and its key-schedule parity.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def _threefry_2x32(key, x0, x1):
    """Threefry-2x32 with 20 rounds of the blocks ``(x0[j], x1[j])`` under the
    two-word ``key``: the same words as `jax.extend.random.threefry_2x32` of
    ``concatenate([x0, x1])`` (``tests/test_brownian.py`` checks it), written
    out as plain integer operations. (JAX's lowering of its primitive for
    XLA:CPU runs about 4x slower here: under `jax.vmap` over 1000 paths, 93
    against 22 ns per path for four words, and the tree hashes at every level
    of every step.)"""
    k0, k1 = key[0], key[1]
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(_PARITY))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


# ln 2 split in two (fdlibm's split: the high part has trailing zero bits, so
# that ``e * _LN2_HI`` is exact for the exponents of float64).
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10

# Per float type: the integer type of its bits, mantissa bits, exponent bias,
# and the highest odd power kept of the atanh series (the next term is below
# the type's rounding: 2 s^25/25 < 1e-20 for float64, 2 s^13/13 < 2e-11 for float32).
_LOG_FORMATS = {
    jnp.dtype(jnp.float64): (jnp.uint64, jnp.int64, 52, 1023, 23),
    jnp.dtype(jnp.float32): (jnp.uint32, jnp.int32, 23, 127, 11),
}


def _log(x):
    """Natural logarithm of positive, normal float64 or float32 ``x`` (the
    tree's uniforms and the tail variable of `_ndtri`), to 3 ulp in either:
    the exponent and a mantissa ``m`` in [sqrt(1/2), sqrt(2))
    split off with integer operations, then ``log m = 2 atanh(s)``,
    ``s = (m - 1)/(m + 1)``, ``|s| <= 0.172``, by its odd series.

    XLA:CPU's own logarithm costs about 4 ns per element in float64, and in
    float32 inside `_ndtri`'s fused loop it made the whole loop run 4-5x
    slower; this one costs well under 1 ns. The tree takes two logarithms per
    normal."""
    uint, sint, mbits, bias, top = _LOG_FORMATS[jnp.dtype(x.dtype)]
    b = lax.bitcast_convert_type(x, uint)
    e = (b >> uint(mbits)).astype(sint) - bias
    one_bits = uint(bias << mbits)
    m = lax.bitcast_convert_type((b & uint((1 << mbits) - 1)) | one_bits, x.dtype)
    big = m > math.sqrt(2.0)
    m = jnp.where(big, m * 0.5, m)
    e = (e + big.astype(sint)).astype(x.dtype)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    series = jnp.full_like(s2, 2.0 / top)
    for k in range((top - 3) // 2, -1, -1):
        series = series * s2 + 2.0 / (2 * k + 1)
    if x.dtype == jnp.float64:
        return e * _LN2_HI + (s * series + e * _LN2_LO)
    return e * math.log(2.0) + s * series


# The rational approximations of Cephes' ndtri (S. L. Moshier, Cephes Math
# Library 2.x, ``ndtri.c``): x = w + w^3 P0(w^2)/Q0(w^2) (times sqrt(2 pi)) for
# exp(-2) < q < 1 - exp(-2), w = q - 1/2; in the tails, with z = sqrt(-2 ln q),
# x = z - ln(z)/z - P1(1/z)/(z Q1(1/z)) for z < 8. (Cephes has a third pair for
# z >= 8, q < exp(-32): the tree's uniforms are at least 2^-33, z <= 6.8.)
# Highest power first; the Q's leading 1 is written out.
_NDTRI_P0 = (-5.99633501014107895267e1, 9.80010754185999661536e1, -5.66762857469070293439e1,
             1.39312609387279679503e1, -1.23916583867381258016e0)
_NDTRI_Q0 = (1.0, 1.95448858338141759834e0, 4.67627912898881538453e0, 8.63602421390890590575e1,
             -2.25462687854119370527e2, 2.00260212380060660359e2, -8.20372256168333339912e1,
             1.59056225126211695515e1, -1.18331621121330003142e0)
_NDTRI_P1 = (4.05544892305962419923e0, 3.15251094599893866154e1, 5.71628192246421288162e1,
             4.40805073893200834700e1, 1.46849561928858024014e1, 2.18663306850790267539e0,
             -1.40256079171354495875e-1, -3.50424626827848203418e-2, -8.57456785154685413611e-4)
_NDTRI_Q1 = (1.0, 1.57799883256466749731e1, 4.53907635128879210584e1, 4.13172038254672030440e1,
             1.50425385692907503408e1, 2.50464946208309415979e0, -1.42182922854787788574e-1,
             -3.80806407691578277194e-2, -9.33259480895457427372e-4)


def _horner(coeffs, x):
    acc = jnp.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        acc = acc * x + c
    return acc


def _ndtri(u):
    """The standard normal quantile of the tree's uniforms ``u`` (float64 in
    [2^-33, 1 - 2^-33], float32 in [2^-24, 1 - 2^-24]): Cephes' approximations
    with `_log`, within a few ulp of `scipy.special.ndtri`
    (``tests/test_brownian.py``). `jax.scipy.special.ndtri` evaluates the same
    approximations with XLA's logarithm: about 15-17 ns per normal on XLA:CPU
    against 2-3 ns here, and a tree descent draws two normals per channel and
    level."""
    upper = u > 1.0 - math.exp(-2.0)
    q = jnp.where(upper, 1.0 - u, u)
    central = q > math.exp(-2.0)
    w = q - 0.5
    w2 = w * w
    x_central = (w + w * w2 * (_horner(_NDTRI_P0, w2) / _horner(_NDTRI_Q0, w2))) * math.sqrt(2.0 * math.pi)
    z = jnp.sqrt(-2.0 * _log(jnp.where(central, 0.01, q)))
    iz = 1.0 / z
    r = _horner(_NDTRI_P1, iz) / _horner(_NDTRI_Q1, iz)
    x = jnp.where(central, x_central, r * iz + _log(z) * iz - z)
    return jnp.where(upper, -x, x)


def _uniforms(bits, dtype):
    """Uniforms strictly inside (0, 1) from 32-bit words, at the midpoints of
    2^32 cells in float64 and of 2^23 cells in float32 (``k + 1/2`` is exact
    there for ``k < 2^23``; with 24 bits the top word rounded to 1, whose
    quantile is infinite)."""
    if jnp.dtype(dtype) == jnp.float64:
        return (bits.astype(jnp.float64) + 0.5) * 2.0**-32
    return ((bits >> 9).astype(jnp.float32) + 0.5) * 2.0**-23


def _normals(seed, node, n, dtype):
    """``2 x n`` standard normals for tree node ``node`` (a counter-based hash
    of ``(seed, node, j)``: no key splitting, any node in any order). Below
    float64 they are computed in float32."""
    bits = jnp.stack(_threefry_2x32(seed, jnp.full((n,), node, jnp.uint32), jnp.arange(n, dtype=jnp.uint32)))
    return _ndtri(_uniforms(bits, dtype)).astype(dtype)


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


class PointCache(NamedTuple):
    """One point ``u`` of the unit interval as the tree sees it: its leaf
    index, its place ``theta`` in the leaf and the leaf's ``(W, H)``, and the
    ``(W, H)`` of the sibling that each split of its descent set aside
    (``offs``, one row per level). A solver keeps the cache of its current
    time, so each step descends the tree once (for its new end) instead of
    twice.

    With ``keep_nodes`` (`descend`) the cache also holds the node each split
    went on to (``ons``, the leaf last), and the descent went only as deep as
    its point needs (`_stop`): a point on the boundary of a node of level
    ``stop < levels`` (a multiple of ``2^-stop``) needs nothing below it, and
    its rows from ``stop`` on are zeros."""

    index: jax.Array
    theta: jax.Array
    leaf: tuple
    offs: tuple
    ons: tuple = None


def _unit_position(u, levels, dtype):
    """Leaf index and place in the leaf of ``u`` in ``[0, 1]``."""
    if not 1 <= levels <= 30:
        raise ValueError(f"`levels` must be between 1 and 30; got {levels}.")
    scale = 2.0**levels
    x = jnp.clip(jnp.asarray(u, dtype), 0, 1) * scale
    i = jnp.clip(jnp.floor(x), 0, scale - 1)
    return i.astype(jnp.uint32), x - i


def _stop(i, theta, levels):
    """The depth a point needs: ``stop`` where it lies on the boundary of a
    node of level ``stop`` (its leaf index ``i`` ends in ``levels - stop`` zero
    bits and ``theta`` is 0; u = 0: 0), else ``levels``."""
    trailing = lax.population_count((i & (~i + jnp.uint32(1))) - jnp.uint32(1)).astype(jnp.int32)
    return jnp.where(theta == 0, jnp.maximum(levels - trailing, 0), levels).astype(jnp.int32)


def _descend_impl(seed, u, n, levels, dtype, keep_nodes, left):
    """Walk the tree down to the leaf holding ``u``: one split per level.

    ``left``: the cache of a point ``u_a <= u``; the walk then also sums the
    ``(W, H)`` of ``[u_a, u]`` (returned with the cache of ``u``).

    ``keep_nodes``: the walk skips what it can, and keeps what the next walk
    needs to (`PointCache`). It reuses ``left``'s splits (when ``left`` kept
    its nodes) down to the level where the two points part, that split too
    (halves swapped), and stops at the level where ``u`` lies on a node's
    boundary: for steps of ``2^-k`` of the span it hashes about two levels per
    step instead of ``levels``. Each node is a function of the seed and its
    place in the tree alone, so the reused numbers are those a full descent
    computes: the path does not depend on the order of the queries. Each
    level's split runs when any `jax.vmap` lane needs it (`unvmap_any`) and
    lanes that do not keep their reused values: lanes at the same times (fixed
    steps, shared steps) skip together, lanes at scattered times skip little
    and pay the selects."""
    i, theta = _unit_position(u, levels, dtype)
    z = _normals(seed, jnp.uint32(0), n, dtype)
    root = (z[0], z[1] / math.sqrt(12.0))
    # Node 0 holds the root's (W, H); node k >= 1 the split of heap node k.
    lazy = keep_nodes and left is not None and left.ons is not None
    ls = jnp.arange(levels)

    def bit_of(index, l):
        return ((index >> (levels - 1 - l).astype(jnp.uint32)) & jnp.uint32(1)).astype(bool)

    def split(node, l, bit, W, H):
        h = jnp.asarray(2.0, dtype) ** (-l.astype(dtype))
        lo, hi = _split(seed, node, h, W, H, dtype)
        on = (jnp.where(bit, hi[0], lo[0]), jnp.where(bit, hi[1], lo[1]))
        off = (jnp.where(bit, lo[0], hi[0]), jnp.where(bit, lo[1], hi[1]))
        return on, off

    part = None
    if left is not None:
        # The level whose split sends the two points to different halves
        # (``levels``: the same leaf).
        differ = left.index ^ i
        part = jnp.where(differ == 0, levels, levels - 1 - (
            31 - lax.clz(jnp.where(differ == 0, jnp.uint32(1), differ)).astype(jnp.int32)))
    stop = _stop(i, theta, levels) if keep_nodes else None
    # How deep ``left``'s descent went (all the way unless it kept its nodes).
    left_stop = None if left is None or left.ons is None else _stop(left.index, left.theta, levels)

    def level(carry, inp):
        node, (W, H) = carry
        l, a_off, a_on = inp
        bit = bit_of(i, l)
        if not keep_nodes:
            on, off = split(node, l, bit, W, H)
            return (2 * node + bit.astype(jnp.uint32), on), (off, None)
        if lazy:
            reused = (l <= part) & (l < left_stop)
            swap = l == part
            old_on = jax.tree_util.tree_map(lambda x, y: jnp.where(swap, x, y), a_off, a_on)
            old_off = jax.tree_util.tree_map(lambda x, y: jnp.where(swap, x, y), a_on, a_off)
        else:
            reused = jnp.asarray(False)
            old_on = old_off = (jnp.zeros_like(W), jnp.zeros_like(H))
        keep = reused | (l >= stop)
        # Below ``stop`` nothing is needed: zeros (a skipped split's rows).
        old_on = jax.tree_util.tree_map(lambda x: jnp.where(l >= stop, 0, x), old_on)
        old_off = jax.tree_util.tree_map(lambda x: jnp.where(l >= stop, 0, x), old_off)

        def run(_):
            on, off = split(node, l, bit, W, H)
            pick = lambda new, old: jnp.where(keep, old, new)  # noqa: E731
            return jax.tree_util.tree_map(pick, on, old_on), jax.tree_util.tree_map(pick, off, old_off)

        on, off = lax.cond(eqxi.unvmap_any(~keep), run, lambda _: (old_on, old_off), None)
        return (2 * node + bit.astype(jnp.uint32), on), (off, on)

    xs = (ls, left.offs if lazy else None, left.ons if lazy else None)
    (_, leaf), (offs, ons) = lax.scan(level, (jnp.uint32(1), root), xs)
    cache = PointCache(index=i, theta=theta, leaf=leaf, offs=offs, ons=ons)
    if left is None:
        return cache, None
    # Below the level where the points part: the siblings right of u_a's path
    # (its tail within the node where they part) and left of u's (its head
    # there). Each piece adds its increment w and its time integral
    # m (h + w/2) (length m, Lévy area h); a piece also adds its length times
    # the increment of the pieces before it. The weights are scalars of the
    # two paths' bits, so each sum is one pass over the siblings' rows.
    m = jnp.asarray(2.0, dtype) ** (-(ls + 1).astype(dtype))
    below = ls > part
    in_tail = below & ~bit_of(left.index, ls)
    if left_stop is not None:
        in_tail = in_tail & (ls < left_stop)
    in_head = below & bit_of(i, ls)
    c_tail = jnp.where(in_tail, m, 0)
    c_head = jnp.where(in_head, m, 0)
    m_tail = jnp.sum(c_tail)
    m_head = jnp.sum(c_head)
    # The tail runs from u_a up the levels (deepest sibling first): before the
    # sibling at level l come u_a's first piece and the siblings below l. The
    # head runs from the shallowest sibling down, then u's leaf piece.
    after_tail = _exclusive_sums(c_tail)  # tail length of the siblings above l
    after_head = m_head - _exclusive_sums(c_head) - c_head  # head length of the siblings below l

    def weighted(weights, rows):
        # A vector-matrix product: one operation in the program (and a
        # matrix-vector product for `single_kernel`).
        return jnp.dot(weights, rows, precision=lax.Precision.HIGHEST)

    (aw, ah), (bw, bh) = left.offs, offs
    tW = weighted(in_tail.astype(dtype), aw)
    tI = weighted(c_tail, ah) + weighted(jnp.where(in_tail, m / 2 + after_tail, 0), aw)
    hW = weighted(in_head.astype(dtype), bw)
    hI = weighted(c_head, bh) + weighted(jnp.where(in_head, m / 2 + after_head, 0), bw)
    delta = jnp.asarray(2.0**-levels, dtype)
    one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)
    # u_a's first piece: its leaf's right of it; where u_a stopped early, the
    # whole node of level ``stop`` that it starts.
    lw, li = _piece(left.leaf[0], left.leaf[1], delta, left.theta, one)
    first = (lw, li, delta * (1 - left.theta))
    if left_stop is not None:
        m_stop = jnp.asarray(2.0, dtype) ** (-left_stop.astype(dtype))
        node_w = jnp.where(left_stop == 0, root[0], left.ons[0][jnp.maximum(left_stop - 1, 0)])
        node_h = jnp.where(left_stop == 0, root[1], left.ons[1][jnp.maximum(left_stop - 1, 0)])
        whole = (node_w, m_stop * (node_h + node_w / 2), m_stop)
        first = jax.tree_util.tree_map(lambda x, y: jnp.where(left_stop < levels, x, y), whole, first)
    tail = (first[0] + tW, first[1] + tI + m_tail * first[0], first[2] + m_tail)
    if left_stop is not None:
        # u_a stopped above the parting level: its tail there is the whole
        # left half of the parting node, u's sibling at that level.
        m_part = jnp.asarray(2.0, dtype) ** (-(jnp.minimum(part, levels - 1) + 1).astype(dtype))
        sw = offs[0][jnp.minimum(part, levels - 1)]
        sh = offs[1][jnp.minimum(part, levels - 1)]
        half = (sw, m_part * (sh + sw / 2), m_part)
        tail = jax.tree_util.tree_map(lambda x, y: jnp.where(part >= left_stop, x, y), half, tail)
    # u's head: the siblings, then its leaf's piece left of it.
    rw, ri = _piece(leaf[0], leaf[1], delta, zero, theta)
    head = (hW + rw, hI + ri + delta * theta * hW, m_head + delta * theta)
    W_far, I_far, len_far = _cat(tail, head)
    W_near, I_near = _piece(leaf[0], leaf[1], delta, left.theta, theta)
    len_near = delta * (theta - left.theta)
    same = part == levels
    W = jnp.where(same, W_near, W_far)
    I = jnp.where(same, I_near, I_far)
    length = jnp.where(same, len_near, len_far)
    safe = jnp.where(length > 0, length, 1)
    H = jnp.where(length > 0, I / safe - W / 2, 0)
    return cache, (W, H)


# One trace per (shapes, static settings): a solve descends the tree from
# several places (the loop's first point and its steps; a checkpointed
# adjoint's replays and the derivative of a step), and tracing a descent
# costs ~0.2 s. As a nested `jax.jit` each is traced once and, under `vmap`
# and differentiation, transformed once (JAX caches both per jaxpr).
_descend = jax.jit(_descend_impl, static_argnums=(2, 3, 4, 5))


def _exclusive_sums(c):
    """``[0, c[0], c[0] + c[1], ...]`` of a short vector, as a product with a
    triangular matrix (`jnp.cumsum` lowers to a `reduce_window`, which
    `single_kernel` does not take)."""
    k = c.shape[0]
    below = jnp.tril(jnp.ones((k, k), c.dtype), -1)
    return jnp.dot(below, c, precision=lax.Precision.HIGHEST)


def _cat(a, b):
    """Concatenate pieces ``a`` then ``b``, each ``(W, I, length)``."""
    wa, ia, la = a
    wb, ib, lb = b
    return wa + wb, ia + ib + lb * wa, la + lb


def descend(seed, u, n: int, levels: int = DEFAULT_LEVELS, dtype=jnp.float64, keep_nodes: bool = False) -> PointCache:
    """The cache of ``u`` in ``[0, 1]`` (``keep_nodes``: see `PointCache`)."""
    return _descend(seed, u, n, levels, dtype, keep_nodes, None)[0]


def unit_increment(seed, us, ut, n: int, levels: int = DEFAULT_LEVELS, dtype=jnp.float64):
    """``(W, H)`` of a standard Brownian motion on ``[0, 1]`` over ``[us, ut]``
    (``0 <= us <= ut <= 1``), each of shape ``(n,)``."""
    return _descend(seed, ut, n, levels, dtype, False, descend(seed, us, n, levels, dtype))[1]


def increment(seed, t0, t1, s, t, n: int, levels: int = DEFAULT_LEVELS, dtype=jnp.float64):
    """``(W, H)`` over ``[s, t]`` of the Brownian motion on ``[t0, t1]``
    seeded by ``seed``: arrays of shape ``(n,)`` (independent components)."""
    span = t1 - t0
    us = (s - t0) / span
    ut = (t - t0) / span
    W, H = unit_increment(seed, us, ut, n, levels, dtype)
    root = jnp.sqrt(span).astype(dtype)
    return root * W, root * H


def point(seed, t0, t1, s, n: int, levels: int = DEFAULT_LEVELS, dtype=jnp.float64,
          keep_nodes: bool = False) -> PointCache:
    """The cache of time ``s`` of the Brownian motion on ``[t0, t1]``
    (``keep_nodes``: see `PointCache`)."""
    return descend(seed, (s - t0) / (t1 - t0), n, levels, dtype, keep_nodes)


def increment_from(seed, t0, t1, cache_s: PointCache, t, n: int, levels: int = DEFAULT_LEVELS,
                   dtype=jnp.float64):
    """``(W, H, cache_t)`` over ``[s, t]`` given the cache of ``s`` (``s <= t``):
    one descent, restarted from ``cache_s``'s nodes where it kept them (the
    new cache keeps its nodes too)."""
    cache_t, (W, H) = _descend(seed, (t - t0) / (t1 - t0), n, levels, dtype, cache_s.ons is not None, cache_s)
    root = jnp.sqrt(t1 - t0).astype(dtype)
    return root * W, root * H, cache_t
