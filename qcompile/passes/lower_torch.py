"""lower_torch: a folded GraphModule -> a PyTorch GraphModule that runs on the integer weights.

``lower_packed`` rewrites every quantized 2-D weight whose readers all compute x @ W^T (+ b)
(``partition.matmul_operands``: linear, addmm, mm, matmul) into one packed-weight op per reader:

- on CPU (and any device but CUDA): ``qcompile::packed_linear`` on the folded graph's own packed codes
  (2-, 4- and 8-bit; 3-bit codes are repacked into 4-bit fields, 5- to 7-bit into bytes), uint8 zero
  offsets and float32 scales; the fused kernel in ``qcompile/kernels`` streams the packed bytes once (a
  decode step is memory-bound);
- on CUDA, for <= 4-bit codes, group sizes 32/64/128/256 and shapes tinygemm tiles:
  ``qcompile::int4pack_linear`` with the weight repacked by ``aten._convert_weight_to_int4pack`` and
  bfloat16 scales-and-zeros (tinygemm computes in bfloat16; a per-channel weight is given as 256-groups
  that share the row's scale); other CUDA weights take packed_linear's dequantize-then-matmul path.

Convolutions, embeddings, power-grid weights and other readers keep their ``qcompile::dequantize_weight``
(dequantize, then the float op). The module holds only packed tensors: the codes, one scale and one zero
offset per group.

``lower_dequantized`` is the reference: every dequantize node replaced by its float weight, computed once.
Both return new GraphModules that share the unchanged tensors with the folded graph and work with
``torch.compile`` and ``torch.export`` (the ops are registered custom ops with fake implementations).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings

import torch
from torch import fx

from .. import primitives as P
from ..kernels import cpu_ops
from ..ir import (META_MODULE_PATH, META_WEIGHT, copy_graph_module, drop_unread_tensors, ensure_submodule, fetch_attr,
                  module_device)
from ..ops import DEQUANTIZE_WEIGHT, INT4PACK_LINEAR, PACKED_LINEAR
from .fold import register_tensor
from .partition import matmul_operands

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)


def lower_packed(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the folded ``gm`` whose matmul-read weights run packed kernels for gm's device."""
    lowered = copy_graph_module(gm, "PackedModule")
    if module_device(lowered).type == "cpu":
        cpu_ops()  # build (or load) the fused kernels now, not inside a later trace
    for node in _dequantize_nodes(lowered):
        codes_node, scale_node, zero_point_node, bits, qmin, axis, shape, _, exponent = node.args
        operands = [matmul_operands(user, node) for user in node.users]
        if len(shape) != 2 or exponent != 1.0 or not operands or any(operand is None for operand in operands):
            continue
        rows, cols = shape[axis], math.prod(shape) // shape[axis]
        scale = fetch_attr(lowered, scale_node.target)
        group_size = cols // scale.shape[1]
        codes = fetch_attr(lowered, codes_node.target)
        zero_offset = P.unsigned_codes(fetch_attr(lowered, zero_point_node.target), qmin)
        if codes.device.type == "cuda" and group_size == cols and cols % TINYGEMM_GROUP_SIZES[-1] == 0:
            group_size = TINYGEMM_GROUP_SIZES[-1]  # one scale per row = the same scale for every 256-group
        if codes.device.type == "cuda" and _tinygemm_fits(bits, group_size, rows, cols):
            groups = cols // group_size
            tensors = _tinygemm_tensors(codes, bits, scale.expand(rows, groups), zero_offset.expand(rows, groups), cols)
            make = lambda x, bias, weight, scales_and_zeros: (INT4PACK_LINEAR, (  # noqa: E731
                x, weight, scales_and_zeros, group_size, bias))
        else:
            tensors = {"zero_offset": zero_offset}
            width = P.container_bits(bits)
            if width != bits:  # e.g. 3-bit codes: the kernel reads whole fields of a byte
                tensors["container_codes"] = P.pack_codes(P.unpack_codes(codes, bits, 0, cols), bits, 0, width)
            make = lambda x, bias, zero, container=codes_node: (PACKED_LINEAR, (  # noqa: E731
                x, container, scale_node, zero, bits, group_size, bias))
        inputs = [_register(lowered, node, suffix, tensor) for suffix, tensor in tensors.items()]
        for user, (x, bias) in zip(list(node.users), operands):
            target, args = make(x, bias, *inputs)
            with lowered.graph.inserting_before(user):
                packed = lowered.graph.call_function(target, args)
            packed.meta[META_MODULE_PATH] = node.meta.get(META_MODULE_PATH, "")
            user.replace_all_uses_with(packed)
            lowered.graph.erase_node(user)
        lowered.graph.erase_node(node)
    return _finish(lowered)


