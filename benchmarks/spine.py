"""The spine benchmark: per model, capture time, blocks, quantization time and model bytes fp32 vs W8 vs W4.

"MiB (x)" is the whole model (float embeddings included); "layers x" the quantized layers' own
compression (packed codes + scales + zero points vs their float weights).

    python -m benchmarks.spine [--quick] [--json benchmarks/results/spine.json]

Models are built from configs (random weights: this measures the compiler, not accuracy) and
calibrated on random inputs of their real input size.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import qcompile

from .common import write_results


def timm_model(name):
    import timm
    return lambda: timm.create_model(name, pretrained=False).eval()


def llama(layers, hidden):
    def build():
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                            num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                            num_key_value_heads=max(1, hidden // 256))).eval()
    return build


def gpt2(layers, hidden):
    def build():
        from transformers import GPT2Config, GPT2LMHeadModel
        return GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=hidden // 64)).eval()
    return build


def images(batches, batch_size, size=224):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch_size, 3, size, size, generator=generator) for _ in range(batches)]


def tokens(batches, batch_size, seq_len, vocab):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(vocab, (batch_size, seq_len), generator=generator)} for _ in range(batches)]


MODELS = {
    "resnet18": (timm_model("resnet18"), lambda q: images(2 if q else 4, 8)),
    "mobilenetv3_small_100": (timm_model("mobilenetv3_small_100"), lambda q: images(2 if q else 4, 8)),
    "vit_tiny_patch16_224": (timm_model("vit_tiny_patch16_224"), lambda q: images(2 if q else 4, 8)),
    "convnext_atto": (timm_model("convnext_atto"), lambda q: images(2 if q else 4, 8)),
    "llama-4L-512": (llama(4, 512), lambda q: tokens(2 if q else 4, 4, 128, 32000)),
    "gpt2-4L-512": (gpt2(4, 512), lambda q: tokens(2 if q else 4, 4, 128, 50257)),
}
PRESETS = ("w8a16-rtn", "w4a16-rtn", "w4g128-rtn")


def run(quick: bool) -> list[dict]:
    rows = []
    for name, (factory, calib) in MODELS.items():
        torch.manual_seed(0)
        model, batches = factory(), calib(quick)
        row = {"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
        for preset in PRESETS:
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    qm = qcompile.compile(model, batches, preset, progress=False)
            except qcompile.ConfigError as error:
                row[preset] = {"error": str(error).split(";")[0]}
                continue
            report = qm.report()
            row["fp32_MiB"] = report.model_float_bytes / 2**20
            row["blocks"] = len(report.blocks)
            row["capture_s"] = report.capture_seconds
            layers = [r for r in report.layers if r.status == "quantized"]
            row[preset] = {"MiB": report.model_bytes / 2**20, "ratio": report.compression,
                           "layers_ratio": sum(r.float_bytes for r in layers) / sum(r.bytes for r in layers),
                           "quantize_s": report.quantize_seconds, "total_s": time.perf_counter() - start}
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<24} {'params M':>8} {'capture s':>9} {'blocks':>6} {'fp32 MiB':>9}"
    for preset in PRESETS:
        header += f" | {preset + ' MiB (x)':>22} {'layers x':>8} {'quant s':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        line = (f"{row['model']:<24} {row['params_M']:>8.2f} {row.get('capture_s', float('nan')):>9.2f} "
                f"{row.get('blocks', 0):>6} {row.get('fp32_MiB', float('nan')):>9.2f}")
        for preset in PRESETS:
            cell = row[preset]
            if "error" in cell:
                line += f" | {'n/a: group does not divide a layer':>39}"
            else:
                line += (f" | {cell['MiB']:>13.2f} ({cell['ratio']:4.2f}x) {cell['layers_ratio']:>7.2f}x "
                         f"{cell['quantize_s']:>7.2f}")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer calibration batches")
    parser.add_argument("--json", default="benchmarks/results/spine.json")
    args = parser.parse_args()
    rows = run(args.quick)
    print_table(rows)
    write_results(args.json, rows, qcompile=qcompile.__version__, quick=args.quick)


if __name__ == "__main__":
    main()
