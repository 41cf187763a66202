"""lower_onnx: a folded GraphModule -> an ONNX QDQ model (opset 21) that onnxruntime runs.

Uses torch's dynamo ONNX exporter with translations for qcompile's ops, on an "ONNX view" of the
folded graph in which every ``qcompile::dequantize_weight`` (packed codes) becomes a
``qcompile::dequantize_linear`` on unpacked codes laid out as ONNX's ``DequantizeLinear`` wants them:

- a weight consumed by matmul (linear layers are rewritten to ``matmul(x, W^T) + b`` for this, and
  GPT-2's addmm weights already are): a [K, N] initializer, per-channel ``axis=1`` with scale [N], or
  blocked ``axis=0, block_size=group`` with scale [K / group, N]: the DequantizeLinear -> MatMul pair
  that onnxruntime fuses into ``MatMulNBits`` (4-bit) or integer matmuls (8-bit);
- a conv weight: its own layout with per-channel ``axis=0``; group-wise conv weights are dequantized
  as the [out, K] matrix (``axis=1`` blocks) and reshaped, an exactly equivalent subgraph.

- an embedding table of <= 4 bits with power-of-two blocks >= 16: onnxruntime's
  ``com.microsoft.GatherBlockQuantized`` (it does not fuse DequantizeLinear -> Gather, which would
  dequantize the whole table on every call); other embeddings: DequantizeLinear -> Gather.

A power-grid weight (``QuantParams.exponent`` != 1) gets its inverse map right after the dequantization:
Abs -> Pow(1 / exponent) -> Mul by Sign, the same float function as ``qcompile::dequantize_weight``
(onnxruntime then runs the matmul in float: no MatMulNBits fusion for such weights).

Codes of 2..4 bits are stored as INT4/UINT4 initializers (same values, same DequantizeLinear result),
5..8 bits as INT8/UINT8. ``qcompile::quantize_dequantize`` becomes QuantizeLinear -> DequantizeLinear
(8-bit activations; other widths raise ``UnsupportedOpError``). Batch and sequence dims stay dynamic.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import torch
from onnxscript import opset21 as onnx_op
from onnxscript.values import Op, Opset
from torch import fx

from .. import primitives as P
from ..errors import UnsupportedOpError
from ..ir import META_MODULE_PATH, META_WEIGHT, QuantParams, copy_graph_module, drop_unread_tensors, fetch_attr
from ..ops import DEQUANTIZE_LINEAR, DEQUANTIZE_WEIGHT, GATHER_BLOCK_QUANTIZED, QUANTIZE_DEQUANTIZE
from .capture import dynamic_shapes
from .fold import folded_params
from .partition import EMBEDDING_TARGETS, matmul_operands

def _gather_block_quantized_schema() -> onnx.defs.OpSchema:
    """onnxruntime's contrib op, described for onnxscript (onnx ships no schema for it)."""
    schema = onnx.defs.OpSchema
    integers = ["tensor(uint8)", "tensor(int8)"]
    return schema(
        "GatherBlockQuantized", "com.microsoft", 1,
        inputs=[schema.FormalParameter("data", "T1"), schema.FormalParameter("indices", "Tind"),
                schema.FormalParameter("scales", "T2"), schema.FormalParameter("zero_points", "T1")],
        outputs=[schema.FormalParameter("output", "T2")],
        type_constraints=[("T1", integers, ""), ("Tind", ["tensor(int32)", "tensor(int64)"], ""),
                          ("T2", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[schema.Attribute(name, schema.AttrType.INT, "") for name in
                    ("block_size", "gather_axis", "quantize_axis")])


_GATHER_BLOCK_QUANTIZED = Op(Opset("com.microsoft", 1), "GatherBlockQuantized", _gather_block_quantized_schema())
# op type -> positions of (codes, zero point) among its inputs, for the 4-bit narrowing
_QUANTIZED_READERS = {"DequantizeLinear": (0, 2), "GatherBlockQuantized": (0, 3)}


def _dequantize_linear_onnx(codes, scale, zero_point, axis: int, block_size: int):
    return onnx_op.DequantizeLinear(codes, scale, zero_point, axis=axis, block_size=block_size)


def _quantize_dequantize_onnx(x, scale, zero_point, qmin: int, qmax: int):
    return onnx_op.DequantizeLinear(onnx_op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


def _gather_block_quantized_onnx(codes, indices, scale, zero_point, block_size: int):
    return _GATHER_BLOCK_QUANTIZED(codes, indices, scale, zero_point, block_size=block_size, gather_axis=0,
                                   quantize_axis=1)


TRANSLATIONS = {DEQUANTIZE_LINEAR: _dequantize_linear_onnx, QUANTIZE_DEQUANTIZE: _quantize_dequantize_onnx,
                GATHER_BLOCK_QUANTIZED: _gather_block_quantized_onnx}


def export_onnx(gm: fx.GraphModule, example: tuple[tuple, dict], path: str | os.PathLike, opset: int = 21
                ) -> onnx.ModelProto:
    """Write the ONNX QDQ model of a folded graph to ``path`` (checked with onnx.checker) and return it."""
    if opset < 21:
        raise UnsupportedOpError(f"opset {opset}: qcompile's blocked int4 DequantizeLinear needs opset >= 21")
    view, narrow = onnx_view(gm)
    model = _export_program(view, *example, opset).model_proto
    for node in model.graph.node:  # the exporter's stack traces and FX dumps: ~0.5 MiB on a ViT-tiny
        del node.metadata_props[:]
    _narrow_to_int4(model, narrow)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, os.fspath(path))
    return model


def _export_program(view: fx.GraphModule, args: tuple, kwargs: dict, opset: int):
    """torch's dynamo ONNX export of the view with every input dim of size > 1 dynamic; when the model's shape
    arithmetic defeats that (e.g. a spatial size that must stay divisible by 4), with the batch dim only, then
    static (warned). UnsupportedOpError with each attempt's reason when all fail."""
    failures = []
    for dims in ("all", "batch", None):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    view, args, kwargs=kwargs, dynamo=True, opset_version=opset, custom_translation_table=TRANSLATIONS,
                    dynamic_shapes=dynamic_shapes(view, args, kwargs, dims) if dims else None, optimize=True,
                    verbose=False, report=False)
        except Exception as error:  # noqa: BLE001 - the exporter raises many types; each attempt is reported
            failures.append(f"{dims or 'static'} shapes: {type(error).__name__}: {_summary(error)}")
            continue
        if failures:
            warnings.warn(f"ONNX export with {'only the batch dim' if dims else 'no'} dynamic input dims "
                          f"(the others failed: {'; '.join(failures)})", stacklevel=3)
        return program
    raise UnsupportedOpError("torch's ONNX exporter could not export the quantized graph: " + " | ".join(failures))


def _summary(error: Exception) -> str:
    """The exporter's own one-line reason: its exception summary when it gives one, else the first line."""
    text = str(error)
    marker = "## Exception summary"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("(Refer")]
    return " ".join(lines)[:300]


