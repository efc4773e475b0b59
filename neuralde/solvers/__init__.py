from .base import AbstractSolver, StepInfo
from .explicit_rk import RK4, Dopri5, Euler, ExplicitRK, Heun, Tsit5
from .delay import MethodOfSteps

__all__ = ["AbstractSolver", "StepInfo", "ExplicitRK", "Euler", "Heun", "RK4", "Dopri5", "Tsit5", "MethodOfSteps"]
