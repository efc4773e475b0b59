"""Error norms, the PI step-size controller and the initial step."""
from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu


def rms_norm(tree) -> jnp.ndarray:
    """Root-mean-square over every element of every leaf."""
    leaves = jtu.tree_leaves(tree)
    total = sum(jnp.sum(jnp.square(jnp.abs(x))) for x in leaves)
    size = sum(x.size for x in leaves)
    return jnp.sqrt(total / size)


def scaled_error(y_err, y0, y1, rtol, atol, norm=None) -> jnp.ndarray:
    """``norm`` (default RMS) of ``y_err / (atol + rtol max(|y0|, |y1|))``;
    <= 1 means acceptable."""

    def leaf(e, a, b):
        scale = atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))
        return e / scale.astype(e.dtype)

    return (norm or rms_norm)(jtu.tree_map(leaf, y_err, y0, y1))


def all_finite(tree) -> jnp.ndarray:
    leaves = jtu.tree_leaves(tree)
    out = jnp.array(True)
    for x in leaves:
        out = out & jnp.all(jnp.isfinite(x))
    return out


class PIController(eqx.Module):
    """Proportional--integral step-size control.

    After an accepted step with scaled error ``err`` (and ``err_prev`` for the
    previous accepted step) the next step is
    ``h * safety * err^(-beta1/k) * err_prev^(beta2/k)``, clipped to
    ``[factor_min, factor_max]``, where ``k`` is the order of the error
    estimate plus one. A rejected step is retried with the integral part only
    (``safety * err^(-1/k)``, at least ``factor_min``), and the step after a
    rejection may not grow (Hairer, Norsett & Wanner, Solving ODEs I, II.4;
    Gustafsson (1991), ACM TOMS 17(4):533-554). The defaults 0.7 and 0.4 are
    those OrdinaryDiffEq.jl uses for its 5(4) pairs; `solve` takes each
    solver's own ``pi_coefficients`` (explicit Runge--Kutta: 0.85 and 0.2,
    the exponents 0.17 and 0.04 of Hairer's DOPRI5 code).
    """

    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    beta1: float = 0.7
    beta2: float = 0.4

    def factor(self, err, err_prev, accept, rejected_last, finite, k: int):
        # One exponential for both cases (a step's controller is scalar work
        # on the critical path of every iteration).
        log_err = jnp.log(jnp.maximum(err, 1e-10))
        exponent = jnp.where(accept, (-self.beta1 / k) * log_err + (self.beta2 / k) * jnp.log(err_prev),
                             (-1.0 / k) * log_err)
        factor = self.safety * jnp.exp(exponent)
        # Accepted: within [factor_min, factor_max], no growth right after a
        # rejection; rejected: within [factor_min, 1].
        upper = jnp.where(accept & ~rejected_last, self.factor_max, 1.0)
        factor = jnp.clip(factor, self.factor_min, upper)
        return jnp.where(finite, factor, self.factor_min)


def initial_step(vf, t0, y0, f0, error_order: int, rtol, atol, span):
    """Hairer, Norsett & Wanner, Solving ODEs I (2nd ed.), II.4, 'Starting step
    size'. Uses one extra evaluation of the vector field."""

    def scaled(tree):
        return rms_norm(jtu.tree_map(lambda x, y: x / (atol + rtol * jnp.abs(y)).astype(x.dtype), tree, y0))

    d0 = scaled(y0).astype(span.dtype)
    d1 = scaled(f0).astype(span.dtype)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    h0 = jnp.minimum(h0, span)
    y1 = jtu.tree_map(lambda y, f: y + h0.astype(y.dtype) * f, y0, f0)
    f1 = vf(t0 + h0, y1)
    d2 = scaled(jtu.tree_map(lambda a, b: a - b, f1, f0)).astype(span.dtype) / h0
    dmax = jnp.maximum(d1, d2)
    h1 = jnp.where(dmax <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / dmax) ** (1.0 / error_order))
    return jnp.minimum(jnp.minimum(100 * h0, h1), span)
