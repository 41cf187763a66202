"""The custom ops that a folded graph holds, registered with torch.library so that they survive
torch.export, run under torch.compile and have one definition that lowerings translate.

- ``qcompile::dequantize_weight(packed_codes, scale, zero_point, bits, qmin, axis, shape, dtype, exponent)``:
  packed integer codes (``primitives.pack_codes``, dense) -> the float weight in its parameter layout
  (exponent != 1: a power grid, mapped back with sign(y)·|y|^(1/exponent)).
- ``qcompile::quantize_dequantize(x, scale, zero_point, qmin, qmax)``: per-tensor fake quantization
  of an activation (QuantizeLinear -> DequantizeLinear in ONNX terms).
- ``qcompile::dequantize_linear(codes, scale, zero_point, axis, block_size)``: ONNX DequantizeLinear
  semantics on unpacked codes (used by the ONNX lowering's view of a folded graph).
- ``qcompile::gather_block_quantized(codes, indices, scale, zero_point, block_size)``: an embedding
  lookup that dequantizes only the gathered rows (onnxruntime's GatherBlockQuantized).
- ``qcompile::packed_linear(x, packed_codes, scale, zero_offset, bits, group_size, bias)``: x @ W^T + b
  straight from the packed codes (the packed PyTorch lowering; the fused CPU kernel, see kernels/).
- ``qcompile::int4pack_linear(x, packed_weight, scales_and_zeros, group_size, bias)``: the same on CUDA
  through torch's tinygemm kernel (``aten._weight_int4pack_mm``), in its own weight layout.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import primitives as P
from .kernels import cpu_ops


@torch.library.custom_op("qcompile::dequantize_weight", mutates_args=())
def dequantize_weight(packed_codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                      qmin: int, axis: int, shape: list[int], dtype: torch.dtype, exponent: float = 1.0
                      ) -> torch.Tensor:
    """packed_codes: uint8 [rows, ceil(cols * bits / 8)]; scale, zero_point: [rows | 1, n_groups].
    Returns the weight of ``shape`` and ``dtype``: (codes - zero_point) * scale (from the power domain of
    ``exponent``), mapped back from the [rows, cols] matrix view along ``axis``."""
    rows = shape[axis]
    cols = math.prod(shape) // rows
    codes = P.unpack_codes(packed_codes, bits, qmin, cols)
    return P.weight_from_matrix(P.dequantize_weight(codes, scale, zero_point, exponent), axis, shape).to(dtype)


@dequantize_weight.register_fake
def _(packed_codes, scale, zero_point, bits, qmin, axis, shape, dtype, exponent=1.0):
    return packed_codes.new_empty(shape, dtype=dtype)


@torch.library.custom_op("qcompile::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                        qmax: int) -> torch.Tensor:
    """Per-tensor fake quantization of x (any shape), in x's dtype."""
    return P.fake_quantize(x, scale, zero_point, qmin, qmax)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


