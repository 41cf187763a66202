"""The custom ops that a folded graph holds, registered with torch.library so that they survive
torch.export, run under torch.compile and have one definition that lowerings translate.

- ``qcompile::dequantize_weight(packed_codes, scale, zero_point, bits, qmin, axis, shape, dtype)``:
  packed integer codes (``primitives.pack_codes``) -> the float weight in its parameter layout.
- ``qcompile::quantize_dequantize(x, scale, zero_point, qmin, qmax)``: per-tensor fake quantization
  of an activation (QuantizeLinear -> DequantizeLinear in ONNX terms).
"""
from __future__ import annotations

import math

import torch

from . import primitives as P


@torch.library.custom_op("qcompile::dequantize_weight", mutates_args=())
def dequantize_weight(packed_codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                      qmin: int, axis: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """packed_codes: uint8 [rows, ceil(cols / per_byte)]; scale, zero_point: [rows | 1, n_groups].
    Returns the weight of ``shape`` and ``dtype``: (codes - zero_point) * scale, mapped back from the
    [rows, cols] matrix view along ``axis``."""
    rows = shape[axis]
    cols = math.prod(shape) // rows
    codes = P.unpack_codes(packed_codes, bits, qmin, cols)
    return P.weight_from_matrix(P.dequantize_weight(codes, scale, zero_point), axis, shape).to(dtype)


@dequantize_weight.register_fake
def _(packed_codes, scale, zero_point, bits, qmin, axis, shape, dtype):
    return packed_codes.new_empty(shape, dtype=dtype)


@torch.library.custom_op("qcompile::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                        qmax: int) -> torch.Tensor:
    """Per-tensor fake quantization of x (any shape), in x's dtype."""
    return P.fake_quantize(x, scale, zero_point, qmin, qmax)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


DEQUANTIZE_WEIGHT = torch.ops.qcompile.dequantize_weight.default
QUANTIZE_DEQUANTIZE = torch.ops.qcompile.quantize_dequantize.default