def lower_dequantized(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the folded ``gm`` with every quantized weight as a float buffer (the weights the
    quantized model computes with, dequantized once): the reference for packed kernels."""
    lowered = copy_graph_module(gm, "DequantizedModule")
    for node in _dequantize_nodes(lowered):
        args = [fetch_attr(lowered, a.target) if isinstance(a, fx.Node) else a for a in node.args]
        weight = _register(lowered, node, "dequantized", DEQUANTIZE_WEIGHT(*args))
        node.replace_all_uses_with(weight)
        lowered.graph.erase_node(node)
    return _finish(lowered)


def _dequantize_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == DEQUANTIZE_WEIGHT]


def _register(gm: fx.GraphModule, node: fx.Node, suffix: str, tensor: torch.Tensor) -> fx.Node:
    """Register ``tensor`` as ``<weight>_<suffix>`` beside the weight's packed codes, read before ``node``."""
    owner, _, attr = node.meta[META_WEIGHT].rpartition(".")
    return register_tensor(gm, owner, f"{attr}_{suffix}", tensor.contiguous(), node,
                           node.meta.get(META_MODULE_PATH, ""))


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    drop_unread_tensors(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _tinygemm_fits(bits: int, group_size: int, rows: int, cols: int) -> bool:
    """Whether CUDA's tinygemm int4 kernel takes this weight: <= 4-bit codes, its group sizes, rows a
    multiple of 8 and cols of 32 (two 16-wide k-tiles)."""
    return bits <= 4 and group_size in TINYGEMM_GROUP_SIZES and rows % 8 == 0 and cols % 32 == 0


def _tinygemm_tensors(codes: torch.Tensor, bits: int, scale: torch.Tensor, zero_offset: torch.Tensor, cols: int
                      ) -> dict[str, torch.Tensor]:
    """tinygemm's layout of a <= 4-bit weight: the unsigned codes repacked with
    ``aten._convert_weight_to_int4pack`` (two codes a byte, the first in the high nibble) and bfloat16
    scales-and-zeros [n_groups, rows, 2] for w = (u - 8) * scale + zero, i.e. zero = (8 - zero_offset) * scale."""
    unsigned = P.unpack_codes(codes, bits, 0, cols).to(torch.uint8)
    high_first = (unsigned[:, 0::2] << 4) | unsigned[:, 1::2]
    inner_k_tiles = next(tiles for tiles in (8, 4, 2) if cols % (tiles * 16) == 0)
    weight = torch.ops.aten._convert_weight_to_int4pack(high_first.contiguous(), inner_k_tiles)
    zero = (8 - zero_offset.float()) * scale
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16)
    return {"int4pack": weight, "scales_and_zeros": scales_and_zeros}


def dynamo_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None):
    """``torch.compile(model, backend="qcompile", options={"config": ..., "calib": ...})``.

    Dynamo hands over each graph with the model's parameters and buffers as inputs; they are frozen into
    the graph (inference: the weights are constants to quantize), the qcompile passes run on it with
    ``calib`` (batches of the graph's remaining inputs, i.e. the model's tensor arguments in order), and
    the packed module is compiled by inductor. Without calib, weight-only round-to-nearest quantization
    needs no data; the first call's inputs stand in for capture (warned once)."""
    from torch._inductor.compile_fx import compile_fx

    from ..api import compile as quantize
    from ..config import resolve_config
    from ..errors import ConfigError
    from ..ir import normalize_batch
    options = dict(options or {})
    config, calib = resolve_config(options.pop("config", "w8a16-rtn")), options.pop("calib", None)
    if options:
        raise ConfigError(f"the qcompile backend takes options 'config' and 'calib', got {sorted(options)}")
    frozen, input_positions = _freeze_state(gm, example_inputs)
    if calib is None:
        _warn_data_free()
        config = dataclasses.replace(config, method="rtn", method_options={}, activation=None)
    else:
        calib = [normalize_batch(batch)[0] for batch in calib]
        if any(len(batch) != len(input_positions) for batch in calib):
            raise ConfigError(f"the qcompile backend got a graph with {len(input_positions)} tensor inputs, but calib "
                              f"batches hold {sorted({len(b) for b in calib})} positional tensors: give calib batches "
                              "as the model's positional tensor arguments; with graph breaks, quantize with "
                              "qcompile.compile(model, calib) and torch.compile(qm.to_torch(packed=True)) instead")
    compiled = None

    def run(*args):
        # Quantizing traces the graph with torch.export, which cannot nest inside dynamo's compilation of
        # the caller's frame: it runs on the first call instead (dynamo is off while a compiled graph runs).
        nonlocal compiled
        inputs = [args[i] for i in input_positions]
        if compiled is None:
            copies = [t.clone() for t in inputs]  # capture marks the tensors it traces (dynamic dims)
            qm = quantize(frozen, calib if calib is not None else [tuple(copies)], config, progress=False)
            compiled = compile_fx(lower_packed(qm.graph_module), copies)
        return compiled(*inputs)
    return run


