from .base import AbstractSolver, StepInfo
from .delay import MethodOfSteps
from .explicit_rk import RK4, Dopri5, Euler, ExplicitRK, Heun, Tsit5
from .implicit import ESDIRK, Kvaerno3, Kvaerno4, Kvaerno5
from .sde import SOSRI, SRA1, SRIW1, EulerMaruyama

__all__ = ["AbstractSolver", "StepInfo", "ExplicitRK", "Euler", "Heun", "RK4", "Dopri5", "Tsit5",
           "ESDIRK", "Kvaerno3", "Kvaerno4", "Kvaerno5", "EulerMaruyama", "SRIW1", "SOSRI", "SRA1",
           "MethodOfSteps"]
