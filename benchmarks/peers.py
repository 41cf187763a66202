"""qcompile side by side with the reference implementation of its method: Intel's auto-round (SignRound).

    python -m benchmarks.peers [--quick]     (needs `.venv/bin/pip install -c constraints.txt -e ".[peers]"`)

The Shakespeare Llama of ``benchmarks.rounding`` (held-out perplexity), the same 128 calibration windows of 128
tokens, asymmetric weights in groups of 128 at 4 and 2 bits, 200 steps of batch 8. auto-round keeps ``lm_head``
in float by default, so qcompile does too here (``overrides={"lm_head": None}``). Rows: auto-round, qcompile
``signround`` (its defaults) and RTN. Writes ``benchmarks/results/peers_autoround.json``. The first piece of
the peer suite (issue 9); onnxruntime's quantizer and torchao are not in it yet.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

from qcompile import QuantConfig, QuantSpec

from .common import write_results
from .rounding import MODELS, quantize

ITERS, GROUP = 200, 128


def auto_round(model, tokenizer, calib: list[dict], bits: int) -> tuple[torch.nn.Module, float]:
    """auto-round's SignRound on a copy of ``model``: (the model with fake-quantized weights, seconds)."""
    from auto_round import AutoRound
    windows = [row.unsqueeze(0) for batch in calib for row in batch["input_ids"]]
    copied = copy.deepcopy(model)
    start = time.perf_counter()
    rounder = AutoRound(copied, tokenizer, bits=bits, group_size=GROUP, sym=False, iters=ITERS, nsamples=len(windows),
                        seqlen=windows[0].shape[-1], dataset=windows, batch_size=8, device_map="cpu",
                        enable_torch_compile=False)
    quantized, _ = rounder.quantize()
    return quantized, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from .zoo import shakespeare as lm
    _, build = MODELS["shakespeare"]
    model, calib, metric, metric_name, _ = build(args.quick, torch.device("cpu"))
    tokenizer = lm.load()[1]
    rows = [{"tool": "float", "scheme": "-", "metric": metric(model), "seconds": 0.0}]
    for bits in (4, 2):
        scheme = f"W{bits}G{GROUP}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer, seconds = auto_round(model, tokenizer, calib, bits)
        rows.append({"tool": "auto-round 0.16.1", "scheme": scheme, "metric": metric(peer), "seconds": seconds})
        for method in ("signround", "rtn"):
            config = QuantConfig(weight=QuantSpec(bits=bits, group_size=GROUP, symmetric=False), method=method,
                                 overrides={"lm_head": None})
            quantized, seconds, _ = quantize(model, calib, config)
            rows.append({"tool": f"qcompile {method}", "scheme": scheme, "metric": metric(quantized), "seconds": seconds})
        for row in rows[-3:]:
            print(f"{row['scheme']:<8} {row['tool']:<20} {metric_name} {row['metric']:8.2f} {row['seconds']:7.1f} s",
                  flush=True)
    write_results("benchmarks/results/peers_autoround.json", rows, model="Shakespeare Llama", metric=metric_name,
                  quick=args.quick)


if __name__ == "__main__":
    main()
