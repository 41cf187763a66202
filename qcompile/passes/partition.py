"""partition: GraphModule -> Partition (quantizable layers and reconstruction blocks).

1. Finds quantizable ops: linear, conv1d/2d/3d, matmul/mm/addmm whose right operand is a 2-D
   parameter (GPT-2's Conv1D), and embeddings (quantized only when an override names them, since
   weight-only LLM recipes keep them float by default). Ops that look quantizable but are not supported (transposed conv, a
   weight computed in the graph, a parameter on the left of a matmul) stay float with a reason.
2. Builds the dependency DAG (networkx) of the nodes downstream of quantized ops; values that no
   quantized op influences (masks, rotary tables, embeddings) are the same in the float and the
   quantized model and do not constrain the cut.
3. Cuts the node order after every dominator of the output on that DAG: such a cut is crossed by one
   quantization-dependent value (single entry, single exit). Regions are then merged by the module
   that owns their layers: the deepest indexed container item (``layers.3``, ``layer1.0``,
   ``blocks.5``) holding at least two quantized layers, so a residual block or a transformer layer
   is one block. ``granularity="layer"`` also cuts after each quantized op: one layer a block.

Reads node.meta[META_MODULE_PATH]; writes nothing on the graph.
"""
from __future__ import annotations

import operator
import warnings
from collections import Counter

import networkx as nx
import torch
from torch import fx

from ..config import QuantConfig
from ..errors import ConfigError, InvalidModelError
from ..ir import Block, META_MODULE_PATH, Partition, QuantLayer, fetch_attr

_aten = torch.ops.aten
LINEAR_TARGETS = {_aten.linear.default, torch._C._nn.linear}
CONV_TARGETS = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default, _aten.conv1d.padding,
                _aten.conv2d.padding, _aten.conv3d.padding, torch.conv1d, torch.conv2d, torch.conv3d}
CONVOLUTION_TARGETS = {_aten.convolution.default}
MATMUL_TARGETS = {_aten.matmul.default, _aten.mm.default, torch.matmul, torch.mm, operator.matmul}
ADDMM_TARGETS = {_aten.addmm.default, torch.addmm}
FUSABLE_ACTIVATIONS = {_aten.relu.default, _aten.relu_.default, _aten.hardtanh.default, _aten.hardtanh_.default,
                       torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.hardtanh}
ADD_TARGETS = {_aten.add.Tensor, _aten.add_.Tensor, operator.add, torch.add}
EMBEDDING_TARGETS = {_aten.embedding.default: (1, 0), torch.nn.functional.embedding: (0, 1)}  # (indices, weight)
TRANSPOSED_CONV_TARGETS = {_aten.conv_transpose1d.default, _aten.conv_transpose2d.input,
                           _aten.conv_transpose3d.input, torch.conv_transpose1d, torch.conv_transpose2d,
                           torch.conv_transpose3d}
SOURCE, SINK = "__qcompile_source__", "__qcompile_sink__"


def partition(gm: fx.GraphModule, config: QuantConfig) -> Partition:
    """Quantizable layers of ``gm`` with their resolved specs, and the blocks to quantize in order."""
    layers, notes = find_layers(gm, config)
    if not layers:
        raise InvalidModelError("the model has no quantizable op (linear, conv, or matmul with a parameter weight); "
                                "there is nothing to quantize")
    quantized = [layer for layer in layers if layer.quantized]
    dependent = _quantization_dependent(gm, {layer.node for layer in quantized})
    blocks = _build_blocks(gm, quantized, dependent, config.granularity) if quantized else []
    if config.activation is not None:
        _assign_activations(blocks, activation_values(gm, quantized, config.activation_scope))
    return Partition(blocks=blocks, layers=layers, dependent=dependent, notes=notes)


