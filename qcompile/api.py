"""compile(): runs the pass pipeline and returns a QuantizedModel."""
from __future__ import annotations

import os
import time
import warnings
from typing import Any, Iterable

import torch
from torch import fx

from . import primitives as P
from . import rounding
from .checkpoint import RunCheckpoint, run_fingerprint
from .config import QuantConfig, resolve_config
from .errors import CalibrationError, internal_errors
from .ir import Partition, fetch_attr, module_device, normalize_batch
from .passes.allocate import allocate
from .passes.capture import capture, flatten_inputs
from .passes.fold import fold, folded_params
from .passes.optimize import OptimizeResult, optimize
from .passes.partition import partition as partition_pass
from .report import BlockRow, LayerRow, Report
from .rounding.rtn import round_to_nearest


class QuantizedModel(torch.nn.Module):
    """A quantized model: the folded graph (integer codes, scales, quantization ops) behind the
    original model's call signature."""

    def __init__(self, graph_module: fx.GraphModule, config: QuantConfig, report: Report,
                 example_inputs: tuple[tuple, dict]):
        super().__init__()
        self.graph_module = graph_module
        self.config = config
        self.example_inputs = example_inputs
        self._report = report

    def forward(self, *args, **kwargs):
        if kwargs.keys() - self.example_inputs[1].keys():
            args, kwargs = self._as_captured(args, kwargs)
        return self.graph_module(*args, **kwargs)

    def _as_captured(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Inputs given by keyword that the model was captured with positionally (``qm(x=...)`` after
        calibrating on plain tensors), moved to their positions; the names are the graph's placeholders."""
        captured_args = self.example_inputs[0]
        if not all(isinstance(a, torch.Tensor) for a in captured_args):
            return args, kwargs
        names = [node.target for node in self.graph_module.graph.find_nodes(op="placeholder")][:len(captured_args)]
        kwargs = dict(kwargs)
        moved = [kwargs.pop(name) for name in names[len(args):] if name in kwargs]
        unknown = kwargs.keys() - self.example_inputs[1].keys()
        if unknown:
            raise TypeError(f"the quantized model takes the inputs it was calibrated with ({', '.join(names)}"
                            f"{', ' if self.example_inputs[1] else ''}{', '.join(self.example_inputs[1])}); "
                            f"unexpected keyword inputs {sorted(unknown)}")
        return (*args, *moved), kwargs

    def report(self) -> Report:
        """Per-layer bits, group size, weight error (nearest rounding vs the method), bytes; per-block
        output error and time; model size before and after."""
        return self._report

    def quant_params(self):
        """weight target -> QuantParams, read back from the folded graph."""
        return folded_params(self.graph_module)

    def nbytes(self) -> int:
        """Bytes held by the model's tensors (packed codes count at their packed size)."""
        return module_nbytes(self.graph_module)

    def export_onnx(self, path: str, opset: int = 21):
        """Write an ONNX QDQ model (opset >= 21) that onnxruntime runs; returns the onnx.ModelProto.
        Batch and sequence dims are dynamic; see ``passes/lower_onnx.py`` for the layouts."""
        from .passes.lower_onnx import export_onnx
        with internal_errors("the ONNX export"):
            return export_onnx(self.graph_module, self.example_inputs, path, opset)

    def to_torch(self, packed: bool = True) -> fx.GraphModule:
        """A PyTorch GraphModule with the model's call signature, for the device the model is on.
        packed=True: linears (and addmm/mm/matmul with a quantized weight) run integer kernels on the packed
        codes, other quantized ops dequantize their weight per call (passes/lower_torch.py); the module
        holds only packed weights. packed=False: every quantized weight as a float buffer, dequantized once
        (the numerical reference). Both work under ``torch.compile`` and ``torch.export``."""
        from .passes.lower_torch import lower_dequantized, lower_packed
        with internal_errors("the PyTorch lowering"):
            return lower_packed(self.graph_module) if packed else lower_dequantized(self.graph_module)

    def save(self, path: str) -> None:
        """Write ``path``/graph.json and ``path``/tensors.safetensors (no pickle); read with ``qcompile.load``."""
        from .format import save
        save(self, path)


def compile(model: torch.nn.Module, calib: Iterable[Any], config: QuantConfig | str = "w8a16-rtn",
            progress: bool = True, checkpoint_dir: str | os.PathLike | None = None) -> QuantizedModel:
    """Quantize ``model`` with ``config`` (a QuantConfig or a preset name), calibrating on ``calib``:
    an iterable of example inputs (tensors, tuples of tensors, or dicts of keyword arguments).
    ``checkpoint_dir``: write each finished block's parameters there, and resume from them when the
    same run is started again (``qcompile.checkpoint``)."""
    config = resolve_config(config)
    rounding.check_config(config)
    with internal_errors(f"quantizing {type(model).__name__}"):
        return _compile(model, calib, config, progress, checkpoint_dir)


def _compile(model: torch.nn.Module, calib: Iterable[Any], config: QuantConfig, progress: bool,
             checkpoint_dir: str | os.PathLike | None) -> QuantizedModel:
    device = module_device(model)
    batches = _materialize(calib, device)
    start = time.perf_counter()
    example = _example(batches)
    gm = capture(model, *example)
    capture_seconds = time.perf_counter() - start
    partition = partition_pass(gm, config)
    flat = [flatten_inputs(gm, args, kwargs, index) for index, (args, kwargs) in enumerate(batches)]
    float_bytes = module_nbytes(gm)
    if not partition.blocks:
        warnings.warn("no layer is quantized (every quantizable layer is kept float)", stacklevel=3)
    allocation = None
    if config.mixed_precision is not None and partition.blocks:
        partition, allocation = allocate(gm, partition, flat, config, device)
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = RunCheckpoint.open(checkpoint_dir, run_fingerprint(gm, partition, flat, config))
    result = optimize(gm, partition, flat, config, device, progress, checkpoint)
    rows = _layer_rows(gm, partition, result, config)
    fold(gm, partition.layers, result.weight_params, result.activation_params)
    report = Report(method=config.method, layers=rows,
                    blocks=[BlockRow(b.name, b.layers, b.output_error, b.seconds) for b in result.blocks],
                    model_float_bytes=float_bytes, model_bytes=module_nbytes(gm),
                    capture_seconds=capture_seconds, quantize_seconds=time.perf_counter() - start - capture_seconds,
                    notes=list(partition.notes), mixed_precision=None if allocation is None else allocation.to_dict())
    return QuantizedModel(gm, config, report, example)


def module_nbytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct tensors (parameters and buffers) a module holds."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _materialize(calib: Iterable[Any], device: torch.device) -> list[tuple[tuple, dict]]:
    """Every calibration batch as (args, kwargs) on ``device``."""
    if isinstance(calib, (torch.Tensor, dict)):
        raise CalibrationError("calib must be an iterable of batches (e.g. a list of tensors or a DataLoader), "
                               f"not a single {type(calib).__name__}; wrap one batch in a list")
    try:
        iterator = iter(calib)
    except TypeError:
        raise CalibrationError(f"calib must be an iterable of batches, got {type(calib).__name__}") from None
    to_device = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    batches = []
    for index, batch in enumerate(iterator):
        try:
            args, kwargs = normalize_batch(batch)
        except TypeError as error:
            raise CalibrationError(f"calibration batch {index}: {error}") from None
        batches.append((tuple(to_device(a) for a in args), {k: to_device(v) for k, v in kwargs.items()}))
    if not batches:
        raise CalibrationError("calib is empty (or an exhausted iterator): give at least one batch of example "
                               "inputs, e.g. a list of tensors or a DataLoader")
    return batches


def _example(batches: list[tuple[tuple, dict]]) -> tuple[tuple, dict]:
    """The batch to capture with: the first whose tensor dims are all >= 2 (a size-1 dim would be
    specialised by torch.export), else the first."""
    def all_dims_wide(batch):
        tensors = [v for v in (*batch[0], *batch[1].values()) if isinstance(v, torch.Tensor)]
        return all(size >= 2 for t in tensors for size in t.shape)
    return next((batch for batch in batches if all_dims_wide(batch)), batches[0])


def _layer_rows(gm: fx.GraphModule, partition: Partition, result: OptimizeResult, config: QuantConfig
                ) -> list[LayerRow]:
    block_of = {layer.node: block.name for block in partition.blocks for layer in block.layers}
    activation_bits = config.activation.bits if config.activation is not None else None
    rows = []
    for layer in partition.layers:
        params = result.weight_params.get(layer.weight) if layer.quantized else None
        if params is None:
            weight = fetch_attr(gm, layer.weight) if layer.weight else None
            nbytes = weight.numel() * weight.element_size() if weight is not None else 0
            rows.append(LayerRow(layer.module_path, layer.op, f"float: {layer.float_reason}", weight=layer.weight,
                                 float_bytes=nbytes, bytes=nbytes))
            continue
        weight = fetch_attr(gm, layer.weight)
        rtn = round_to_nearest(weight, layer, layer.spec)
        rows.append(LayerRow(
            layer.module_path, layer.op, "quantized", weight=layer.weight, bits=params.bits, group_size=params.group_size,
            symmetric=params.symmetric, activation_bits=activation_bits,
            weight_error_rtn=P.relative_error(weight, rtn.dequantize()),
            weight_error=P.relative_error(weight, params.dequantize()), exponent=params.exponent,
            block=block_of.get(layer.node),
            float_bytes=weight.numel() * weight.element_size(), bytes=params.nbytes()))
    return rows
