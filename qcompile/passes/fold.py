"""fold: write quantization parameters into the graph as real integer data and quantization ops.

For each quantized weight, the parameter is replaced by three buffers on its owner module,
``<name>_codes`` (uint8, packed densely by ``primitives.pack_codes``), ``<name>_scale`` (float32) and
``<name>_zero_point``, feeding one ``qcompile::dequantize_weight`` node placed before its first
consumer (so dequantized weights live only while used). For each quantized activation value, a
``<value>_act_scale`` / ``<value>_act_zero_point`` pair feeds one ``qcompile::quantize_dequantize``
node right after the value, and every reader reads its output. New nodes carry META_ROLE, META_MODULE_PATH and, for weights,
META_WEIGHT. ``folded_params`` reads the QuantParams back from such a graph.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import fx

from .. import primitives as P
from ..ir import (ActivationParams, META_MODULE_PATH, META_ROLE, META_WEIGHT, QuantLayer, QuantParams,
                  ROLE_ACTIVATION_QDQ, ROLE_WEIGHT_DEQUANT, drop_unread_tensors, fetch_attr, module_device,
                  reroute_readers)
from ..ops import DEQUANTIZE_WEIGHT, QUANTIZE_DEQUANTIZE


def fold(gm: fx.GraphModule, layers: Iterable[QuantLayer], weight_params: Mapping[str, QuantParams],
         activation_params: Mapping[str, ActivationParams]) -> fx.GraphModule:
    """Rewrite ``gm`` in place (and return it): quantized weights and activations of ``layers`` that
    have params. Works on the whole model and on a block's GraphModule alike."""
    by_name = {node.name: node for node in gm.graph.nodes}
    layers = [layer for layer in layers if layer.quantized and layer.node in by_name and layer.weight in weight_params]
    dequantized: dict[str, fx.Node] = {}
    for layer in layers:
        node = by_name[layer.node]
        weight_node = node.args[layer.weight_index]
        if layer.weight not in dequantized:
            dequantized[layer.weight] = _insert_dequantize(gm, node, layer, weight_params[layer.weight],
                                                           fetch_attr(gm, layer.weight).dtype)
        node.replace_input_with(weight_node, dequantized[layer.weight])
    drop_unread_tensors(gm)  # float weights that only quantized layers read
    _insert_activation_qdq(gm, by_name, activation_params)
    gm.graph.lint()
    gm.recompile()
    return gm


def register_tensor(gm: fx.GraphModule, owner: str, name: str, tensor: torch.Tensor, before: fx.Node,
                    path: str) -> fx.Node:
    """Register ``tensor`` as buffer ``name`` of submodule ``owner`` and read it with a get_attr node placed
    before ``before``, tagged with module path ``path``."""
    gm.get_submodule(owner).register_buffer(name, tensor)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(f"{owner}.{name}" if owner else name)
    node.meta[META_MODULE_PATH] = path
    return node


def _insert_dequantize(gm: fx.GraphModule, consumer: fx.Node, layer: QuantLayer, params: QuantParams,
                       dtype: torch.dtype) -> fx.Node:
    owner, _, attr = layer.weight.rpartition(".")
    qmin, _ = params.qrange
    device = fetch_attr(gm, layer.weight).device
    packed = P.pack_codes(params.weight_codes, params.bits, qmin).to(device)
    codes = register_tensor(gm, owner, f"{attr}_codes", packed, consumer, layer.module_path)
    scale = register_tensor(gm, owner, f"{attr}_scale", params.scale.float().to(device), consumer, layer.module_path)
    zero_point = register_tensor(gm, owner, f"{attr}_zero_point", params.zero_point.to(device), consumer, layer.module_path)
    with gm.graph.inserting_before(consumer):
        node = gm.graph.call_function(DEQUANTIZE_WEIGHT, (codes, scale, zero_point, params.bits, qmin, params.axis,
                                                          list(params.shape), dtype, params.exponent))
    node.meta.update({META_MODULE_PATH: layer.module_path, META_ROLE: ROLE_WEIGHT_DEQUANT, META_WEIGHT: layer.weight})
    return node


def _insert_activation_qdq(gm: fx.GraphModule, by_name: dict[str, fx.Node],
                           activation_params: Mapping[str, ActivationParams]) -> None:
    """One quantize-dequantize right after each quantized value; every reader then reads it quantized."""
    first_compute = next(n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr"))
    device = module_device(gm)
    for name, params in activation_params.items():
        value = by_name.get(name)
        if value is None:
            continue
        scale = register_tensor(gm, "", f"{name}_act_scale", params.scale.float().to(device), first_compute, "")
        zero_point = register_tensor(gm, "", f"{name}_act_zero_point", params.zero_point.to(device), first_compute, "")
        qmin, qmax = params.qrange
        qdq = reroute_readers(gm.graph, value, lambda v: gm.graph.call_function(
            QUANTIZE_DEQUANTIZE, (v, scale, zero_point, qmin, qmax)))
        qdq.meta.update({META_MODULE_PATH: value.meta.get(META_MODULE_PATH, ""), META_ROLE: ROLE_ACTIVATION_QDQ})


def folded_params(gm: fx.GraphModule) -> dict[str, QuantParams]:
    """The QuantParams of every dequantize node of a folded graph, keyed by the weight target."""
    params = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != DEQUANTIZE_WEIGHT:
            continue
        codes_node, scale_node, zero_point_node, bits, qmin, axis, shape, _, exponent = node.args
        scale, zero_point = fetch_attr(gm, scale_node.target), fetch_attr(gm, zero_point_node.target)
        rows = shape[axis]
        cols = math.prod(shape) // rows
        symmetric = qmin < 0
        codes = P.unpack_codes(fetch_attr(gm, codes_node.target), bits, qmin, cols).to(P.code_dtype(symmetric))
        n_groups = scale.shape[1]
        params[node.meta[META_WEIGHT]] = QuantParams(
            weight_codes=codes, scale=scale, zero_point=zero_point, bits=bits, symmetric=symmetric,
            group_size=-1 if n_groups == 1 else cols // n_groups, axis=axis, shape=tuple(shape), exponent=exponent)
    return params
