"""Rounding optimizers, one file each, behind one interface (``registry.RoundingOptimizer``)."""
from . import adaround, brecq, comq, gptq, rtn, signround  # noqa: F401 - each registers its method
from .registry import RoundingOptimizer, available, check_config, get, register

__all__ = ["RoundingOptimizer", "available", "check_config", "get", "register"]
