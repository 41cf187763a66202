"""The errors qcompile raises. Each names what went wrong, where (node, module path, batch) and the fix."""
from __future__ import annotations

import contextlib
import traceback
from pathlib import Path


class QCompileError(Exception):
    """Base class of every error qcompile raises on purpose."""


class ConfigError(QCompileError, ValueError):
    """A QuantConfig / QuantSpec value is out of range or does not fit a layer of the model."""


class CaptureError(QCompileError):
    """The model could not be captured to a graph by torch.export nor by torch.fx."""


class CalibrationError(QCompileError):
    """The calibration data is empty, does not match the model's inputs, or produced NaN/Inf."""


class UnsupportedOpError(QCompileError):
    """A graph holds an op that a pass cannot handle (and cannot leave in float)."""


class SerializationError(QCompileError):
    """A saved model cannot be written or read back (format, version, checksum, unsafe content)."""


class InvalidModelError(QCompileError):
    """The model itself cannot be quantized: NaN/Inf weights, no quantizable op at all."""


class CheckpointError(QCompileError):
    """A checkpoint directory belongs to another run, or its files are damaged."""


class InternalError(QCompileError):
    """An unexpected failure inside qcompile's own code: a bug to report (the original error is chained)."""


@contextlib.contextmanager
def internal_errors(what: str):
    """Re-raise an exception that is not a QCompileError as an InternalError naming ``what``, the qcompile
    function it came through and the original error (chained, so its traceback stays available)."""
    try:
        yield
    except QCompileError:
        raise
    except Exception as error:
        package = Path(__file__).parent
        frames = [frame for frame in traceback.extract_tb(error.__traceback__)
                  if Path(frame.filename).is_relative_to(package)]
        where = f" in {Path(frames[-1].filename).relative_to(package.parent)}:{frames[-1].lineno} ({frames[-1].name})" \
            if frames else ""
        message = (str(error).strip().splitlines() or [""])[0][:300]
        raise InternalError(f"{what} failed{where} with {type(error).__name__}: {message}. This is a bug in qcompile "
                            "(or torch), not in the model or the config: please report it with the model's class and "
                            "the config; the original error is chained below") from error