# The exporter re-traces the graph, then decomposes it: a reshape of a transposed attention output is traced
# as a view where the attention op's meta strides allow it, and fails once attention is decomposed with other
# strides (T5, BEiT); a contiguous() that was a no-op on the first strides is dropped the same way. So every
# reshape reads a contiguous clone, which survives both (ONNX has no strides: it becomes an Identity that the
# exporter's optimizer removes).
RESHAPES = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default)


def _read_contiguous(graph: fx.Graph, node: fx.Node) -> None:
    with graph.inserting_before(node):
        dense = graph.call_function(torch.ops.aten.clone.default, (node.args[0],),
                                    {"memory_format": torch.contiguous_format})
    node.target, node.args = torch.ops.aten.reshape.default, (dense, *node.args[1:])


def onnx_view(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, bool]]:
    """A copy of the folded graph with ONNX-layout dequantization (sharing gm's other tensors), and the
    initializers to store as 4-bit: buffer name -> signed."""
    view = copy_graph_module(gm, "OnnxView")
    params = folded_params(view)
    narrow: dict[str, bool] = {}
    for node in [n for n in view.graph.nodes if n.op == "call_function" and n.target == DEQUANTIZE_WEIGHT]:
        _lower_dequantize(view, node, params[node.meta[META_WEIGHT]], narrow)
    for node in view.graph.nodes:
        if node.op == "call_function" and node.target == QUANTIZE_DEQUANTIZE and (node.args[3], node.args[4]) not in (
                (0, 255), (-128, 127)):
            raise UnsupportedOpError(f"activation quantized to [{node.args[3]}, {node.args[4]}] at "
                                     f"{node.meta.get(META_MODULE_PATH)!r}: ONNX export supports 8-bit activations")
        if node.op == "call_function" and node.target in RESHAPES:
            _read_contiguous(view.graph, node)
    view.graph.eliminate_dead_code()
    drop_unread_tensors(view)
    view.graph.lint()
    view.recompile()
    return view, narrow


