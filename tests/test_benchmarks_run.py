"""Smoke test of the benchmark suite: ``python -m benchmarks.run --quick`` end to end (real zoo models, real
peers, real onnxruntime sessions). It checks the pipeline and the outputs' shape, not the numbers."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run import QUICK_METHODS, QUICK_MODELS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)], cwd=ROOT, check=True,
                   timeout=900)
    return out, json.loads((out / "benchmarks_quick.json").read_text())


def test_every_quick_model_has_float_peer_and_qcompile_rows(quick_run):
    _, result = quick_run
    rows = result["rows"]
    assert [m for m in dict.fromkeys(r["model"] for r in rows)] == list(QUICK_MODELS)
    for model in QUICK_MODELS:
        group = [r for r in rows if r["model"] == model]
        assert group[0]["tool"] == "float"
        ours = [r for r in group if r["tool"].startswith("qcompile")]
        assert {r["method"] for r in ours} == set(QUICK_METHODS)
        assert len({r["scheme"] for r in ours}) == 2
        assert any(r["tool"] not in ("float",) and not r["tool"].startswith("qcompile") for r in group), model


def test_rows_are_measured_or_carry_the_peer_error(quick_run):
    _, result = quick_run
    for row in result["rows"]:
        assert not (row["tool"].startswith("qcompile") and "error" in row), row
        if "error" in row:
            continue
        if row["tool"] != "float":
            assert math.isfinite(row["metric"]) and row["quantize_s"] > 0, row
        if row.get("artefact") != "fake-quant torch":
            assert row.get("onnx_ms") is not None or row.get("torch_ms") is not None, row


def test_quantized_models_are_smaller_than_float_where_sized(quick_run):
    _, result = quick_run
    for model in QUICK_MODELS:
        group = [r for r in result["rows"] if r["model"] == model]
        float_size = group[0]["size_kib"]
        for row in group[1:]:
            if row.get("size_kib") is not None and row["tool"].startswith("qcompile"):
                assert row["size_kib"] < float_size, row


def test_writes_markdown_and_plots(quick_run):
    out, result = quick_run
    text = (out / "benchmarks_quick.md").read_text()
    assert result["meta"]["versions"] in text
    for model in QUICK_MODELS:
        assert f"`{model}`" in text
        assert (out / f"bench_{model}_quick.png").stat().st_size > 10_000
