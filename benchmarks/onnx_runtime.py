"""ONNX benchmark: file size and onnxruntime CPU latency of fp32 vs qcompile's W8A8 / W4 exports vs
onnxruntime's own quantizers on the same float model.

    python -m benchmarks.onnx_runtime [--quick] [--json benchmarks/results/onnx_runtime.json]

Rows per model: the fp32 ONNX export; qcompile presets exported with ``export_onnx``; onnxruntime's
``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax) for the vision models and
its ``MatMulNBitsQuantizer`` (4-bit RTN) for the LM, each on the fp32 ONNX file with the same
calibration batches. Latency: median of repeated ``session.run`` calls (batch 1 and 32 for vision, one
decode-like step with one token for the LM). Models are built from configs (random weights): this
measures the lowering, not task accuracy; "rel err" is the output's RMS error against fp32 on a
calibration-like batch.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import qcompile
from qcompile import QuantConfig, QuantSpec

from .common import export_fp32, feeds_of, file_size, median_ms, write_results
from .peers import ort_matmul_nbits, ort_quantize_static


def latency_ms(path: Path, feeds: dict, repeats: int) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return median_ms(lambda: session.run(None, feeds), repeats)


def output(path: Path, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def rms_relative(reference: np.ndarray, value: np.ndarray) -> float:
    return float(np.sqrt(((reference - value) ** 2).mean() / (reference ** 2).mean()))


def vision(name: str, quick: bool):
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    generator = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 224, 224, generator=generator) for _ in range(2 if quick else 4)]
    shapes = {"batch 1": torch.randn(1, 3, 224, 224, generator=generator),
              "batch 32": torch.randn(32, 3, 224, 224, generator=generator)}
    return model, calib, shapes


def llama(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hidden = 512 if quick else 768
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 128 * 128,
                         num_hidden_layers=4, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(32000, (4, 64), generator=generator)} for _ in range(2 if quick else 4)]
    shapes = {"decode (1 token)": {"input_ids": torch.randint(32000, (1, 1), generator=generator)},
              "prefill (128)": {"input_ids": torch.randint(32000, (1, 128), generator=generator)}}
    return model, calib, shapes


def bench_model(name, model, calib, shapes, configs, peers, workdir: Path, repeats: int) -> list[dict]:
    fp32 = workdir / f"{name}-fp32.onnx"
    args, kwargs = qcompile.ir.normalize_batch(calib[0])
    export_fp32(model, (args, kwargs), fp32)
    names = [i.name for i in ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()]
    reference_feeds = feeds_of(calib[-1], names)
    reference = output(fp32, reference_feeds)
    files = {"fp32": (fp32, 0.0)}
    for label, config in configs.items():
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = qcompile.compile(model, calib, config, progress=False)
        path = workdir / f"{name}-{label}.onnx"
        quantized.export_onnx(path)
        files[f"qcompile {label}"] = (path, time.perf_counter() - start)
    for label, make in peers.items():
        path = workdir / f"{name}-{label.replace(' ', '_')}.onnx"
        start = time.perf_counter()
        try:
            make(fp32, path, [feeds_of(b, names) for b in calib])
            files[label] = (path, time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001 - a peer that fails is recorded, not fatal
            files[label] = (None, f"{type(error).__name__}: {str(error)[:120]}")
    rows = []
    for label, (path, seconds) in files.items():
        row = {"model": name, "variant": label}
        if path is None:
            row["error"] = seconds
        else:
            row.update({"MiB": file_size(path) / 2**20, "quantize_s": seconds,
                        "rel_err": rms_relative(reference, output(path, reference_feeds))})
            for shape, batch in shapes.items():
                row[f"ms {shape}"] = latency_ms(path, feeds_of(batch, names), repeats)
        rows.append(row)
    base = rows[0]
    for row in rows:
        if "error" not in row:
            row["x smaller"] = base["MiB"] / row["MiB"]
            for shape in shapes:
                row[f"x faster {shape}"] = base[f"ms {shape}"] / row[f"ms {shape}"]
    return rows


def print_rows(rows: list[dict]) -> None:
    keys = [k for k in rows[0] if k not in ("model", "variant")]
    print(f"{'model':<22} {'variant':<26} " + " ".join(f"{k:>17}" for k in keys))
    for row in rows:
        if "error" in row:
            print(f"{row['model']:<22} {row['variant']:<26} skipped: {row['error']}")
            continue
        print(f"{row['model']:<22} {row['variant']:<26} " + " ".join(f"{row.get(k, float('nan')):>17.3f}" for k in keys))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--lm-only", action="store_true", help="only the language model rows")
    parser.add_argument("--json", default="benchmarks/results/onnx_runtime.json")
    args = parser.parse_args()
    repeats = 5 if args.quick else 20
    static = lambda fp32, out, feeds: ort_quantize_static(fp32, out, feeds)  # noqa: E731
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        w4_vision = QuantConfig(weight=QuantSpec(bits=4, symmetric=False))  # per channel: ViT-tiny rows are 192 wide
        for name in () if args.lm_only else ("resnet18", "vit_tiny_patch16_224"):
            model, calib, shapes = vision(name, args.quick)
            configs = {"w8a8-static": "w8a8-static-rtn", "w8a8": "w8a8-rtn", "w4": w4_vision}
            rows = bench_model(name, model, calib, shapes, configs, {"ort quantize_static": static}, workdir, repeats)
            print_rows(rows)
            results += rows
        model, calib, shapes = llama(args.quick)
        g128 = QuantSpec(bits=4, group_size=128, symmetric=False)
        configs = {"w8a8": "w8a8-rtn", "w4g128": "w4g128-rtn",
                   "w4g128 + embedding": QuantConfig(weight=g128, overrides={"model.embed_tokens": g128})}
        peers = {"ort MatMulNBits rtn g128": lambda fp32, out, feeds: ort_matmul_nbits(fp32, out, 4, 128)}
        rows = bench_model("llama-4L", model, calib, shapes, configs, peers, workdir, repeats)
        print_rows(rows)
        results += rows
    write_results(args.json, results, onnxruntime=ort.__version__, quick=args.quick)


if __name__ == "__main__":
    main()