def _lower_dequantize(view: fx.GraphModule, node: fx.Node, params: QuantParams, narrow: dict[str, bool]) -> None:
    users = list(node.users)
    if _lower_embedding_lookup(view, node, params, users, narrow):
        return
    rewritable = all(matmul_operands(user, node) is not None for user in users)
    matmul_layout = len(params.shape) == 2 and (params.axis == 1 or rewritable)
    codes, scale, zero_point = params.weight_codes, params.scale, params.zero_point
    rows, cols = codes.shape
    reshape_to = None
    if matmul_layout:
        codes = codes.t()
        if scale.numel() == 1:
            axis, block_size = 1, 0
        elif scale.shape[1] == 1:
            axis, block_size, scale, zero_point = 1, 0, scale[:, 0], zero_point[:, 0]
        else:
            axis, block_size, scale, zero_point = 0, cols // scale.shape[1], scale.t(), zero_point.t()
    elif scale.numel() == 1 or scale.shape[1] == 1:
        codes = codes.reshape(params.shape)
        axis, block_size = 0, 0
        if scale.numel() > 1:
            scale, zero_point = scale[:, 0], zero_point[:, 0]
    else:
        axis, block_size, reshape_to = 1, cols // scale.shape[1], list(params.shape)
    if scale.numel() == 1:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    targets = _register_onnx_tensors(view, node, params, (codes, scale, zero_point), narrow)
    with view.graph.inserting_before(node):
        inputs = [view.graph.get_attr(target) for target in targets]
        value = view.graph.call_function(DEQUANTIZE_LINEAR, (*inputs, axis, block_size))
        if reshape_to is not None:
            value = view.graph.call_function(torch.ops.aten.reshape.default, (value, reshape_to))
        value = _cast(view, _from_power_domain(view, value, params.exponent), node.args[7])
    for new in (*inputs, value):
        new.meta[META_MODULE_PATH] = node.meta.get(META_MODULE_PATH, "")
    if matmul_layout and rewritable:
        for user in users:
            x, bias = matmul_operands(user, node)
            with view.graph.inserting_before(user):
                result = view.graph.call_function(torch.ops.aten.matmul.default, (x, value))
                if bias is not None:
                    result = view.graph.call_function(torch.ops.aten.add.Tensor, (result, bias))
            user.replace_all_uses_with(result)
            view.graph.erase_node(user)
    else:
        node.replace_all_uses_with(value)
    view.graph.erase_node(node)


def _register_onnx_tensors(view: fx.GraphModule, node: fx.Node, params: QuantParams,
                           tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor], narrow: dict[str, bool]
                           ) -> list[str]:
    """Register (codes, scale, zero point) in ONNX layout as ``<weight>_q``, ``_q_scale``,
    ``_q_zero_point`` beside the packed ones; mark codes and zero point for 4-bit storage when they
    fit. Returns the three targets."""
    weight = node.meta[META_WEIGHT]
    owner, _, attr = weight.rpartition(".")
    module = view.get_submodule(owner) if owner else view
    device = fetch_attr(view, node.args[0].target).device
    targets = []
    for suffix, tensor in zip(("q", "q_scale", "q_zero_point"), tensors):
        module.register_buffer(f"{attr}_{suffix}", tensor.contiguous().to(device))
        targets.append(f"{weight}_{suffix}")
    if params.bits <= 4:
        narrow[targets[0]] = narrow[targets[2]] = params.symmetric
    return targets


def _from_power_domain(view: fx.GraphModule, value: fx.Node, exponent: float) -> fx.Node:
    """A power-grid weight's inverse map after its dequantization, ``primitives.from_power_domain`` (the
    exporter traces it to Sign, Abs, Pow, Mul); nothing for the uniform grid."""
    if exponent == 1.0:
        return value
    return view.graph.call_function(P.from_power_domain, (value, exponent))


