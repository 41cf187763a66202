"""The power-exponent grid (NUPES) through primitives, every rounding method, fold, ONNX and torch lowering,
and dense code packing."""
import dataclasses

import pytest
import torch

import qcompile
from qcompile import QuantConfig, QuantSpec
from qcompile import primitives as P
from qcompile.errors import ConfigError
from qcompile.ir import QuantLayer
from qcompile.ops import DEQUANTIZE_WEIGHT, PACKED_LINEAR
from qcompile.quantizers import WeightQuantizer
from qcompile.rounding import comq, gptq
from qcompile.rounding.layerwise import layer_objective
from qcompile.rounding.rtn import round_to_nearest
from tests.conftest import MODELS, call, relative_error
from tests.passes.test_lower_onnx import rms_relative, run, session
from tests.rounding.test_layerwise_methods import correlated_layer


def heavy_tailed(rows=64, cols=256, seed=0):
    """Student-t (3 degrees of freedom) weights: a bell with heavy tails, as in trained LLM layers."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, cols)) / 10


def linear_layer(weight):
    return QuantLayer(node="linear", op="linear", module_path="fc", weight="fc.weight", input_index=0,
                      weight_index=1, axis=0, weight_shape=tuple(weight.shape), spec=None)


@pytest.mark.parametrize("bits,symmetric,group_size,observer", [(4, False, -1, "minmax"), (3, True, 32, "minmax"),
                                                                (2, False, 16, "mse"), (8, True, -1, "mse")])
def test_exponent_one_is_the_uniform_grid_bit_for_bit(bits, symmetric, group_size, observer):
    weight = heavy_tailed()
    layer = linear_layer(weight)
    uniform = QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size, observer=observer)
    power = dataclasses.replace(uniform, grid="power", exponent=1.0)
    a, b = round_to_nearest(weight, layer, uniform), round_to_nearest(weight, layer, power)
    assert b.exponent == 1.0
    for field in ("weight_codes", "scale", "zero_point"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(a.dequantize(), b.dequantize())
    # and the general formula with a = 1 (no shortcut) gives the same floats
    scale, zero = P.expand_groups(a.scale, *weight.shape), P.expand_groups(a.zero_point, *weight.shape)
    general = P.dequantize(a.weight_codes, scale, zero, torch.tensor(1.0))
    assert torch.equal(general, a.dequantize())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_searched_exponent_beats_uniform_on_heavy_tailed_weights(bits, observer):
    weight = heavy_tailed()
    layer = linear_layer(weight)
    uniform = QuantSpec(bits=bits, symmetric=False, observer=observer)
    searched = round_to_nearest(weight, layer, dataclasses.replace(uniform, grid="power"))
    assert searched.exponent < 1.0
    error_uniform = relative_error(weight, round_to_nearest(weight, layer, uniform).dequantize())
    assert relative_error(weight, searched.dequantize()) < 0.8 * error_uniform


def test_search_never_loses_to_uniform():
    for seed in range(5):
        weight = torch.rand(16, 64, generator=torch.Generator().manual_seed(seed)) - 0.5   # uniform: no tails
        layer = linear_layer(weight)
        uniform = QuantSpec(bits=3, symmetric=False)
        searched = round_to_nearest(weight, layer, dataclasses.replace(uniform, grid="power"))
        assert relative_error(weight, searched.dequantize()) <= relative_error(
            weight, round_to_nearest(weight, layer, uniform).dequantize())


def test_nearest_grid_code_is_the_nearest_dequantized_value():
    values = torch.linspace(-1.2, 1.2, 401)
    scale, zero = torch.tensor(0.11), torch.tensor(7.0)
    for exponent in (0.4, 0.7, 1.0, 1.6):
        codes = P.nearest_grid_code(values, scale, zero, 0, 15, exponent)
        grid = P.dequantize(torch.arange(16.0), scale, zero, exponent)
        best = (grid[None, :] - values[:, None]).abs().min(dim=1).values
        assert torch.allclose((P.dequantize(codes, scale, zero, exponent) - values).abs(), best, atol=1e-6)


@pytest.mark.parametrize("solve,defaults", [(gptq.gptq_solve, gptq.DEFAULTS), (comq.comq_solve, comq.DEFAULTS)],
                         ids=["gptq", "comq"])
@pytest.mark.parametrize("exponent", [0.5, 0.75])
def test_layerwise_methods_beat_rtn_on_the_power_grid(solve, defaults, exponent):
    weight, gram = correlated_layer()
    spec = QuantSpec(bits=3, symmetric=False, group_size=32, grid="power", exponent=exponent)
    rtn = round_to_nearest(weight, linear_layer(weight), spec)
    solution = solve(weight, gram, spec, defaults, exponent)
    ours = P.dequantize_weight(solution.codes, solution.scale, solution.zero_point, exponent)
    assert layer_objective(weight, ours, gram) < 0.8 * layer_objective(weight, rtn.dequantize(), gram)
    if solve is comq.comq_solve:  # exact coordinate steps: the objective never increases
        assert all(b <= a * (1 + 1e-5) for a, b in zip(solution.objective, solution.objective[1:]))


def test_learned_exponent_gets_gradients_and_moves():
    weight = heavy_tailed(32, 64)
    spec = QuantSpec(bits=3, symmetric=False, grid="power", exponent="learned")
    quantizer = WeightQuantizer(weight, linear_layer(weight), spec, rounding="offset", learn="clip")
    start = float(quantizer.exponent.detach())
    x = torch.randn(128, 64)
    loss = (x @ quantizer().t() - x @ weight.t()).pow(2).mean()
    loss.backward()
    assert quantizer.exponent.grad is not None and torch.isfinite(quantizer.exponent.grad)
    assert quantizer.exponent.grad != 0
    qm = qcompile.compile(torch.nn.Sequential(torch.nn.Linear(64, 32)).eval(), [x[:64], x[64:]],
                          QuantConfig(weight=spec, method="signround", method_options={"iters": 40}), progress=False)
    row = qm.report().layers[0]
    assert row.exponent != pytest.approx(start) and 0.1 <= row.exponent <= 2.0
    assert list(qm.quant_params().values())[0].exponent == row.exponent


def test_learned_exponent_needs_a_gradient_method():
    spec = QuantSpec(bits=4, grid="power", exponent="learned")
    with pytest.raises(ConfigError, match="exponent='learned'.*use exponent='search'"):
        qcompile.compile(torch.nn.Linear(8, 4).eval(), [torch.randn(2, 8)], QuantConfig(weight=spec, method="gptq"),
                         progress=False)


POWER = QuantConfig(weight=QuantSpec(bits=4, group_size=16, symmetric=False, grid="power"),
                    overrides={"stem": QuantSpec(bits=8, grid="power", exponent=0.6)})


@pytest.mark.filterwarnings("ignore:override .stem. matches no quantizable layer")
@pytest.mark.parametrize("model_name", ["user_net", "llama"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_power_grid_through_onnx_and_torch(model_name, method, tmp_path):
    factory, calib = MODELS[model_name]
    batches = calib()
    model = factory()
    uniform = qcompile.compile(model, batches, dataclasses.replace(POWER, weight=QuantSpec(
        bits=4, group_size=16, symmetric=False), method=method, overrides={"stem": QuantSpec(bits=8)}), progress=False)
    qm = qcompile.compile(model, batches, dataclasses.replace(POWER, method=method), progress=False)
    exponents = [row.exponent for row in qm.report().layers if row.status == "quantized"]
    assert any(a != 1.0 for a in exponents)
    qm.export_onnx(tmp_path / "power.onnx")
    exact = session(tmp_path / "power.onnx", exact_matmul_nbits=True)
    packed, reference = qm.to_torch(packed=True), qm.to_torch(packed=False)
    targets = [n.target for n in packed.graph.nodes if n.op == "call_function"]
    assert DEQUANTIZE_WEIGHT in targets   # power-grid weights dequantize (the inverse power) before the matmul
    for batch in batches:
        expected = call(qm, batch)
        assert rms_relative(expected.detach().numpy(), run(exact, batch)) < 1e-5
        assert relative_error(expected, call(packed, batch)) < 1e-10
        assert relative_error(expected, call(reference, batch)) < 1e-10
        float_output = call(model, batch)  # no blow-up: the same order of error as the uniform grid
        assert relative_error(float_output, expected) < 10 * relative_error(float_output, call(uniform, batch))
    qm.save(tmp_path / "saved")
    loaded = qcompile.load(tmp_path / "saved")
    for batch in batches:
        assert torch.equal(call(loaded, batch), call(qm, batch))


@pytest.mark.parametrize("bits", range(2, 9))
def test_dense_packing_takes_bits_per_code(bits):
    qmin, qmax = P.quant_range(bits, False)
    codes = torch.randint(qmin, qmax + 1, (5, 37)).to(torch.uint8)
    packed = P.pack_codes(codes, bits, qmin)
    assert packed.shape == (5, -(-37 * bits // 8))
    container = P.pack_codes(codes, bits, qmin, P.container_bits(bits))
    assert torch.equal(P.unpack_codes(container, bits, qmin, 37, P.container_bits(bits)), codes.to(torch.int16))
    if bits in (2, 4, 8):
        assert torch.equal(packed, container)


def test_three_bit_models_store_three_bits_and_run_packed():
    factory, calib = MODELS["llama"]
    batches = calib()
    config = QuantConfig(weight=QuantSpec(bits=3, group_size=32, symmetric=False))
    qm = qcompile.compile(factory(), batches, config, progress=False)
    for params in qm.quant_params().values():
        rows, cols = params.weight_codes.shape
        assert params.nbytes() == rows * cols * 3 // 8 + params.scale.numel() * 5
    packed = qm.to_torch(packed=True)
    assert PACKED_LINEAR in [n.target for n in packed.graph.nodes if n.op == "call_function"]
    for batch in batches:
        assert relative_error(call(qm, batch), call(packed, batch)) < 1e-10