def activation_values(gm: fx.GraphModule, layers: list[QuantLayer], scope: str) -> list[str]:
    """Names of the values an activation spec quantizes, in graph order (see QuantConfig.activation_scope).

    "inputs": every value read as the activation of a quantized layer. "static": also each quantized
    layer's output and each add of two quantized values, taken after a directly following ReLU-like op
    so that the activation fuses into the integer kernel."""
    by_name = {node.name: node for node in gm.graph.nodes}
    layer_nodes = {layer.node for layer in layers}
    embedding_nodes = {layer.node for layer in layers if layer.op == "embedding"}
    values = set()
    for layer in layers:
        if layer.op == "embedding":
            continue  # its input is token indices
        value = by_name[layer.node].args[layer.input_index]
        if isinstance(value, fx.Node):
            values.add(value.name)
    if scope == "static":
        for node in gm.graph.nodes:
            operands = [arg for arg in node.args if isinstance(arg, fx.Node)]
            joins_quantized = node.op == "call_function" and node.target in ADD_TARGETS and len(operands) == 2 \
                and all(arg.name in values for arg in operands)
            if (node.name in layer_nodes and node.name not in embedding_nodes) or joins_quantized:
                users = list(node.users)
                fused = len(users) == 1 and users[0].op == "call_function" and users[0].target in FUSABLE_ACTIVATIONS
                values.add(users[0].name if fused else node.name)
    return [node.name for node in gm.graph.nodes if node.name in values]


def _assign_activations(blocks: list[Block], values: list[str]) -> None:
    """Each value goes to the block that makes it, or (graph inputs) to the first block reading it."""
    for value in values:
        owner = next((b for b in blocks if value in b.nodes), None) or next(b for b in blocks if value in b.inputs)
        owner.activations.append(value)


def find_layers(gm: fx.GraphModule, config: QuantConfig) -> tuple[list[QuantLayer], list[str]]:
    """Every quantizable op in graph order, with its weight spec resolved (overrides applied)."""
    layers, notes, matched = [], [], set()
    for node in gm.graph.nodes:
        match = _match(node)
        if match is None:
            continue
        op, input_index, weight_index, axis, unsupported = match
        path = node.meta.get(META_MODULE_PATH, "") or node.name
        weight_node = node.args[weight_index] if weight_index < len(node.args) else None
        if unsupported is None and not (isinstance(weight_node, fx.Node) and weight_node.op == "get_attr"):
            if op == "matmul":
                continue  # activation x activation (attention scores): not a weight layer
            unsupported = "its weight is computed in the graph (e.g. weight normalisation), not a parameter"
        weight = fetch_attr(gm, weight_node.target) if unsupported is None else None
        if unsupported is None and not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
            unsupported = "its weight is not a floating-point tensor"
        elif unsupported is None and op == "matmul" and weight.dim() != 2:
            unsupported = f"a {weight.dim()}-D parameter in a matmul is not supported"
        if unsupported is not None:
            message = f"layer {path!r} (node {node.name}, {op}) stays float: {unsupported}"
            warnings.warn(message, stacklevel=3)
            notes.append(message)
            layers.append(QuantLayer(node.name, op, path, "", input_index, weight_index, axis, (), None, unsupported))
            continue
        if not torch.isfinite(weight).all():
            raise InvalidModelError(f"the weight {weight_node.target!r} of layer {path!r} holds NaN or Inf; "
                                    "fix or re-load the model before quantizing")
        spec, pattern = config.weight_spec_for(path)
        if pattern is not None:
            matched.add(pattern)
        reason = None if spec is not None else f"override {pattern!r} keeps it float"
        if op == "embedding" and pattern is None:
            spec, reason = None, "embeddings stay float unless an override names them"
        if spec is not None and spec.group_size > 0:
            cols = weight.numel() // weight.shape[axis]
            if cols % spec.group_size:
                raise ConfigError(
                    f"layer {path!r} ({op}, weight {tuple(weight.shape)}) has {cols} input elements per output, "
                    f"not divisible by group_size={spec.group_size}; choose a group_size that divides {cols}, "
                    f"or add an override for {path!r}")
        layers.append(QuantLayer(node.name, op, path, weight_node.target, input_index, weight_index, axis,
                                 tuple(weight.shape), spec, reason))
    quantized_nodes = {layer.node for layer in layers if layer.quantized}
    quantized_weights = {layer.weight for layer in layers if layer.quantized}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in quantized_weights:
            others = [user.name for user in node.users if user.name not in quantized_nodes]
            if others:
                notes.append(f"weight {node.target!r} is also read by non-quantized ops ({', '.join(others[:3])}, "
                             "e.g. a tied embedding): its float copy stays beside the codes; keep the layer float "
                             "with an override to save its bytes")
    for pattern in config.overrides:
        if pattern not in matched:
            message = f"override {pattern!r} matches no quantizable layer"
            warnings.warn(message, stacklevel=3)
            notes.append(message)
    return layers, notes