def _cast(view: fx.GraphModule, value: fx.Node, dtype: torch.dtype) -> fx.Node:
    """``value`` (float32) cast to the weight's dtype when that differs."""
    if dtype == torch.float32:
        return value
    return view.graph.call_function(torch.ops.aten._to_copy.default, (value,), {"dtype": dtype})


def _lower_embedding_lookup(view: fx.GraphModule, node: fx.Node, params: QuantParams, users: list[fx.Node],
                            narrow: dict[str, bool]) -> bool:
    """Embedding lookups of a <= 4-bit table with power-of-two blocks >= 16 become gathers of quantized
    rows; False (nothing changed) for any other reader or layout."""
    readers = [user for user in users if user.target in EMBEDDING_TARGETS
               and user.args[EMBEDDING_TARGETS[user.target][1]] is node]
    rows, cols = params.weight_codes.shape
    block = cols // params.scale.shape[1]
    if not users or len(readers) != len(users) or params.bits > 4 or len(params.shape) != 2 \
            or params.scale.shape[0] != rows or block < 16 or block & (block - 1):
        return False
    targets = _register_onnx_tensors(view, node, params, (params.weight_codes, params.scale, params.zero_point),
                                     narrow)
    for user in readers:
        with view.graph.inserting_before(user):
            codes, scale, zero_point = (view.graph.get_attr(target) for target in targets)
            value = view.graph.call_function(GATHER_BLOCK_QUANTIZED, (
                codes, user.args[EMBEDDING_TARGETS[user.target][0]], scale, zero_point, block))
            value = _cast(view, _from_power_domain(view, value, params.exponent), node.args[7])
        value.meta[META_MODULE_PATH] = node.meta.get(META_MODULE_PATH, "")
        user.replace_all_uses_with(value)
        view.graph.erase_node(user)
    view.graph.erase_node(node)
    return True


def _narrow_to_int4(model: onnx.ModelProto, narrow: dict[str, bool]) -> None:
    """Store the codes named in ``narrow`` (and their zero points) as INT4/UINT4 initializers.

    The exporter's optimizer may merge identical initializers (zero points, rarely codes); a merged
    tensor keeps one name. A DequantizeLinear / GatherBlockQuantized is narrowed when its codes carry a
    narrowed name: the values fit either container and the op gives the same result in both, so the only
    rule to keep is that codes and zero point share a type; a zero point shared with an 8-bit reader gets
    a private 4-bit copy."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    readers = [n for n in model.graph.node if n.op_type in _QUANTIZED_READERS and n.input[0] in initializers]
    zero_point_of = {id(n): _QUANTIZED_READERS[n.op_type][1] for n in readers}
    wide_zero_points = {n.input[zero_point_of[id(n)]] for n in readers
                        if n.input[0] not in narrow and len(n.input) > zero_point_of[id(n)]}
    targets: dict[str, bool] = {}
    for node in (n for n in readers if n.input[0] in narrow):
        signed = narrow[node.input[0]]
        targets[node.input[0]] = signed
        position = zero_point_of[id(node)]
        if len(node.input) > position and node.input[position] in initializers:
            if node.input[position] in wide_zero_points:
                private = onnx.TensorProto()
                private.CopyFrom(initializers[node.input[position]])
                private.name = f"{node.input[0]}_zero_point4"
                model.graph.initializer.append(private)
                initializers[private.name] = private
                node.input[position] = private.name
            targets[node.input[position]] = signed
    for name, signed in targets.items():
        tensor = initializers[name]
        values = onnx.numpy_helper.to_array(tensor)
        nibbles = torch.from_numpy(np.ascontiguousarray(values).astype(np.int16) & 0xF).reshape(1, -1)
        tensor.data_type = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
        tensor.raw_data = P.pack_codes(nibbles, 4, 0).numpy().tobytes()
        del tensor.int32_data[:]
    for info in [*model.graph.value_info, *model.graph.input]:
        if info.name in targets:
            info.type.tensor_type.elem_type = onnx.TensorProto.INT4 if targets[info.name] else onnx.TensorProto.UINT4
