import pytest
import torch

import qcompile
from qcompile import QuantConfig, QuantSpec
from qcompile.errors import CalibrationError
from qcompile.ir import normalize_batch
from qcompile.passes.calibrate import CalibrationStream, RangeObserver
from qcompile.passes.capture import capture, flatten_inputs
from qcompile.passes.partition import partition
from tests.conftest import MODELS, user_net


def test_stream_keeps_only_live_values():
    factory, calib = MODELS["llama"]
    batches = calib()
    gm = capture(factory(), *normalize_batch(batches[0]))
    result = partition(gm, QuantConfig())
    flat = [flatten_inputs(gm, *normalize_batch(b), i) for i, b in enumerate(batches)]
    stream = CalibrationStream(gm, result, flat, torch.device("cpu"), result.dependent)
    for block in result.blocks:
        outputs = stream.run(block.graph_module, block, quantized_inputs=False)
        stream.advance(block, outputs, outputs)
        later_inputs = {name for b in result.blocks[block.index + 1:] for name in b.inputs}
        assert set(stream.float_env[0]) <= later_inputs
        assert set(stream.quant_env[0]) <= later_inputs & result.dependent
    assert stream.float_env[0] == {} and stream.quant_env[0] == {}


def test_observers():
    x = torch.cat([torch.linspace(-1, 1, 10001), torch.tensor([50.0])])
    minmax = RangeObserver(QuantSpec(bits=8, symmetric=False, granularity="tensor"))
    percentile = RangeObserver(QuantSpec(bits=8, symmetric=False, granularity="tensor", observer="percentile",
                                         percentile=99.9))
    mse = RangeObserver(QuantSpec(bits=8, symmetric=False, granularity="tensor", observer="mse"))
    for observer in (minmax, percentile, mse):
        observer.update(x[:5000])
        observer.update(x[5000:])
    full_range = minmax.params().scale * 255
    assert torch.isclose(full_range, torch.tensor(51.0), rtol=1e-3)
    assert percentile.params().scale * 255 < 3.0  # the outlier is clipped
    assert mse.params().scale < minmax.params().scale


def test_empty_calibration_is_an_error():
    with pytest.raises(CalibrationError, match="calib is empty"):
        qcompile.compile(user_net(), [], "w8a16-rtn", progress=False)
    with pytest.raises(CalibrationError, match="calib is empty"):
        qcompile.compile(user_net(), iter([]), "w8a16-rtn", progress=False)
    batches = (torch.randn(2, 3, 16, 16) for _ in range(2))
    list(batches)  # a generator used up by an earlier loop
    with pytest.raises(CalibrationError, match="exhausted iterator"):
        qcompile.compile(user_net(), batches, "w8a16-rtn", progress=False)
    with pytest.raises(CalibrationError, match="not a single Tensor"):
        qcompile.compile(user_net(), torch.randn(2, 3, 16, 16), "w8a16-rtn", progress=False)
    with pytest.raises(CalibrationError, match="batch 1"):
        qcompile.compile(user_net(), [torch.randn(2, 3, 16, 16), "text"], "w8a16-rtn", progress=False)


def test_mismatched_calibration_is_an_error():
    calib = [torch.randn(2, 3, 16, 16), torch.randn(2, 16, 16)]
    with pytest.raises(CalibrationError, match="batch 1"):
        qcompile.compile(user_net(), calib, "w8a16-rtn", progress=False)
    calib = [torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 3, 16, 16))]
    with pytest.raises(CalibrationError, match="batch 1.*dtype"):
        qcompile.compile(user_net(), calib, "w8a16-rtn", progress=False)


def test_nan_activations_are_an_error():
    calib = [torch.randn(2, 3, 16, 16), torch.full((2, 3, 16, 16), float("nan"))]
    with pytest.raises(CalibrationError, match="NaN/Inf.*batch 1"):
        qcompile.compile(user_net(), calib, "w8a16-rtn", progress=False)
