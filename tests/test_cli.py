import json
import subprocess
import sys

import qcompile
from qcompile.cli import main


def test_quantize_timm_model_saves_and_reports(tmp_path, capsys):
    out, report_json = tmp_path / "model", tmp_path / "report.json"
    onnx_path = tmp_path / "model.onnx"
    code = main(["quantize", "timm:resnet18", "--config", "w4a16-rtn", "--input-shape", "3,32,32",
                 "--calib-batches", "2", "--batch-size", "2", "--out", str(out), "--json", str(report_json),
                 "--onnx", str(onnx_path), "--no-progress"])
    assert code == 0
    import onnxruntime
    onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    printed = capsys.readouterr().out
    assert "layer4.1.conv2" in printed and "smaller" in printed
    assert json.loads(report_json.read_text())["method"] == "rtn"
    assert qcompile.load(out).report().model_bytes < qcompile.load(out).report().model_float_bytes
    assert main(["report", str(out)]) == 0
    assert "layer4.1.conv2" in capsys.readouterr().out


def test_quantize_module_factory_and_hf_config(tmp_path, capsys):
    assert main(["quantize", "tests.conftest:user_net", "--input-shape", "3,16,16", "--bits", "4",
                 "--no-progress"]) == 0
    assert "conv_b" in capsys.readouterr().out
    config = tmp_path / "llama.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 128, "hidden_size": 64,
                                  "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                                  "num_key_value_heads": 2}))
    assert main(["quantize", f"hf-config:{config}", "--config", "w4g128-rtn", "--group-size", "32",
                 "--seq-len", "8", "--no-progress"]) == 0
    assert "model.layers.0.mlp.down_proj" in capsys.readouterr().out


def test_errors_are_reported_not_raised(capsys):
    code = main(["quantize", "timm:resnet18", "--config", "w4g128-rtn", "--input-shape", "3,32,32",
                 "--calib-batches", "1", "--no-progress"])
    assert code == 2
    assert "ConfigError" in capsys.readouterr().err


def test_console_entry_point():
    result = subprocess.run([sys.executable, "-m", "qcompile.cli", "quantize", "--help"], capture_output=True,
                            text=True, check=True)
    assert "timm:NAME" in result.stdout
