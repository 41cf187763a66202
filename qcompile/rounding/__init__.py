"""Rounding optimizers, one file each, behind one interface (``registry.RoundingOptimizer``)."""
from . import adaround, brecq, comq, gptq, rtn, signround  # noqa: F401 - each registers its method
from .registry import RoundingOptimizer, available, get, register

__all__ = ["RoundingOptimizer", "available", "get", "register"]