def _match(node: fx.Node):
    """(op, input_index, weight_index, weight_axis, unsupported_reason) for a quantizable-looking node."""
    if node.op != "call_function":
        return None
    target = node.target
    if target in LINEAR_TARGETS:
        return "linear", 0, 1, 0, None
    if target in CONV_TARGETS:
        return "conv", 0, 1, 0, None
    if target in CONVOLUTION_TARGETS:
        transposed = node.args[6] if len(node.args) > 6 else node.kwargs.get("transposed", False)
        return "conv", 0, 1, 0, ("transposed convolution is not supported yet" if transposed else None)
    if target in TRANSPOSED_CONV_TARGETS:
        return "conv", 0, 1, 0, "transposed convolution is not supported yet"
    if target in ADDMM_TARGETS:
        return "matmul", 1, 2, 1, None
    if target in EMBEDDING_TARGETS:
        indices, weight = EMBEDDING_TARGETS[target]
        return "embedding", indices, weight, 0, None
    if target in MATMUL_TARGETS:
        left = node.args[0]
        if isinstance(left, fx.Node) and left.op == "get_attr":
            return "matmul", 1, 0, 1, "the parameter is the left operand of the matmul"
        return "matmul", 0, 1, 1, None
    return None


def _build_blocks(gm: fx.GraphModule, layers: list[QuantLayer], dependent: set[str], granularity: str
                  ) -> list[Block]:
    compute = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    position = {node.name: i for i, node in enumerate(compute)}
    layer_of_node = {layer.node: layer for layer in layers}
    cuts = {position[name] for name in _output_dominators(gm, dependent)}
    if granularity == "layer":
        cuts |= {position[name] for name in layer_of_node}
    cuts.add(len(compute) - 1)
    owner = _owner_function(layers)

    regions, start = [], 0
    for cut in sorted(cuts):
        if cut >= start:
            regions.append(compute[start:cut + 1])
            start = cut + 1
    segments: list[tuple[object, list[fx.Node]]] = []
    pending: list[fx.Node] = []
    for region in regions:
        region_layers = [layer_of_node[n.name] for n in region if n.name in layer_of_node]
        if not region_layers:
            pending += region
            continue
        key = (region_layers[0].node if granularity == "layer"
               else tuple(sorted({owner(layer.module_path) for layer in region_layers})))
        if segments and segments[-1][0] == key:
            segments[-1][1].extend(pending + region)
        else:
            segments.append((key, pending + region))
        pending = []
    if pending:
        segments[-1][1].extend(pending)

    last_use = _last_use(gm, position)
    blocks = []
    for index, (key, nodes) in enumerate(segments):
        names = {n.name for n in nodes}
        end = position[nodes[-1].name]
        inputs = []
        for node in nodes:
            for arg in node.all_input_nodes:
                if arg.op != "get_attr" and arg.name not in names and arg.name not in inputs:
                    inputs.append(arg.name)
        outputs = [n.name for n in nodes if last_use.get(n.name, -1) > end]
        dependent_outputs = [name for name in outputs if name in dependent]
        name = _common_module(key) if isinstance(key, tuple) else layer_of_node[key].module_path
        block_layers = [layer_of_node[n.name] for n in nodes if n.name in layer_of_node]
        blocks.append(Block(index=index, name=name, nodes=[n.name for n in nodes], inputs=inputs, outputs=outputs,
                            layers=block_layers, graph_module=_block_module(gm, nodes, inputs, outputs, name),
                            main_output=(dependent_outputs or outputs)[-1]))
    return blocks


