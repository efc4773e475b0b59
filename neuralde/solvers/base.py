"""The interface every solver family implements.

A solver is a stateless `eqx.Module`; its capabilities are class attributes.
The integration loop (`neuralde._loop`) calls

    state = solver.init(problem, t0, y0)
    y1, y_error, coeffs, state1, num_fevals = solver.step(problem, t0, dt, y0, state)

where ``problem`` gives the vector field in the loop's (always forward) time
(`problem.vf(t, y)`; later also Brownian increments and delayed history),
``y_error`` is the embedded error estimate (``None`` for methods without one),
``coeffs`` the step's dense-output polynomial (`neuralde._interpolation`) and
``state1`` the solver state to carry if the step is accepted (for example the
FSAL derivative).

``num_fevals`` is a Python int when every step makes the same number of
evaluations (counted after the loop), or a `StepInfo` for solvers whose steps
can fail on their own (an implicit solver whose Newton iteration diverges) or
that keep extra counters.
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Optional

import equinox as eqx


class StepInfo(NamedTuple):
    """What a step reports besides its result (see the module docstring)."""

    #: Vector-field evaluations of this attempt (int or traced int32).
    nfev: Any
    #: ``False`` rejects the step whatever its error estimate (e.g. Newton did not
    #: converge); the loop retries with ``dt * fail_factor``. ``None``: always ok.
    ok: Any = None
    #: Increments of the counters named by the solver's ``stat_names``.
    stats: tuple = ()
    #: Step-size factor after a failed (``ok=False``) attempt.
    fail_factor: Any = 0.25
    #: Solver state to carry when the step is rejected (``None``: keep the old
    #: one), e.g. a Jacobian that was refreshed during the failed attempt.
    reject_state: Any = None
    #: A `Status` code (int32) that ends the solve after an accepted attempt
    #: (``0``/``None``: carry on), e.g. a delay solver's history buffer is full.
    status: Any = None


class AbstractSolver(eqx.Module):
    #: Order of the method (global error O(dt^order)).
    order: ClassVar[int]
    #: Exponent base of the controller: order of the error estimate + 1, or None.
    error_order: ClassVar[Optional[int]] = None
    #: ``(beta1, beta2)`` of the PI step-size controller (`PIController`):
    #: the exponents of the current and the previous error, times
    #: ``error_order``. The default, (0.7, 0.4), is OrdinaryDiffEq.jl's.
    pi_coefficients: ClassVar[tuple] = (0.7, 0.4)
    #: Whether the solver can choose its own steps (otherwise dt0 is required).
    adaptive: ClassVar[bool] = False
    #: Names of the term classes the solver accepts.
    term_kinds: ClassVar[tuple] = ("ODETerm",)
    #: Degree of the dense-output polynomial.
    interp_degree: ClassVar[int] = 1
    #: Names of extra integer counters the solver reports in `Solution.stats`
    #: (incremented through `StepInfo.stats`).
    stat_names: ClassVar[tuple] = ()

    def init(self, problem, t0, y0):
        raise NotImplementedError

    def step(self, problem, t0, dt, y0, state):
        raise NotImplementedError

    def breakpoints(self, problem, t0):
        """Sorted times after ``t0`` that steps must land on rather than step
        over (a delay equation's propagated discontinuities), or ``None``."""
        return None

    @property
    def init_fevals(self) -> int:
        """Vector-field evaluations made by `init`."""
        return 0
