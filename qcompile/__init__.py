"""qcompile: a post-training quantization compiler for PyTorch.

    qm = qcompile.compile(model, calib, config="w4a16-rtn")
    qm(x); qm.report(); qm.save("dir"); qcompile.load("dir")
"""
from . import ops  # noqa: F401 - registers the qcompile:: custom ops
from . import rounding
from .api import QuantizedModel, compile
from .config import PRESETS, QuantConfig, QuantSpec
from .errors import (CalibrationError, CaptureError, ConfigError, InvalidModelError, QCompileError,
                     SerializationError, UnsupportedOpError)
from .format import load

__version__ = "0.1.0"

__all__ = ["compile", "load", "QuantizedModel", "QuantConfig", "QuantSpec", "PRESETS", "rounding",
           "QCompileError", "ConfigError", "CaptureError", "CalibrationError", "UnsupportedOpError",
           "SerializationError", "InvalidModelError"]