def _quantization_dependent(gm: fx.GraphModule, layer_nodes: set[str]) -> set[str]:
    """Names of the nodes whose value depends on a quantized layer (the layers included)."""
    dependent = set()
    for node in gm.graph.nodes:
        if node.name in layer_nodes or any(arg.name in dependent for arg in node.all_input_nodes):
            dependent.add(node.name)
    return dependent


def _output_dominators(gm: fx.GraphModule, dependent: set[str]) -> list[str]:
    """Nodes through which every quantization-dependent path to the output passes."""
    dag = nx.DiGraph()
    for node in gm.graph.nodes:
        if node.name not in dependent and node.op != "output":
            continue
        target = SINK if node.op == "output" else node.name
        preds = [arg.name for arg in node.all_input_nodes if arg.name in dependent]
        if node.op != "output" and not preds:
            preds = [SOURCE]
        dag.add_edges_from((pred, target) for pred in preds)
    if SINK not in dag or SOURCE not in dag:
        return []
    idom = nx.immediate_dominators(dag, SOURCE)
    dominators, node = [], idom.get(SINK, SOURCE)
    while node != SOURCE:
        dominators.append(node)
        node = idom[node]
    return dominators


def _owner_function(layers: list[QuantLayer]):
    """module path -> the module that owns it as a block: the deepest prefix ending in a container
    index that holds at least two quantized layers, else the path itself."""
    count = Counter()
    for layer in layers:
        parts = layer.module_path.split(".")
        count.update(".".join(parts[:i + 1]) for i in range(len(parts)))

    def owner(path: str) -> str:
        parts, best = path.split("."), path
        for i, part in enumerate(parts):
            prefix = ".".join(parts[:i + 1])
            if part.isdigit() and count[prefix] >= 2:
                best = prefix
        return best
    return owner


def _common_module(owners: tuple[str, ...]) -> str:
    """The deepest module holding all ``owners`` ("a.b" for "a.b.c" and "a.b.d"), else them joined by '+'."""
    split = [owner.split(".") for owner in owners]
    common = []
    for parts in zip(*split):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common) if common else "+".join(owners)


def _last_use(gm: fx.GraphModule, position: dict[str, int]) -> dict[str, int]:
    """Node name -> position of its last user (len(position) for the graph output)."""
    last = {}
    for node in gm.graph.nodes:
        where = len(position) if node.op == "output" else position.get(node.name)
        if where is None:
            continue
        for arg in node.all_input_nodes:
            last[arg.name] = max(last.get(arg.name, -1), where)
    return last


def _block_module(gm: fx.GraphModule, nodes: list[fx.Node], inputs: list[str], outputs: list[str],
                  name: str) -> fx.GraphModule:
    """A GraphModule ``forward(*inputs) -> tuple(outputs)`` running ``nodes``, sharing gm's tensors."""
    by_name = {node.name: node for node in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for input_name in inputs:
        env[by_name[input_name]] = placeholder = graph.placeholder(input_name)
        placeholder.meta = dict(by_name[input_name].meta)
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = graph.get_attr(arg.target)
                env[arg].meta = dict(arg.meta)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[by_name[o]] for o in outputs))
    return fx.GraphModule(gm, graph, class_name=f"Block_{name.replace('.', '_').replace('+', '__')}"[:80])


def matmul_operands(user: fx.Node, weight: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """(x, bias) when ``user`` computes x @ M^T (+ bias) with M the [rows, cols] matrix view of the 2-D
    ``weight`` (``primitives.weight_matrix``): linear(x, W, b) (W = M, output axis 0), or addmm(b, x, W)
    with unit alpha/beta, mm(x, W), matmul(x, W) (W = M^T, output axis 1); None for any other reader."""
    if user.target in LINEAR_TARGETS and len(user.args) >= 2 and user.args[1] is weight and not user.kwargs:
        return user.args[0], (user.args[2] if len(user.args) > 2 else None)
    if user.target in ADDMM_TARGETS and len(user.args) == 3 and user.args[2] is weight and user.args[1] is not weight \
            and all(user.kwargs.get(k, 1) == 1 for k in ("alpha", "beta")):
        return user.args[1], user.args[0]
    if user.target in MATMUL_TARGETS and len(user.args) == 2 and user.args[1] is weight and user.args[0] is not weight:
        return user.args[0], None
    return None
