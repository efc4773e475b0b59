"""neuralde: neural differential equations in JAX."""
from ._solution import Solution, Status
from ._solve import solve
from ._terms import AbstractTerm, DDETerm, ODETerm, SDETerm
from . import ensemble
from .nn import NeuralDDE, NeuralODE, NeuralSDE
from .sensitivity import AbstractSensitivity, BacksolveAdjoint, CheckpointAdjoint, ForwardMode, ReverseMode
from .solvers import (RK4, SOSRI, SRA1, SRIW1, AbstractSolver, Dopri5, Euler, EulerMaruyama, Heun, Kvaerno3,
                      Kvaerno4, Kvaerno5, MethodOfSteps, Tsit5)

__version__ = "0.2.0"

__all__ = [
    "solve",
    "Solution",
    "Status",
    "AbstractTerm",
    "ODETerm",
    "SDETerm",
    "AbstractSolver",
    "Euler",
    "Heun",
    "RK4",
    "Dopri5",
    "Tsit5",
    "Kvaerno3",
    "Kvaerno4",
    "Kvaerno5",
    "EulerMaruyama",
    "SRIW1",
    "SOSRI",
    "SRA1",
    "DDETerm",
    "MethodOfSteps",
    "NeuralDDE",
    "AbstractSensitivity",
    "ReverseMode",
    "CheckpointAdjoint",
    "BacksolveAdjoint",
    "ForwardMode",
    "NeuralODE",
    "NeuralSDE",
    "ensemble",
]
