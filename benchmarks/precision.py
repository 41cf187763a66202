"""Power-exponent grids (NUPES) and importance-based mixed precision on the real models (issue 7).

    python -m benchmarks.precision [--quick] [--models digitnet,shakespeare] [--device cpu|cuda]

Models and metrics are those of ``benchmarks.rounding`` (DigitNet on MNIST: test accuracy; the Shakespeare
Llama: held-out perplexity). Weights are asymmetric, per channel for DigitNet and in groups of 128 for the LM.
Rows per model, each with round-to-nearest and with the model's best rounding method (``BEST``):

- uniform and power grid (exponent searched per layer; SignRound learns it) at 3 and 4 bits;
- mixed precision (candidates 2/3/4/8 bits, Fisher scores) at the size of the uniform 3-bit model, i.e. the
  same packed bytes; plus, with round-to-nearest, the Hessian and output-error scores.

Columns: the metric, bits per quantized weight element (packed codes + scales + zero points, from the
quantized model's own bytes), the mean relative block output error on the calibration data (the sharper
measure where the metric saturates), quantization wall time. Writes ``benchmarks/results/precision[_<models>].json``
and, per model, ``docs/results/precision_<model>.png`` (metric against bits per weight; the bits per layer of
the mixed-precision allocation).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from qcompile import MixedPrecision, QuantConfig, QuantSpec

from .common import write_results
from .rounding import MODELS, quantize

BEST = {"digitnet": "comq", "shakespeare": "signround"}
GROUP = {"digitnet": -1, "shakespeare": 128}
CANDIDATES = (2, 3, 4, 8)
PLOTS = Path("docs/results")


def bits_per_weight(quantized) -> float:
    """8 · packed bytes / elements over the quantized weights."""
    params = quantized.quant_params().values()
    return 8 * sum(p.nbytes() for p in params) / sum(p.weight_codes.numel() for p in params)


def configs(key: str, bits: int, grid: str, method: str) -> QuantConfig:
    exponent = ("learned" if method == "signround" else "search") if grid == "power" else None
    return QuantConfig(weight=QuantSpec(bits=bits, group_size=GROUP[key], symmetric=False, grid=grid,
                                        exponent=exponent), method=method)


def run_model(key: str, quick: bool, device: torch.device) -> list[dict]:
    model_name, build = MODELS[key]
    model, calib, metric, metric_name, _ = build(quick, device)
    rows = [{"model": model_name, "scheme": "float", "method": "-", "metric_name": metric_name,
             "metric": metric(model), "bits": 32.0, "seconds": 0.0}]
    print_row(rows[-1])

    def measure(scheme: str, config: QuantConfig) -> dict:
        quantized, seconds, _ = quantize(model, calib, config)
        report = quantized.report()
        row = {"model": model_name, "scheme": scheme, "method": config.method, "metric_name": metric_name,
               "metric": metric(quantized), "bits": bits_per_weight(quantized), "seconds": seconds,
               "block_error": sum(b.output_error for b in report.blocks) / len(report.blocks),
               "exponents": [r.exponent for r in report.layers if r.exponent is not None],
               "layer_bits": {r.path: r.bits for r in report.layers if r.bits is not None}}
        if report.mixed_precision is not None:
            row["mixed_precision"] = {k: v for k, v in report.mixed_precision.items() if k != "layers"}
        rows.append(row)
        print_row(row)
        return row

    same_size_as_w3 = None
    for method in ("rtn", BEST[key]):
        for bits in (3, 4):
            for grid in ("uniform", "power"):
                row = measure(f"W{bits} {grid}", configs(key, bits, grid, method))
                if (bits, grid, method) == (3, "uniform", "rtn"):
                    same_size_as_w3 = row["bits"]
        scores = ("fisher", "hessian", "output_error") if method == "rtn" else ("fisher",)
        for score in scores:
            config = dataclasses.replace(configs(key, 4, "uniform", method), mixed_precision=MixedPrecision(
                target_bits=same_size_as_w3, candidates=CANDIDATES, score=score))
            measure(f"mixed@W3 {score}", config)
    return rows


def plot(rows: list[dict], key: str) -> Path:
    """Metric vs bits per weight (one line per grid/allocation and method) and the mixed allocation's bits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    quantized = [row for row in rows if row["method"] != "-"]
    series = {"W3 uniform": "uniform", "W4 uniform": "uniform", "W3 power": "power", "W4 power": "power",
              "mixed@W3 fisher": "mixed (fisher)"}
    for method in dict.fromkeys(row["method"] for row in quantized):
        for label in dict.fromkeys(series.values()):
            points = sorted((row["bits"], row["metric"]) for row in quantized
                            if row["method"] == method and series.get(row["scheme"]) == label)
            left.plot(*zip(*points), marker="o", label=f"{label}, {method}")
    left.axhline(rows[0]["metric"], color="gray", linestyle="--", label="float")
    left.set_xlabel("bits per weight (codes + scales + zero points)")
    left.set_ylabel(rows[0]["metric_name"])
    left.set_title(f"{rows[0]['model']}: grids and mixed precision")
    left.legend(fontsize=8)
    mixed = next(row for row in quantized if row["scheme"] == "mixed@W3 fisher" and row["method"] == BEST[key])
    names = list(mixed["layer_bits"])
    right.bar(range(len(names)), [mixed["layer_bits"][n] for n in names])
    right.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    right.set_ylabel("bits")
    right.set_title(f"mixed precision at {mixed['bits']:.2f} bits/weight ({mixed['method']}, Fisher)")
    figure.tight_layout()
    PLOTS.mkdir(parents=True, exist_ok=True)
    path = PLOTS / f"precision_{key}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path}")
    return path


def print_row(row: dict) -> None:
    error = f"{row['block_error']:.2e}" if "block_error" in row else "-"
    print(f"{row['model']:<18} {row['scheme']:<22} {row['method']:<10} {row['metric']:>9.4f} {row['bits']:>6.2f} "
          f"{error:>10} {row['seconds']:>8.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calibration and evaluation samples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--json")
    args = parser.parse_args()
    device, models = torch.device(args.device), args.models.split(",")
    print(f"{'model':<18} {'scheme':<22} {'method':<10} {'metric':>9} {'bits':>6} {'block err':>10} {'seconds':>8}")
    rows = []
    for key in models:
        model_rows = run_model(key, args.quick, device)
        plot(model_rows, key)
        rows.extend(model_rows)
    suffix = "" if args.models == ",".join(MODELS) else "_" + "_".join(models)
    write_results(args.json or f"benchmarks/results/precision{suffix}.json", rows, quick=args.quick,
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


if __name__ == "__main__":
    main()
