"""Every rounding method side by side on the real models, the gradient-PTQ knob ablation, and the
large-model timing.

    python -m benchmarks.rounding [--quick] [--models digitnet,shakespeare] [--device cpu|cuda]
                                                     # methods x schemes -> results/rounding[_<models>].json
    python -m benchmarks.rounding --ablation [...]   # seed-000 knobs    -> results/rounding_ablation[_<models>].json
    python -m benchmarks.rounding --large [--layers 22] [--method signround] [--options JSON]
                                                     # 1.1B decoder, GPU -> results/rounding_large_<method>.json

Models (trained here on real data): DigitNet on MNIST (``zoo/mnist.py``; test accuracy on 1,000 held-out
digits; calibration 256 training digits in batches of 32) and the Shakespeare Llama (``zoo/shakespeare.py``;
perplexity on 256 held-out windows of 128 tokens; calibration 128 training windows in batches of 8).
Schemes: W4 and W3 per channel, W2 with groups (32 for DigitNet, whose stem keeps per channel: its 9
inputs; 128 for the LM), asymmetric. Columns: metric, mean block output error (report), quantization
wall time, peak memory added during quantization (CUDA allocator on GPU, resident set on CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings

import torch

import qcompile
from qcompile import QuantConfig, QuantSpec

from .common import PeakMemory, write_results

METHODS = ("rtn", "gptq", "comq", "adaround", "brecq", "signround")


def schemes(group: int, per_channel: tuple[str, ...]) -> dict[str, QuantConfig]:
    def spec(bits, group_size=-1):
        return QuantSpec(bits=bits, group_size=group_size, symmetric=False)
    return {"W4": QuantConfig(weight=spec(4)), "W3": QuantConfig(weight=spec(3)),
            f"W2G{group}": QuantConfig(weight=spec(2, group), overrides={name: spec(2) for name in per_channel})}


def digitnet(quick: bool, device: torch.device):
    from .zoo.mnist import load_or_train
    model, (train, test) = load_or_train()
    model = model.to(device)
    calib = [x.to(device) for x in train[0][:128 if quick else 256].split(32)]
    images, labels = test[0].to(device), test[1].to(device)

    def accuracy(m):
        with torch.no_grad():
            return float((m(images).argmax(1) == labels).float().mean())
    return model, calib, accuracy, "accuracy", schemes(32, ("stem.0",))


def shakespeare(quick: bool, device: torch.device):
    from .zoo import shakespeare as lm
    model, _, held_out, train = lm.load()
    model = model.to(device)
    generator = torch.Generator().manual_seed(0)
    picked = train[torch.randperm(len(train), generator=generator)[:64 if quick else 128]]
    calib = [{"input_ids": ids.to(device)} for ids in picked.split(8)]
    evaluation = held_out[:64 if quick else 256]
    return model, calib, lambda m: lm.perplexity(m, evaluation), "perplexity", schemes(128, ())


MODELS = {"digitnet": ("DigitNet (MNIST)", digitnet), "shakespeare": ("Shakespeare Llama", shakespeare)}


def quantize(model, calib, config: QuantConfig) -> tuple[qcompile.QuantizedModel, float, int]:
    """(quantized model, wall seconds, peak bytes added)."""
    device = next(model.parameters()).device
    with warnings.catch_warnings(), PeakMemory(device) as memory:
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        quantized = qcompile.compile(model, calib, config, progress=False)
        seconds = time.perf_counter() - start
    return quantized, seconds, memory.peak


def measure(model_name, model, calib, metric, metric_name, scheme, config) -> dict:
    quantized, seconds, peak = quantize(model, calib, config)
    report = quantized.report()
    row = {"model": model_name, "scheme": scheme, "method": config.method, "options": dict(config.method_options),
           "metric_name": metric_name, "metric": metric(quantized),
           "block_error": sum(b.output_error for b in report.blocks) / len(report.blocks),
           "seconds": seconds, "peak_mib": None if peak is None else peak / 2 ** 20}
    print_row(row)
    return row


def run_table(models: list[str], quick: bool, device: torch.device, only: str | None) -> list[dict]:
    rows = []
    for key in models:
        model_name, build = MODELS[key]
        model, calib, metric, metric_name, configs = build(quick, device)
        rows.append({"model": model_name, "scheme": "float", "method": "-", "metric_name": metric_name,
                     "metric": metric(model)})
        print_row(rows[-1])
        for scheme, base in configs.items():
            for method in METHODS:
                if only is not None and f"{scheme}:{method}" not in only.split(","):
                    continue
                rows.append(measure(model_name, model, calib, metric, metric_name, scheme,
                                    dataclasses.replace(base, method=method)))
    return rows


# The knobs of the gradient-based PTQ study (Yvinec et al., arXiv 2308.07662), one at a time from a
# base recipe (block loss, sigmoid rounding, rounding only, Adam, 1000 steps), plus SignRound's recipe.
ABLATION = {
    "base: block loss, sigmoid, rounding, adam, 1000": {},
    "loss = layer": {"loss": "layer"},
    "dof = rounding + scale": {"learn": "scale"},
    "dof = rounding + clip": {"learn": "clip"},
    "param = offset (STE)": {"rounding": "offset"},
    "param = offset + clip": {"rounding": "offset", "learn": "clip"},
    "optimizer = signsgd (lr 1e-3)": {"optimizer": "signsgd", "lr": 1e-3},
    "iters = 200": {"iters": 200},
    "iters = 3000": {"iters": 3000},
    "qdrop = 0.5": {"qdrop": 0.5},
    "signround recipe (offset, clip, signsgd 1/iters, 200)": {
        "rounding": "offset", "learn": "clip", "optimizer": "signsgd", "lr": None, "schedule": "linear",
        "iters": 200, "keep_best": True},
    "signround recipe, 1000 steps": {
        "rounding": "offset", "learn": "clip", "optimizer": "signsgd", "lr": None, "schedule": "linear",
        "iters": 1000, "keep_best": True},
}


def run_ablation(models: list[str], quick: bool, device: torch.device, only: str | None) -> list[dict]:
    rows = []
    for key in models:
        model_name, build = MODELS[key]
        model, calib, metric, metric_name, configs = build(quick, device)
        scheme = "W3"
        for index, (label, knobs) in enumerate(ABLATION.items()):
            if only is not None and str(index) not in only.split(","):
                continue
            config = dataclasses.replace(configs[scheme], method="brecq", method_options=knobs)
            rows.append({**measure(model_name, model, calib, metric, metric_name, scheme, config), "recipe": label})
        for batch in (4, 16):  # calibration batch size (one step = one batch): same samples, re-batched
            if only is not None and f"batch{batch}" not in only.split(","):
                continue
            flat = _rebatch(calib, batch)
            config = dataclasses.replace(configs[scheme], method="brecq")
            rows.append({**measure(model_name, model, flat, metric, metric_name, scheme, config),
                         "recipe": f"batch size = {batch}"})
    return rows


def _rebatch(calib: list, size: int) -> list:
    if isinstance(calib[0], dict):
        ids = torch.cat([b["input_ids"] for b in calib])
        return [{"input_ids": chunk} for chunk in ids.split(size)]
    return list(torch.cat(calib).split(size))


def run_large(layers: int, method: str, options: dict, samples: int, seq_len: int, device: str) -> list[dict]:
    """A TinyLlama-1.1B-shaped decoder (random weights, bf16) on a GPU: wall time and peak memory."""
    from transformers import LlamaConfig, LlamaForCausalLM
    device = torch.device(device)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(dtype=torch.bfloat16).eval()
    parameters = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(32000, (8, seq_len), generator=generator).to(device)}
             for _ in range(samples // 8)]
    quant = QuantConfig(weight=QuantSpec(bits=4, group_size=128, symmetric=False), method=method,
                        method_options=options)
    quantized, seconds, peak = quantize(model, calib, quant)
    row = {"model": f"llama-{layers}L-2048 ({parameters / 1e9:.2f} B params, bf16)", "scheme": "W4G128",
           "method": method, "options": options, "samples": samples, "seq_len": seq_len, "seconds": seconds,
           "seconds_per_block": seconds / len(quantized.report().blocks), "peak_gib": peak / 2 ** 30,
           "model_gib": parameters * 2 / 2 ** 30,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(row)
    return [row]


def print_row(row: dict) -> None:
    if row["method"] == "-":
        print(f"{row['model']:<18} {'float':<7} {'':<10} {row['metric']:>9.4f}")
        return
    options = " ".join(f"{k}={v}" for k, v in row["options"].items())
    print(f"{row['model']:<18} {row['scheme']:<7} {row['method']:<10} {row['metric']:>9.4f} "
          f"{row['block_error']:>10.2e} {row['seconds']:>8.1f} {_mib(row['peak_mib']):>8}  {options}", flush=True)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calibration and evaluation samples")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--method", default="signround")
    parser.add_argument("--options", type=json.loads, default={}, help='method options as JSON, e.g. {"iters": 200}')
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="where the model lives and blocks train (--large: cuda)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--only", help="a subset, comma-separated: scheme:method rows of the table (W3:gptq), "
                        "recipe indices and batch4/batch16 of the ablation")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.large:
        rows = run_large(args.layers, args.method, args.options, args.samples, args.seq_len,
                         "cuda" if args.device == "cpu" else args.device)
        write_results(args.json or f"benchmarks/results/rounding_large_{args.method}.json", rows)
        return
    print(f"{'model':<18} {'scheme':<7} {'method':<10} {'metric':>9} {'block err':>10} {'seconds':>8} {'peak MiB':>8}")
    device, models = torch.device(args.device), args.models.split(",")
    suffix = "" if args.models == ",".join(MODELS) else "_" + "_".join(models)
    meta = {"quick": args.quick, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if args.ablation:
        write_results(args.json or f"benchmarks/results/rounding_ablation{suffix}.json",
                      run_ablation(models, args.quick, device, args.only), **meta)
    else:
        write_results(args.json or f"benchmarks/results/rounding{suffix}.json",
                      run_table(models, args.quick, device, args.only), **meta)


if __name__ == "__main__":
    main()
