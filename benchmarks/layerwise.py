"""RTN vs GPTQ vs COMQ: task metric, output error, block error and quantization time.

    python -m benchmarks.layerwise [--quick] [--json benchmarks/results/layerwise.json]

Models: DigitNet trained here on real MNIST digits (benchmarks/zoo/mnist.py; metric: accuracy on 1,000 held-out
digits), and timm ResNet-18 / ViT-tiny and a 4-layer Llama built from configs (random weights; metric:
relative output error against float on held-out random inputs, since they have no task). Calibration:
256 training digits / 4 random batches. Columns: metric, mean block output error (report), mean
relative weight error, wall time of compile and mean per block.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
import warnings

import torch

import qcompile
from qcompile import QuantConfig, QuantSpec

from .common import write_results

METHODS = ("rtn", "gptq", "comq")


def schemes(group: int, per_channel_overrides: tuple[str, ...]) -> dict[str, QuantConfig]:
    """W4 / W3 per channel and W4 / W2 with ``group``; layers named in the overrides stay per channel
    (their input size is not a multiple of the group)."""
    def grouped(bits):
        return QuantConfig(weight=QuantSpec(bits=bits, group_size=group, symmetric=False),
                           overrides={name: QuantSpec(bits=bits, symmetric=False) for name in per_channel_overrides})
    return {"W4": QuantConfig(weight=QuantSpec(bits=4, symmetric=False)),
            "W3": QuantConfig(weight=QuantSpec(bits=3, symmetric=False)),
            f"W4G{group}": grouped(4), f"W2G{group}": grouped(2)}


def digitnet():
    from .zoo.mnist import load_or_train
    model, (train, test) = load_or_train()
    calib = list(train[0][:256].split(32))

    def accuracy(m):
        with torch.no_grad():
            return float((m(test[0]).argmax(1) == test[1]).float().mean())
    return model, calib, accuracy, "test accuracy", schemes(32, ("stem.0",))


def output_error_metric(model, held_out):
    def call(m, batch):
        out = m(**batch) if isinstance(batch, dict) else m(batch)
        return out.logits if hasattr(out, "logits") else out
    with torch.no_grad():
        references = [call(model, b) for b in held_out]

    def error(m):
        with torch.no_grad():
            num = sum((call(m, b) - r).pow(2).sum().item() for b, r in zip(held_out, references))
        return num / sum(r.pow(2).sum().item() for r in references)
    return error


def timm_model(name, overrides, group, quick):
    def build():
        import timm
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randn(4 if quick else 8, 3, 224, 224, generator=generator) for _ in range(6)]
        return model, batches[:4], output_error_metric(model, batches[4:]), "output rel. error", \
            schemes(group, overrides)
    return build


def llama(quick):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408,
                                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(8000, (4, 64 if quick else 128), generator=generator)} for _ in range(6)]
    return model, batches[:4], output_error_metric(model, batches[4:]), "output rel. error", schemes(128, ())


def run(quick: bool) -> list[dict]:
    models = {"DigitNet (MNIST)": digitnet,
              "llama-4L-512": lambda: llama(quick),
              "vit_tiny_patch16_224": timm_model("vit_tiny_patch16_224", ("patch_embed.proj",), 64, quick)}
    if not quick:
        models["resnet18"] = timm_model("resnet18", ("conv1",), 64, quick)
    rows = []
    for model_name, build in models.items():
        model, calib, metric, metric_name, configs = build()
        rows.append({"model": model_name, "scheme": "float", "method": "-", "metric_name": metric_name,
                     "metric": metric(model)})
        for scheme, base in configs.items():
            for method in METHODS:
                config = dataclasses.replace(base, method=method)
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantized = qcompile.compile(model, calib, config, progress=False)
                seconds = time.perf_counter() - start
                report = quantized.report()
                layers = [r for r in report.layers if r.status == "quantized"]
                rows.append({"model": model_name, "scheme": scheme, "method": method, "metric_name": metric_name,
                             "metric": metric(quantized),
                             "block_error": sum(b.output_error for b in report.blocks) / len(report.blocks),
                             "weight_error": sum(r.weight_error for r in layers) / len(layers),
                             "seconds": seconds, "seconds_per_block": seconds / len(report.blocks)})
                print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    if row["method"] == "-":
        print(f"{row['model']:<22} {'float':<8} {'':<6} {row['metric']:>10.4f}")
        return
    print(f"{row['model']:<22} {row['scheme']:<8} {row['method']:<6} {row['metric']:>10.4f} {row['block_error']:>11.2e} "
          f"{row['weight_error']:>11.2e} {row['seconds']:>8.1f} {row['seconds_per_block']:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller inputs, no ResNet-18")
    parser.add_argument("--json", default="benchmarks/results/layerwise.json")
    args = parser.parse_args()
    print(f"{'model':<22} {'scheme':<8} {'method':<6} {'metric':>10} {'block err':>11} {'weight err':>11} "
          f"{'total s':>8} {'s/block':>9}")
    rows = run(args.quick)
    write_results(args.json, rows, quick=args.quick)


if __name__ == "__main__":
    main()
