"""Order conditions of the Butcher tableaus in `neuralde._tableaus`.

A Runge--Kutta method (c, A, b) has order p iff for every rooted tree t with
|t| <= p nodes

    sum_i b_i Phi_i(t) = 1 / gamma(t),

where Phi_i(leaf) = 1, Phi_i([t_1, ..., t_m]) = prod_k sum_j a_ij Phi_j(t_k) and
gamma(t) = |t| prod_k gamma(t_k) (Butcher; Hairer, Norsett & Wanner, Solving
ODEs I, 2nd ed., Thm. II.2.13). There are 1, 1, 2, 4, 9, 20 trees of order
1, ..., 6, so 1, 2, 4, 8, 17 conditions up to order 1, ..., 5.

A continuous extension b(theta) has order q iff for |t| <= q

    sum_i b_i(theta) Phi_i(t) = theta^|t| / gamma(t)   for all theta in [0, 1]

(HNW I, II.6), checked here at several theta in (0, 1).
"""
from __future__ import annotations

import numpy as np
import pytest

import neuralde as nde
from neuralde import _tableaus

# The trees are generated, not listed: a tree is the tuple of its subtrees,
# sorted in the order the trees were generated (so each tree has one form).


def _forests(total, start, catalog):
    if total == 0:
        yield ()
        return
    for index in range(start, len(catalog)):
        tree, order = catalog[index]
        if order <= total:
            for rest in _forests(total - order, index, catalog):
                yield (tree,) + rest


def rooted_trees(max_order):
    """{order: [trees]} for orders 1..max_order."""
    catalog = []
    by_order = {}
    for n in range(1, max_order + 1):
        by_order[n] = list(_forests(n - 1, 0, catalog))
        catalog.extend((tree, n) for tree in by_order[n])
    return by_order


TREES = rooted_trees(6)


def tree_order(tree):
    return 1 + sum(tree_order(child) for child in tree)


def density(tree):
    """gamma(t)."""
    out = tree_order(tree)
    for child in tree:
        out *= density(child)
    return out


def stage_weights(tree, a):
    """Phi_i(t) for every stage i."""
    phi = np.ones(a.shape[0])
    for child in tree:
        phi = phi * (a @ stage_weights(child, a))
    return phi


def residuals(weights, a, order, theta=1.0):
    """sum_i w_i Phi_i(t) - theta^|t|/gamma(t) for every tree of ``order``."""
    return np.array([weights @ stage_weights(t, a) - theta**order / density(t) for t in TREES[order]])


def max_residual_up_to(weights, a, order, theta=1.0):
    return max(np.max(np.abs(residuals(weights, a, k, theta))) for k in range(1, order + 1))


# name: (tableau, solver class, order of b, order of the embedded b_hat or None,
#        order of the continuous extension)
METHODS = {
    "Euler": (_tableaus.EULER, nde.Euler, 1, None, 1),
    "Heun": (_tableaus.HEUN, nde.Heun, 2, None, 2),
    "RK4": (_tableaus.RK4, nde.RK4, 4, None, 3),
    "Dopri5": (_tableaus.DOPRI5, nde.Dopri5, 5, 4, 4),
    "Tsit5": (_tableaus.TSIT5, nde.Tsit5, 5, 4, 4),
}
# The orders in the public contract (API.md).
API_ORDERS = {"Euler": 1, "Heun": 2, "RK4": 4, "Dopri5": 5, "Tsit5": 5}
THETAS = (0.1, 0.25, 0.5, 0.75, 0.9)
TOL = 1e-12


def test_tree_counts():
    assert [len(TREES[n]) for n in range(1, 7)] == [1, 1, 2, 4, 9, 20]
    # Cumulative numbers of conditions for orders 1..5.
    assert list(np.cumsum([len(TREES[n]) for n in range(1, 6)])) == [1, 2, 4, 8, 17]
    # Spot checks: the bushy tree of order 3 has gamma 3, the tall one gamma 6.
    assert sorted(density(t) for t in TREES[3]) == [3, 6]
    assert sorted(density(t) for t in TREES[4]) == [4, 8, 12, 24]


