"""The packed PyTorch lowering: fused CPU kernel vs the dequantized reference, to_torch(packed=True) vs
to_torch(packed=False), torch.compile / torch.export of the packed module, the "qcompile" dynamo backend,
and (on a GPU) the tinygemm path."""
import warnings

import pytest
import torch

import qcompile
from qcompile import QuantConfig, QuantSpec, ops
from qcompile import primitives as P
from qcompile.kernels import cpu_ops
from qcompile.ops import DEQUANTIZE_WEIGHT, INT4PACK_LINEAR, PACKED_LINEAR
from tests.conftest import MODELS, call, logits, relative_error

needs_kernels = pytest.mark.skipif(cpu_ops() is None, reason="the native CPU kernels could not be built here")


def _packed_weight(rows, cols, bits, group_size, symmetric, seed=0):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    scale, zero_point = P.weight_scale_zero_point(weight, bits, symmetric, group_size)
    codes = P.quantize_weight(weight, scale, zero_point, bits, symmetric)
    qmin, _ = P.quant_range(bits, symmetric)
    zero_offset = P.unsigned_codes(zero_point, qmin)
    return (P.pack_codes(codes, bits, qmin, P.container_bits(bits)), scale, zero_offset,
            P.dequantize_weight(codes, scale, zero_point))


@needs_kernels
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 32), (3, -1), (2, 64), (2, -1), (8, -1), (8, 64), (8, 16)])
@pytest.mark.parametrize("shape", [(96, 256), (40, 200)])   # 200: rows that end in a partial chunk
@pytest.mark.parametrize("rows_of_x", [1, 3, 8, 20])         # 20: the prefill path (dequantize once, BLAS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_fused_kernel_matches_the_dequantized_matmul(bits, group_size, shape, rows_of_x, symmetric):
    rows, cols = shape
    if group_size != -1 and cols % group_size:
        pytest.skip("group size does not divide the row")
    packed, scale, zero_offset, weight = _packed_weight(rows, cols, bits, group_size, symmetric)
    x = torch.randn(rows_of_x, cols)
    bias = torch.randn(rows)
    y = ops.packed_linear(x, packed, scale, zero_offset, bits, cols if group_size == -1 else group_size, bias)
    reference = x @ weight.t() + bias
    assert relative_error(reference, y) < 1e-10


def test_without_native_kernels_the_op_dequantizes(monkeypatch):
    packed, scale, zero_offset, weight = _packed_weight(64, 128, 4, 32, False)
    monkeypatch.setattr(ops, "cpu_ops", lambda: None)
    x = torch.randn(2, 5, 128)
    y = ops.packed_linear(x, packed, scale, zero_offset, 4, 32, None)
    assert relative_error(x @ weight.t(), y) < 1e-10


def test_gradients_reach_the_input_and_bias():
    packed, scale, zero_offset, weight = _packed_weight(32, 64, 4, 32, True)
    x = torch.randn(3, 64, requires_grad=True)
    bias = torch.zeros(32, requires_grad=True)
    ops.packed_linear(x, packed, scale, zero_offset, 4, 32, bias).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (x_ref @ weight.t()).square().sum().backward()
    assert relative_error(x_ref.grad, x.grad) < 1e-10 and bias.grad.abs().sum() > 0


_STEM_8_BIT = {"stem": QuantSpec(bits=8)}  # user_net's stem has 27 inputs per output
CONFIGS = {
    "w4g16": QuantConfig(weight=QuantSpec(bits=4, group_size=16), overrides=_STEM_8_BIT),
    "w8": QuantConfig(weight=QuantSpec(bits=8)),
    "w2g16": QuantConfig(weight=QuantSpec(bits=2, group_size=16), overrides=_STEM_8_BIT),
    "w8a8": "w8a8-rtn",
}


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "user_net"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_packed_module_matches_the_dequantized_one(model_name, config):
    factory, calib = MODELS[model_name]
    batches = calib()
    qm = qcompile.compile(factory(), batches, CONFIGS[config], progress=False)
    packed, reference = qm.to_torch(packed=True), qm.to_torch(packed=False)
    targets = [n.target for n in packed.graph.nodes if n.op == "call_function"]
    assert PACKED_LINEAR in targets
    if model_name == "user_net":  # its convs keep dequantize-then-conv
        assert DEQUANTIZE_WEIGHT in targets
    for batch in batches:
        expected = logits(call(reference, batch))
        assert relative_error(expected, logits(call(qm, batch))) < 1e-10
        assert relative_error(expected, logits(call(packed, batch))) < 1e-8
    assert qcompile.api.module_nbytes(packed) <= qm.nbytes()


