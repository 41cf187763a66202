"""The models of the benchmark suite (``benchmarks.run``): what each is calibrated and judged on, which
schemes qcompile runs on it and which peers run next to it.

- ``mnist-resnet``, ``mnist-vit``, ``digits-resnet``, ``digits-vit``: classifiers trained here on real digits
  (``zoo/images.py``), judged by test accuracy (%) of the ONNX file in onnxruntime, the artefact users ship.
  Schemes W8A8 (static, full-integer), W4A8 (static), W3A16 and W2A16 (groups of 32; the convolutional stem,
  whose input counts 32 does not divide, per channel). Peers: onnxruntime ``quantize_static`` (MinMax, Entropy, Percentile at W8A8;
  MinMax with int4 weights at W4A8).
- ``pnet``, ``rnet``, ``onet``: MTCNN's pretrained nets (``zoo/mtcnn.py``), judged by the smallest output SQNR
  (dB) against float on crops of real photographs. Schemes W8A8 and W4A8; the same onnxruntime peers.
- ``shakespeare``: the Llama trained here (``zoo/shakespeare.py``), judged by held-out perplexity, ``lm_head``
  in float everywhere (auto-round's default). Schemes W8 (per channel, RTN only: torchao's int8 cell),
  W4G128, W3G128, W2G128 (asymmetric). Peers: auto-round (200 steps, batch 8, the same 128 windows), onnxruntime
  ``MatMulNBits`` (RTN, HQQ, GPTQ at 4 bits; RTN and HQQ at 2), torchao (``int8``, ``int4``, ``intx`` 4/3/2).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from qcompile import QuantConfig, QuantSpec
from qcompile.config import PRESET_METHODS

from . import peers
from .zoo import images, mtcnn
from .zoo import shakespeare as lm


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A qcompile config (its method is replaced per row), the weight bits it is plotted at, the methods run."""
    config: QuantConfig
    bits: int
    methods: tuple[str, ...] = PRESET_METHODS


@dataclasses.dataclass(frozen=True)
class Peer:
    """One peer cell: ``run(fp32_onnx, workdir, calib_feeds)`` returns an ONNX path or a torch module;
    ``fake_quant``: the module holds dequantized float weights (no size or latency to report)."""
    tool: str
    method: str
    scheme: str
    bits: int
    run: Callable[[Path, Path, list], "Path | torch.nn.Module"]
    fake_quant: bool = False


@dataclasses.dataclass
class Subject:
    """One benchmarked model. ``evaluate(model)`` takes any callable model (torch, quantized, ``OrtModel``) and
    returns the metric, or (metric, details) where more fidelity numbers go into the JSON row; ``example`` =
    (args, kwargs) for latency."""
    name: str
    title: str
    model: torch.nn.Module
    calib: list
    metric_name: str
    higher_is_better: bool
    evaluate: Callable[[object], "float | tuple[float, dict]"]
    example: tuple
    schemes: dict[str, Scheme]
    peers: list[Peer]
    judge_onnx: bool                      # qcompile rows judged on their ONNX export (else on the PyTorch model)
    torch_latency: bool                   # time the packed PyTorch lowering as well


def _static(weight: QuantSpec) -> QuantConfig:
    return QuantConfig(weight=weight, activation=QuantSpec(bits=8, symmetric=False, granularity="tensor"),
                       activation_scope="static")


def _ort_static_peers(schemes: dict[str, Scheme]) -> list[Peer]:
    tool = peers.version("onnxruntime")
    cells = [(method, "W8A8", 8) for method in ("MinMax", "Entropy", "Percentile")] + [("MinMax", "W4A8", 4)]
    return [Peer(tool, f"quantize_static {method}", scheme, bits,
                 lambda fp32, workdir, feeds, method=method, bits=bits, scheme=scheme: _ort_static(
                     fp32, workdir / f"ort-{scheme}-{method}.onnx", feeds, method, bits))
            for method, scheme, bits in cells if scheme in schemes]


def _ort_static(fp32: Path, out: Path, feeds: list, method: str, bits: int) -> Path:
    peers.ort_quantize_static(fp32, out, feeds, method, bits)
    return out


def image(name: str, quick: bool) -> Subject:
    model, splits = images.load(name)
    test = splits.test if not quick else images.Split(splits.test.images[:256], splits.test.labels[:256])
    first = "stem.0" if "resnet" in name else "patch_embed.backbone.*"   # 9 and 216 inputs: no 32-groups
    per_channel = QuantSpec(bits=2, symmetric=False)
    schemes = {"W8A8": Scheme(_static(QuantSpec(bits=8)), 8),
               "W4A8": Scheme(_static(QuantSpec(bits=4, symmetric=False)), 4),
               "W3A16": Scheme(QuantConfig(weight=QuantSpec(bits=3, symmetric=False)), 3),
               "W2A16": Scheme(QuantConfig(weight=QuantSpec(bits=2, group_size=32, symmetric=False),
                                           overrides={first: per_channel}), 2)}
    dataset, arch = name.split("-")
    title = f"{'ResNet-style CNN' if arch == 'resnet' else 'ViT'} on {'MNIST' if dataset == 'mnist' else 'sklearn digits'}"
    return Subject(name, title, model, list(splits.calibration.images.split(32)), "accuracy %", True,
                   lambda m: 100 * images.accuracy(m, test), ((test.images[:64],), {}), schemes,
                   _ort_static_peers(schemes), judge_onnx=True, torch_latency=False)


