"""The qcompile demo: quantize two models trained here on real data and compare them with float.

    python -m examples.demo [--skip-lm]      (from the repository root; a few minutes on 2 CPU cores)

1. The ResNet-style CNN trained on real MNIST digits (committed in benchmarks/zoo/images/, 98.9 % on 1,000
   held-out digits), calibrated on 256 digits it never saw: full-integer W8A8 (static activations, GPTQ)
   and 4-bit weights (COMQ), each exported to ONNX and run in onnxruntime.
2. The 5.3 M-parameter Llama trained on Shakespeare's plays (committed in benchmarks/zoo/shakespeare/),
   calibrated on 64 windows of 128 tokens: 4-bit weights in groups of 128 with SignRound (``lm_head`` in float),
   held-out perplexity, the packed PyTorch lowering and the ONNX export (onnxruntime's MatMulNBits).
Prints accuracy / perplexity, size and latency of float vs quantized, and writes ONNX files into out/.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import qcompile
from benchmarks.common import OrtModel, export_fp32, onnx_size_and_latency, torch_latency_ms

OUT = Path("out")


def measure(label: str, model, judged, metric, example: dict, onnx_path: Path, seconds: float) -> dict:
    """One row: metric (on ``judged``), PyTorch and onnxruntime latency on ``example``, ONNX size."""
    row = {"model": label, "metric": metric(judged), "quantize s": seconds,
           "torch ms": torch_latency_ms(model, ((), example), 10)}
    onnx = onnx_size_and_latency(onnx_path, ((), example), 10)
    return {**row, "onnx KiB": onnx["size_kib"], "onnx ms": onnx["onnx_ms"]}


def quantize(model, calib, config, name: str) -> tuple[qcompile.QuantizedModel, float, Path]:
    print(f"\nquantizing {name} ...", flush=True)
    start = time.perf_counter()
    quantized = qcompile.compile(model, calib, config)
    seconds = time.perf_counter() - start
    path = OUT / f"{name}.onnx"
    quantized.export_onnx(path)
    print(f"  {seconds:.1f} s; wrote {path}", flush=True)
    return quantized, seconds, path


def show(title: str, metric_name: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"  {'model':<34} {metric_name:>11} {'onnx KiB':>9} {'onnx ms':>8} {'torch ms':>9} {'quantize s':>10}"
          "   (torch: the packed PyTorch lowering, QuantizedModel.to_torch())")
    for row in rows:
        print(f"  {row['model']:<34} {row['metric']:>11.2f} {row['onnx KiB']:>9.0f} {row['onnx ms']:>8.2f} "
              f"{row['torch ms']:>9.2f} {row['quantize s']:>10.1f}")


def cnn() -> None:
    from benchmarks.zoo import images
    model, splits = images.load("mnist-resnet")
    calib = list(splits.calibration.images.split(32))
    example = {"x": splits.test.images[:64]}
    accuracy = lambda m: 100 * images.accuracy(m, splits.test)  # noqa: E731
    float_path = OUT / "mnist-resnet-fp32.onnx"
    export_fp32(model, ((splits.test.images[:2],), {}), float_path)
    rows = [measure("float32", model, OrtModel(float_path), accuracy, example, float_path, 0.0)]
    for config, name in (("w8a8-static-gptq", "mnist-resnet-w8a8"),
                         (qcompile.QuantConfig(weight=qcompile.QuantSpec(bits=4, symmetric=False), method="comq"),
                          "mnist-resnet-w4")):
        quantized, seconds, path = quantize(model, calib, config, name)
        rows.append(measure(name, quantized.to_torch(), OrtModel(path), accuracy, example, path, seconds))
    show("MNIST ResNet-style CNN: test accuracy % of the ONNX files in onnxruntime on 1,000 real digits; "
         "latency of a batch of 64", "accuracy %", rows)


def language_model() -> None:
    from benchmarks.zoo import shakespeare as lm
    model, _, held_out, train = lm.load()
    picked = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:64]]
    calib = [{"input_ids": ids} for ids in picked.split(8)]
    evaluation = held_out[:128]
    perplexity = lambda m: lm.perplexity(m, evaluation)  # noqa: E731
    example = {"input_ids": held_out[:1]}
    float_path = OUT / "shakespeare-fp32.onnx"
    export_fp32(model, ((), example), float_path)
    rows = [measure("float32", model, model, perplexity, example, float_path, 0.0)]
    config = qcompile.QuantConfig(weight=qcompile.QuantSpec(bits=4, group_size=128, symmetric=False),
                                  method="signround", overrides={"lm_head": None})
    quantized, seconds, path = quantize(model, calib, config, "shakespeare-w4g128")
    rows.append(measure("shakespeare-w4g128 (signround)", quantized.to_torch(), quantized, perplexity, example,
                        path, seconds))
    show("Shakespeare Llama: perplexity on 128 held-out windows of 128 tokens (latency: one window)",
         "perplexity", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-lm", action="store_true", help="only the CNN")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    cnn()
    if not args.skip_lm:
        language_model()
    print(f"\nONNX files in {OUT}/ (onnxruntime.InferenceSession runs them); qcompile.compile(model, calib, config) "
          "does the same for your model.")


if __name__ == "__main__":
    main()
