"""Shared machinery of layer-wise rounding methods (GPTQ, COMQ): per-layer reconstruction problems.

Each quantized layer of a block is reduced to minimising ||X W^T - X Q^T||^2 over its quantized weight
Q, which depends on the data only through the Gram matrix H = X^T X of the layer's inputs. The Gram
matrices are accumulated in float32 over the calibration batches by running the block with an FX
interpreter that reads each layer's input; layers are taken in stages of layers that read the same value
(q/k/v, gate/up), in graph order, and a stage sees the earlier stages already quantized ("true
sequential" in GPTQ's reference implementation).

A power-grid exponent that is searched is chosen here on the layer output error (the Gram matrix), not
on the weight error: a lower weight error that moves error onto the large weights can raise the output's.

Input matrices X by op: linear / matmul / addmm: the last dim of the input; conv1d/conv2d: unfolded
patches (``F.unfold``), in the (channel, kernel) order of ``weight.reshape(out, -1)``; a grouped conv
gets one Gram matrix per group for its rows. Embeddings (lookups), conv3d and ``padding="same"`` convs
have no input matrix here: ``layerwise_params`` rounds them to nearest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import fx

from .. import primitives as P
from ..config import QuantSpec
from ..ir import Block, QuantLayer, QuantParams, module_device, values_to
from ..quantizers import power_exponent
from .rtn import round_to_nearest


@dataclass
class Solution:
    """What a layer solver returns for a [rows, cols] weight: integer-valued float codes [rows, cols],
    scale and zero point [rows | 1, n_groups], and the objective after each pass (for diagnostics)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    objective: list[float]


# solver(weight [rows, cols] float32, gram [cols, cols] float32, spec, options, exponent) -> Solution, where
# exponent is the layer's grid exponent (1.0: uniform; ``quantizers.power_exponent``)
Solver = Callable[[torch.Tensor, torch.Tensor, QuantSpec, Mapping[str, Any], float], Solution]


def layer_objective(weight: torch.Tensor, dequantized: torch.Tensor, gram: torch.Tensor) -> float:
    """trace((W - Q) H (W - Q)^T) = ||X W^T - X Q^T||^2 summed over rows."""
    error = weight - dequantized
    return float(((error @ gram) * error).sum())


def _conv_geometry(node: fx.Node, spatial: int) -> tuple[list[int], list[int], list[int], int] | None:
    """(stride, padding, dilation, groups) of a 1-D/2-D conv node as 2-D lists; None when it has no
    unfolded form here (3-D, or string padding)."""
    if spatial not in (1, 2):
        return None
    args = list(node.args) + [None] * (7 - len(node.args))

    def as_list(value, default):
        if isinstance(value, str):
            return None
        value = list(value) if isinstance(value, (list, tuple)) else [default if value is None else value]
        return value * spatial if len(value) == 1 else value

    stride, padding, dilation = as_list(args[3], 1), as_list(args[4], 0), as_list(args[5], 1)
    if stride is None or padding is None or dilation is None:
        return None
    if spatial == 1:
        stride, padding, dilation = [1, *stride], [0, *padding], [1, *dilation]
    return stride, padding, dilation, int(args[6] or 1)


def _input_rows(layer: QuantLayer, node: fx.Node, x: torch.Tensor, weight_shape: tuple[int, ...]
                ) -> torch.Tensor | None:
    """The layer's inputs as rows of X ([n, cols] or, for grouped convs, [groups, n, cols/groups])."""
    if layer.op in ("linear", "matmul"):
        return x.reshape(-1, x.shape[-1]).float()
    if layer.op == "embedding":
        return None  # a lookup has no input matrix: nearest rounding
    geometry = _conv_geometry(node, len(weight_shape) - 2)
    if geometry is None:
        return None
    stride, padding, dilation, groups = geometry
    if x.dim() == 3:
        x = x.unsqueeze(2)
    kernel = list(weight_shape[2:]) if len(weight_shape) == 4 else [1, weight_shape[2]]
    patches = F.unfold(x.float(), kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C*k, L]
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return rows.reshape(rows.shape[0], groups, -1).transpose(0, 1) if groups > 1 else rows


