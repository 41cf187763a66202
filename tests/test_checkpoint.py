"""Resumable quantization: a real run killed mid-way resumes to the bit-identical result; stale or damaged
checkpoints are refused."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qcompile
from qcompile import QuantConfig, QuantSpec
from qcompile.checkpoint import MANIFEST
from qcompile.errors import CheckpointError
from tests.conftest import MODELS, call

REPO = Path(__file__).resolve().parents[1]
CONFIG = QuantConfig(weight=QuantSpec(bits=3, group_size=32, symmetric=False), method="signround",
                     method_options={"iters": 40})
RUN = """
import sys, torch, qcompile
from tests.conftest import MODELS
from tests.test_checkpoint import CONFIG
factory, calib = MODELS["llama"]
qcompile.compile(factory(), calib(), CONFIG, progress=False, checkpoint_dir=sys.argv[1])
"""


def finished_blocks(directory: Path) -> int:
    try:
        return len(json.loads((directory / MANIFEST).read_text())["blocks"])
    except (OSError, ValueError, KeyError):
        return 0


def assert_identical(a, b, batches):
    params_a, params_b = a.quant_params(), b.quant_params()
    assert params_a.keys() == params_b.keys()
    for target in params_a:
        for field in ("weight_codes", "scale", "zero_point"):
            assert torch.equal(getattr(params_a[target], field), getattr(params_b[target], field)), (target, field)
    for batch in batches:
        assert torch.equal(call(a, batch), call(b, batch))


def test_a_killed_run_resumes_bit_identically(tmp_path):
    factory, calib = MODELS["llama"]
    batches = calib()
    directory = tmp_path / "checkpoint"
    process = subprocess.Popen([sys.executable, "-c", RUN, str(directory)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 300
    while finished_blocks(directory) < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = finished_blocks(directory)
    blocks = len(qcompile.compile(factory(), batches, "w8a16-rtn", progress=False).report().blocks)
    assert 1 <= done < blocks, f"the run was to be killed mid-way ({done} of {blocks} blocks finished)"
    resumed = qcompile.compile(factory(), batches, CONFIG, progress=False, checkpoint_dir=directory)
    assert finished_blocks(directory) == blocks
    uninterrupted = qcompile.compile(factory(), batches, CONFIG, progress=False)
    assert_identical(resumed, uninterrupted, batches)


def test_a_finished_checkpoint_is_reused_without_optimizing(tmp_path, monkeypatch):
    factory, calib = MODELS["user_net"]
    batches = calib()
    config = QuantConfig(weight=QuantSpec(bits=4, symmetric=False), activation=QuantSpec(
        bits=8, symmetric=False, granularity="tensor"), method="gptq")
    first = qcompile.compile(factory(), batches, config, progress=False, checkpoint_dir=tmp_path)
    monkeypatch.setattr(qcompile.rounding.gptq, "gptq_solve", lambda *a, **k: pytest.fail("re-optimized a block"))
    again = qcompile.compile(factory(), batches, config, progress=False, checkpoint_dir=tmp_path)
    assert_identical(first, again, batches)


def test_another_config_or_model_refuses_the_checkpoint(tmp_path):
    factory, calib = MODELS["user_net"]
    batches = calib()
    qcompile.compile(factory(), batches, "w4a16-rtn", progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="different model, calibration data or config"):
        qcompile.compile(factory(), batches, "w4a16-gptq", progress=False, checkpoint_dir=tmp_path)
    other = factory()
    with torch.no_grad():
        other.head.weight.mul_(2)
    with pytest.raises(CheckpointError, match="different model"):
        qcompile.compile(other, batches, "w4a16-rtn", progress=False, checkpoint_dir=tmp_path)


def test_a_damaged_block_file_is_refused(tmp_path):
    factory, calib = MODELS["user_net"]
    batches = calib()
    qcompile.compile(factory(), batches, "w4a16-rtn", progress=False, checkpoint_dir=tmp_path)
    block_file = sorted(tmp_path.glob("block_*.safetensors"))[0]
    block_file.write_bytes(block_file.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="checksum"):
        qcompile.compile(factory(), batches, "w4a16-rtn", progress=False, checkpoint_dir=tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a qcompile checkpoint manifest"):
        qcompile.compile(factory(), batches, "w4a16-rtn", progress=False, checkpoint_dir=tmp_path)
