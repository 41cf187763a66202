"""ONNX lowering: checked files that onnxruntime runs, matching the PyTorch quantized model, with
onnxruntime's fused integer kernels picked."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qcompile
from qcompile import QuantConfig, QuantSpec
from qcompile.errors import UnsupportedOpError
from tests.conftest import MODELS, call

# Group-wise 4-bit where every layer's input divides 32; per-channel for the layers that don't.
W4G32 = QuantConfig(weight=QuantSpec(bits=4, group_size=32, symmetric=False),
                    overrides={name: QuantSpec(bits=4, symmetric=False)
                               for name in ("conv1", "stem", "conv_a", "conv_b", "matmul", "patch_embed.proj", "conv_stem",
                                            "*conv_dw", "stem.0")})
WEIGHT_ONLY = {"w8a16": "w8a16-rtn", "w4a16": "w4a16-rtn", "w4g32": W4G32}
ACTIVATIONS = {"w8a8": "w8a8-rtn", "w8a8-static": "w8a8-static-rtn"}


def session(path, exact_matmul_nbits=False, optimized_path=None):
    options = ort.SessionOptions()
    if exact_matmul_nbits:  # MatMulNBits computes in fp32 instead of quantizing activations to int8
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if optimized_path:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, batch):
    names = [i.name for i in sess.get_inputs()]
    feeds = {k: v.numpy() for k, v in batch.items()} if isinstance(batch, dict) else {names[0]: batch.numpy()}
    return sess.run(None, feeds)[0]


def rms_relative(reference, value):
    reference, value = np.asarray(reference, dtype=np.float64), np.asarray(value, dtype=np.float64)
    return float(np.sqrt(((reference - value) ** 2).mean() / (reference ** 2).mean()))


def op_counts(path, tmp_path):
    optimized = tmp_path / "optimized.onnx"
    session(path, optimized_path=optimized)
    return collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)


GROUP_32_MODELS = ("gpt2", "llama", "resnet18", "user_net", "vit_tiny_patch16_224")  # others have 40- or 16-wide layers


@pytest.mark.parametrize("name,preset", [(name, preset) for name in sorted(MODELS) for preset in sorted(WEIGHT_ONLY)
                                         if preset != "w4g32" or name in GROUP_32_MODELS])
def test_weight_only_parity(name, preset, tmp_path):
    factory, calib = MODELS[name]
    model, batches = factory(), calib()
    qm = qcompile.compile(model, batches, WEIGHT_ONLY[preset], progress=False)
    path = tmp_path / "model.onnx"
    qm.export_onnx(path)  # runs onnx.checker with full_check
    exact, fast = session(path, exact_matmul_nbits=True), session(path)
    for batch in batches:  # batches differ in batch size (and sequence length): dynamic axes
        reference = call(qm, batch).detach().numpy()
        assert rms_relative(reference, run(exact, batch)) < 1e-5
        assert rms_relative(reference, run(fast, batch)) < 3e-2


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("preset", sorted(ACTIVATIONS))
def test_quantized_activation_parity(name, preset, tmp_path):
    """Integer kernels round intermediate values their own way, so the check is that the ONNX model
    is as close to float as the PyTorch quantized model is (and exact where ORT keeps float math)."""
    factory, calib = MODELS[name]
    model, batches = factory(), calib()
    qm = qcompile.compile(model, batches, ACTIVATIONS[preset], progress=False)
    path = tmp_path / "model.onnx"
    qm.export_onnx(path)
    sess = session(path)
    for batch in batches:
        reference, quantized = call(model, batch).detach().numpy(), call(qm, batch).detach().numpy()
        deployed = run(sess, batch)
        assert rms_relative(reference, deployed) <= 1.5 * rms_relative(reference, quantized) + 1e-3


def test_int4_weights_are_4bit_initializers_and_fuse_to_matmul_nbits(tmp_path):
    factory, calib = MODELS["llama"]
    qm = qcompile.compile(factory(), calib(), W4G32, progress=False)
    path = tmp_path / "llama.onnx"
    model = qm.export_onnx(path)
    four_bit = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT4]
    assert len(four_bit) == 2 * 15  # codes and zero points of the 15 linear layers
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
    assert len(blocked) == 15
    assert op_counts(path, tmp_path)["MatMulNBits"] == 15


def test_static_w8a8_cnn_runs_integer_kernels(tmp_path):
    factory, calib = MODELS["resnet18"]
    qm = qcompile.compile(factory(), calib(), "w8a8-static-rtn", progress=False)
    path = tmp_path / "resnet.onnx"
    qm.export_onnx(path)
    counts = op_counts(path, tmp_path)
    assert counts["QLinearConv"] == 20 and counts["QLinearAdd"] == 8
    assert counts["Conv"] == 0 and counts["FusedConv"] == 0


def test_w8a8_llm_runs_integer_matmuls(tmp_path):
    factory, calib = MODELS["llama"]
    qm = qcompile.compile(factory(), calib(), "w8a8-rtn", progress=False)
    path = tmp_path / "llama.onnx"
    qm.export_onnx(path)
    assert op_counts(path, tmp_path)["MatMulIntegerToFloat"] == 15


def test_unrepresentable_activation_bits_raise(tmp_path):
    config = QuantConfig(weight=QuantSpec(bits=8), activation=QuantSpec(bits=6, symmetric=False, granularity="tensor"))
    qm = qcompile.compile(MODELS["user_net"][0](), MODELS["user_net"][1](), config, progress=False)
    with pytest.raises(UnsupportedOpError, match="8-bit activations"):
        qm.export_onnx(tmp_path / "m.onnx")
    with pytest.raises(UnsupportedOpError, match="opset"):
        qm.export_onnx(tmp_path / "m.onnx", opset=17)


def test_export_after_load(tmp_path):
    factory, calib = MODELS["gpt2"]
    batches = calib()
    qm = qcompile.compile(factory(), batches, W4G32, progress=False)
    qm.save(tmp_path / "saved")
    loaded = qcompile.load(tmp_path / "saved")
    loaded.export_onnx(tmp_path / "gpt2.onnx")
    out = run(session(tmp_path / "gpt2.onnx", exact_matmul_nbits=True), batches[1])
    assert rms_relative(call(qm, batches[1]).detach().numpy(), out) < 1e-5


def test_quantized_embedding_lowers_to_gather_block_quantized(tmp_path):
    factory, calib = MODELS["llama"]
    model, batches = factory(), calib()
    four_bit = QuantSpec(bits=4, group_size=32, symmetric=False)
    qm = qcompile.compile(model, batches, QuantConfig(weight=four_bit, overrides={"model.embed_tokens": four_bit}),
                          progress=False)
    rows = {row.path: row for row in qm.report().layers}
    assert rows["model.embed_tokens"].status == "quantized" and rows["model.embed_tokens"].bits == 4
    path = tmp_path / "llama.onnx"
    exported = qm.export_onnx(path)
    gather = next(n for n in exported.graph.node if n.op_type == "GatherBlockQuantized")
    table = next(t for t in exported.graph.initializer if t.name == gather.input[0])
    assert table.data_type == onnx.TensorProto.UINT4
    assert op_counts(path, tmp_path)["GatherBlockQuantized"] == 1
    exact = session(path, exact_matmul_nbits=True)
    for batch in batches:
        assert rms_relative(call(qm, batch).detach().numpy(), run(exact, batch)) < 1e-5
