"""Pure quantization math. Every formula lives here once; passes and optimizers call it.

Conventions. A weight is quantized as a matrix ``w`` of shape [rows, cols]: rows are output channels,
cols the reduction (input) elements of one output. Group-wise quantization splits cols into
``cols // group_size`` groups; ``scale`` and ``zero_point`` have shape [rows, n_groups] (a per-channel
spec has n_groups = 1, a per-tensor spec rows = n_groups = 1). Codes are integers in [qmin, qmax]:
symmetric specs use [-2^(b-1), 2^(b-1)-1] with zero point 0, asymmetric [0, 2^b-1].
Scales are computed in float32 whatever the weight dtype.

Grids. The uniform grid dequantizes to (codes - zero_point) * scale. The power grid (NUPES, Yvinec et al.
2023, arXiv 2308.05600) quantizes u = sign(w)·|w|^a on that uniform grid and dequantizes with the inverse
map sign(y)·|y|^(1/a): an exponent a < 1 puts more levels near zero, where bell-shaped weights are dense.
Scales, zero points and ranges of a power-grid weight live in the power domain (u); every function that
takes ``exponent`` uses a = 1 (the uniform grid, exactly) by default.
"""
from __future__ import annotations

import math

import torch

SCALE_EPS = 1e-12
# Exponents the data-free power-grid search tries (1.0, the uniform grid, included).
POWER_EXPONENTS = tuple(round(0.25 + 0.05 * step, 2) for step in range(21))


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of b-bit codes."""
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def code_dtype(symmetric: bool) -> torch.dtype:
    """The storage dtype of unpacked codes and zero points: int8 (symmetric) or uint8 (asymmetric)."""
    return torch.int8 if symmetric else torch.uint8


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows, cols] -> [rows, n_groups, group] (group_size -1: one group of all cols)."""
    rows, cols = w.shape
    size = cols if group_size == -1 else group_size
    return w.reshape(rows, cols // size, size)


def scale_zero_point(w_min: torch.Tensor, w_max: torch.Tensor, bits: int, symmetric: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine scale and integer zero point that map [w_min, w_max] onto the b-bit code range.

    Symmetric: scale = max(|min|, |max|) / ((qmax - qmin) / 2), zero point 0 (as torchao / GPTQ).
    Asymmetric: the range is widened to include 0; scale = (max - min) / (qmax - qmin),
    zero point = clamp(round(-min / scale)). Returns float32 scale and zero point (integer valued).
    """
    qmin, qmax = quant_range(bits, symmetric)
    w_min = torch.minimum(w_min.float(), torch.zeros_like(w_min, dtype=torch.float32))
    w_max = torch.maximum(w_max.float(), torch.zeros_like(w_max, dtype=torch.float32))
    if symmetric:
        scale = torch.maximum(-w_min, w_max) / ((qmax - qmin) / 2)
        scale = scale.clamp_min(SCALE_EPS)
        return scale, torch.zeros_like(scale)
    scale = ((w_max - w_min) / (qmax - qmin)).clamp_min(SCALE_EPS)
    zero_point = torch.clamp(torch.round(-w_min / scale), qmin, qmax)
    return scale, zero_point


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _is_one(exponent) -> bool:
    return not isinstance(exponent, torch.Tensor) and exponent == 1


def to_power_domain(x: torch.Tensor, exponent: float | torch.Tensor) -> torch.Tensor:
    """sign(x)·|x|^exponent (x itself for exponent 1); exponent may be a learnable scalar tensor."""
    return x if _is_one(exponent) else torch.sign(x) * x.abs().pow(exponent)


def from_power_domain(u: torch.Tensor, exponent: float | torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_power_domain``: sign(u)·|u|^(1 / exponent)."""
    return u if _is_one(exponent) else torch.sign(u) * u.abs().pow(1.0 / exponent)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             rounding=torch.round, exponent: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Integer-valued codes clamp(round(u / scale) + zero_point, qmin, qmax) of u = x in the power domain
    (u = x on the uniform grid), in float32 (broadcasting); ``rounding=round_ste`` for a differentiable form."""
    return torch.clamp(rounding(to_power_domain(x.float(), exponent) / scale) + zero_point, qmin, qmax)


def nearest_grid_code(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      exponent: float = 1.0) -> torch.Tensor:
    """The code whose dequantized value is nearest to x itself (float32, broadcasting). On the uniform grid
    that is ``quantize``; on the power grid, rounding in the power domain can pick the farther of the two
    codes around x, so both are compared in x's domain."""
    if _is_one(exponent):
        return quantize(x, scale, zero_point, qmin, qmax)
    low = torch.clamp(torch.floor(to_power_domain(x.float(), exponent) / scale) + zero_point, qmin, qmax)
    high = torch.clamp(low + 1, qmin, qmax)
    closer_high = (dequantize(high, scale, zero_point, exponent) - x).abs() < (dequantize(low, scale, zero_point,
                                                                                          exponent) - x).abs()
    return torch.where(closer_high, high, low)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               exponent: float | torch.Tensor = 1.0) -> torch.Tensor:
    """(codes - zero_point) * scale mapped back from the power domain, in float32 (broadcasting)."""
    return from_power_domain((codes.float() - zero_point.float()) * scale.float(), exponent)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  exponent: float | torch.Tensor = 1.0) -> torch.Tensor:
    """dequantize(quantize(x)), in x's dtype."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, exponent=exponent), scale, zero_point,
                      exponent).to(x.dtype)


def minmax_range(w: torch.Tensor, group_size: int, per_tensor: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (or per-tensor) min and max of a [rows, cols] matrix, each [rows, n_groups] ([1, 1])."""
    if per_tensor:
        return w.min().reshape(1, 1).float(), w.max().reshape(1, 1).float()
    grouped = group_view(w.float(), group_size)
    return grouped.amin(dim=-1), grouped.amax(dim=-1)


