"""The virtual Brownian tree: the law of W and of the space-time Lévy area H
(KS tests, covariances), independence, consistency under subdivision,
determinism, float32 precision."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from neuralde import _brownian as B

N = 4000
LEVELS = 16
# Fixed seeds: the tests are deterministic; thresholds are 4-sigma / p > 1e-4.
SEEDS = jax.vmap(B.seed_from_key)(jax.random.split(jax.random.key(2024), N))
unit = jax.jit(B.unit_increment, static_argnums=(3, 4, 5))


@pytest.fixture(scope="module")
def query():
    """(W, H) over [s, t] of the standard Brownian motion on [0, 1], for all N
    seeds at once; s and t are traced, so one compilation serves every test."""
    f = jax.jit(jax.vmap(lambda seed, s, t: B.unit_increment(seed, s, t, 2, LEVELS), in_axes=(0, None, None)))
    return lambda s, t: tuple(np.asarray(x) for x in f(SEEDS, jnp.float64(s), jnp.float64(t)))


INTERVALS = [(0.0, 1.0), (0.0, 0.5), (0.25, 0.5), (0.1, 0.35), (0.49, 0.51), (0.3, 0.3 + 2e-3), (0.123, 0.9)]


@pytest.mark.parametrize("s,t", INTERVALS)
def test_increment_law_ks(query, s, t):
    W, H = query(s, t)
    h = t - s
    for comp in range(2):
        assert stats.kstest(W[:, comp] / np.sqrt(h), "norm").pvalue > 1e-4
        assert stats.kstest(H[:, comp] / np.sqrt(h / 12), "norm").pvalue > 1e-4
    # W and H are uncorrelated (independent Gaussians).
    assert abs(np.corrcoef(W[:, 0], H[:, 0])[0, 1]) < 4 / np.sqrt(N)


def test_split_covariance(query):
    """The halves of [0, 1]: (W1, H1, W2, H2) independent with variances
    (1/2, 1/24, 1/2, 1/24), and they recombine into the whole's (W, H)."""
    W1, H1 = query(0.0, 0.5)
    W2, H2 = query(0.5, 1.0)
    W, H = query(0.0, 1.0)
    X = np.stack([W1[:, 0], H1[:, 0], W2[:, 0], H2[:, 0]])
    cov = np.cov(X)
    want = np.diag([0.5, 1 / 24, 0.5, 1 / 24])
    sd = np.sqrt(np.outer(np.diag(want), np.diag(want)) / N)  # standard error of each entry (Gaussian)
    sd[np.diag_indices(4)] *= np.sqrt(2)
    assert np.all(np.abs(cov - want) < 4 * sd)
    np.testing.assert_allclose(W1 + W2, W, atol=1e-13)
    np.testing.assert_allclose((H1 + H2) / 2 + (W1 - W2) / 4, H, atol=1e-13)


def test_disjoint_increments_independent(query):
    Wa, Ha = query(0.1, 0.4)
    Wb, Hb = query(0.4, 0.77)
    for a in (Wa[:, 0], Ha[:, 0]):
        for b in (Wb[:, 0], Hb[:, 0]):
            assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(N)
    # Components are independent Brownian motions.
    assert abs(np.corrcoef(Wa[:, 0], Wa[:, 1])[0, 1]) < 4 / np.sqrt(N)


def test_subdivision_consistency(query):
    """W(s,u) + W(u,t) = W(s,t) and the time integrals add up:
    I(s,t) = I(s,u) + I(u,t) + (t-u) W(s,u), with I = h (H + W/2)."""
    s, u, t = 0.05, 0.3711, 0.8
    Wa, Ha = query(s, u)
    Wb, Hb = query(u, t)
    W, H = query(s, t)
    np.testing.assert_allclose(Wa + Wb, W, atol=1e-12)

    def integral(w, h_, length):
        return length * (h_ + w / 2)

    lhs = integral(Wa, Ha, u - s) + integral(Wb, Hb, t - u) + (t - u) * Wa
    np.testing.assert_allclose(lhs, integral(W, H, t - s), atol=1e-12)