def mtcnn_net(name: str, quick: bool) -> Subject:
    model = mtcnn.load(name)
    size = mtcnn.SIZES[name]
    test = mtcnn.crops(size, 128 if quick else 512, seed=1)
    reference = mtcnn.outputs(model, test)
    schemes = {"W8A8": Scheme(_static(QuantSpec(bits=8)), 8),
               "W4A8": Scheme(_static(QuantSpec(bits=4, symmetric=False)), 4)}

    def evaluate(m) -> tuple[float, dict]:
        details = mtcnn.fidelity(name, reference, mtcnn.outputs(m, test))
        return details["sqnr_min"], details
    return Subject(name, f"MTCNN {name[0].upper()}-Net (pretrained)", model,
                   list(mtcnn.crops(size, 128, seed=0).split(32)), "min SQNR dB", True, evaluate,
                   ((test[:64],), {}), schemes, _ort_static_peers(schemes), judge_onnx=True, torch_latency=False)


LM_ITERS, LM_BATCH, GROUP = 200, 8, 128


def language(quick: bool) -> Subject:
    model, tokenizer, held_out, train = lm.load()
    generator = torch.Generator().manual_seed(0)
    picked = train[torch.randperm(len(train), generator=generator)[:32 if quick else 128]]
    calib = [{"input_ids": ids} for ids in picked.split(LM_BATCH)]
    evaluation = held_out[:32 if quick else 256]

    def grouped(bits: int) -> QuantConfig:
        return QuantConfig(weight=QuantSpec(bits=bits, group_size=GROUP, symmetric=False), overrides={"lm_head": None})
    schemes = {"W8": Scheme(QuantConfig(weight=QuantSpec(bits=8), overrides={"lm_head": None}), 8, ("rtn",)),
               **{f"W{bits}G{GROUP}": Scheme(grouped(bits), bits) for bits in (4, 3, 2)}}
    ort, torchao, autoround = peers.version("onnxruntime"), peers.version("torchao"), peers.version("auto-round")

    def nbits(bits: int, algorithm: str) -> Callable:
        def run(fp32: Path, workdir: Path, feeds: list) -> Path:
            out = workdir / f"ort-nbits-{bits}-{algorithm}.onnx"
            peers.ort_matmul_nbits(fp32, out, bits, GROUP, algorithm, feeds, exclude=("lm_head",))
            return out
        return run

    def ao(config: str) -> Callable:
        return lambda fp32, workdir, feeds: peers.torchao_weight_only(model, config, GROUP)

    def rounder(bits: int) -> Callable:
        return lambda fp32, workdir, feeds: peers.auto_round(model, tokenizer, calib, bits, GROUP,
                                                             10 if quick else LM_ITERS, LM_BATCH)
    cells = [*(Peer(autoround, "SignRound", f"W{b}G{GROUP}", b, rounder(b), fake_quant=True) for b in (4, 3, 2)),
             *(Peer(ort, f"MatMulNBits {a}", f"W4G{GROUP}", 4, nbits(4, a)) for a in ("rtn", "hqq", "gptq")),
             *(Peer(ort, f"MatMulNBits {a}", f"W2G{GROUP}", 2, nbits(2, a)) for a in ("rtn", "hqq")),
             Peer(torchao, "int8 weight-only", "W8", 8, ao("int8")),
             Peer(torchao, "int4 weight-only", f"W4G{GROUP}", 4, ao("int4")),
             *(Peer(torchao, f"intx{b} weight-only", f"W{b}G{GROUP}", b, ao(f"intx{b}")) for b in (4, 3, 2))]
    return Subject("shakespeare", "Shakespeare Llama (5.3 M, trained here)", model, calib, "perplexity", False,
                   lambda m: lm.perplexity(m, evaluation), ((), {"input_ids": held_out[:1]}), schemes, cells,
                   judge_onnx=False, torch_latency=True)


SUBJECTS: dict[str, Callable[[bool], Subject]] = {
    **{name: (lambda quick, name=name: image(name, quick)) for name in images.ZOO},
    **{name: (lambda quick, name=name: mtcnn_net(name, quick)) for name in mtcnn.SIZES},
    "shakespeare": language,
}
