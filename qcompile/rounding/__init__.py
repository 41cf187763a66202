"""Rounding optimizers, one file each, behind one interface (``registry.RoundingOptimizer``)."""
from . import rtn  # noqa: F401 - registers "rtn"
from .registry import RoundingOptimizer, available, get, register

__all__ = ["RoundingOptimizer", "available", "get", "register"]