def _quantize_dequantize_setup_context(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax = inputs
    codes = torch.round(x / scale) + zero_point
    ctx.save_for_backward((codes >= qmin) & (codes <= qmax))


def _quantize_dequantize_backward(ctx, grad):
    """The straight-through estimator: the gradient passes where x is inside the quantization range."""
    inside, = ctx.saved_tensors
    return grad * inside, None, None, None, None


torch.library.register_autograd("qcompile::quantize_dequantize", _quantize_dequantize_backward,
                                setup_context=_quantize_dequantize_setup_context)


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


@torch.library.custom_op("qcompile::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed_codes: torch.Tensor, scale: torch.Tensor, zero_offset: torch.Tensor,
                  bits: int, group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: x @ W^T (+ bias) where W [N, K] = (u - zero_offset) * scale,
    u the unsigned codes that ``packed_codes`` holds in ``container_bits(bits)``-wide fields (uint8
    [N, ceil(K / per_byte)], ``primitives.pack_codes(..., width=container_bits(bits))``); scale float32 /
    zero_offset uint8 [N | 1, K / group_size]. On CPU the fused kernel reads the
    packed bytes once (kernels/packed_linear_cpu.cpp); elsewhere, or for group sizes the kernel does not
    tile, the weight is dequantized for the call."""
    width = P.container_bits(bits)
    n_groups = scale.shape[1]
    kernels = cpu_ops() if x.device.type == "cpu" else None
    if kernels is not None and kernels.supports_groups(width, n_groups, group_size):
        y = kernels.packed_linear(x, packed_codes, scale, zero_offset, width, group_size).to(x.dtype)
    else:
        y = torch.nn.functional.linear(x, _packed_linear_weight(packed_codes, scale, zero_offset, bits, x.shape[-1],
                                                                x.dtype))
    return y if bias is None else y + bias


@packed_linear.register_fake
def _(x, packed_codes, scale, zero_offset, bits, group_size, bias):
    return x.new_empty((*x.shape[:-1], packed_codes.shape[0]))


def _packed_linear_weight(packed_codes, scale, zero_offset, bits, cols, dtype):
    """The [N, K] weight packed_linear computes with."""
    return P.dequantize_weight(P.unpack_codes(packed_codes, bits, 0, cols, P.container_bits(bits)), scale,
                               zero_offset).to(dtype)


def _linear_setup_context(ctx, inputs, output):
    ctx.inputs = inputs


def _packed_linear_backward(ctx, grad):
    x, packed_codes, scale, zero_offset, bits, _, bias = ctx.inputs
    grad_x, grad_bias = _linear_input_grads(grad, _packed_linear_weight(packed_codes, scale, zero_offset, bits,
                                                                        x.shape[-1], grad.dtype), bias)
    return grad_x, None, None, None, None, None, grad_bias


def _linear_input_grads(grad, weight, bias):
    """(d x, d bias) of y = x @ weight^T + bias: the codes, scales and zero points get no gradient."""
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if bias is not None else None
    return grad @ weight, grad_bias


torch.library.register_autograd("qcompile::packed_linear", _packed_linear_backward,
                                setup_context=_linear_setup_context)


@torch.library.custom_op("qcompile::int4pack_linear", mutates_args=())
def int4pack_linear(x: torch.Tensor, packed_weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype, on CUDA: ``aten._weight_int4pack_mm`` (tinygemm) with the weight
    in ``aten._convert_weight_to_int4pack`` layout and bfloat16 scales_and_zeros [K / group_size, N, 2]
    (w = (u - 8) * scale + zero). Computes in bfloat16, as the kernel does."""
    if x.device.type != "cuda":
        raise RuntimeError(f"qcompile::int4pack_linear runs on CUDA, got an input on {x.device}: the module was "
                           "lowered for CUDA; move the QuantizedModel to the target device, then call "
                           "to_torch(packed=True)")
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm(rows, packed_weight, group_size, scales_and_zeros)
    y = y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
    return y if bias is None else y + bias


@int4pack_linear.register_fake
def _(x, packed_weight, scales_and_zeros, group_size, bias):
    return x.new_empty((*x.shape[:-1], scales_and_zeros.shape[1]))


def _int4pack_linear_backward(ctx, grad):
    x, packed_weight, scales_and_zeros, group_size, bias = ctx.inputs
    identity = torch.eye(x.shape[-1], dtype=torch.bfloat16, device=x.device)
    weight_t = torch.ops.aten._weight_int4pack_mm(identity, packed_weight, group_size, scales_and_zeros)  # W^T [K, N]
    grad_x, grad_bias = _linear_input_grads(grad, weight_t.t().to(grad.dtype), bias)
    return grad_x, None, None, None, grad_bias


torch.library.register_autograd("qcompile::int4pack_linear", _int4pack_linear_backward,
                                setup_context=_linear_setup_context)


DEQUANTIZE_WEIGHT = torch.ops.qcompile.dequantize_weight.default
GATHER_BLOCK_QUANTIZED = torch.ops.qcompile.gather_block_quantized.default
DEQUANTIZE_LINEAR = torch.ops.qcompile.dequantize_linear.default
QUANTIZE_DEQUANTIZE = torch.ops.qcompile.quantize_dequantize.default
PACKED_LINEAR = torch.ops.qcompile.packed_linear.default
INT4PACK_LINEAR = torch.ops.qcompile.int4pack_linear.default
