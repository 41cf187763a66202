"""The errors qcompile raises. Each names what went wrong, where (node, module path, batch) and the fix."""


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
