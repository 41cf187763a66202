"""The few types that passes share: quantizable layers, blocks, quantization parameters, metadata keys."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx

from . import primitives as P
from .config import QuantSpec

# Node metadata keys (node.meta[...]).
META_MODULE_PATH = "qcompile_module_path"   # str: dotted path of the nn.Module that created the node
META_ROLE = "qcompile_role"                 # str: ROLE_* for nodes that fold inserts
META_WEIGHT = "qcompile_weight"             # str: on a dequantize node, the weight target it replaces
ROLE_WEIGHT_DEQUANT = "weight_dequantize"
ROLE_ACTIVATION_QDQ = "activation_quantize_dequantize"
ROLE_WEIGHT_FAKE_QUANT = "weight_fake_quantize"            # trainable copies (passes/fake_quant.py)
ROLE_ACTIVATION_FAKE_QUANT = "activation_fake_quantize"

# GraphModule.meta keys.
GM_INPUT_NAMES = "qcompile_input_names"      # FX-traced graphs: forward's parameter names, placeholder order
GM_CAPTURED_BY = "qcompile_captured_by"      # "torch.export" | "torch.fx"


@dataclass
class QuantParams:
    """Quantization parameters of one weight; optimizers produce them, fold and lowerings read them.

    weight_codes: [rows, cols] int8 (symmetric) / uint8 (asymmetric) codes of the weight matrix
                  (``primitives.weight_matrix``); scale: float32 [rows | 1, n_groups];
    zero_point:   same shape as scale, dtype of the codes; bits, symmetric: the code range;
    group_size:   cols per scale (-1: one scale per row, or per tensor when scale is [1, 1]);
    axis, shape:  the parameter's output-channel axis and shape, to map the matrix back;
    exponent:     the power-grid exponent a (1.0: the uniform grid); the weight is
                  sign(y)·|y|^(1/a) with y = (codes - zero_point) * scale.
    """

    weight_codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    symmetric: bool
    group_size: int
    axis: int
    shape: tuple[int, ...]
    exponent: float = 1.0

    @property
    def qrange(self) -> tuple[int, int]:
        return P.quant_range(self.bits, self.symmetric)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight in the parameter's layout."""
        return P.weight_from_matrix(P.dequantize_weight(self.weight_codes, self.scale, self.zero_point, self.exponent),
                                    self.axis, self.shape)

    def nbytes(self) -> int:
        """Bytes of the packed codes plus scale and zero point as fold stores them."""
        rows, cols = self.weight_codes.shape
        return (P.packed_nbytes(rows, cols, self.bits) + self.scale.numel() * self.scale.element_size()
                + self.zero_point.numel() * self.zero_point.element_size())

    def validate(self, name: str) -> None:
        """Raise ValueError when codes, scales or shapes are inconsistent (a buggy optimizer)."""
        qmin, qmax = self.qrange
        rows, cols = self.weight_codes.shape
        n_groups = 1 if self.group_size == -1 else cols // self.group_size
        problems = []
        if self.weight_codes.dtype != P.code_dtype(self.symmetric):
            problems.append(f"codes dtype {self.weight_codes.dtype}")
        elif self.weight_codes.numel() and (int(self.weight_codes.min()) < qmin or int(self.weight_codes.max()) > qmax):
            problems.append(f"codes outside [{qmin}, {qmax}]")
        if self.scale.shape not in ((rows, n_groups), (1, 1)) or self.zero_point.shape != self.scale.shape:
            problems.append(f"scale {tuple(self.scale.shape)} / zero point {tuple(self.zero_point.shape)} for codes {(rows, cols)}")
        if not torch.isfinite(self.scale).all() or (self.scale <= 0).any():
            problems.append("non-finite or non-positive scales")
        if not (isinstance(self.exponent, float) and 0 < self.exponent < float("inf")):
            problems.append(f"power-grid exponent {self.exponent!r} (a positive float)")
        if problems:
            raise ValueError(f"invalid QuantParams for {name}: " + "; ".join(problems))


