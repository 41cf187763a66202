import torch

import qcompile
from qcompile import primitives as P
from qcompile.ir import META_ROLE, ROLE_ACTIVATION_QDQ, ROLE_WEIGHT_DEQUANT, fetch_attr
from qcompile.ops import DEQUANTIZE_WEIGHT, QUANTIZE_DEQUANTIZE
from tests.conftest import MODELS, user_net


def test_folded_graph_holds_integer_codes():
    factory, calib = MODELS["resnet18"]
    model = factory()
    qm = qcompile.compile(model, calib(), "w4a16-rtn", progress=False)
    gm = qm.graph_module
    dequant = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == DEQUANTIZE_WEIGHT]
    assert len(dequant) == 21 and all(n.meta[META_ROLE] == ROLE_WEIGHT_DEQUANT for n in dequant)
    float_weights = [name for name, p in gm.named_parameters() if name.endswith("weight") and p.dim() > 1]
    assert float_weights == [], "quantized layers keep no float weight"
    for node in dequant:
        codes = fetch_attr(gm, node.args[0].target)
        assert codes.dtype == torch.uint8
        rows = node.args[6][0]
        cols = codes.numel() * 2 // rows  # two 4-bit codes a byte
        assert codes.shape == (rows, cols // 2)
    # report bytes are the packed bytes
    report = qm.report()
    params = qm.quant_params()
    for row in report.layers:
        assert row.bytes == params[row.weight].nbytes()
    assert report.model_bytes == qm.nbytes() < report.model_float_bytes / 6


def test_dequantized_weights_equal_the_reference():
    model = user_net()
    qm = qcompile.compile(model, [torch.randn(2, 3, 16, 16)], "w4a16-rtn", progress=False)
    params = qm.quant_params()
    assert set(params) == {"stem.weight", "conv_a.weight", "conv_b.weight", "projection", "head.weight"}
    state = dict(model.named_parameters())
    for target, p in params.items():
        weight = state[target]
        axis = 1 if target == "projection" else 0
        matrix = P.weight_matrix(weight.detach(), axis)
        scale, zero = P.weight_scale_zero_point(matrix, 4, False, -1)
        reference = P.weight_from_matrix(P.dequantize_weight(P.quantize_weight(matrix, scale, zero, 4, False),
                                                             scale, zero), axis, weight.shape)
        assert torch.equal(p.dequantize(), reference)
        layer = next(n for n in qm.graph_module.graph.nodes if n.target == DEQUANTIZE_WEIGHT
                     and n.meta["qcompile_weight"] == target)
        assert torch.equal(DEQUANTIZE_WEIGHT(*[fetch_attr(qm.graph_module, a.target) for a in layer.args[:3]],
                                             *layer.args[3:]), reference)


def test_w8a8_inserts_one_qdq_per_activation():
    factory, calib = MODELS["llama"]
    qm = qcompile.compile(factory(), calib(), "w8a8-rtn", progress=False)
    qdq = [n for n in qm.graph_module.graph.nodes if n.target == QUANTIZE_DEQUANTIZE]
    assert all(n.meta[META_ROLE] == ROLE_ACTIVATION_QDQ for n in qdq)
    # q/k/v share one input and gate/up share one: 4 quantized activations a layer, + lm_head
    assert len(qdq) == 2 * 4 + 1
    for node in qdq:
        scale = fetch_attr(qm.graph_module, node.args[1].target)
        assert scale.numel() == 1 and scale > 0
        assert all(user.target in (DEQUANTIZE_WEIGHT, torch.ops.aten.linear.default) for user in node.users)


def test_rtn_mse_observer_lowers_weight_error():
    model = user_net()
    layer_error = {}
    for observer in ("minmax", "mse"):
        config = qcompile.QuantConfig(weight=qcompile.QuantSpec(bits=3, symmetric=False, observer=observer))
        qm = qcompile.compile(model, [torch.randn(2, 3, 16, 16)], config, progress=False)
        layer_error[observer] = {row.path: row.weight_error for row in qm.report().layers}
    for path, error in layer_error["mse"].items():
        assert error <= layer_error["minmax"][path] * 1.0001
    assert sum(layer_error["mse"].values()) < sum(layer_error["minmax"].values())


def test_rtn_report_before_equals_after():
    qm = qcompile.compile(user_net(), [torch.randn(2, 3, 16, 16)], "w4a16-rtn", progress=False)
    for row in qm.report().layers:
        assert row.weight_error == row.weight_error_rtn > 0


def test_folded_graph_survives_torch_export():
    factory, calib = MODELS["llama"]
    batches = calib()
    qm = qcompile.compile(factory(), batches, "w8a8-rtn", progress=False)
    exported = torch.export.export(qm, (), batches[0], strict=False)
    targets = {node.target for node in exported.graph.nodes if node.op == "call_function"}
    assert DEQUANTIZE_WEIGHT in targets and QUANTIZE_DEQUANTIZE in targets
    assert torch.equal(exported.module()(**batches[0]).logits, qm(**batches[0]).logits)


def test_tied_embedding_stays_float_when_only_the_head_is_quantized():
    factory, calib = MODELS["gpt2"]
    model, batches = factory(), calib()
    qm = qcompile.compile(model, batches, "w4a16-rtn", progress=False)
    embedding = next(n for n in qm.graph_module.graph.nodes if n.target == torch.ops.aten.embedding.default)
    table = embedding.args[0]
    assert table.op == "get_attr" and fetch_attr(qm.graph_module, table.target).dtype == torch.float32
    assert any("tied embedding" in note for note in qm.report().notes)
