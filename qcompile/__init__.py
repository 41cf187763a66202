"""qcompile: a post-training quantization compiler for PyTorch.

    qm = qcompile.compile(model, calib, config="w4a16-rtn")
    qm(x); qm.report(); qm.save("dir"); qcompile.load("dir")
"""
import importlib.metadata

import torch

from . import ops  # noqa: F401 - registers the qcompile:: custom ops
from . import rounding
from .api import QuantizedModel, compile
from .config import PRESETS, MixedPrecision, QuantConfig, QuantSpec
from .errors import (CalibrationError, CaptureError, CheckpointError, ConfigError, InvalidModelError, QCompileError,
                     SerializationError, UnsupportedOpError)
from .format import load
from .passes.lower_torch import dynamo_backend

# torch.compile(backend="qcompile"): an installed qcompile declares a torch_dynamo_backends entry point that
# dynamo loads on first use (registering here too would be a duplicate); a source tree registers on import.
if not importlib.metadata.entry_points(group="torch_dynamo_backends", name="qcompile"):
    torch._dynamo.register_backend(dynamo_backend, name="qcompile")

__version__ = "0.1.0"

__all__ = ["compile", "load", "QuantizedModel", "QuantConfig", "QuantSpec", "MixedPrecision", "PRESETS", "rounding",
           "QCompileError", "ConfigError", "CaptureError", "CalibrationError", "UnsupportedOpError",
           "SerializationError", "InvalidModelError", "CheckpointError"]
