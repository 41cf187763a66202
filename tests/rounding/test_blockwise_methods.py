"""AdaRound, BRECQ/QDrop and SignRound: against RTN on small blocks, folding, determinism, knobs."""
import pytest
import torch

import qcompile
from qcompile import QuantConfig, QuantSpec
from qcompile.errors import ConfigError
from qcompile.ir import QuantLayer
from qcompile.quantizers import ActivationQuantizer, WeightQuantizer, rectified_sigmoid
from qcompile.rounding import blockwise
from tests.conftest import MODELS, call, relative_error

METHODS = ("adaround", "brecq", "signround")


class ConvResidualBlock(torch.nn.Module):
    """conv-bn-relu-conv with a residual, as in a ResNet basic block."""

    def __init__(self, channels=16):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class TransformerLayer(torch.nn.Module):
    """A pre-norm transformer layer: attention (q/k/v/o) and an MLP, with residuals."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))
        self.up, self.down = torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).reshape(b, t, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attention = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


def conv_block():
    torch.manual_seed(0)
    model = torch.nn.Sequential(ConvResidualBlock()).eval()  # in a container: one reconstruction block
    with torch.no_grad():
        model[0].bn1.running_mean.uniform_(-0.2, 0.2)
        model[0].bn1.running_var.uniform_(0.5, 2.0)
    return model, correlated_images(16)


def correlated_images(channels, batches=4):
    """Inputs correlated across channels and neighbouring pixels, like activations of a real network
    (with i.i.d. inputs nearest rounding is already near-optimal for a layer)."""
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(channels, channels, generator=generator) / channels ** 0.5 + torch.eye(channels)
    images = []
    for _ in range(batches):
        x = torch.einsum("dc,nchw->ndhw", mixing, torch.randn(16, channels, 8, 8, generator=generator))
        images.append(torch.nn.functional.avg_pool2d(x, 3, 1, 1))
    return images


def transformer_layer():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(TransformerLayer()).eval()
    return model, [torch.randn(8, 12, 32, generator=generator) for _ in range(4)]


def output_error(model, quantized, batches):
    return sum(relative_error(call(model, b), call(quantized, b)) for b in batches) / len(batches)


def config(method, bits, **options):
    return QuantConfig(weight=QuantSpec(bits=bits, symmetric=False), method=method,
                       method_options={"iters": 150, **options})


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("build", [conv_block, transformer_layer], ids=["conv_residual", "transformer_layer"])
def test_lower_block_error_than_rtn(build, method, bits):
    model, batches = build()
    rtn = qcompile.compile(model, batches, QuantConfig(weight=QuantSpec(bits=bits, symmetric=False)), progress=False)
    learned = qcompile.compile(model, batches, config(method, bits), progress=False)
    assert len(learned.report().blocks) == 1
    assert output_error(model, learned, batches) < 0.8 * output_error(model, rtn, batches)


@pytest.mark.parametrize("method", METHODS)
def test_folds_to_valid_codes_and_is_deterministic(method):
    model, batches = transformer_layer()
    first = qcompile.compile(model, batches, config(method, 3, iters=40), progress=False)
    second = qcompile.compile(model, batches, config(method, 3, iters=40), progress=False)
    for name, params in first.quant_params().items():
        params.validate(name)
        other = second.quant_params()[name]
        assert torch.equal(params.weight_codes, other.weight_codes) and torch.equal(params.scale, other.scale)


def random_quantizer(rounding, learn, symmetric=False, group_size=8):
    torch.manual_seed(0)
    weight = torch.randn(12, 16)
    layer = QuantLayer("linear", "linear", "layer", "layer.weight", 0, 1, 0, (12, 16), None)
    quantizer = WeightQuantizer(weight, layer, QuantSpec(bits=3, group_size=group_size, symmetric=symmetric),
                                rounding, learn)
    with torch.no_grad():
        for param in quantizer.parameters():
            param.add_(torch.rand_like(param) * 0.6 - 0.3)
    quantizer.project_()
    return weight, quantizer


@pytest.mark.parametrize("learn", ["rounding", "scale", "clip"])
@pytest.mark.parametrize("rounding", ["sigmoid", "offset"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_hard_forward_is_what_folds(rounding, learn, symmetric):
    _, quantizer = random_quantizer(rounding, learn, symmetric)
    params = quantizer.quant_params()
    params.validate("layer.weight")
    assert torch.equal(quantizer(hard=True), params.dequantize())


def test_adaround_starts_at_the_float_weight():
    weight, _ = random_quantizer("sigmoid", "rounding")
    layer = QuantLayer("linear", "linear", "layer", "layer.weight", 0, 1, 0, (12, 16), None)
    quantizer = WeightQuantizer(weight, layer, QuantSpec(bits=4, symmetric=True), "sigmoid", "rounding")
    scale, zero_point = quantizer.scale_zero_point()
    unclipped = (weight / scale + zero_point).abs() <= 7  # the grid's largest codes may clip
    assert unclipped.float().mean() > 0.9
    assert torch.allclose(quantizer()[unclipped], weight[unclipped], atol=1e-5)
    assert rectified_sigmoid(torch.tensor([-10.0, 10.0])).tolist() == [0.0, 1.0]


def test_signround_offset_at_zero_is_nearest_rounding():
    model, batches = transformer_layer()
    rtn = qcompile.compile(model, batches, QuantConfig(weight=QuantSpec(bits=3, symmetric=False)), progress=False)
    untrained = qcompile.compile(model, batches, config("signround", 3, iters=1, lr=0.0), progress=False)
    for name, params in rtn.quant_params().items():
        assert torch.equal(params.weight_codes, untrained.quant_params()[name].weight_codes)


def test_learns_activation_steps_with_qdrop():
    model, batches = conv_block()
    activation = QuantSpec(bits=4, symmetric=False, granularity="tensor")
    observed = qcompile.compile(model, batches, QuantConfig(weight=QuantSpec(bits=4, symmetric=False),
                                                            activation=activation), progress=False)
    learned = qcompile.compile(model, batches, QuantConfig(
        weight=QuantSpec(bits=4, symmetric=False), activation=activation, method="brecq",
        method_options={"iters": 150, "qdrop": 0.5, "act_lr": 1e-3}), progress=False)
    assert output_error(model, learned, batches) < output_error(model, observed, batches)
    observed_scales = {n: b for n, b in observed.graph_module.named_buffers() if n.endswith("_act_scale")}
    learned_scales = {n: b for n, b in learned.graph_module.named_buffers() if n.endswith("_act_scale")}
    assert observed_scales.keys() == learned_scales.keys() and observed_scales
    assert any(not torch.equal(observed_scales[n], learned_scales[n]) for n in observed_scales)


def test_qdrop_keeps_float_values_in_training_only():
    from qcompile.ir import ActivationParams
    params = ActivationParams(scale=torch.tensor(0.5), zero_point=torch.tensor(0, dtype=torch.uint8), bits=2,
                              symmetric=False)
    quantizer = ActivationQuantizer(params, learn=True, drop_prob=0.5)
    x = torch.rand(1000) * 1.5
    quantized = quantizer.eval()(x)
    assert torch.equal(quantized, (x / 0.5).round().clamp(0, 3) * 0.5)
    mixed = quantizer.train()(x)
    kept = mixed == x
    assert 0.3 < kept.float().mean() < 0.7 and torch.equal(mixed[~kept], quantized[~kept])


@pytest.mark.parametrize("options,message", [
    ({"loss": "fisher"}, "loss"), ({"rounding": "floor"}, "rounding"), ({"iters": 0}, "iters"),
    ({"qdrop": 1.0}, "qdrop"), ({"optimizer": "sgd"}, "optimizer"), ({"steps": 3}, "steps")])
def test_bad_options_are_config_errors(options, message):
    model, batches = conv_block()
    with pytest.raises(ConfigError, match=message):
        qcompile.compile(model, batches, QuantConfig(weight=QuantSpec(bits=4), method="brecq",
                                                     method_options=options), progress=False)


@pytest.mark.parametrize("knobs", [
    {"loss": "layer", "rounding": "offset", "learn": "scale", "optimizer": "signsgd", "schedule": "linear"},
    {"loss": "block", "rounding": "sigmoid", "learn": "clip", "optimizer": "adam"},
    {"rounding": "offset", "keep_best": True, "qdrop": 0.3}])
def test_knob_combinations_run_and_beat_rtn(knobs):
    model, batches = transformer_layer()
    rtn = qcompile.compile(model, batches, QuantConfig(weight=QuantSpec(bits=3, symmetric=False)), progress=False)
    learned = qcompile.compile(model, batches, config("brecq", 3, **knobs), progress=False)
    assert output_error(model, learned, batches) < output_error(model, rtn, batches)


def test_squared_error_sums_features_and_averages_positions():
    produced = torch.ones(2, 3, 4, 5, requires_grad=True)
    target = torch.zeros(2, 3, 4, 5)
    assert blockwise.squared_error((produced,), (target,)).item() == pytest.approx(3.0)
    tokens = torch.ones(2, 7, 6, requires_grad=True)
    assert blockwise.squared_error((tokens,), (torch.zeros(2, 7, 6),)).item() == pytest.approx(6.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_runs_on_cuda_with_bf16_autocast(method):
    factory, calib = MODELS["llama"]
    model = factory().cuda()
    batches = [{k: v.cuda() for k, v in b.items()} for b in calib()]
    rtn = qcompile.compile(model, batches, QuantConfig(weight=QuantSpec(bits=3, symmetric=False)), progress=False)
    learned = qcompile.compile(model, batches, config(method, 3, amp=True), progress=False)
    assert all(t.device.type == "cuda" for t in learned.graph_module.buffers())
    assert output_error(model, learned, batches) < output_error(model, rtn, batches)