class _Collector(fx.Interpreter):
    """Runs a block with some weights replaced, accumulating X^T X of the chosen layers' inputs."""

    def __init__(self, module: fx.GraphModule, overrides: dict[str, torch.Tensor], layers: list[QuantLayer]):
        super().__init__(module)
        self.overrides = overrides
        self.layers = {layer.node: layer for layer in layers}
        self.nodes = {node.name: node for node in module.graph.nodes}
        self.grams: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def fetch_attr(self, target: str):
        return self.overrides[target] if target in self.overrides else super().fetch_attr(target)

    def run_node(self, node: fx.Node):
        layer = self.layers.get(node.name)
        if layer is not None:
            x = self.env[node.args[layer.input_index]]
            rows = _input_rows(layer, node, x, layer.weight_shape)
            if rows is None:
                self.grams[node.name] = None
            else:
                gram = rows.transpose(-1, -2) @ rows
                self.grams[node.name] = gram if node.name not in self.grams else self.grams[node.name] + gram
                self.counts[node.name] = self.counts.get(node.name, 0) + rows.shape[-2]
        return super().run_node(node)


def _stages(block: Block, layers: list[QuantLayer]) -> list[list[QuantLayer]]:
    """Layers grouped by the value they read, in graph order."""
    nodes = {node.name: node for node in block.graph_module.graph.nodes}
    stages: dict[str, list[QuantLayer]] = {}
    for layer in layers:
        stages.setdefault(nodes[layer.node].args[layer.input_index].name, []).append(layer)
    return list(stages.values())


def layerwise_params(block: Block, inputs: list[tuple], specs: Mapping[str, QuantSpec], solver: Solver,
                     options: Mapping[str, Any]) -> dict[str, QuantParams]:
    """QuantParams for ``specs`` (weight target -> spec) found by ``solver`` on each layer's Gram matrix."""
    device = module_device(block.graph_module)
    layers = [layer for layer in block.layers if layer.weight in specs]
    first_reader = {}
    for layer in layers:
        first_reader.setdefault(layer.weight, layer)
    params: dict[str, QuantParams] = {}
    overrides: dict[str, torch.Tensor] = {}
    for stage in _stages(block, list(first_reader.values())):
        collector = _Collector(block.graph_module, overrides, stage)
        with torch.no_grad():
            for batch in inputs:
                collector.run(*values_to(batch, device))
        for layer in stage:
            weight = block.weight(layer.weight)
            gram = collector.grams.get(layer.node)
            spec = specs[layer.weight]
            if gram is None or (gram.dim() == 3 and spec.granularity == "tensor"):
                params[layer.weight] = round_to_nearest(weight, layer, spec)
            else:
                params[layer.weight] = _solve(weight, layer, spec, gram / max(collector.counts[layer.node], 1),
                                              solver, options)
            overrides[layer.weight] = params[layer.weight].dequantize().to(weight.dtype).to(device)
    return params


def _solve(weight: torch.Tensor, layer: QuantLayer, spec: QuantSpec, gram: torch.Tensor, solver: Solver,
           options: Mapping[str, Any]) -> QuantParams:
    matrix = P.weight_matrix(weight.detach(), layer.axis).float()
    exponent = power_exponent(matrix, spec, gram if gram.dim() == 2 else None)
    grams = gram if gram.dim() == 3 else gram.unsqueeze(0)
    rows_per_group = matrix.shape[0] // grams.shape[0]
    parts = [solver(matrix[g * rows_per_group:(g + 1) * rows_per_group], grams[g], spec, options, exponent)
             for g in range(grams.shape[0])]
    dtype = P.code_dtype(spec.symmetric)
    return QuantParams(weight_codes=torch.cat([part.codes for part in parts]).to(dtype),
                       scale=torch.cat([part.scale for part in parts]),
                       zero_point=torch.cat([part.zero_point for part in parts]).to(dtype), bits=spec.bits,
                       symmetric=spec.symmetric, group_size=spec.group_size, axis=layer.axis,
                       shape=tuple(weight.shape), exponent=exponent)