def test_checker_on_known_conditions():
    """The generic conditions agree with the written-out ones for order <= 4
    (HNW I, Table II.2.2) on a random tableau."""
    rng = np.random.default_rng(0)
    s = 5
    a = np.tril(rng.normal(size=(s, s)), -1)
    b = rng.normal(size=s)
    c = a.sum(axis=1)
    explicit = {
        1: [b.sum() - 1],
        2: [b @ c - 1 / 2],
        3: [b @ c**2 - 1 / 3, b @ a @ c - 1 / 6],
        4: [b @ c**3 - 1 / 4, b @ (c * (a @ c)) - 1 / 8, b @ a @ c**2 - 1 / 12, b @ a @ a @ c - 1 / 24],
    }
    for order, values in explicit.items():
        np.testing.assert_allclose(np.sort(residuals(b, a, order)), np.sort(values), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(METHODS))
def test_tableau_is_consistent(name):
    tab, solver_cls, *_ = METHODS[name]
    s = tab.num_stages
    assert tab.a.shape == (s, s) and tab.b.shape == (s,) and tab.c.shape == (s,)
    np.testing.assert_array_equal(np.triu(tab.a), 0.0)
    np.testing.assert_allclose(tab.a.sum(axis=1), tab.c, rtol=0, atol=1e-14)
    # b(1) = b: the dense output ends on the step's solution.
    np.testing.assert_allclose(tab.interp_weights(1.0), tab.b, rtol=0, atol=1e-13)
    np.testing.assert_allclose(tab.interp.sum(axis=1), tab.b, rtol=0, atol=1e-13)
    if tab.fsal:
        np.testing.assert_array_equal(tab.a[-1], tab.b)
        assert tab.c[-1] == 1.0
    # The solver uses this tableau.
    assert solver_cls.tableau is tab
    assert solver_cls.order == API_ORDERS[name]


@pytest.mark.parametrize("name", list(METHODS))
def test_order_conditions(name):
    """b satisfies every condition up to the method's order, and not all of the
    next order (so the order is exactly the one stated)."""
    tab, _, order, _, _ = METHODS[name]
    assert order == API_ORDERS[name]
    worst = max_residual_up_to(tab.b, tab.a, order)
    print(f"{name}: max residual up to order {order}: {worst:.1e}; "
          f"order {order + 1}: {np.max(np.abs(residuals(tab.b, tab.a, order + 1))):.1e}")
    assert worst < TOL
    assert np.max(np.abs(residuals(tab.b, tab.a, order + 1))) > 1e-6


@pytest.mark.parametrize("name", ["Dopri5", "Tsit5"])
def test_embedded_method(name):
    """b_hat = b - b_err has order 4 but not 5, so the error estimate is O(h^5)."""
    tab, _, _, embedded_order, _ = METHODS[name]
    assert tab.b_err is not None
    b_hat = tab.b - tab.b_err
    worst = max_residual_up_to(b_hat, tab.a, embedded_order)
    fifth = np.max(np.abs(residuals(b_hat, tab.a, embedded_order + 1)))
    print(f"{name}: b_hat residual up to order 4: {worst:.1e}; order 5: {fifth:.1e}")
    assert worst < TOL
    assert fifth > 1e-6
    # The error weights are not zero and the estimate is of the right order.
    assert np.max(np.abs(tab.b_err)) > 1e-3


@pytest.mark.parametrize("name", ["Euler", "Heun", "RK4"])
def test_no_embedded_method(name):
    assert METHODS[name][0].b_err is None


@pytest.mark.parametrize("name", list(METHODS))
def test_continuous_extension(name):
    """b(theta) satisfies the order conditions with theta^|t|/gamma(t) up to the
    interpolant's order (4 for Dopri5/Tsit5, 3 for RK4, 2 for Heun, 1 for
    Euler) at every theta, and not all of the next order."""
    tab, _, _, _, interp_order = METHODS[name]
    next_order = []
    for theta in THETAS:
        weights = tab.interp_weights(theta)
        worst = max_residual_up_to(weights, tab.a, interp_order, theta)
        assert worst < TOL, f"{name}: theta={theta} residual {worst:.2e}"
        # In particular the quadrature conditions sum_i b_i(theta) c_i^(k-1) = theta^k / k.
        for k in range(1, interp_order + 1):
            assert weights @ tab.c ** (k - 1) == pytest.approx(theta**k / k, abs=TOL)
        next_order.append(np.max(np.abs(residuals(weights, tab.a, interp_order + 1, theta))))
    print(f"{name}: interpolant order {interp_order}; next-order residuals {np.array(next_order)}")
    assert max(next_order) > 1e-6