def test_packed_w4g128_linears_are_six_times_smaller_than_fp32():
    factory, calib = MODELS["llama"]
    model = factory()
    packed = qcompile.compile(model, calib(), "w4a16-rtn", progress=False).to_torch(packed=True)
    linear_float = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    linear_packed = sum(b.numel() * b.element_size() for name, b in packed.named_buffers()
                        if name.endswith(("_codes", "_scale", "_zero_offset")) and "embed" not in name)
    assert linear_float / linear_packed >= 6


@pytest.mark.parametrize("model_name", ["llama", "user_net"])
def test_packed_module_compiles_and_exports(model_name):
    factory, calib = MODELS[model_name]
    batches = calib()
    qm = qcompile.compile(factory(), batches, "w4a16-rtn", progress=False)
    packed = qm.to_torch(packed=True)
    args, kwargs = (batches[0], {}) if isinstance(batches[0], torch.Tensor) else ((), batches[0])
    args = args if isinstance(args, tuple) else (args,)
    expected = logits(packed(*args, **kwargs))
    compiled = torch.compile(packed)
    assert relative_error(expected, logits(compiled(*args, **kwargs))) < 1e-8
    exported = torch.export.export(packed, args, kwargs)
    assert PACKED_LINEAR in [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert relative_error(expected, logits(exported.module()(*args, **kwargs))) < 1e-8


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(128, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_dynamo_backend_quantizes_with_calib_like_compile():
    model = _Mlp().eval()
    calib = [torch.randn(4, 64) for _ in range(3)]
    compiled = torch.compile(model, backend="qcompile", options={"config": "w4a16-gptq", "calib": calib})
    x = torch.randn(4, 64)
    expected = qcompile.compile(model, calib, "w4a16-gptq", progress=False)(x)
    assert relative_error(expected, compiled(x)) < 1e-8
    assert relative_error(model(x), compiled(x)) > 1e-6  # quantized, not the float model


def test_dynamo_backend_without_calib_is_data_free_rtn_and_says_so():
    model = _Mlp().eval()
    x = torch.randn(4, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.compile(model, backend="qcompile", options={"config": "w4a16-gptq"})(x)
    assert any("data-free" in str(w.message) for w in caught)
    expected = qcompile.compile(model, [x], "w4a16-rtn", progress=False)(x)
    assert relative_error(expected, y) < 1e-8


def test_dynamo_backend_rejects_calib_that_does_not_fit_the_graph():
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="ConfigError: .* calib batches"):
        torch.compile(_Mlp().eval(), backend="qcompile",
                      options={"calib": [(torch.randn(4, 64), torch.randn(4, 64))]})(torch.randn(4, 64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_module_uses_tinygemm():
    factory, calib = MODELS["llama"]
    batches = [{k: v.cuda() for k, v in b.items()} for b in calib()]
    qm = qcompile.compile(factory().cuda(), batches, "w4a16-rtn", progress=False)
    packed, reference = qm.to_torch(packed=True), qm.to_torch(packed=False)
    assert INT4PACK_LINEAR in [n.target for n in packed.graph.nodes if n.op == "call_function"]
    compiled = torch.compile(packed)
    for batch in batches:
        expected = logits(reference(**batch))
        assert relative_error(expected, logits(packed(**batch))) < 1e-3   # tinygemm computes in bfloat16
        assert relative_error(expected, logits(compiled(**batch))) < 1e-3
