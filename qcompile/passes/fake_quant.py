"""fake_quant: a trainable copy of a graph, with fake-quantizer modules on weights and activations.

``insert_fake_quant`` copies a GraphModule (a block or a whole model) and rewrites the copy:

- every get_attr of a weight in ``weights`` becomes a call of that weight's quantizer module (a module
  whose ``forward()`` returns the weight to use, e.g. ``quantizers.WeightQuantizer``);
- every value in ``activations`` passes through its quantizer module (``forward(x)``), which every
  reader then reads, as fold's quantize-dequantize nodes would;
- the activation input of each layer in ``detach_layers`` is detached, so that a loss on that layer's
  output trains only its own weight (layer-wise reconstruction);
- ``extra_outputs`` (node names) are appended to the output tuple.

The copy shares the original's other tensors; the original graph is not changed. Inserted nodes carry
META_ROLE (ROLE_WEIGHT_FAKE_QUANT / ROLE_ACTIVATION_FAKE_QUANT) and the value's META_MODULE_PATH.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from torch import fx, nn

from ..ir import (META_MODULE_PATH, META_ROLE, META_WEIGHT, ROLE_ACTIVATION_FAKE_QUANT, ROLE_WEIGHT_FAKE_QUANT,
                  QuantLayer, reroute_readers)

WEIGHT_PREFIX = "fake_quant_weight"
ACTIVATION_PREFIX = "fake_quant_activation"


def insert_fake_quant(gm: fx.GraphModule, weights: Mapping[str, nn.Module], activations: Mapping[str, nn.Module],
                      detach_layers: Iterable[QuantLayer] = (), extra_outputs: Iterable[str] = ()) -> fx.GraphModule:
    """The rewritten copy of ``gm`` (see the module docstring)."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    copy = fx.GraphModule(gm, graph, class_name=f"FakeQuant{type(gm).__name__}")
    by_name = {node.name: node for node in graph.nodes}
    for index, (target, module) in enumerate(weights.items()):
        copy.add_submodule(f"{WEIGHT_PREFIX}_{index}", module)
        for node in [n for n in graph.nodes if n.op == "get_attr" and n.target == target]:
            with graph.inserting_before(node):
                call = graph.call_module(f"{WEIGHT_PREFIX}_{index}")
            call.meta.update({**node.meta, META_ROLE: ROLE_WEIGHT_FAKE_QUANT, META_WEIGHT: target})
            node.replace_all_uses_with(call)
            graph.erase_node(node)
    for index, (name, module) in enumerate(activations.items()):
        copy.add_submodule(f"{ACTIVATION_PREFIX}_{index}", module)
        value = by_name[name]
        call = reroute_readers(graph, value, lambda v: graph.call_module(f"{ACTIVATION_PREFIX}_{index}", (v,)))
        call.meta.update({META_MODULE_PATH: value.meta.get(META_MODULE_PATH, ""), META_ROLE: ROLE_ACTIVATION_FAKE_QUANT})
    for layer in detach_layers:
        node = by_name[layer.node]
        with graph.inserting_before(node):
            detached = graph.call_method("detach", (node.args[layer.input_index],))
        node.update_arg(layer.input_index, detached)
    extra = [by_name[name] for name in extra_outputs]
    if extra:
        output_node = next(node for node in graph.nodes if node.op == "output")
        output_node.args = (tuple(output_node.args[0]) + tuple(extra),)
    graph.lint()
    copy.recompile()
    return copy
