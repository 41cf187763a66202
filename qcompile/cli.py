"""`qcompile quantize MODEL [--out DIR] [--onnx FILE] ...` and `qcompile report DIR`.

MODEL is ``timm:NAME`` (built from its config, random weights: no download), ``hf-config:PATH.json``
(a transformers config file; causal LM if the config allows, else the base model), or
``package.module:factory`` (a function returning a model, or a (model, calib) pair).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from typing import Any

import torch

from . import api
from .config import PRESETS, QuantConfig, resolve_config
from .errors import QCompileError


def load_model(spec: str) -> tuple[torch.nn.Module, Any]:
    """(model, calib or None) for a MODEL argument."""
    kind, _, name = spec.partition(":")
    if kind == "timm":
        import timm
        return timm.create_model(name, pretrained=False).eval(), None
    if kind == "hf-config":
        import transformers
        config = transformers.AutoConfig.from_pretrained(name)
        try:
            return transformers.AutoModelForCausalLM.from_config(config).eval(), None
        except ValueError:
            return transformers.AutoModel.from_config(config).eval(), None
    if kind and name:
        factory = getattr(importlib.import_module(kind), name)
        made = factory()
        return (made[0], made[1]) if isinstance(made, tuple) else (made, None)
    raise SystemExit(f"qcompile: cannot read MODEL {spec!r}; use timm:NAME, hf-config:PATH.json or module:factory")


def random_calib(model: torch.nn.Module, batches: int, batch_size: int, input_shape: list[int] | None,
                 seq_len: int) -> list:
    """Random calibration inputs shaped for the model (a smoke test, not a real calibration set)."""
    generator = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    if input_shape is None and config is not None and hasattr(config, "vocab_size"):
        return [{"input_ids": torch.randint(config.vocab_size, (batch_size, seq_len), generator=generator)}
                for _ in range(batches)]
    if input_shape is None:
        input_shape = list(getattr(model, "pretrained_cfg", {}).get("input_size", ()))
    if not input_shape:
        raise SystemExit("qcompile: give --input-shape C,H,W (per sample) for this model")
    return [torch.randn(batch_size, *input_shape, generator=generator) for _ in range(batches)]


def build_config(args: argparse.Namespace) -> QuantConfig:
    config = resolve_config(args.config)
    if args.method:
        config = dataclasses.replace(config, method=args.method)
    if args.bits or args.group_size:
        weight = dataclasses.replace(config.weight, bits=args.bits or config.weight.bits,
                                     group_size=args.group_size or config.weight.group_size, granularity=None)
        config = dataclasses.replace(config, weight=weight)
    if args.options:
        config = dataclasses.replace(config, method_options=json.loads(args.options))
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    quantize = commands.add_parser("quantize", help="quantize a model and print its report")
    quantize.add_argument("model", help="timm:NAME | hf-config:PATH.json | module:factory")
    quantize.add_argument("--config", default="w8a16-rtn", help=f"a preset: {', '.join(sorted(PRESETS))}")
    quantize.add_argument("--method", help="override the preset's rounding method")
    quantize.add_argument("--bits", type=int, help="override the weight bits")
    quantize.add_argument("--group-size", type=int, help="override the weight group size")
    quantize.add_argument("--options", help="method options as JSON, e.g. '{\"iters\": 200}'")
    quantize.add_argument("--calib-batches", type=int, default=4)
    quantize.add_argument("--batch-size", type=int, default=4)
    quantize.add_argument("--input-shape", help="per-sample input shape for random calibration, e.g. 3,224,224")
    quantize.add_argument("--seq-len", type=int, default=64, help="token count of random LM calibration")
    quantize.add_argument("--device", default="cpu")
    quantize.add_argument("--out", help="directory to save the quantized model to")
    quantize.add_argument("--json", help="write the report as JSON to this file")
    quantize.add_argument("--onnx", help="also export an ONNX QDQ model (opset 21) to this file")
    quantize.add_argument("--no-progress", action="store_true")
    report = commands.add_parser("report", help="print the report of a saved quantized model")
    report.add_argument("directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            from .format import load
            print(load(args.directory).report())
            return 0
        model, calib = load_model(args.model)
        model = model.to(args.device)
        if calib is None:
            shape = [int(v) for v in args.input_shape.split(",")] if args.input_shape else None
            print("qcompile: calibrating on random inputs (pass a module:factory returning (model, calib) "
                  "for real data)", file=sys.stderr)
            calib = random_calib(model, args.calib_batches, args.batch_size, shape, args.seq_len)
        quantized = api.compile(model, calib, build_config(args), progress=not args.no_progress)
        print(quantized.report())
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(quantized.report().to_dict(), handle, indent=1)
        if args.out:
            quantized.save(args.out)
            print(f"saved to {args.out}")
        if args.onnx:
            quantized.export_onnx(args.onnx)
            print(f"wrote {args.onnx}")
        return 0
    except QCompileError as error:
        print(f"qcompile: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
