"""Runge--Kutta methods as validated numerical data.

A tableau holds the Butcher coefficients of an explicit method, the weights of
its embedded error estimate and the polynomial weights of its continuous
extension (dense output).  Every tableau is checked when it is built: the rows
of ``a`` sum to ``c``, ``b`` sums to one, the error weights sum to zero and the
interpolant reproduces ``b`` at theta = 1.  The higher order conditions are
checked by the test-suite (``tests/test_tableaus.py``).
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction as F

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ButcherTableau:
    """Explicit Runge--Kutta method.

    Attributes:
        c: stage times, shape ``(s,)``.
        a: stage coefficients, shape ``(s, s)``, strictly lower triangular.
        b: solution weights, shape ``(s,)``.
        b_err: ``b - b_hat`` for the embedded lower-order solution, or ``None``.
        interp: ``(s, p)`` array; the weight of stage ``i`` at ``theta`` is
            ``sum_j interp[i, j] * theta**(j + 1)`` (so ``y(t0 + theta h) =
            y0 + h sum_i b_i(theta) k_i``).
        fsal: the last stage is evaluated at the step's solution, so it is the
            first stage of the next step.
    """

    c: np.ndarray
    a: np.ndarray
    b: np.ndarray
    b_err: np.ndarray | None
    interp: np.ndarray
    fsal: bool = False

    def __post_init__(self):
        for name in ("c", "a", "b", "b_err", "interp"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.asarray(value, dtype=np.float64))
        s = self.b.shape[0]
        if self.c.shape != (s,) or self.a.shape != (s, s):
            raise ValueError(f"inconsistent tableau shapes: c {self.c.shape}, a {self.a.shape}, b {self.b.shape}")
        if np.any(np.triu(self.a) != 0):
            raise ValueError("an explicit tableau must have a strictly lower-triangular `a`")
        if not np.allclose(self.a.sum(axis=1), self.c, rtol=0, atol=1e-14):
            raise ValueError("the rows of `a` must sum to `c`")
        if abs(self.b.sum() - 1.0) > 1e-14:
            raise ValueError("`b` must sum to 1")
        if self.b_err is not None and abs(self.b_err.sum()) > 1e-14:
            raise ValueError("the error weights `b_err` must sum to 0")
        if self.interp.shape[0] != s:
            raise ValueError("`interp` needs one row per stage")
        if not np.allclose(self.interp.sum(axis=1), self.b, rtol=0, atol=1e-13):
            raise ValueError("the interpolant must equal `b` at theta = 1")
        if self.fsal and not (np.allclose(self.a[-1], self.b, rtol=0, atol=0) and self.c[-1] == 1):
            raise ValueError("an FSAL tableau's last row of `a` must be `b`, with c = 1")

    @property
    def num_stages(self) -> int:
        return self.b.shape[0]

    def interp_weights(self, theta: float) -> np.ndarray:
        """``b_i(theta)`` for every stage (numpy; used by the tests)."""
        powers = theta ** np.arange(1, self.interp.shape[1] + 1)
        return self.interp @ powers


def _frac(rows):
    return np.array([[float(x) for x in row] for row in rows])


# Forward Euler, with the linear interpolant.
EULER = ButcherTableau(c=[0.0], a=[[0.0]], b=[1.0], b_err=None, interp=[[1.0]])

# Heun's second-order method (explicit trapezoid); its continuous extension
# b1 = theta - theta^2/2, b2 = theta^2/2 is of order 2.
HEUN = ButcherTableau(
    c=[0.0, 1.0],
    a=[[0.0, 0.0], [1.0, 0.0]],
    b=[0.5, 0.5],
    b_err=None,
    interp=[[1.0, -0.5], [0.0, 0.5]],
)

# The classical fourth-order method with its free third-order continuous
# extension (Hairer, Norsett & Wanner, Solving ODEs I, 2nd ed., II.6).
RK4 = ButcherTableau(
    c=[0.0, 0.5, 0.5, 1.0],
    a=[[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1.0, 0]],
    b=[1 / 6, 1 / 3, 1 / 3, 1 / 6],
    b_err=None,
    interp=[[1.0, -1.5, 2 / 3], [0.0, 1.0, -2 / 3], [0.0, 1.0, -2 / 3], [0.0, -0.5, 2 / 3]],
)


def _dopri5() -> ButcherTableau:
    # Dormand & Prince (1980), J. Comput. Appl. Math. 6(1):19-26; dense output of
    # Shampine (1986), Math. Comp. 46(173):135-150, in the form of Hairer, Norsett &
    # Wanner, Solving ODEs I (2nd ed.), II.6: y(theta) - y0 = theta R2 +
    # theta(1-theta) R3 + theta^2(1-theta) R4 + theta^2(1-theta)^2 R5.
    a = _frac([
        [0, 0, 0, 0, 0, 0, 0],
        [F(1, 5), 0, 0, 0, 0, 0, 0],
        [F(3, 40), F(9, 40), 0, 0, 0, 0, 0],
        [F(44, 45), F(-56, 15), F(32, 9), 0, 0, 0, 0],
        [F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729), 0, 0, 0],
        [F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656), 0, 0],
        [F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), 0],
    ])
    c = np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1])
    b = a[-1].copy()
    b_hat = np.array([float(x) for x in (F(5179, 57600), 0, F(7571, 16695), F(393, 640),
                                         F(-92097, 339200), F(187, 2100), F(1, 40))])
    d = np.array([float(x) for x in (F(-12715105075, 11282082432), 0, F(87487479700, 32700410799),
                                     F(-10690763975, 1880347072), F(701980252875, 199316789632),
                                     F(-1453857185, 822651844), F(69997945, 29380423))])
    e1 = np.eye(7)[0]
    e7 = np.eye(7)[6]
    r2, r3, r4, r5 = b, e1 - b, 2 * b - e1 - e7, d
    interp = np.stack([r2 + r3, -r3 + r4 + r5, -r4 - 2 * r5, r5], axis=1)
    return ButcherTableau(c=c, a=a, b=b, b_err=b - b_hat, interp=interp, fsal=True)


def _tsit5() -> ButcherTableau:
    # Tsitouras (2011), "Runge--Kutta pairs of order 5(4) satisfying only the first
    # column simplifying assumption", Comput. Math. Appl. 62(2):770-775, with the
    # decimals of its published free fourth-order interpolant.  The paper's last
    # error weight has a sign misprint; 1/66 is the value the order conditions
    # (checked in the tests) require.
    a = np.zeros((7, 7))
    a[1, :1] = [0.161]
    a[2, :2] = [-0.008480655492356989, 0.335480655492357]
    a[3, :3] = [2.897153057105493, -6.359448489975075, 4.3622954328695815]
    a[4, :4] = [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525]
    a[5, :5] = [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
                -0.028269050394068383]
    a[6, :6] = [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742,
                -3.290069515436081, 2.324710524099774]
    c = np.array([0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0])
    # Rounding of the published decimals leaves rows that sum to c only to ~1e-16.
    b = a[6].copy()
    b_err = np.array([-0.0017800110522257771, -0.0008164344596567469, 0.007880878010261995,
                      -0.1447110071732629, 0.5823571654525552, -0.458082105929187, 1 / 66])
    interp = np.array([
        [1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216],
        [0.0, 0.13169999999999998, -0.2234, 0.1017],
        [0.0, 3.9302962368947516, -5.941033872131505, 2.490627285651253],
        [0.0, -12.411077166933676, 30.33818863028232, -16.548102889244902],
        [0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928],
        [0.0, -27.896526289197286, 65.09189467479366, -34.87065786149661],
        [0.0, 1.5, -4.0, 2.5],
    ])
    return ButcherTableau(c=c, a=a, b=b, b_err=b_err, interp=interp, fsal=True)


DOPRI5 = _dopri5()
TSIT5 = _tsit5()
