import pytest
import torch
from torch import fx

import qcompile
from qcompile import QuantConfig, QuantSpec
from qcompile.errors import ConfigError, InvalidModelError
from qcompile.ir import normalize_batch
from qcompile.passes.capture import capture, flatten_inputs
from qcompile.passes.partition import partition
from tests.conftest import MODELS, user_net


def captured(name):
    factory, calib = MODELS[name]
    batches = calib()
    return capture(factory(), *normalize_batch(batches[0])), batches


def run_blocks_in_sequence(gm, blocks, batch):
    """Run the model block by block (each block's GraphModule alone) and return the graph outputs."""
    env = dict(zip([n.name for n in gm.graph.nodes if n.op == "placeholder"],
                   flatten_inputs(gm, *normalize_batch(batch), 0)))
    for block in blocks:
        outputs = block.graph_module(*[env[name] for name in block.inputs])
        env.update(zip(block.outputs, outputs))
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    return fx.map_arg(output_node.args[0], lambda n: env[n.name])


def test_resnet_blocks_are_residual_blocks():
    gm, _ = captured("resnet18")
    result = partition(gm, QuantConfig())
    assert [b.name for b in result.blocks] == ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                               "layer3.1", "layer4.0", "layer4.1", "fc"]
    assert len(result.layers) == 21
    assert [len(b.layers) for b in result.blocks] == [1, 2, 2, 3, 2, 3, 2, 3, 2, 1]
    assert all(len([o for o in b.outputs if o in result.dependent]) == 1 for b in result.blocks)


@pytest.mark.parametrize("name,layer_blocks", [("llama", ["model.layers.0", "model.layers.1", "lm_head"]),
                                               ("gpt2", ["transformer.h.0", "transformer.h.1", "lm_head"])])
def test_transformer_layer_is_one_block(name, layer_blocks):
    gm, _ = captured(name)
    result = partition(gm, QuantConfig())
    assert [b.name for b in result.blocks] == layer_blocks
    # masks / rotary tables are computed once and shared: the only quantization-dependent value
    # crossing a cut is the residual stream
    for block in result.blocks:
        assert len([name for name in block.inputs if name in result.dependent]) <= 1


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_blocks_run_alone_and_compose_to_the_model(name, granularity):
    gm, batches = captured(name)
    result = partition(gm, QuantConfig(granularity=granularity))
    if granularity == "layer":
        assert all(len(b.layers) == 1 for b in result.blocks)
        assert len(result.blocks) == len([layer for layer in result.layers if layer.quantized])
    for batch in batches:
        reference = gm(*normalize_batch(batch)[0], **normalize_batch(batch)[1])
        reference = reference.logits if hasattr(reference, "logits") else reference
        composed = run_blocks_in_sequence(gm, result.blocks, batch)
        composed = composed[0] if isinstance(composed, (tuple, list)) else composed
        torch.testing.assert_close(composed, reference)


def test_matmul_with_parameter_is_quantizable():
    gm = capture(user_net(), (torch.randn(2, 3, 16, 16),), {})
    layers = {layer.module_path: layer for layer in partition(gm, QuantConfig()).layers}
    assert layers["head"].op == "linear"
    matmul = next(layer for layer in layers.values() if layer.op == "matmul")
    assert matmul.weight == "projection" and matmul.axis == 1


class Unsupported(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(3, 4, 2, stride=2)
        self.normed = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 4))
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        x = self.up(x).mean(dim=(2, 3))
        return self.head(self.normed(x))


def test_unsupported_patterns_stay_float_with_a_reason():
    gm = capture(Unsupported().eval(), (torch.randn(2, 3, 4, 4),), {})
    with pytest.warns(UserWarning, match="stays float"):
        result = partition(gm, QuantConfig())
    reasons = {layer.module_path: layer.float_reason for layer in result.layers}
    assert "transposed" in reasons["up"]
    assert "computed in the graph" in next(r for p, r in reasons.items() if p.startswith("normed"))
    assert reasons["head"] is None


def test_overrides_and_unmatched_override_warning():
    gm, _ = captured("llama")
    config = QuantConfig(weight=QuantSpec(bits=4), overrides={"lm_head": None, "*.mlp.*": QuantSpec(bits=8),
                                                               "nothing.*": None})
    with pytest.warns(UserWarning, match="'nothing.\\*' matches no quantizable layer"):
        result = partition(gm, config)
    layers = {layer.module_path: layer for layer in result.layers}
    assert layers["lm_head"].spec is None and "override" in layers["lm_head"].float_reason
    assert layers["model.layers.0.mlp.up_proj"].spec.bits == 8
    assert layers["model.layers.0.self_attn.q_proj"].spec.bits == 4
    assert result.blocks[-1].name == "model.layers.1"


def test_group_size_must_divide_the_input_dim():
    gm, _ = captured("resnet18")
    with pytest.raises(ConfigError, match="'conv1'.*147.*group_size=128"):
        partition(gm, QuantConfig(weight=QuantSpec(bits=4, group_size=128)))


def test_no_quantizable_op_is_an_error():
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Flatten())
    gm = capture(model, (torch.randn(2, 3),), {})
    with pytest.raises(InvalidModelError, match="no quantizable op"):
        partition(gm, QuantConfig())


def test_nan_weights_are_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    gm = capture(model, (torch.randn(2, 3),), {})
    with pytest.raises(InvalidModelError, match="'0.weight'.*NaN"):
        partition(gm, QuantConfig())


def test_embeddings_stay_float_unless_an_override_names_them():
    gm, _ = captured("llama")
    layers = {layer.module_path: layer for layer in partition(gm, QuantConfig(weight=QuantSpec(bits=4))).layers}
    embedding = layers["model.embed_tokens"]
    assert embedding.op == "embedding" and embedding.spec is None and "override" in embedding.float_reason
    config = QuantConfig(weight=QuantSpec(bits=4), overrides={"model.embed_tokens": QuantSpec(bits=8)})
    layers = {layer.module_path: layer for layer in partition(gm, config).layers}
    assert layers["model.embed_tokens"].spec.bits == 8


def test_inf_weights_are_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with torch.no_grad():
        model[0].weight[1, 2] = float("inf")
    with pytest.raises(InvalidModelError, match="'0.weight'.*NaN or Inf"):
        qcompile.compile(model, [torch.randn(2, 3)], progress=False)


class IntegerLookup(torch.nn.Module):
    """Integer tensors only: an index table and integer arithmetic."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(10) * 3)

    def forward(self, x):
        return self.table[x] * 2 + x


class IntegerMatmul(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randint(-5, 5, (4, 3)), requires_grad=False)

    def forward(self, x):
        return x @ self.weight


def test_integer_only_models_are_refused_or_kept_float():
    with pytest.raises(InvalidModelError, match="no quantizable op"):
        qcompile.compile(IntegerLookup(), [torch.randint(0, 10, (2, 5))], progress=False)
    model = IntegerMatmul()
    with pytest.warns(UserWarning, match="no layer is quantized"):
        qm = qcompile.compile(model, [torch.randint(0, 10, (2, 4))], progress=False)
    row, = qm.report().layers
    assert row.status == "float: its weight is not a floating-point tensor"
    x = torch.randint(0, 10, (3, 4))
    assert torch.equal(qm(x), model(x))
