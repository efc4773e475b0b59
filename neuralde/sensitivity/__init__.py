from .backsolve import BacksolveAdjoint
from .base import AbstractSensitivity
from .checkpoint import CheckpointAdjoint
from .forward import ForwardMode
from .reverse import ReverseMode

__all__ = ["AbstractSensitivity", "BacksolveAdjoint", "CheckpointAdjoint", "ForwardMode", "ReverseMode"]
