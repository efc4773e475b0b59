from .base import AbstractSensitivity
from .forward import ForwardMode
from .reverse import ReverseMode

__all__ = ["AbstractSensitivity", "ForwardMode", "ReverseMode"]
