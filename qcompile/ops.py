"""The custom ops that a folded graph holds, registered with torch.library so that they survive
torch.export, run under torch.compile and have one definition that lowerings translate.

- ``qcompile::dequantize_weight(packed_codes, scale, zero_point, bits, qmin, axis, shape, dtype)``:
  packed integer codes (``primitives.pack_codes``) -> the float weight in its parameter layout.
- ``qcompile::quantize_dequantize(x, scale, zero_point, qmin, qmax)``: per-tensor fake quantization
  of an activation (QuantizeLinear -> DequantizeLinear in ONNX terms).
- ``qcompile::dequantize_linear(codes, scale, zero_point, axis, block_size)``: ONNX DequantizeLinear
  semantics on unpacked codes (used by the ONNX lowering's view of a folded graph).
- ``qcompile::gather_block_quantized(codes, indices, scale, zero_point, block_size)``: an embedding
  lookup that dequantizes only the gathered rows (onnxruntime's GatherBlockQuantized).
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


@torch.library.custom_op("qcompile::dequantize_linear", mutates_args=())
def dequantize_linear(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                      block_size: int) -> torch.Tensor:
    """ONNX DequantizeLinear (opset 21): (codes - zero_point) * scale in float32, with a scalar scale
    (per tensor), a 1-D scale along ``axis`` (per axis), or, when block_size > 0, a scale shaped like
    codes except ``codes.shape[axis] / block_size`` along ``axis`` (blocked)."""
    if block_size > 0:
        scale = scale.repeat_interleave(block_size, dim=axis)
        zero_point = zero_point.repeat_interleave(block_size, dim=axis)
    elif scale.dim() == 1:
        view = [1] * codes.dim()
        view[axis] = -1
        scale, zero_point = scale.reshape(view), zero_point.reshape(view)
    return P.dequantize(codes, scale, zero_point)


@dequantize_linear.register_fake
def _(codes, scale, zero_point, axis, block_size):
    return codes.new_empty(codes.shape, dtype=scale.dtype)


@torch.library.custom_op("qcompile::gather_block_quantized", mutates_args=())
def gather_block_quantized(codes: torch.Tensor, indices: torch.Tensor, scale: torch.Tensor,
                           zero_point: torch.Tensor, block_size: int) -> torch.Tensor:
    """codes: [rows, cols]; scale, zero_point: [rows, cols / block_size]; indices: any shape.
    Returns float32 indices.shape + [cols]: the dequantized rows ``indices`` picks."""
    rows = codes[indices]
    return P.dequantize(rows, scale[indices].repeat_interleave(block_size, dim=-1),
                        zero_point[indices].repeat_interleave(block_size, dim=-1))


@gather_block_quantized.register_fake
def _(codes, indices, scale, zero_point, block_size):
    return scale.new_empty((*indices.shape, codes.shape[1]))


DEQUANTIZE_WEIGHT = torch.ops.qcompile.dequantize_weight.default
GATHER_BLOCK_QUANTIZED = torch.ops.qcompile.gather_block_quantized.default
DEQUANTIZE_LINEAR = torch.ops.qcompile.dequantize_linear.default
QUANTIZE_DEQUANTIZE = torch.ops.qcompile.quantize_dequantize.default
