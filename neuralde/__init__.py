"""neuralde: neural differential equations in JAX."""
from ._solution import Solution, Status
from ._solve import solve
from ._terms import AbstractTerm, DDETerm, ODETerm
from .nn import NeuralDDE, NeuralODE
from .sensitivity import AbstractSensitivity, BacksolveAdjoint, CheckpointAdjoint, ForwardMode, ReverseMode
from .solvers import RK4, AbstractSolver, Dopri5, Euler, Heun, MethodOfSteps, Tsit5

__version__ = "0.1.0"

__all__ = [
    "solve",
    "Solution",
    "Status",
    "AbstractTerm",
    "ODETerm",
    "AbstractSolver",
    "Euler",
    "Heun",
    "RK4",
    "Dopri5",
    "Tsit5",
    "AbstractSensitivity",
    "ReverseMode",
    "CheckpointAdjoint",
    "BacksolveAdjoint",
    "ForwardMode",
    "NeuralODE",
    "DDETerm",
    "MethodOfSteps",
    "NeuralDDE",
]
