"""Itô SDE solvers: Euler--Maruyama and Rößler's stochastic Runge--Kutta
methods of strong order 1.5 (SRI for diagonal/scalar noise, SRA for additive
noise), adaptive with the embedded error estimate of Rackauckas & Nie.

Every step asks ``problem.brownian_step`` for the increment ``dW`` and
the space-time Lévy area ``H`` of the step; the iterated integrals the methods
need follow from them (Kloeden & Platen 1992, 5.8; Foster 2020):

    I_(1)     = dW
    I_(1,1)   = (dW^2 - h) / 2
    I_(1,0)   = h (dW/2 + H)          (= ∫∫ dW ds)
    I_(1,1,1) = (dW^3 - 3 h dW) / 6

(per noise channel; for diagonal noise the channels are the components of
``y``). The path is a virtual Brownian tree, so a rejected step is retried on
the same path (no rejection-sampling bookkeeping is needed).
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .base import AbstractSolver

#: Weight of the drift part of the error estimate ``E = delta |E_D| + |E_N|``
#: (Rackauckas & Nie 2017).
ERROR_DELTA = 1.0


class SRITableau(NamedTuple):
    """Rößler's SRI scheme (Rößler 2010, SIAM J. Numer. Anal. 48(3):922-952,
    eq. (6.1) for one noise channel): stages

        H0_i = y + h sum_j A0_ij f_j + sum_j B0_ij g_j I_(1,0)/h
        H1_i = y + h sum_j A1_ij f_j + sum_j B1_ij g_j sqrt(h)

    with ``f_j = f(t + c0_j h, H0_j)``, ``g_j = g(t + c1_j h, H1_j)``, and

        y1 = y + h sum alpha_i f_i
               + sum g_i (beta1_i I_(1) + beta2_i I_(1,1)/sqrt(h)
                          + beta3_i I_(1,0)/h + beta4_i I_(1,1,1)/h).

    The drift part of the error estimate is ``E_D = h sum_i (alpha_i -
    [i == 1]) f_i``: the drift gap to the natural embedding, the order-1.0
    scheme that takes an Euler drift (Rackauckas & Nie 2017)."""

    c0: np.ndarray
    c1: np.ndarray
    A0: np.ndarray
    A1: np.ndarray
    B0: np.ndarray
    B1: np.ndarray
    alpha: np.ndarray
    beta1: np.ndarray
    beta2: np.ndarray
    beta3: np.ndarray
    beta4: np.ndarray


class SRATableau(NamedTuple):
    """Rößler's SRA scheme for additive noise (Rößler 2010, eq. (6.4) with
    one noise channel): ``H0_i = y + h sum_j A0_ij f_j + sum_j B0_ij g_j
    I_(1,0)/h`` with ``g_j = g(t + c1_j h)``, and ``y1 = y + h sum alpha_i
    f_i + sum g_i (beta1_i I_(1) + beta2_i I_(1,0)/h)``."""

    c0: np.ndarray
    c1: np.ndarray
    A0: np.ndarray
    B0: np.ndarray
    alpha: np.ndarray
    beta1: np.ndarray
    beta2: np.ndarray


def _a(rows):
    return np.array(rows, dtype=float)


#: SRI1 with the weights "W1" of Rößler (2010), Table 5.2 (the coefficients
#: StochasticDiffEq.jl's SRIW1 uses).
SRIW1_TABLEAU = SRITableau(
    c0=_a([0, 3 / 4, 0, 0]),
    c1=_a([0, 1 / 4, 1, 1 / 4]),
    A0=_a([[0, 0, 0, 0], [3 / 4, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),
    A1=_a([[0, 0, 0, 0], [1 / 4, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1 / 4, 0]]),
    B0=_a([[0, 0, 0, 0], [3 / 2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),
    B1=_a([[0, 0, 0, 0], [1 / 2, 0, 0, 0], [-1, 0, 0, 0], [-5, 3, 1 / 2, 0]]),
    alpha=_a([1 / 3, 2 / 3, 0, 0]),
    beta1=_a([-1, 4 / 3, 2 / 3, 0]),
    beta2=_a([-1, 4 / 3, -1 / 3, 0]),
    beta3=_a([2, -4 / 3, -2 / 3, 0]),
    beta4=_a([-2, 5 / 3, -2 / 3, 1]),
)

def _sri_from_rows(A0, A1, B0, B1, alpha, beta1, beta2, beta3, beta4):
    A0, A1 = _a(A0), _a(A1)
    e = np.ones(len(alpha))
    return SRITableau(c0=A0 @ e, c1=A1 @ e, A0=A0, A1=A1, B0=_a(B0), B1=_a(B1), alpha=_a(alpha), beta1=_a(beta1),
                      beta2=_a(beta2), beta3=_a(beta3), beta4=_a(beta4))


#: SOSRI: the stability-optimised SRI of Rackauckas & Nie (2018),
#: "Stability-optimized high order methods and stiffness detection for
#: pathwise stiff stochastic differential equations", arXiv:1804.04344
#: (coefficients as published with StochasticDiffEq.jl's SOSRI / SRIOpt1;
#: c0 = A0 e, c1 = A1 e).
SOSRI_TABLEAU = _sri_from_rows(
    A0=[[0, 0, 0, 0], [-0.04199224421316468, 0, 0, 0], [2.842612915017106, -2.0527723684000727, 0, 0],
        [4.338237071435815, -2.8895936137439793, 2.3017575594644466, 0]],
    A1=[[0, 0, 0, 0], [0.26204282091330466, 0, 0, 0], [0.20903646383505375, -0.1502377115150361, 0, 0],
        [0.05836595312746999, 0.6149440396332373, 0.08535117634046772, 0]],
    B0=[[0, 0, 0, 0], [-0.21641093549612528, 0, 0, 0], [1.5336352863679572, 0.26066223492647056, 0, 0],
        [-1.0536037558179159, 1.7015284721089472, -0.20725685784180017, 0]],
    B1=[[0, 0, 0, 0], [-0.5119011827621657, 0, 0, 0], [2.67767339866713, -4.9395031322250995, 0, 0],
        [0.15580956238299215, 3.2361551006624674, -1.4223118283355949, 0]],
    alpha=[1.140099274172029, -0.6401334255743456, 0.4736296532772559, 0.026404498125060714],
    beta1=[-1.8453464565104432, 2.688764531100726, -0.2523866501071323, 0.40896857551684956],
    beta2=[0.4969658141589478, -0.5771202869753592, -0.12919702470322217, 0.2093514975196336],
    beta3=[2.8453464565104425, -2.688764531100725, 0.2523866501071322, -0.40896857551684945],
    beta4=[0.11522663875443433, -0.57877086147738, 0.2857851028163886, 0.17775911990655704],
)

#: SRA1 of Rößler (2010), Table 6.2 (as in StochasticDiffEq.jl's SRA1).
SRA1_TABLEAU = SRATableau(
    c0=_a([0, 3 / 4]),
    c1=_a([1, 0]),
    A0=_a([[0, 0], [3 / 4, 0]]),
    B0=_a([[0, 0], [3 / 2, 0]]),
    alpha=_a([1 / 3, 2 / 3]),
    beta1=_a([1, 0]),
    beta2=_a([-1, 1]),
)


def sri_order_conditions(tab: SRITableau) -> np.ndarray:
    """Residuals of Rößler's (2010) Theorem 6.2 conditions for strong order 1.5
    of an SRI method with one noise channel (all zero for a valid tableau)."""
    e = np.ones_like(tab.alpha)
    a, b1, b2, b3, b4 = tab.alpha, tab.beta1, tab.beta2, tab.beta3, tab.beta4
    A0, A1, B0, B1 = tab.A0, tab.A1, tab.B0, tab.B1
    B1e, B0e = B1 @ e, B0 @ e
    return np.array([
        a @ e - 1, b1 @ e - 1, b2 @ e, b3 @ e, b4 @ e,
        b1 @ B1e, b2 @ B1e - 1, b3 @ B1e, b4 @ B1e,
        a @ A0 @ e - 0.5, a @ B0e - 1, a @ B0e**2 - 1.5,
        b1 @ A1 @ e - 1, b2 @ A1 @ e, b3 @ A1 @ e + 1, b4 @ A1 @ e,
        b1 @ B1e**2 - 1, b2 @ B1e**2, b3 @ B1e**2 + 1, b4 @ B1e**2 - 2,
        b1 @ B1 @ B1e, b2 @ B1 @ B1e, b3 @ B1 @ B1e, b4 @ B1 @ B1e - 1,
        0.5 * b1 @ A1 @ B0e + b3 @ A1 @ B0e / 3,
    ])


def sra_order_conditions(tab: SRATableau) -> np.ndarray:
    """Residuals of Rößler's (2010) conditions for strong order 1.5 of an SRA
    method (additive noise)."""
    e = np.ones_like(tab.alpha)
    B0e = tab.B0 @ e
    return np.array([
        tab.alpha @ e - 1, tab.beta1 @ e - 1, tab.beta2 @ e,
        tab.alpha @ B0e - 1, tab.alpha @ tab.A0 @ e - 0.5, tab.alpha @ B0e**2 - 1.5,
        tab.beta1 @ tab.c1 - 1, tab.beta2 @ tab.c1 + 1,
    ])


# ------------------------------------------------------------------- helpers


def _lin(y0, pairs):
    """``y0 + sum_k w_k * x_k`` leaf by leaf over pytrees ``x_k``, skipping
    zero Python-float weights (``y0`` may be ``None``: no base)."""
    pairs = [(float(w), x) for w, x in pairs if float(w) != 0.0]
    if not pairs:
        return y0

    def leaf(*leaves):
        base = leaves[0] if y0 is not None else None
        xs = leaves[1:] if y0 is not None else leaves
        acc = base
        for (w, _), x in zip(pairs, xs):
            acc = w * x if acc is None else acc + w * x
        return acc

    trees = ([y0] if y0 is not None else []) + [x for _, x in pairs]
    return jtu.tree_map(leaf, *trees)


def _add(*trees):
    trees = [t for t in trees if t is not None]
    return jtu.tree_map(lambda *x: sum(x[1:], x[0]), *trees)


def _scale_tree(tree, c):
    return jtu.tree_map(lambda x: x * jnp.asarray(c).astype(x.dtype), tree)


def _linear_coeffs(y0, y1):
    return jtu.tree_map(lambda a, b: (b - a)[None], y0, y1)


def _error(e_drift, e_noise):
    return jtu.tree_map(lambda d, n: ERROR_DELTA * jnp.abs(d) + jnp.abs(n), e_drift, e_noise)


def _drift_gap(alpha, fs, dt):
    """``h sum_i (alpha_i - [i == 1]) f_i``: the drift part of the difference
    between the method and its natural order-1.0 embedding (Euler drift)."""
    weights = [float(a) - (1.0 if i == 0 else 0.0) for i, a in enumerate(alpha)]
    return _scale_tree(_lin(None, [(w, f) for w, f in zip(weights, fs) if f is not None]), dt)


def _iterated(dw, h_area, dt):
    """``I_(1,1)/sqrt(h), I_(1,0)/h, I_(1,1,1)/h`` per channel."""
    def leaf(w, a):
        h = dt.astype(w.dtype)
        sq = jnp.sqrt(h)
        return (w * w - h) / (2 * sq), w / 2 + a, (w * w * w - 3 * h * w) / (6 * h)

    out = jtu.tree_map(leaf, dw, h_area)
    pick = lambda i: jtu.tree_map(lambda _, o: o[i], dw, out)
    return pick(0), pick(1), pick(2)


def _lin_noise(pairs):
    """``sum_k w_k * x_k`` over noise-layout pytrees (Python or traced scalars w)."""
    acc = None
    for w, x in pairs:
        if isinstance(w, (int, float)) and w == 0:
            continue
        term = jtu.tree_map(lambda v, w=w: w * v, x)
        acc = term if acc is None else _add(acc, term)
    return acc


class _SDESolver(AbstractSolver):
    term_kinds: ClassVar[tuple] = ("SDETerm",)
    #: The `SDETerm` noise types the method converges for.
    noise_types: ClassVar[tuple] = ()
    interp_degree: ClassVar[int] = 1
    #: Steps end exactly on the save times: a path between two steps is not
    #: known to the solver, and interpolating it would add an error of order
    #: sqrt(step) at every save time.
    step_to_save_times: ClassVar[bool] = True

    def init(self, problem, t0, y0):
        # The state is the Brownian tree's cache of the current time: a
        # rejected step keeps it, an accepted one moves it to the step's end.
        return problem.brownian_start(t0, y0)


class EulerMaruyama(_SDESolver):
    """Euler--Maruyama, ``y1 = y + f(t, y) h + g(t, y) dW``: strong order 0.5
    (1.0 for additive noise), weak order 1; fixed step ``dt0``; any noise type.
    Reference: Maruyama (1955), Rend. Circ. Mat. Palermo 4:48-90; Kloeden &
    Platen (1992), Numerical Solution of SDEs, 10.2."""

    order: ClassVar[float] = 0.5
    noise_types: ClassVar[tuple] = ("diagonal", "scalar", "additive", "general")

    def step(self, problem, t0, dt, y0, state):
        dw, _, cache = problem.brownian_step(state, t0 + dt, y0)
        f = problem.vf(t0, y0)
        g = problem.diffusion(t0, y0)
        y1 = _add(_lin(y0, [(1.0, _scale_tree(f, dt))]), problem.term.noise_product(g, dw, y0))
        return y1, None, _linear_coeffs(y0, y1), cache, 2


class SRIW1(_SDESolver):
    """Rößler's SRI1 method with weights W1: strong order 1.5 for Itô SDEs
    with scalar noise, or diagonal noise where each component's diffusion
    depends on that component only (``g_i(t, y_i)``; with cross-dependence the
    method stays convergent, at strong order 0.5), weak order 2; adaptive, with
    the embedded error estimate of Rackauckas & Nie, ``E = |E_D| + |E_N|``:
    the gap to the method's natural order-1.0 embedding, ``E_N`` its order-1.5
    noise terms (``beta3``, ``beta4``) and ``E_D = (2h/3)(f_2 - f_1)`` its
    drift gap to an Euler drift. (StochasticDiffEq.jl's code takes
    ``E_D = h (f_1 + f_2)`` weighted by 1/6, which is O(h) and does not vanish
    for deterministic dynamics; the signed gap does, as the paper's embedding
    does.) Two drift and four diffusion evaluations per step.

    References: Rößler (2010), "Runge-Kutta methods for the strong
    approximation of solutions of stochastic differential equations", SIAM J.
    Numer. Anal. 48(3):922-952; Rackauckas & Nie (2017), "Adaptive methods for
    stochastic differential equations via natural embeddings and rejection
    sampling with memory", Discrete Contin. Dyn. Syst. B 22(7):2731-2761.
    The controller exponent is that of StochasticDiffEq.jl (PI with
    beta1 = 0.7/1.5, beta2 = 0.4/1.5)."""

    order: ClassVar[float] = 1.5
    error_order: ClassVar[float] = 1.5
    adaptive: ClassVar[bool] = True
    noise_types: ClassVar[tuple] = ("diagonal", "scalar", "additive")
    stat_names: ClassVar[tuple] = ()
    sri_tableau: ClassVar[SRITableau] = SRIW1_TABLEAU

    def step(self, problem, t0, dt, y0, state):
        tab = self.sri_tableau
        term = problem.term
        s = len(tab.alpha)
        dw, area, cache = problem.brownian_step(state, t0 + dt, y0)
        chi1, chi2, chi3 = _iterated(dw, area, dt)
        sq = jnp.sqrt(dt)
        need_f, need_g = _needed(tab)
        fs, gs = [None] * s, [None] * s
        nfev = 0
        for i in range(s):
            # Stage for the drift.
            if need_f[i]:
                if i > 0 and not tab.A0[i].any() and not tab.B0[i].any() and tab.c0[i] == tab.c0[0] and need_f[0]:
                    fs[i] = fs[0]  # H0_i = y at the same time: stage 1's evaluation
                else:
                    h0 = _lin(y0, [(tab.A0[i, j], _scale_tree(fs[j], dt)) for j in range(i)])
                    b0 = [(tab.B0[i, j], term.noise_product(gs[j], chi2, y0)) for j in range(i) if tab.B0[i, j] != 0]
                    if b0:
                        h0 = _add(h0, _lin(None, b0))
                    fs[i] = problem.vf(t0 + float(tab.c0[i]) * dt, h0)
                    nfev += 1
            if need_g[i]:
                h1 = _lin(y0, [(tab.A1[i, j], _scale_tree(fs[j], dt)) for j in range(i)])
                h1 = _lin(h1, [(tab.B1[i, j], _scale_tree(gs[j], sq)) for j in range(i)])
                gs[i] = problem.diffusion(t0 + float(tab.c1[i]) * dt, h1)
                nfev += 1
        drift = _lin(None, [(tab.alpha[i], fs[i]) for i in range(s)])
        noise1 = [term.noise_product(gs[i], _lin_noise([(float(tab.beta1[i]), dw), (float(tab.beta2[i]), chi1)]), y0)
                  for i in range(s) if tab.beta1[i] != 0 or tab.beta2[i] != 0]
        noise2 = [term.noise_product(gs[i], _lin_noise([(float(tab.beta3[i]), chi2), (float(tab.beta4[i]), chi3)]), y0)
                  for i in range(s) if tab.beta3[i] != 0 or tab.beta4[i] != 0]
        e_noise = _add(*noise2)
        y1 = _add(_lin(y0, [(1.0, _scale_tree(drift, dt))]), *noise1, e_noise)
        e_drift = _drift_gap(tab.alpha, fs, dt)
        return y1, _error(e_drift, e_noise), _linear_coeffs(y0, y1), cache, nfev


def _needed(tab: SRITableau):
    s = len(tab.alpha)
    need_f = [bool(tab.alpha[i] != 0 or tab.A0[:, i].any() or tab.A1[:, i].any() or i == 0)
              for i in range(s)]
    need_g = [bool(tab.beta1[i] != 0 or tab.beta2[i] != 0 or tab.beta3[i] != 0 or tab.beta4[i] != 0
                   or tab.B0[:, i].any() or tab.B1[:, i].any()) for i in range(s)]
    return need_f, need_g


class SRA1(_SDESolver):
    """Rößler's SRA1: strong order 1.5 for Itô SDEs with additive noise
    (``diffusion`` independent of ``y``), weak order 2; adaptive, with the
    natural-embedding error estimate of Rackauckas & Nie, ``E = |E_D| +
    |E_N|`` with ``E_D = (2h/3)(f_2 - f_1)`` and ``E_N = (g(t) - g(t + h))
    I_(1,0)/h`` (see `SRIW1`). Two drift and two
    diffusion evaluations per step.

    References: Rößler (2010), SIAM J. Numer. Anal. 48(3):922-952, SRA1;
    Rackauckas & Nie (2017), Discrete Contin. Dyn. Syst. B 22(7):2731-2761.
    Controller exponent as StochasticDiffEq.jl (it takes order 2 for SRA
    methods: beta1 = 0.7/2, beta2 = 0.4/2)."""

    order: ClassVar[float] = 1.5
    error_order: ClassVar[float] = 2.0
    adaptive: ClassVar[bool] = True
    noise_types: ClassVar[tuple] = ("additive",)
    sra_tableau: ClassVar[SRATableau] = SRA1_TABLEAU

    def step(self, problem, t0, dt, y0, state):
        tab = self.sra_tableau
        term = problem.term
        s = len(tab.alpha)
        dw, area, cache = problem.brownian_step(state, t0 + dt, y0)
        _, chi2, _ = _iterated(dw, area, dt)
        # Additive noise: g does not depend on y, so it is evaluated at y0.
        gs = [problem.diffusion(t0 + float(tab.c1[i]) * dt, y0) for i in range(s)]
        fs = []
        for i in range(s):
            h0 = _lin(y0, [(tab.A0[i, j], _scale_tree(fs[j], dt)) for j in range(i)])
            b0 = [(tab.B0[i, j], term.noise_product(gs[j], chi2, y0)) for j in range(i) if tab.B0[i, j] != 0]
            if b0:
                h0 = _add(h0, _lin(None, b0))
            fs.append(problem.vf(t0 + float(tab.c0[i]) * dt, h0))
        drift = _lin(None, [(tab.alpha[i], fs[i]) for i in range(s)])
        noise1 = [term.noise_product(gs[i], _lin_noise([(float(tab.beta1[i]), dw)]), y0)
                  for i in range(s) if tab.beta1[i] != 0]
        noise2 = [term.noise_product(gs[i], _lin_noise([(float(tab.beta2[i]), chi2)]), y0)
                  for i in range(s) if tab.beta2[i] != 0]
        e_noise = _add(*noise2)
        y1 = _add(_lin(y0, [(1.0, _scale_tree(drift, dt))]), *noise1, e_noise)
        e_drift = _drift_gap(tab.alpha, fs, dt)
        return y1, _error(e_drift, e_noise), _linear_coeffs(y0, y1), cache, 2 * s


class SOSRI(SRIW1):
    """SOSRI: Rackauckas & Nie's stability-optimised SRI method (four drift
    and four diffusion evaluations per step), strong order 1.5 for the same
    noise as `SRIW1`, with a much larger stability region for pathwise stiff
    problems; adaptive with the same natural-embedding error estimate.
    Reference: Rackauckas & Nie (2018), "Stability-optimized high order
    methods and stiffness detection for pathwise stiff stochastic differential
    equations", arXiv:1804.04344 (IEEE HPEC 2020)."""

    sri_tableau: ClassVar[SRITableau] = SOSRI_TABLEAU