@dataclass
class ActivationParams:
    """Per-tensor quantization of an activation (the input of quantized ops): float32 scalar scale,
    zero point of the code dtype, bits and symmetry."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    symmetric: bool

    @property
    def qrange(self) -> tuple[int, int]:
        return P.quant_range(self.bits, self.symmetric)


@dataclass(frozen=True)
class QuantLayer:
    """A quantizable op found by partition.

    node: the op's node name; op: "linear" | "conv" | "matmul"; weight: the get_attr target of its
    weight; input_index / weight_index: positions of activation and weight in node.args; axis: the
    weight's output-channel axis; spec: the resolved weight spec, or None when the layer stays float,
    with ``float_reason`` saying why.
    """

    node: str
    op: str
    module_path: str
    weight: str
    input_index: int
    weight_index: int
    axis: int
    weight_shape: tuple[int, ...]
    spec: QuantSpec | None
    float_reason: str | None = None

    @property
    def quantized(self) -> bool:
        return self.spec is not None


@dataclass
class Block:
    """A contiguous segment of the graph's node order that runs on its own.

    nodes:   the original node names in order; inputs: the values it reads that earlier code made
             (placeholders or nodes of earlier blocks); outputs: the values it makes that later code
             or the model output reads; layers: its quantizable ops; activations: the values whose
             quantization it owns (made in it, or graph inputs it reads first);
    graph_module: ``forward(*inputs) -> tuple(outputs)``, sharing the model's parameters.
    """

    index: int
    name: str
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    layers: list[QuantLayer]
    graph_module: fx.GraphModule
    main_output: str = ""
    activations: list[str] = field(default_factory=list)

    def weight(self, target: str) -> torch.Tensor:
        """The float weight tensor behind a get_attr target."""
        return fetch_attr(self.graph_module, target)

    def layer_of(self, weight: str) -> QuantLayer:
        """The first layer of this block that reads ``weight``."""
        return next(layer for layer in self.layers if layer.weight == weight)


def values_to(values: Any, device: torch.device) -> tuple:
    """A sequence of graph values with its tensors moved to ``device`` (other values as they are)."""
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in values)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for a module without tensors."""
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def drop_unread_tensors(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes nobody reads, then delete the parameters and buffers no get_attr reads, so
    that the module holds exactly the tensors its graph uses (call ``gm.recompile()`` afterwards)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if name not in read:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)


def reroute_readers(graph: fx.Graph, value: fx.Node, make: Callable[[fx.Node], fx.Node]) -> fx.Node:
    """Insert the node ``make(value)`` creates right after ``value`` (before the first computing node
    when ``value`` is a graph input) and make every other reader of ``value`` read it instead."""
    anchor = value.next
    if value.op == "placeholder":
        anchor = next(node for node in graph.nodes if node.op not in ("placeholder", "get_attr"))
    with graph.inserting_before(anchor):
        node = make(value)
    value.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    return node


def copy_graph_module(gm: fx.GraphModule, class_name: str) -> fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph and its own module tree that shares ``gm``'s tensors:
    passes may add, rewrite and drop nodes and buffers on the copy without touching ``gm``."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph, class_name)


def ensure_submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at dotted ``path`` ("" is ``root``), creating empty modules along the way."""
    owner = root
    for part in path.split(".") if path else []:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    return owner


def fetch_attr(module: torch.nn.Module, target: str) -> Any:
    """The attribute behind a get_attr target such as "layers.0.mlp.weight"."""
    owner, _, attr = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


@dataclass
class Partition:
    """What partition found: the blocks in execution order and every quantizable op (float ones too)."""

    blocks: list[Block]
    layers: list[QuantLayer]
    dependent: set[str] = field(default_factory=set)   # names of the values quantization changes
    notes: list[str] = field(default_factory=list)


def normalize_batch(batch: Any) -> tuple[tuple, dict]:
    """A calibration batch as (args, kwargs): a tensor, a tuple/list of positional inputs, or a dict of
    keyword arguments."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise TypeError(f"a calibration batch must be a tensor, a tuple/list or a dict, got {type(batch).__name__}")