def test_determinism_and_keys(query):
    a = query(0.2, 0.7)
    b = query(0.2, 0.7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # Different keys give different paths; typed and legacy keys both work.
    s1 = B.seed_from_key(jax.random.key(0))
    s2 = B.seed_from_key(jax.random.PRNGKey(0))
    s3 = B.seed_from_key(jax.random.key(1))
    w1 = unit(s1, 0.1, 0.2, 1, LEVELS, jnp.float64)[0]
    w3 = unit(s3, 0.1, 0.2, 1, LEVELS, jnp.float64)[0]
    assert s2.shape == (2,)
    assert float(jnp.abs(w1 - w3)[0]) > 0


def test_scaling_to_span():
    """On [t0, t1] the path is sqrt(span) times the unit path at rescaled times."""
    seed = B.seed_from_key(jax.random.key(5))
    W, H = jax.jit(B.increment, static_argnums=(5, 6, 7))(seed, 2.0, 6.0, 3.0, 5.0, 3, LEVELS, jnp.float64)
    Wu, Hu = unit(seed, 0.25, 0.75, 3, LEVELS, jnp.float64)
    np.testing.assert_allclose(W, 2.0 * Wu, rtol=1e-12)
    np.testing.assert_allclose(H, 2.0 * Hu, rtol=1e-12)


def test_float32_short_interval_precision():
    """Over a short step W and H keep their relative precision in float32: the
    query adds only pieces inside the interval, never differences of large
    sums (an O(1) running integral would lose everything here). What remains
    is the rounding of the top-down conditioning, measured at ~1e-3 relative."""
    seed = B.seed_from_key(jax.random.key(7))
    s, t = 0.4999, 0.5002  # straddles the root's midpoint: the worst case for cancellation
    W64, H64 = unit(seed, s, t, 4, 20, jnp.float64)
    W32, H32 = unit(seed, np.float32(s), np.float32(t), 4, 20, jnp.float32)
    scale = np.sqrt(t - s)
    assert np.max(np.abs(np.asarray(W32, np.float64) - W64)) < 5e-3 * scale
    assert np.max(np.abs(np.asarray(H32, np.float64) - H64)) < 5e-3 * scale


def test_levels_validation():
    with pytest.raises(ValueError, match="levels"):
        B.unit_increment(B.seed_from_key(jax.random.key(0)), 0.0, 1.0, 1, levels=40)


def test_threefry_matches_jax():
    # The tree's hash is Threefry-2x32 written out (faster on XLA:CPU): the same words as JAX's
    # own primitive, so the paths are those of `jax.extend.random.threefry_2x32`.
    from jax.extend.random import threefry_2x32

    rng = np.random.default_rng(0)
    keys = jnp.asarray(rng.integers(0, 2**32, (64, 2), dtype=np.uint64).astype(np.uint32))
    counts = jnp.asarray(rng.integers(0, 2**32, (64, 2, 5), dtype=np.uint64).astype(np.uint32))
    ours = jax.jit(jax.vmap(lambda k, c: jnp.concatenate(B._threefry_2x32(k, c[0], c[1]))))(keys, counts)
    ref = jax.vmap(lambda k, c: threefry_2x32(k, c.reshape(-1)))(keys, counts)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    # Random123's known-answer vector for Threefry-2x32-20 (key and counter all ones).
    ones = jnp.uint32(0xFFFFFFFF)
    out = B._threefry_2x32(jnp.array([ones, ones]), jnp.array([ones]), jnp.array([ones]))
    assert [int(out[0][0]), int(out[1][0])] == [0x1CB996FC, 0xBB002BE7]


def test_normals_quantile_and_log_match_scipy():
    # The tree turns its uniforms into normals with its own quantile and logarithm (faster on
    # XLA:CPU than XLA's log): both against scipy / numpy over random hash words and the
    # extreme words at both ends, where the tail approximations and the largest normals are.
    from scipy.special import ndtri

    rng = np.random.default_rng(1)
    words = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64),
                            np.arange(0, 5000, dtype=np.uint64) * 512,
                            2**32 - 1 - np.arange(0, 5000, dtype=np.uint64) * 512]).astype(np.uint32)
    for dtype, ulps, largest in ((jnp.float64, 8, 6.2), (jnp.float32, 8, 5.29)):
        u = jax.jit(B._uniforms, static_argnums=1)(jnp.asarray(words), dtype)
        assert u.dtype == dtype and float(u.min()) > 0 and float(u.max()) < 1
        z = np.asarray(jax.jit(B._ndtri)(u), np.float64)
        ref = ndtri(np.asarray(u, np.float64))
        spacing = np.spacing(np.abs(ref).astype(np.dtype(dtype))).astype(np.float64)
        # Near u = 1/2 the quantile is near 0, where an ulp of it is tiny: there the bound is
        # absolute, a fifth of the type's epsilon.
        near_zero = 0.2 * np.finfo(np.dtype(dtype)).eps
        assert np.all(np.abs(z - ref) <= ulps * spacing + near_zero), dtype
        assert abs(z.max()) > largest and abs(z.min()) > largest
    for dtype, ulps in ((jnp.float64, 4), (jnp.float32, 5)):
        x = np.concatenate([rng.uniform(2.0**-34, 1.0, 50_000), rng.uniform(0.5, 7.0, 50_000), [1.0, 2.0, 0.5]])
        x = x.astype(np.dtype(dtype))
        lg = np.asarray(jax.jit(B._log)(jnp.asarray(x)), np.float64)
        ref = np.log(x.astype(np.float64))
        assert np.all(np.abs(lg - ref) <= ulps * np.spacing(np.abs(ref).astype(np.dtype(dtype))) + 1e-300), dtype