def _freeze_state(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, list[int]]:
    """The dynamo graph with its lifted parameters and buffers turned back into attributes (named by the
    model's dotted paths, e.g. ``layers.0.fc.weight``), and the positions of the remaining inputs."""
    frozen = copy_graph_module(gm, "FrozenGraph").eval()
    placeholders = [node for node in frozen.graph.nodes if node.op == "placeholder"]
    kept = []
    for position, (node, value) in enumerate(zip(placeholders, example_inputs)):
        path = _state_path(node, value)
        if path is None:
            kept.append(position)
            continue
        owner_path, _, attr = path.rpartition(".")
        ensure_submodule(frozen, owner_path)
        node.replace_all_uses_with(register_tensor(frozen, owner_path, attr, value.detach(), node, owner_path))
        frozen.graph.erase_node(node)
    frozen.graph.lint()
    frozen.recompile()
    return frozen, kept


def _state_path(node: fx.Node, value) -> str | None:
    """The dotted path of a placeholder that dynamo lifted from the model's parameters or buffers, else None."""
    grapharg = node.meta.get("grapharg")
    source = grapharg.source.name if grapharg is not None and getattr(grapharg, "source", None) is not None else ""
    source = source() if callable(source) else source
    if not isinstance(value, torch.nn.Parameter) and "_buffers[" not in source and "_parameters[" not in source:
        return None
    keys = [key for key in re.findall(r"\[['\"]([^'\"]+)['\"]\]", source) if key != "self"]
    return ".".join(keys) if keys else node.name


@functools.lru_cache(maxsize=None)
def _warn_data_free() -> None:
    warnings.warn("torch.compile(backend='qcompile') without options['calib']: applying data-free weight-only "
                  "round-to-nearest quantization (no rounding optimizer, no activation quantization); pass "
                  "options={'config': ..., 'calib': [batches]} for the configured method", stacklevel=3)
