"""Packed PyTorch lowering: speed and size of ``qm.to_torch(packed=True)`` under torch.compile.

Two tables, printed and written as JSON (benchmarks/results/packed_torch_<device>.json):

1. kernels: one projection x[1 x 4096] @ W[4096 x 4096] (a decode step), fp32 linear vs qcompile's
   packed_linear (int4 g128, int8 per channel) vs torch's stock packed kernels (PERF.md's table).
2. models: a Llama-style LM built from config (4 layers, hidden 1024, vocab 32000) and timm's ResNet-18:
   eager fp32, compiled fp32, compiled packed W8 (per channel) and compiled packed W4 (G128 for the LM, per channel for
   the CNN; RTN: every method folds to the same kernels): latency of a one-token step (the LM without KV cache: one token
   through every projection and the 32000-way head), of a 256-token prefill, of a 1 x 224 x 224 image;
   weight bytes; peak CUDA memory on a GPU.

    python -m benchmarks.packed_torch [--device cuda] [--only kernels|models]

On CUDA the models run in bfloat16 (what tinygemm's int4 kernel takes).
"""
from __future__ import annotations

import argparse

import torch

import qcompile
from qcompile import primitives as P
from qcompile.api import module_nbytes
from qcompile.ops import packed_linear

from .common import median_ms, write_results

W4G128 = qcompile.QuantConfig(weight=qcompile.QuantSpec(bits=4, group_size=128, symmetric=False))


def _timer(device: torch.device):
    def time_ms(run, repeats=20):
        def synced():
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return median_ms(synced, repeats)
    return time_ms


def kernel_rows(device: torch.device) -> list[dict]:
    time_ms = _timer(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = k = 4096
    weight = torch.randn(n, k, device=device)
    x = torch.randn(1, k, device=device, dtype=dtype)
    rows = [{"path": f"{dtype} linear", "ms": time_ms(lambda: torch.nn.functional.linear(x, weight.to(dtype)))}]
    for bits, group_size in ((4, 128), (8, -1)):
        scale, zero_point = P.weight_scale_zero_point(weight, bits, False, group_size)
        codes = P.quantize_weight(weight, scale, zero_point, bits, False)
        packed = P.pack_codes(codes, bits, 0)
        zero_offset = zero_point.to(torch.uint8)
        size = k if group_size == -1 else group_size
        rows.append({"path": f"qcompile packed_linear int{bits} g{group_size}",
                     "ms": time_ms(lambda: packed_linear(x, packed, scale, zero_offset, bits, size, None))})
    if device.type == "cpu":
        int8 = torch.randint(-128, 127, (n, k), dtype=torch.int8)
        scales = torch.rand(n)
        rows.append({"path": "aten._weight_int8pack_mm (stock)",
                     "ms": time_ms(lambda: torch.ops.aten._weight_int8pack_mm(x, int8, scales))})
    for row in rows:
        row["vs_linear"] = rows[0]["ms"] / row["ms"]
    return rows


def _llama(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(device, dtype)

    class Logits(torch.nn.Module):  # one tensor in, one tensor out, no cache: what the compilers see
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits
    calib = [torch.randint(0, 32000, (2, 32), device=device) for _ in range(2)]
    inputs = {"1-token step": torch.randint(0, 32000, (1, 1), device=device),
              "256-token prefill": torch.randint(0, 32000, (1, 256), device=device)}
    return Logits().eval(), calib, inputs


def _resnet(device, dtype):
    import timm
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval().to(device, dtype)
    calib = [torch.randn(2, 3, 224, 224, device=device, dtype=dtype)]
    return model, calib, {"1x224x224 image": torch.randn(1, 3, 224, 224, device=device, dtype=dtype)}


def model_rows(device: torch.device) -> list[dict]:
    time_ms = _timer(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, build in (("llama-4x1024", _llama), ("resnet18", _resnet)):
        model, calib, inputs = build(device, dtype)
        variants = {"eager fp32" if dtype == torch.float32 else "eager bf16": model,
                    "compiled float": torch.compile(model)}
        w4 = W4G128 if name.startswith("llama") else "w4a16-rtn"  # the CNN's stem (147 inputs): per channel
        for label, config in (("compiled packed W8", "w8a16-rtn"), ("compiled packed W4", w4)):
            qm = qcompile.compile(model, calib, config, progress=False)
            variants[label] = torch.compile(qm.to_torch(packed=True))
        for label, module in variants.items():
            weights = module_nbytes(getattr(module, "_orig_mod", module))
            row = {"model": name, "variant": label, "weight_MB": weights / 2**20}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                for shape, x in inputs.items():
                    row[f"{shape} ms"] = time_ms(lambda: module(x), repeats=10)
            if device.type == "cuda":
                row["peak_cuda_MB"] = torch.cuda.max_memory_allocated() / 2**20
            rows.append(row)
            print(row, flush=True)
    return rows


def _print(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row.get(k, ''):.3f}" if isinstance(row.get(k), float) else str(row.get(k, ""))
                         for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=("kernels", "models"))
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {}
    if args.only in (None, "kernels"):
        result["kernels"] = kernel_rows(device)
        _print(result["kernels"])
    if args.only in (None, "models"):
        result["models"] = model_rows(device)
        _print(result["models"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    for table, rows in result.items():
        write_results(f"benchmarks/results/packed_torch_{table}_{device.type}.json", rows, device=name)


if __name__ == "__main__":
    main()
