"""compile() end to end on every model the spine supports."""
import inspect
import json

import pytest
import torch

import qcompile
from qcompile import primitives as P
from qcompile import QuantConfig, QuantSpec
from qcompile.errors import ConfigError, SerializationError
from tests.conftest import MODELS, call, relative_error, user_net


@pytest.fixture(scope="module")
def quantized():
    """name -> (model, calib, {preset: QuantizedModel}) for W8 and W4, built once."""
    results = {}
    for name, (factory, calib) in MODELS.items():
        model, batches = factory(), calib()
        results[name] = (model, batches, {preset: qcompile.compile(model, batches, preset, progress=False)
                                          for preset in ("w8a16-rtn", "w4a16-rtn")})
    return results


@pytest.mark.parametrize("name", sorted(MODELS))
def test_w8_close_to_float_and_w4_degrades_gracefully(quantized, name):
    model, batches, by_preset = quantized[name]
    for batch in batches:
        reference = call(model, batch)
        w8 = relative_error(reference, call(by_preset["w8a16-rtn"], batch))
        w4 = relative_error(reference, call(by_preset["w4a16-rtn"], batch))
        assert w8 < 1e-2, f"{name}: W8 relative error {w8}"
        assert w8 < w4 < 0.5, f"{name}: W4 relative error {w4} (W8 {w8})"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_report_reflects_the_codes(quantized, name):
    _, _, by_preset = quantized[name]
    w8, w4 = by_preset["w8a16-rtn"].report(), by_preset["w4a16-rtn"].report()
    assert w4.model_bytes < w8.model_bytes < w8.model_float_bytes
    for row in w4.layers:
        if row.status == "quantized":
            elements = row.float_bytes // 4
            rows = by_preset["w4a16-rtn"].quant_params()[row.weight].weight_codes.shape[0]
            # packed 4-bit codes + one float32 scale and one uint8 zero point per output channel
            assert row.bits == 4 and row.bytes == P.packed_nbytes(rows, elements // rows, 4) + rows * 5
    text = str(w4)
    assert "quantized" in text and "smaller" in text


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_load_round_trips_bit_exactly(quantized, name, tmp_path):
    _, batches, by_preset = quantized[name]
    qm = by_preset["w4a16-rtn"]
    qm.save(tmp_path)
    loaded = qcompile.load(tmp_path)
    for batch in batches:
        assert torch.equal(call(loaded, batch), call(qm, batch))
    assert loaded.nbytes() == qm.nbytes()
    assert loaded.config == qm.config
    assert str(loaded.report()) == str(qm.report())
    for target, params in qm.quant_params().items():
        assert torch.equal(loaded.quant_params()[target].weight_codes, params.weight_codes)


def test_positional_inputs_can_be_given_by_keyword(quantized):
    model, batches, by_preset = quantized["user_net"]
    quantized_model, batch = by_preset["w4a16-rtn"], batches[0]
    assert isinstance(batch, torch.Tensor)
    name = next(iter(inspect.signature(model.forward).parameters))
    assert torch.equal(quantized_model(**{name: batch}), quantized_model(batch))
    with pytest.raises(TypeError, match="unexpected keyword inputs \\['images'\\]"):
        quantized_model(images=batch)


def test_w8a8_close_to_float():
    factory, calib = MODELS["resnet18"]
    model, batches = factory(), calib()
    qm = qcompile.compile(model, batches, "w8a8-rtn", progress=False)
    assert relative_error(call(model, batches[0]), call(qm, batches[0])) < 1e-2


def test_layer_granularity_and_overrides():
    factory, calib = MODELS["llama"]
    config = QuantConfig(weight=QuantSpec(bits=4, group_size=32, symmetric=False), granularity="layer",
                         overrides={"lm_head": None})
    qm = qcompile.compile(factory(), calib(), config, progress=False)
    rows = {row.path: row for row in qm.report().layers}
    assert rows["lm_head"].status.startswith("float") and rows["lm_head"].bytes == rows["lm_head"].float_bytes
    assert rows["model.layers.0.mlp.down_proj"].group_size == 32
    assert len(qm.report().blocks) == 14


def test_rounding_registry():
    assert "rtn" in qcompile.rounding.available()
    with pytest.raises(ConfigError, match="unknown rounding method 'magic'.*rtn"):
        qcompile.compile(user_net(), [torch.randn(2, 3, 16, 16)], QuantConfig(method="magic"), progress=False)
    with pytest.raises(ConfigError, match="no option"):
        qcompile.compile(user_net(), [torch.randn(2, 3, 16, 16)], QuantConfig(method_options={"iters": 3}),
                         progress=False)


def test_dataloader_calibration():
    dataset = torch.utils.data.TensorDataset(torch.randn(10, 3, 16, 16))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)  # batches of 4, 4, 2; tuples of one tensor
    model = user_net()
    qm = qcompile.compile(model, loader, "w8a16-rtn", progress=False)
    x = torch.randn(3, 3, 16, 16)
    assert relative_error(model(x), qm(x)) < 1e-2


def corrupt(path, how):
    graph = path / "graph.json"
    tensors = path / "tensors.safetensors"
    if how == "truncated":
        tensors.write_bytes(tensors.read_bytes()[:-100])
    elif how == "tampered":
        data = bytearray(tensors.read_bytes())
        data[-1] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif how == "version":
        document = json.loads(graph.read_text())
        document["format_version"] = 99
        graph.write_text(json.dumps(document))
    elif how == "json":
        graph.write_text(graph.read_text()[:200])
    elif how == "unsafe_target":
        document = json.loads(graph.read_text())
        node = next(n for n in document["nodes"] if n["op"] == "call_function")
        node["target"] = {"function": "builtins", "name": "eval"}
        graph.write_text(json.dumps(document))
    elif how == "missing":
        tensors.unlink()


@pytest.mark.parametrize("how,message", [("truncated", "checksum"), ("tampered", "checksum"),
                                         ("version", "format version 99"), ("json", "not valid JSON"),
                                         ("unsafe_target", "refusing"), ("missing", "not a saved qcompile model")])
def test_load_refuses_bad_files(tmp_path, how, message):
    qm = qcompile.compile(user_net(), [torch.randn(2, 3, 16, 16)], "w8a16-rtn", progress=False)
    qm.save(tmp_path)
    corrupt(tmp_path, how)
    with pytest.raises(SerializationError, match=message):
        qcompile.load(tmp_path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["resnet18", "llama"])
def test_compile_on_cuda(name):
    factory, calib = MODELS[name]
    device = torch.device("cuda")
    model = factory().to(device)
    batches = [{k: v.to(device) for k, v in b.items()} if isinstance(b, dict) else b.to(device) for b in calib()]
    qm = qcompile.compile(model, batches, "w8a8-rtn", progress=False)
    assert all(t.device.type == "cuda" for t in qm.graph_module.buffers())
    assert relative_error(call(model, batches[0]), call(qm, batches[0])) < 1e-2


def test_an_unexpected_failure_inside_a_pass_is_a_named_internal_error(monkeypatch):
    from qcompile.errors import InternalError
    from qcompile.rounding import layerwise

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch deep inside torch")
    monkeypatch.setattr(layerwise, "_input_rows", broken)
    with pytest.raises(InternalError, match=r"quantizing UserNet failed in qcompile/rounding/layerwise.py:\d+ "
                                            r"\(run_node\) with RuntimeError: shape mismatch") as caught:
        qcompile.compile(user_net(), [torch.randn(2, 3, 16, 16)], "w4a16-gptq", progress=False)
    assert isinstance(caught.value.__cause__, RuntimeError)