def test_float32_normals_stay_finite_at_the_top_word():
    # With 24 bits, (2^24 - 1) + 1/2 rounds to 2^24 in float32: the top hash words gave the
    # uniform 1.0 and an infinite normal (one word in 2^24 at every node of every descent).
    top = jnp.array([0xFFFFFFFF, 0xFFFFFF00, 0x00000000], jnp.uint32)
    for dtype in (jnp.float32, jnp.float64):
        z = B._ndtri(B._uniforms(top, dtype))
        assert np.all(np.isfinite(np.asarray(z))) and float(z[0]) > 5.0 and float(z[2]) < -5.0


def test_float32_solve_through_a_top_word_node():
    # Key 2's tree has a top hash word at node 729038 (level 19, the leaves' parents at 20
    # levels), above u = 204750.5 / 2^19 of the span. Before the fix a float32 solve saving
    # there returned NaN (status 3), and the increment over [0.25, u] was NaN.
    import neuralde as nde

    u = np.float32(204750.5 / 2**19)
    seed = B.seed_from_key(jax.random.key(2))
    W, H = B.increment(seed, jnp.float32(0), jnp.float32(1), jnp.float32(0.25), jnp.float32(u), 1, 20, jnp.float32)
    assert np.isfinite(float(W[0])) and np.isfinite(float(H[0]))
    term = nde.SDETerm(lambda t, y, a: -y, lambda t, y, a: 0.5 * jnp.ones_like(y), noise="diagonal")
    sol = nde.solve(term, nde.EulerMaruyama(), jnp.ones(1, jnp.float32), jnp.array([0.0, u, 1.0], jnp.float32),
                    dt0=1e-3, adaptive=False, key=jax.random.key(2), throw=False)
    assert int(sol.status) == 0 and np.all(np.isfinite(np.asarray(sol.ys)))


def _query_sequence(levels):
    """(s, t, accept) of a solver-like walk over [0, 1]: fixed dyadic steps,
    rejected attempts (t shortened, then accepted), steps inside one leaf, a
    step of length zero, and a step from a dyadic point into its own first
    leaf."""
    rng = np.random.default_rng(11)
    ends = list(np.arange(1, 17) / 16)  # dyadic fixed steps from 0
    s, out = ends[7], []
    out += [(a, b, True) for a, b in zip([0.0] + ends[:7], ends[:8])]
    while s < 0.95:
        h = rng.uniform(1e-3, 3e-2)
        for _ in range(rng.integers(0, 3)):
            out.append((s, min(1.0, s + 2 * h), False))
        out.append((s, min(1.0, s + h), True))
        s = min(1.0, s + h)
    leaf = 2.0**-levels
    out += [(s, s, True), (s, s + leaf / 3, True), (s + leaf / 3, s + leaf / 2, True)]
    d = 0.96875  # 31/32: a dyadic point, then a step into its first leaf
    out += [(s + leaf / 2, d, True), (d, d + leaf / 4, True), (d + leaf / 4, 1.0, True)]
    return [np.array(x) for x in zip(*out)]


@pytest.mark.parametrize("levels", [6, 20])
def test_restarted_descents_equal_fresh_ones(levels):
    # A solver's caches keep their nodes where the step times are shared: each
    # descent then reuses the previous one's splits down to where the points
    # part and stops at a node boundary. Same numbers as two fresh descents per
    # step (the plain code path), on one path and under a vmap over seeds.
    s, t, accept = _query_sequence(levels)
    seeds = SEEDS[:3]

    def walk(seed):
        c0 = B.descend(seed, s[0], 3, levels, keep_nodes=True)

        def body(c, x):
            ti, acc = x
            W, H, nc = B.increment_from(seed, 0.0, 1.0, c, ti, 3, levels)
            return jax.tree_util.tree_map(lambda a, b: jnp.where(acc, a, b), nc, c), (W, H)

        return jax.lax.scan(body, c0, (jnp.asarray(t), jnp.asarray(accept)))[1]

    got = jax.jit(jax.vmap(walk))(seeds)
    one = jax.jit(walk)(seeds[1])
    ref = jax.jit(jax.vmap(jax.vmap(lambda sd, a, b: B.unit_increment(sd, a, b, 3, levels),
                                    in_axes=(None, 0, 0)), in_axes=(0, None, None)))(seeds, s, t)
    scale = np.sqrt(np.maximum(t - s, 1e-300))[None, :, None]
    for g, o, r in zip(got, one, ref):
        err = np.abs(np.asarray(g) - np.asarray(r)) / np.maximum(scale, 1e-3)
        assert err.max() < 1e-12, err.max()
        np.testing.assert_allclose(np.asarray(o), np.asarray(g)[1], rtol=0, atol=1e-14)
