"""Primitives against straightforward references."""
import itertools

import pytest
import torch

from qcompile import ops
from qcompile import primitives as P


def reference_quantize(w, bits, symmetric, group_size):
    """Element-by-element affine quantization of a [rows, cols] matrix, written plainly."""
    rows, cols = w.shape
    size = cols if group_size == -1 else group_size
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    out = torch.empty_like(w)
    for r in range(rows):
        for g in range(cols // size):
            chunk = w[r, g * size:(g + 1) * size]
            lo, hi = min(chunk.min().item(), 0.0), max(chunk.max().item(), 0.0)
            if symmetric:
                scale = max(-lo, hi) / ((qmax - qmin) / 2)
                zero = 0.0
            else:
                scale = (hi - lo) / (qmax - qmin)
                zero = min(max(round(-lo / scale), qmin), qmax)
            for c in range(size):
                q = min(max(torch.round(chunk[c] / scale).item() + zero, qmin), qmax)
                out[r, g * size + c] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits,symmetric,group_size", [(8, True, -1), (4, False, -1), (4, False, 8), (3, True, 4),
                                                       (2, False, 16)])
def test_weight_quantization_matches_reference(bits, symmetric, group_size):
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    scale, zero_point = P.weight_scale_zero_point(w, bits, symmetric, group_size)
    codes = P.quantize_weight(w, scale, zero_point, bits, symmetric)
    qmin, qmax = P.quant_range(bits, symmetric)
    assert codes.dtype == P.code_dtype(symmetric)
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    torch.testing.assert_close(P.dequantize_weight(codes, scale, zero_point),
                               reference_quantize(w, bits, symmetric, group_size), rtol=0, atol=1e-6)


def test_per_tensor_scale_is_one_scalar():
    w = torch.randn(5, 7)
    scale, zero_point = P.weight_scale_zero_point(w, 8, True, -1, per_tensor=True)
    assert scale.shape == (1, 1)
    assert torch.isclose(scale, w.abs().max() / 127.5).all()


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_unpack_round_trip(bits, symmetric):
    qmin, qmax = P.quant_range(bits, symmetric)
    codes = torch.randint(qmin, qmax + 1, (3, 13)).to(P.code_dtype(symmetric))
    packed = P.pack_codes(codes, bits, qmin)
    assert packed.dtype == torch.uint8
    assert packed.numel() == P.packed_nbytes(3, 13, bits)
    assert torch.equal(P.unpack_codes(packed, bits, qmin, 13), codes.to(torch.int16))


def test_int4_packing_is_low_nibble_first():
    packed = P.pack_codes(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 4, 0)
    assert packed.tolist() == [[1 | (2 << 4), 3 | (4 << 4)]]


def test_mse_clip_never_worse_than_minmax():
    w = torch.cat([torch.randn(4, 60), 8 * torch.randn(4, 4)], dim=1)  # outliers
    for bits in (3, 4):
        minmax = P.dequantize_weight(P.quantize_weight(w, *P.weight_scale_zero_point(w, bits, False, -1), bits, False),
                                     *P.weight_scale_zero_point(w, bits, False, -1))
        scale, zero = P.weight_scale_zero_point(w, bits, False, -1, observer="mse")
        mse = P.dequantize_weight(P.quantize_weight(w, scale, zero, bits, False), scale, zero)
        err = lambda a: (w - a).abs().pow(2.4).sum(dim=1)  # noqa: E731 - the searched norm
        assert (err(mse) <= err(minmax) + 1e-5).all()


@pytest.mark.parametrize("shape,axis", [((8, 12), 0), ((8, 4, 3, 3), 0), ((12, 8), 1)])
def test_weight_matrix_round_trip(shape, axis):
    w = torch.randn(shape)
    matrix = P.weight_matrix(w, axis)
    assert matrix.shape[0] == shape[axis]
    assert torch.equal(P.weight_from_matrix(matrix, axis, shape), w)


@pytest.mark.parametrize("bits,symmetric,group_size,shape,axis", [
    (4, False, 4, (8, 2, 3, 2), 0), (8, True, -1, (16, 24), 0), (3, True, 8, (24, 10), 1)])
def test_dequantize_weight_op_equals_primitives(bits, symmetric, group_size, shape, axis):
    w = torch.randn(shape)
    matrix = P.weight_matrix(w, axis)
    scale, zero = P.weight_scale_zero_point(matrix, bits, symmetric, group_size)
    codes = P.quantize_weight(matrix, scale, zero, bits, symmetric)
    qmin, _ = P.quant_range(bits, symmetric)
    zero = zero.to(P.code_dtype(symmetric))
    result = ops.DEQUANTIZE_WEIGHT(P.pack_codes(codes, bits, qmin), scale, zero, bits, qmin, axis, list(shape),
                                   torch.float32)
    expected = P.weight_from_matrix(P.dequantize_weight(codes, scale, zero), axis, shape)
    assert torch.equal(result, expected)


def test_fake_quantize_is_idempotent_and_in_range():
    x = torch.randn(1000) * 3
    scale, zero = P.scale_zero_point(x.min(), x.max(), 8, False)
    once = P.fake_quantize(x, scale, zero, 0, 255)
    assert torch.allclose(P.fake_quantize(once, scale, zero, 0, 255), once, atol=1e-6)
    assert (once - x).abs().max() <= scale / 2 + 1e-6


def test_scale_zero_point_includes_zero_exactly():
    for lo, hi in itertools.product([0.5, -2.0], [3.0, -0.1]):
        scale, zero = P.scale_zero_point(torch.tensor(lo), torch.tensor(hi), 4, False)
        assert P.fake_quantize(torch.zeros(1), scale, zero, 0, 15).item() == 0.0
