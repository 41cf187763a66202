import contextlib

import pytest
import torch

from qcompile.errors import CalibrationError, CaptureError
from qcompile.ir import GM_CAPTURED_BY, META_MODULE_PATH, normalize_batch
from qcompile.passes.capture import capture, flatten_inputs
from tests.conftest import MODELS, call, user_net


def test_capture_runs_like_the_model(model_and_calib):
    name, model, calib = model_and_calib
    gm = capture(model, *normalize_batch(calib[0]))
    assert gm.meta[GM_CAPTURED_BY] == "torch.export"
    assert not any(node.op == "call_module" for node in gm.graph.nodes), "graph must be flat"
    for batch in calib:  # batches of other sizes run too (dynamic batch / sequence dims)
        torch.testing.assert_close(call(gm, batch), call(model, batch), rtol=1e-4, atol=1e-4)


def test_module_paths_on_nodes():
    factory, calib = MODELS["llama"]
    gm = capture(factory(), *normalize_batch(calib()[0]))
    paths = {node.meta[META_MODULE_PATH] for node in gm.graph.nodes if node.op == "call_function"}
    assert "model.layers.1.self_attn.q_proj" in paths and "lm_head" in paths


def test_fx_fallback_when_export_fails(monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("export refused")
    monkeypatch.setattr(torch.export, "export", broken_export)
    model = user_net()
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="torch.fx symbolic tracing"):
        gm = capture(model, (x,), {})
    assert gm.meta[GM_CAPTURED_BY] == "torch.fx"
    torch.testing.assert_close(gm(x), model(x))
    assert flatten_inputs(gm, (x,), {}, 0)[0] is x


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: neither export nor fx can capture it
            return self.linear(x)
        return -x


def test_capture_error_names_the_problem():
    with pytest.raises(CaptureError, match="DataDependent.*torch.export failed.*torch.fx failed"):
        capture(DataDependent(), (torch.randn(2, 4),), {})


def test_train_mode_warns_and_is_restored():
    model = user_net().train()
    with pytest.warns(UserWarning, match="train mode"):
        capture(model, (torch.randn(2, 3, 16, 16),), {})
    assert model.training


def test_hf_use_cache_restored():
    factory, calib = MODELS["gpt2"]
    model = factory()
    model.config.use_cache = True
    capture(model, *normalize_batch(calib()[0]))
    assert model.config.use_cache is True


def test_flatten_inputs_checks_batches():
    factory, calib = MODELS["llama"]
    batches = calib()
    gm = capture(factory(), *normalize_batch(batches[0]))
    with pytest.raises(CalibrationError, match="keyword inputs"):
        flatten_inputs(gm, (), {"input_ids": batches[0]["input_ids"]}, 3)
    with pytest.raises(CalibrationError, match="dtype"):
        flatten_inputs(gm, (), {**batches[0], "input_ids": batches[0]["input_ids"].float()}, 4)
    image_gm = capture(user_net(), (torch.randn(2, 3, 16, 16),), {})
    with pytest.raises(CalibrationError, match="batch 7.*shape"):
        flatten_inputs(image_gm, (torch.randn(2, 3, 16),), {}, 7)


def test_batch_norm_folds_into_conv_without_touching_the_model():
    factory, calib = MODELS["resnet18"]
    model = factory()
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    batch = calib()[0]
    gm = capture(model, (batch,), {})
    assert not any("batch_norm" in str(node.target) for node in gm.graph.nodes)
    assert not any("running_mean" in name for name, _ in gm.named_buffers())
    torch.testing.assert_close(gm(batch), model(batch), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


class InPlace(torch.nn.Module):
    """In-place ops on an input, on a value other nodes read later, and through nn.ReLU(inplace=True)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.act = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        x = torch.nn.functional.hardswish(x, inplace=True)
        y = self.conv(x)
        z = y * 2
        y.add_(1.0)
        return self.act(y) + z + y


@pytest.mark.parametrize("tracer", ["torch.export", "torch.fx"])
def test_in_place_ops_become_out_of_place(tracer, monkeypatch):
    if tracer == "torch.fx":
        monkeypatch.setattr(torch.export, "export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("off")))
    torch.manual_seed(0)
    model = InPlace().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x.clone())
    with pytest.warns(UserWarning) if tracer == "torch.fx" else contextlib.nullcontext():
        gm = capture(model, (x.clone(),), {})
    assert gm.meta[GM_CAPTURED_BY] == tracer
    mutating = [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    assert not mutating
    stored = x.clone()
    first, second = gm(stored), gm(stored)
    assert torch.equal(stored, x)  # the graph no longer writes into its input
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
