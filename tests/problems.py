"""Reference initial-value problems for the accuracy tests.

Each `Problem` holds a vector field ``f(t, y, args)`` written in
``jax.numpy``, the initial state, the interval, the ``args`` and a way to get a
reference solution at any times: the exact solution where one is known,
otherwise `scipy_reference` (scipy's DOP853 at ``rtol = atol = 1e-13`` on a
numpy copy of the same vector field).

The vector fields are written once against an array namespace ``xp`` (jax.numpy
or numpy), so the reference solution integrates exactly the same formula as the
solve under test, without jax's per-call dispatch cost.

Besides Lotka--Volterra, the problems are from the non-stiff DETEST set:

    T. E. Hull, W. H. Enright, B. M. Fellen and A. E. Sedgwick (1972),
    "Comparing numerical methods for ordinary differential equations",
    SIAM J. Numer. Anal. 9(4):603--637, doi:10.1137/0709052.

with the initial values and the interval ``[0, 20]`` of the paper:

* A1  y' = -y,                         y(0) = 1;   y = exp(-t)
* A2  y' = -y^3/2,                     y(0) = 1;   y = 1/sqrt(t + 1)
* A3  y' = y cos t,                    y(0) = 1;   y = exp(sin t)
* A4  y' = y/4 (1 - y/20),             y(0) = 1;   y = 20/(1 + 19 exp(-t/4))
* A5  y' = (y - t)/(y + t),            y(0) = 4    (a logarithmic spiral)
* B1  growth of two conflicting populations, y(0) = (1, 3)
* B2  linear chemical reaction,        y(0) = (2, 0, 1); exact by expm
* B3  non-linear chemical reaction,    y(0) = (1, 0, 0)
* B4  y(0) = (3, 0, 0)
* B5  Euler's equations of a rigid body, y(0) = (0, 1, 1); exact (sn, cn, dn | m = 0.51)
* C1  radioactive decay chain of 10,  y(0) = (1, 0, ..., 0); exact
* D1-D5 two-body orbits of eccentricity 0.1, 0.3, 0.5, 0.7, 0.9,
      y(0) = (1 - e, 0, 0, sqrt((1 + e)/(1 - e))); exact via Kepler's equation
* E1  Bessel's equation of order 1/2 (shifted), y = sqrt(2/(pi(t+1))) sin(t+1); exact
* E2  Van der Pol's equation with mu = 1, y(0) = (2, 0)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np
import scipy.integrate
import scipy.linalg
import scipy.special


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """An initial-value problem ``y' = f(t, y, args)``, ``y(t0) = y0``.

    Attributes:
        name: short name (DETEST label where it has one).
        field: ``field(xp, t, y, args)`` with ``xp`` the array namespace.
        y0: initial state (numpy float64, 1-D).
        t0, t1: the interval of the paper.
        args: passed to the vector field (numpy; convert for float32 runs).
        exact: ``exact(ts) -> array (len(ts), n)``, or None (use scipy).
    """

    name: str
    field: Callable[..., Any]
    y0: np.ndarray
    t0: float
    t1: float
    args: Any = None
    exact: Optional[Callable[[np.ndarray], np.ndarray]] = None

    def f(self, t, y, args):
        """The vector field in jax.numpy, ``f(t, y, args)`` (for `nde.ODETerm`)."""
        return self.field(jnp, t, y, args)

    def f_numpy(self, t, y, args):
        """The same vector field in numpy (for scipy)."""
        return np.asarray(self.field(np, t, y, args), dtype=np.float64)

    def reference(self, ts) -> np.ndarray:
        """The solution at ``ts`` (shape ``(len(ts), n)``): exact where known,
        else `scipy_reference`."""
        ts = np.asarray(ts, dtype=np.float64)
        if self.exact is not None:
            return np.asarray(self.exact(ts), dtype=np.float64)
        return scipy_reference(self, ts)


_REFERENCE_CACHE: dict = {}


def scipy_reference(problem: Problem, ts, y0=None, t0=None) -> np.ndarray:
    """Solve ``problem`` with scipy's DOP853 at ``rtol = atol = 1e-13`` from
    ``(t0, y0)`` (default: the problem's own) to ``ts[-1]`` and return the states
    at ``ts`` (shape ``(len(ts), n)``; ``ts`` must be monotonic, in the direction
    of integration). Results are cached."""
    ts = np.asarray(ts, dtype=np.float64)
    t0 = float(problem.t0) if t0 is None else float(t0)
    y0 = np.asarray(problem.y0 if y0 is None else y0, dtype=np.float64)
    key = (problem.name, ts.tobytes(), t0, y0.tobytes())
    if key not in _REFERENCE_CACHE:
        out = scipy.integrate.solve_ivp(
            lambda t, y: problem.f_numpy(t, y, problem.args),
            (t0, float(ts[-1])),
            y0,
            method="DOP853",
            rtol=1e-13,
            atol=1e-13,
            t_eval=ts,
        )
        if not out.success:
            raise RuntimeError(f"scipy reference for {problem.name} failed: {out.message}")
        _REFERENCE_CACHE[key] = out.y.T.copy()
    return _REFERENCE_CACHE[key]


# ----------------------------------------------------------------- problems


def _lotka_volterra(xp, t, u, p):
    x, y = u[0], u[1]
    a, b, d, g = p[0], p[1], p[2], p[3]
    return xp.stack([a * x - b * x * y, -d * y + g * x * y])


LOTKA_VOLTERRA = Problem(
    name="LV",
    field=_lotka_volterra,
    y0=np.array([1.0, 1.0]),
    t0=0.0,
    t1=10.0,
    args=np.array([1.5, 1.0, 3.0, 1.0]),
)


def _a1(xp, t, y, args):
    return -y


def _a2(xp, t, y, args):
    return -0.5 * y**3


def _a3(xp, t, y, args):
    return y * xp.cos(t)


def _a4(xp, t, y, args):
    return 0.25 * y * (1.0 - y / 20.0)


def _a5(xp, t, y, args):
    return (y - t) / (y + t)


A1 = Problem("A1", _a1, np.array([1.0]), 0.0, 20.0, exact=lambda ts: np.exp(-ts)[:, None])
A2 = Problem("A2", _a2, np.array([1.0]), 0.0, 20.0, exact=lambda ts: (1.0 / np.sqrt(ts + 1.0))[:, None])
A3 = Problem("A3", _a3, np.array([1.0]), 0.0, 20.0, exact=lambda ts: np.exp(np.sin(ts))[:, None])
A4 = Problem(
    "A4", _a4, np.array([1.0]), 0.0, 20.0, exact=lambda ts: (20.0 / (1.0 + 19.0 * np.exp(-ts / 4.0)))[:, None]
)
A5 = Problem("A5", _a5, np.array([4.0]), 0.0, 20.0)


def _b1(xp, t, y, args):
    return xp.stack([2.0 * (y[0] - y[0] * y[1]), -(y[1] - y[0] * y[1])])


_B2_MATRIX = np.array([[-1.0, 1.0, 0.0], [1.0, -2.0, 1.0], [0.0, 1.0, -1.0]])


def _b2(xp, t, y, args):
    return xp.stack([-y[0] + y[1], y[0] - 2.0 * y[1] + y[2], y[1] - y[2]])


def _b2_exact(ts):
    y0 = np.array([2.0, 0.0, 1.0])
    return np.stack([scipy.linalg.expm(_B2_MATRIX * t) @ y0 for t in ts])


def _b3(xp, t, y, args):
    return xp.stack([-y[0], y[0] - y[1] ** 2, y[1] ** 2])


def _b4(xp, t, y, args):
    r = xp.sqrt(y[0] ** 2 + y[1] ** 2)
    return xp.stack([-y[1] - y[0] * y[2] / r, y[0] - y[1] * y[2] / r, y[0] / r])


def _b5(xp, t, y, args):
    return xp.stack([y[1] * y[2], -y[0] * y[2], -0.51 * y[0] * y[1]])


def _b5_exact(ts):
    sn, cn, dn, _ = scipy.special.ellipj(ts, 0.51)
    return np.stack([sn, cn, dn], axis=1)


B1 = Problem("B1", _b1, np.array([1.0, 3.0]), 0.0, 20.0)
B2 = Problem("B2", _b2, np.array([2.0, 0.0, 1.0]), 0.0, 20.0, exact=_b2_exact)
B3 = Problem("B3", _b3, np.array([1.0, 0.0, 0.0]), 0.0, 20.0)
B4 = Problem("B4", _b4, np.array([3.0, 0.0, 0.0]), 0.0, 20.0)
B5 = Problem("B5", _b5, np.array([0.0, 1.0, 1.0]), 0.0, 20.0, exact=_b5_exact)


def _c1(xp, t, y, args):
    return xp.concatenate([-y[:1], y[:8] - y[1:9], y[8:9]])


def _c1_exact(ts):
    ts = np.asarray(ts)
    first = np.stack([ts**k * np.exp(-ts) / math.factorial(k) for k in range(9)], axis=1)
    return np.concatenate([first, 1.0 - first.sum(axis=1, keepdims=True)], axis=1)


C1 = Problem("C1", _c1, np.eye(10)[0], 0.0, 20.0, exact=_c1_exact)


def _orbit(xp, t, y, args):
    r3 = (y[0] ** 2 + y[1] ** 2) ** 1.5
    return xp.stack([y[2], y[3], -y[0] / r3, -y[1] / r3])


def _kepler_exact(ecc):
    def exact(ts):
        ts = np.asarray(ts, dtype=np.float64)
        u = ts + ecc * np.sin(ts)
        for _ in range(100):  # Newton on u - e sin u = t
            u = u - (u - ecc * np.sin(u) - ts) / (1.0 - ecc * np.cos(u))
        assert np.max(np.abs(u - ecc * np.sin(u) - ts)) < 1e-13
        s = np.sqrt(1.0 - ecc**2)
        den = 1.0 - ecc * np.cos(u)
        return np.stack([np.cos(u) - ecc, s * np.sin(u), -np.sin(u) / den, s * np.cos(u) / den], axis=1)

    return exact


def orbit_problem(name: str, ecc: float) -> Problem:
    """DETEST class D: y1'' = -y1/r^3, y2'' = -y2/r^3 as a first-order system
    (positions, then velocities), eccentricity ``ecc``, on [0, 20]."""
    y0 = np.array([1.0 - ecc, 0.0, 0.0, math.sqrt((1.0 + ecc) / (1.0 - ecc))])
    return Problem(name, _orbit, y0, 0.0, 20.0, exact=_kepler_exact(ecc))


D1 = orbit_problem("D1", 0.1)
D2 = orbit_problem("D2", 0.3)
D3 = orbit_problem("D3", 0.5)
D4 = orbit_problem("D4", 0.7)
D5 = orbit_problem("D5", 0.9)


def _e1(xp, t, y, args):
    x = t + 1.0
    return xp.stack([y[1], -(y[1] / x + (1.0 - 0.25 / x**2) * y[0])])


def _e1_exact(ts):
    x = np.asarray(ts) + 1.0
    c = math.sqrt(2.0 / math.pi)
    y = c * np.sin(x) / np.sqrt(x)
    dy = c * (np.cos(x) / np.sqrt(x) - 0.5 * np.sin(x) / x**1.5)
    return np.stack([y, dy], axis=1)


def _e2(xp, t, y, args):
    return xp.stack([y[1], (1.0 - y[0] ** 2) * y[1] - y[0]])


E1 = Problem("E1", _e1, _e1_exact(np.array([0.0]))[0], 0.0, 20.0, exact=_e1_exact)
E2 = Problem("E2", _e2, np.array([2.0, 0.0]), 0.0, 20.0)

DETEST = {p.name: p for p in (A1, A2, A3, A4, A5, B1, B2, B3, B4, B5, C1, D1, D2, D3, D4, D5, E1, E2)}
