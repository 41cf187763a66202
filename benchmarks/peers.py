"""The tools users would pick instead of qcompile, each behind a small adapter that takes the same float model
and calibration data as ``qcompile.compile``. ``benchmarks.run`` runs them side by side with qcompile.

- Intel's **auto-round** (the SignRound reference implementation): ``auto_round``; needs ``-e ".[peers]"``.
- **onnxruntime**'s quantizers on the fp32 ONNX export: ``ort_quantize_static`` (QDQ, per-channel weights,
  MinMax / Entropy / Percentile calibration) and ``ort_matmul_nbits`` (blocked weight-only MatMulNBits: RTN,
  GPTQ and HQQ configs).
- **torchao**'s ``quantize_`` with weight-only configs: ``torchao_weight_only``; needs ``-e ".[peers]"``.
"""
from __future__ import annotations

import ast
import copy
import importlib.metadata
import logging
from pathlib import Path

import torch


def version(package: str) -> str:
    """``"<package> <version>"``, or ``"<package> (not installed)"``."""
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package} (not installed)"


def auto_round(model, tokenizer, calib: list[dict], bits: int, group_size: int, iters: int,
               batch_size: int) -> torch.nn.Module:
    """auto-round's SignRound (asymmetric, ``lm_head`` left in float, its default) on a copy of ``model``,
    calibrated on the same windows as qcompile (``calib``: batches of ``{"input_ids": [b, seq]}``). Returns
    auto-round's in-memory result, the model with fake-quantized weights, cast from its bf16 to float32."""
    from auto_round import AutoRound
    logging.getLogger("autoround").setLevel(logging.ERROR)   # its import sets INFO: a line per block and step
    windows = [row.unsqueeze(0) for batch in calib for row in batch["input_ids"]]
    rounder = AutoRound(copy.deepcopy(model), tokenizer, bits=bits, group_size=group_size, sym=False, iters=iters,
                        nsamples=len(windows), seqlen=windows[0].shape[-1], dataset=windows, batch_size=batch_size,
                        device_map="cpu", enable_torch_compile=False)
    quantized, _ = rounder.quantize()
    return quantized.float()


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self.feeds = list(feeds)
        self.rewind()

    def get_next(self):
        return next(self.batches, None)

    def rewind(self):
        self.batches = iter(self.feeds)

    def __iter__(self):                     # the GPTQ path of MatMulNBitsQuantizer iterates the reader
        return iter(self.feeds)


def ort_quantize_static(fp32: Path, out: Path, calib_feeds: list[dict], method: str = "MinMax",
                        weight_bits: int = 8) -> None:
    """onnxruntime's ``quantize_static``: QDQ, per-channel signed weights (8 or 4 bits), uint8 activations
    calibrated with ``method`` (MinMax, Entropy, Percentile) on ``calib_feeds``, after ``quant_pre_process``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared))
    weight_type = {8: QuantType.QInt8, 4: QuantType.QInt4}[weight_bits]
    quantize_static(str(prepared), str(out), _Reader(calib_feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=weight_type,
                    calibrate_method=getattr(CalibrationMethod, method))
    prepared.unlink()


def ort_matmul_nbits(fp32: Path, out: Path, bits: int, block_size: int, algorithm: str = "rtn",
                     calib_feeds: list[dict] | None = None, exclude: tuple[str, ...] = ()) -> None:
    """onnxruntime's ``MatMulNBitsQuantizer``: asymmetric blocked weights of ``bits`` on every MatMul with a
    constant weight except those inside the modules named in ``exclude`` (``module_scopes``); ``algorithm`` is ``rtn``
    (DefaultWeightOnlyQuantConfig), ``gptq`` (GPTQWeightOnlyQuantConfig on ``calib_feeds``) or ``hqq``."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits
    model = onnx.load(str(fp32))
    excluded = [node.name for node in model.graph.node if set(exclude) & set(module_scopes(node))]
    if algorithm == "rtn":
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits)
    elif algorithm == "gptq":
        config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(calib_feeds),
                                                 block_size=block_size)
    elif algorithm == "hqq":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    else:
        raise ValueError(f"unknown MatMulNBits algorithm {algorithm!r}")
    quantizer = _matmul_nbits_quantizer()(model, nodes_to_exclude=excluded, algo_config=config,
                                          block_size=block_size, is_symmetric=False, bits=bits)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


def _matmul_nbits_quantizer():
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    class Quantizer(MatMulNBitsQuantizer):
        """onnxruntime's quantizer with ``nodes_to_exclude`` honoured by its GPTQ path too: that path builds
        its per-node config without them (its RTN path marks them ``"fp32"``, which the GPTQ code skips)."""

        def _generate_q4_node_config(self):
            return {**super()._generate_q4_node_config(), **{name: "fp32" for name in self.nodes_to_exclude}}
    return Quantizer


def module_scopes(node) -> list[str]:
    """The module paths an ONNX node of torch's dynamo exporter came from (its ``pkg.torch.onnx.name_scopes``
    metadata: ``['', 'lm_head', 'linear_28']``); node and initializer names (``node_linear_28``, ``val_615``)
    do not say."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return ast.literal_eval(prop.value)
    return []


def torchao_weight_only(model: torch.nn.Module, config: str, group_size: int,
                        skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """torchao's ``quantize_`` on a copy of ``model``, on every ``nn.Linear`` but those named in ``skip``.
    ``config``: ``int8`` (``Int8WeightOnlyConfig``, per channel), ``int4`` (``Int4WeightOnlyConfig`` in groups,
    bf16, its packed-kernel path: it needs CUDA or the mslk package and raises otherwise) or ``intx<bits>``
    (``IntxWeightOnlyConfig`` in groups: codes held unpacked in int8, dequantized per call, any device)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    copied = copy.deepcopy(model)
    if config == "int8":
        recipe = Int8WeightOnlyConfig()
    elif config == "int4":
        copied, recipe = copied.to(torch.bfloat16), Int4WeightOnlyConfig(group_size=group_size)
    elif config.startswith("intx"):
        recipe = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{config[4:]}"),
                                      granularity=PerGroup(group_size))
    else:
        raise ValueError(f"unknown torchao config {config!r}")
    quantize_(copied, recipe, filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and name not in skip)
    return copied


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes the parameters and buffers of ``module`` hold, counting the inner tensors of tensor subclasses
    (torchao's quantized weights) rather than their logical float size."""
    def nbytes(tensor) -> int:
        if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = tensor.__tensor_flatten__()
            return sum(nbytes(getattr(tensor, name)) for name in names)
        return tensor.numel() * tensor.element_size()
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(nbytes(t) for t in tensors.values())