def mse_clip_range(x: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool,
                   grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4, exponent: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink [x_min, x_max] by the ratio in (1 - max_shrink, 1] that minimises sum |x - fq(x)|^norm.

    x: [..., n] values grouped along the last dim; x_min, x_max: [...] their ranges in the power domain
    of ``exponent`` (the error is measured on x itself). The search of GPTQ's reference quantizer
    (Frantar et al. 2022): ``grid`` ratios, error power ``norm``. Returns the chosen (min, max), each
    shaped like x_min.
    """
    qmin, qmax = quant_range(bits, symmetric)
    x = x.float()
    best_err = torch.full_like(x_min, float("inf"))
    best_min, best_max = x_min.clone(), x_max.clone()
    for step in range(int(max_shrink * grid)):
        ratio = 1.0 - step / grid
        cand_min, cand_max = x_min * ratio, x_max * ratio
        scale, zero_point = scale_zero_point(cand_min, cand_max, bits, symmetric)
        err = (fake_quantize(x, scale[..., None], zero_point[..., None], qmin, qmax, exponent) - x
               ).abs_().pow_(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_min = torch.where(better, cand_min, best_min)
        best_max = torch.where(better, cand_max, best_max)
    return best_min, best_max


def weight_range(w: torch.Tensor, bits: int, symmetric: bool, group_size: int, per_tensor: bool = False,
                 observer: str = "minmax", exponent: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The (min, max) in the power domain that a [rows, cols] weight matrix is quantized over, each
    [rows, n_groups] ([1, 1] per tensor): the min/max, or with observer "mse" the shrunk range of
    ``mse_clip_range``."""
    u_min, u_max = minmax_range(to_power_domain(w.float(), exponent), group_size, per_tensor)
    if observer == "mse":
        values = w.float().reshape(1, 1, -1) if per_tensor else group_view(w.float(), group_size)
        u_min, u_max = mse_clip_range(values, u_min, u_max, bits, symmetric, exponent=exponent)
    return u_min, u_max


def weight_scale_zero_point(w: torch.Tensor, bits: int, symmetric: bool, group_size: int,
                            per_tensor: bool = False, observer: str = "minmax", exponent: float = 1.0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a [rows, cols] weight matrix, each [rows, n_groups] (per tensor: [1, 1])."""
    return scale_zero_point(*weight_range(w, bits, symmetric, group_size, per_tensor, observer, exponent),
                            bits, symmetric)


def search_power_exponent(w: torch.Tensor, bits: int, symmetric: bool, group_size: int, per_tensor: bool = False,
                          observer: str = "minmax", candidates: tuple[float, ...] = POWER_EXPONENTS,
                          gram: torch.Tensor | None = None) -> float:
    """The exponent among ``candidates`` whose power grid rounds a [rows, cols] matrix to nearest with the
    least error; 1.0 (uniform) wins ties. The error is ||w - Q(w)||^2 (NUPES's data-free search), or, given
    the Gram matrix [cols, cols] of the layer's inputs, the layer output error tr(ΔW H ΔW^T)."""
    best, best_error = 1.0, math.inf
    for exponent in sorted(candidates, key=lambda a: a != 1.0):
        scale, zero_point = weight_scale_zero_point(w, bits, symmetric, group_size, per_tensor, observer, exponent)
        codes = quantize_weight(w, scale, zero_point, bits, symmetric, exponent)
        delta = w.float() - dequantize_weight(codes, scale, zero_point, exponent)
        error = float(delta.pow(2).sum() if gram is None else ((delta @ gram) * delta).sum())
        if error < best_error:
            best, best_error = float(exponent), error
    return best


def expand_groups(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[rows | 1, n_groups] per-group values -> [rows, cols], each repeated over its group."""
    n_groups = t.shape[1]
    return t.expand(rows, n_groups).repeat_interleave(cols // n_groups, dim=1)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                    symmetric: bool, exponent: float = 1.0) -> torch.Tensor:
    """Nearest-rounded codes of a [rows, cols] matrix with [rows|1, n_groups] scales, as int8/uint8."""
    qmin, qmax = quant_range(bits, symmetric)
    rows, cols = w.shape
    codes = quantize(w, expand_groups(scale, rows, cols), expand_groups(zero_point, rows, cols), qmin, qmax,
                     exponent=exponent)
    return codes.to(code_dtype(symmetric))


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      exponent: float = 1.0) -> torch.Tensor:
    """[rows, cols] codes with [rows|1, n_groups] scale/zero point -> float32 [rows, cols]."""
    rows, cols = codes.shape
    return dequantize(codes, expand_groups(scale, rows, cols), expand_groups(zero_point, rows, cols), exponent)


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||reference - approx||^2 / ||reference||^2 (0 when both are 0)."""
    ref = reference.detach().float()
    denom = ref.pow(2).sum().item()
    num = (ref - approx.detach().float()).pow(2).sum().item()
    return num / denom if denom > 0 else (0.0 if num == 0 else math.inf)


def container_bits(bits: int) -> int:
    """Bits of the field a code takes in the packed-kernel layout: 2-bit codes four to a byte, 3- and
    4-bit codes two, wider ones one (fields never straddle a byte)."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def unsigned_codes(codes: torch.Tensor, qmin: int) -> torch.Tensor:
    """Codes (or zero points) in [qmin, qmin + 2^bits) stored unsigned, as uint8: ``codes - qmin``."""
    return (codes.to(torch.int16) - qmin).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int, qmin: int, width: int | None = None) -> torch.Tensor:
    """Pack [rows, cols] codes in [qmin, qmin + 2^bits) into uint8 [rows, ceil(cols * width / 8)].

    Codes are stored offset by -qmin (unsigned), ``width`` bits each (default ``bits``: dense), as one
    little-endian bit stream per row: code j occupies stream bits [j * width, (j + 1) * width), stream bit
    k being bit k % 8 of byte k // 8. For widths 2, 4 and 8 that is the ONNX int4 / torch int4 order (low
    bits first); 3-bit codes take 3 bytes per 8 codes.
    """
    width = width or bits
    unsigned = unsigned_codes(codes, qmin)
    rows, cols = unsigned.shape
    if 8 % width == 0:  # fields within bytes: shift-or per field position
        per_byte = 8 // width
        fields = torch.nn.functional.pad(unsigned, (0, (-cols) % per_byte)).reshape(rows, -1, per_byte)
        packed = torch.zeros(fields.shape[:2], dtype=torch.uint8, device=codes.device)
        for j in range(per_byte):
            packed |= fields[..., j] << (j * width)
        return packed
    groups = torch.nn.functional.pad(unsigned, (0, (-cols) % 8)).reshape(rows, -1, 8).to(torch.int64)
    word = sum(groups[..., j] << (j * width) for j in range(8))  # 8 codes = `width` bytes
    stream = torch.stack([(word >> (8 * k)) & 0xFF for k in range(width)], dim=-1).to(torch.uint8)
    return stream.reshape(rows, -1)[:, :-(-cols * width // 8)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, qmin: int, cols: int, width: int | None = None) -> torch.Tensor:
    """Inverse of ``pack_codes``: int16 codes [rows, cols] in [qmin, qmin + 2^bits)."""
    width = width or bits
    rows = packed.shape[0]
    mask = (1 << width) - 1
    if 8 % width == 0:
        fields = [(packed >> (j * width)) & mask for j in range(8 // width)]
        unsigned = torch.stack(fields, dim=-1).reshape(rows, -1)[:, :cols]
        return unsigned.to(torch.int16) + qmin
    words = -(-cols // 8)
    stream = torch.nn.functional.pad(packed, (0, words * width - packed.shape[1])).reshape(rows, words, width)
    word = sum(stream[..., k].to(torch.int64) << (8 * k) for k in range(width))
    unsigned = torch.stack([(word >> (j * width)) & mask for j in range(8)], dim=-1).reshape(rows, -1)[:, :cols]
    return unsigned.to(torch.int16) + qmin


def packed_nbytes(rows: int, cols: int, bits: int) -> int:
    """Bytes of ``pack_codes`` output (dense) for a [rows, cols] matrix."""
    return rows * (-(-cols * bits // 8))


def weight_matrix(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """A parameter as the [rows = output channels, cols = reduction elements] matrix that is quantized.

    axis 0: linear [out, in] and conv [out, in/groups, *kernel] weights (rows = shape[0]);
    axis 1: a 2-D [in, out] matrix on the right of a matmul / addmm (rows = shape[1]).
    """
    if axis == 0:
        return weight.reshape(weight.shape[0], -1)
    if axis == 1 and weight.dim() == 2:
        return weight.t()
    raise ValueError(f"no matrix view of a weight of shape {tuple(weight.shape)} with output axis {axis}")


def weight_from_matrix(matrix: torch.Tensor, axis: int, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of ``weight_matrix``: the [rows, cols] matrix back in the parameter's layout."""
    if axis == 0:
        return matrix.reshape(shape)
    return matrix.t()
