"""capture: nn.Module -> fx.GraphModule.

Tries ``torch.export`` (non-strict, every input dim ``Dim.AUTO`` so that batch and sequence length stay
dynamic where the model allows) and falls back to ``torch.fx`` symbolic tracing through every module.
Writes ``META_MODULE_PATH`` on every node (from ``nn_module_stack``) and ``GM_CAPTURED_BY`` (plus
``GM_INPUT_NAMES`` for FX graphs) on the GraphModule. The graph is flat: export's input-guard module
is dropped (``flatten_inputs`` checks inputs instead) and ``torch.no_grad`` regions are inlined.
Inference BatchNorms that directly follow a conv are folded into its weight and bias (new tensors: the
user's model is not touched), so that quantization sees the weights the integer kernels will run.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any

import torch
from torch import fx
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..errors import CalibrationError, CaptureError
from ..ir import GM_CAPTURED_BY, GM_INPUT_NAMES, META_MODULE_PATH, drop_unread_tensors, fetch_attr


def capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """Trace ``model(*args, **kwargs)`` (in eval mode) to a flat GraphModule with module paths on nodes."""
    with inference_settings(model):
        try:
            gm = _export(model, args, kwargs)
        except Exception as export_error:  # noqa: BLE001 - any export failure falls back to FX
            try:
                gm = _fx_trace(model)
            except Exception as fx_error:  # noqa: BLE001
                raise CaptureError(
                    f"could not capture {type(model).__name__}: torch.export failed with "
                    f"{type(export_error).__name__}: {_first_line(export_error)}; torch.fx failed with "
                    f"{type(fx_error).__name__}: {_first_line(fx_error)}. Make data-dependent control flow "
                    "static (torch.cond or fixed shapes), or quantize a sub-module that traces") from export_error
            warnings.warn(f"torch.export could not capture {type(model).__name__} "
                          f"({_first_line(export_error)}); using torch.fx symbolic tracing", stacklevel=3)
    _annotate_module_paths(gm)
    _functionalize_inplace(gm)
    _drop_metadata_asserts(gm)
    _fold_batch_norms(gm)
    drop_unread_tensors(gm)  # dead BatchNorm statistics, counters
    gm.recompile()
    return gm


@contextlib.contextmanager
def inference_settings(model: torch.nn.Module):
    """Eval mode and, for Hugging Face models, no KV cache in the output; restored afterwards."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if was_training:
        warnings.warn(f"{type(model).__name__} is in train mode; qcompile captures and quantizes it with eval "
                      "semantics (BatchNorm running statistics, no dropout)", stacklevel=4)
    model.eval()
    if use_cache:
        config.use_cache = False
    try:
        yield
    finally:
        model.train(was_training)
        if use_cache:
            config.use_cache = use_cache


def dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, dims: str = "all") -> dict | None:
    """Dim.AUTO for every dim (of size > 1) of every tensor input, keyed by forward's parameter names;
    ``dims="batch"``: for the leading dim only."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    params = signature.parameters
    if any(params[name].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
           for name in bound.arguments):
        return None
    # size-1 dims are specialised by export anyway (0/1 specialisation): leave them static, silently
    dynamic = lambda t: range(t.dim()) if dims == "all" else range(min(t.dim(), 1))  # noqa: E731
    auto = lambda t: {i: Dim.AUTO for i in dynamic(t) if t.shape[i] > 1} if isinstance(t, torch.Tensor) else None  # noqa: E731
    return {name: pytree.tree_map(auto, value) for name, value in bound.arguments.items()}


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes(model, args, kwargs),
                                       strict=False)
    gm = exported.module()
    _drop_guard_modules(gm)
    _inline_grad_regions(gm)
    gm.meta[GM_CAPTURED_BY] = "torch.export"
    return gm


class _TraceThroughModules(fx.Tracer):
    """Symbolic tracer that enters every module, so that linear/conv become functional calls on
    get_attr weights, as in exported graphs."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return False


def _fx_trace(model: torch.nn.Module) -> fx.GraphModule:
    graph = _TraceThroughModules().trace(model)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    gm.meta[GM_CAPTURED_BY] = "torch.fx"
    gm.meta[GM_INPUT_NAMES] = [node.target for node in graph.nodes if node.op == "placeholder"]
    return gm


def _functional_form(node: fx.Node) -> tuple[Any, dict] | None:
    """(out-of-place target, kwargs) of an in-place op that mutates its first argument, else None:
    ``aten.relu_`` -> ``aten.relu``, ``x.add_(y)`` -> ``x.add(y)``, ``F.relu(x, inplace=True)`` ->
    ``F.relu(x, inplace=False)``."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        arguments = node.target._schema.arguments
        if not (arguments and arguments[0].alias_info is not None and arguments[0].alias_info.is_write):
            return None
        packet = getattr(torch.ops.aten, node.target.__name__.split(".")[0].rstrip("_"), None)
        overload = getattr(packet, node.target._overloadname, None) if packet is not None else None
        return (overload, dict(node.kwargs)) if overload is not None and not overload._schema.is_mutable else None
    if node.op == "call_function" and node.kwargs.get("inplace") is True:
        return node.target, {**node.kwargs, "inplace": False}
    if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
        return (node.target[:-1], dict(node.kwargs)) if hasattr(torch.Tensor, node.target[:-1]) else None
    return None


def _is_view(node: Any) -> bool:
    """Whether a node's value may alias another tensor (a view op, or a method we cannot see into)."""
    if not isinstance(node, fx.Node) or node.op in ("placeholder", "get_attr"):
        return False
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        returns = node.target._schema.returns
        return bool(returns) and returns[0].alias_info is not None
    return node.op == "call_method" and node.target in ("view", "reshape", "transpose", "permute", "expand",
                                                       "narrow", "select", "unsqueeze", "squeeze", "flatten")


def _functionalize_inplace(gm: fx.GraphModule) -> None:
    """Rewrite in-place ops (``relu_``, ``hardswish_``, ``add_``) on non-view tensors into their
    out-of-place forms, and let later readers of the mutated tensor read the result instead.

    Blocks and calibration re-run the same stored inputs many times; an op that mutates a block's
    input would change them on every run. Mutations of views are left as they are (a rewrite would
    lose the write to the base tensor)."""
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        functional = _functional_form(node)
        if functional is None or not node.args or _is_view(node.args[0]):
            continue
        mutated = node.args[0]
        node.target, node.kwargs = functional
        if isinstance(mutated, fx.Node):
            mutated.replace_all_uses_with(
                node, delete_user_cb=lambda user: user is not node and order.get(user, -1) > order[node])
    gm.recompile()


def _drop_metadata_asserts(gm: fx.GraphModule) -> None:
    """Erase export's ``aten._assert_tensor_metadata`` checks: they pin every cast's input dtype to the
    one seen at capture, which autocast or a model cast later would break; ``flatten_inputs`` checks
    the graph's inputs instead."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.recompile()


def _drop_guard_modules(gm: fx.GraphModule) -> None:
    """Remove the input-guard call_module that ``ExportedProgram.module()`` inserts."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards"):
            gm.graph.erase_node(node)
            delattr(gm, node.target)
    gm.recompile()


def _inline_grad_regions(gm: fx.GraphModule) -> None:
    """Inline ``wrap_with_set_grad_enabled`` sub-graphs (``torch.no_grad`` regions): qcompile runs
    the graph for inference, where they are plain code."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "__name__", "") != "wrap_with_set_grad_enabled":
            continue
        _, submod_node, *operands = node.args
        submod = getattr(gm, submod_node.target)
        placeholders = [n for n in submod.graph.nodes if n.op == "placeholder"]
        env = dict(zip(placeholders, operands))
        with gm.graph.inserting_before(node):
            for inner in submod.graph.nodes:
                if inner.op in ("placeholder", "output"):
                    continue
                if inner.op == "get_attr":
                    qualified = f"{submod_node.target}.{inner.target}"
                    env[inner] = gm.graph.get_attr(qualified)
                    continue
                env[inner] = gm.graph.node_copy(inner, lambda n: env[n])
            result = fx.map_arg(next(n for n in submod.graph.nodes if n.op == "output").args[0], lambda n: env[n])
        results = result if isinstance(result, (tuple, list)) else (result,)
        for user in list(node.users):
            if user.op == "call_function" and getattr(user.target, "__name__", "") == "getitem":
                user.replace_all_uses_with(results[user.args[1]])
                gm.graph.erase_node(user)
        if node.users:
            node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        if not submod_node.users:
            gm.graph.erase_node(submod_node)
        changed = True
    if changed:
        gm.delete_all_unused_submodules()
        gm.recompile()


_CONV_TARGETS = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
                 torch.conv1d, torch.conv2d, torch.conv3d}
# batch-norm target -> positions of (weight, bias, running_mean, running_var, training, eps) in its args
_BATCH_NORM_ARGS = {torch.ops.aten.batch_norm.default: (1, 2, 3, 4, 5, 7),
                    torch.nn.functional.batch_norm: (3, 4, 1, 2, 5, 7)}


def _fold_batch_norms(gm: fx.GraphModule) -> None:
    """conv -> batch_norm (inference, running statistics) becomes one conv with scaled weight and bias."""
    changed = False
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target not in _BATCH_NORM_ARGS or len(bn.args) < 8 or bn.kwargs:
            continue
        conv = bn.args[0]
        if not (isinstance(conv, fx.Node) and conv.target in _CONV_TARGETS and len(conv.users) == 1):
            continue
        gamma, beta, mean, var, training, eps = (bn.args[i] for i in _BATCH_NORM_ARGS[bn.target])
        weight_node, bias_node = conv.args[1], (conv.args[2] if len(conv.args) > 2 else None)
        stats = [gamma, beta, mean, var, weight_node] + ([bias_node] if bias_node is not None else [])
        if training or not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in stats) \
                or len(weight_node.users) != 1 or (bias_node is not None and len(bias_node.users) != 1):
            continue
        gamma, beta, mean, var, weight = (fetch_attr(gm, n.target).detach() for n in stats[:5])
        bias = fetch_attr(gm, bias_node.target).detach() if bias_node is not None else torch.zeros_like(mean)
        factor = gamma / torch.sqrt(var + eps)
        owner, _, attr = weight_node.target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        setattr(module, attr, torch.nn.Parameter(weight * factor.reshape(-1, *[1] * (weight.dim() - 1)),
                                                 requires_grad=False))
        folded_bias = torch.nn.Parameter((bias - mean) * factor + beta, requires_grad=False)
        if bias_node is None:
            setattr(module, f"{attr}_bn_bias", folded_bias)
            with gm.graph.inserting_before(conv):
                bias_node = gm.graph.get_attr(f"{weight_node.target}_bn_bias")
            bias_node.meta[META_MODULE_PATH] = weight_node.meta.get(META_MODULE_PATH, owner)
            conv.args = (*conv.args[:2], bias_node, *conv.args[3:])
        else:
            bias_owner, _, bias_attr = bias_node.target.rpartition(".")
            setattr(gm.get_submodule(bias_owner) if bias_owner else gm, bias_attr, folded_bias)
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "get_attr" and n.is_impure())
        gm.graph.lint()
        gm.recompile()


def _annotate_module_paths(gm: fx.GraphModule) -> None:
    """META_MODULE_PATH = the innermost module of ``nn_module_stack`` ("" for the top module)."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path = ""
        for entry in reversed(list(stack.values())):
            candidate = entry[0] if isinstance(entry, tuple) else str(entry)
            if not candidate.startswith("_empty_nn_module_stack"):
                path = candidate
                break
        if node.op == "get_attr" and not path:
            path = node.target.rpartition(".")[0]
        node.meta[META_MODULE_PATH] = path


def flatten_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict, batch_index: int) -> list[Any]:
    """The graph's placeholder values for one call ``model(*args, **kwargs)``.

    Raises CalibrationError naming the batch and the input when the structure, dtype or a static dim
    differs from what the graph was captured with.
    """
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if gm.meta.get(GM_CAPTURED_BY) == "torch.fx":
        names = gm.meta[GM_INPUT_NAMES]
        bound = dict(zip(names, args))
        unknown = set(kwargs) - set(names)
        if len(args) > len(names) or unknown:
            raise CalibrationError(f"calibration batch {batch_index} does not match forward({', '.join(names)}): "
                                   f"{len(args)} positional inputs, keyword inputs {sorted(kwargs)}")
        bound.update(kwargs)
        flat = []
        for node in placeholders:
            if node.target in bound:
                flat.append(bound[node.target])
            elif node.args:
                flat.append(node.args[0])
            else:
                raise CalibrationError(f"calibration batch {batch_index} has no value for input {node.target!r}")
        return flat
    in_spec = gm.graph._codegen.pytree_info.in_spec
    children = in_spec.children() if hasattr(in_spec, "children") else in_spec.children_specs  # renamed in torch 2.13
    expected_keys = list(children[1].context) if len(children) == 2 else []
    if set(kwargs) != set(expected_keys):
        raise CalibrationError(f"calibration batch {batch_index} has keyword inputs {sorted(kwargs)} but the model "
                               f"was captured with {sorted(expected_keys)}; give every batch the same inputs")
    ordered = {key: kwargs[key] for key in expected_keys}
    flat, spec = pytree.tree_flatten((tuple(args), ordered))
    if spec != in_spec:
        raise CalibrationError(f"calibration batch {batch_index} has the input structure {spec} but the model was "
                               f"captured with {in_spec}; give every batch the same structure")
    for node, value in zip(placeholders, flat):
        _check_input(node, value, batch_index)
    return flat


def _check_input(node: fx.Node, value: Any, batch_index: int) -> None:
    expected = node.meta.get("val")
    if not isinstance(expected, torch.Tensor):
        return
    if not isinstance(value, torch.Tensor):
        raise CalibrationError(f"calibration batch {batch_index}: input {node.name!r} must be a tensor, got "
                               f"{type(value).__name__}")
    if value.dtype != expected.dtype:
        raise CalibrationError(f"calibration batch {batch_index}: input {node.name!r} has dtype {value.dtype}, the "
                               f"model was captured with {expected.dtype}")
    if value.dim() != expected.dim():
        raise CalibrationError(f"calibration batch {batch_index}: input {node.name!r} has shape {tuple(value.shape)}, "
                               f"the model was captured with {tuple(expected.shape)}")
    for dim, (size, captured) in enumerate(zip(value.shape, expected.shape)):
        if isinstance(captured, int) and size != captured:
            raise CalibrationError(
                f"calibration batch {batch_index}: input {node.name!r} has shape {tuple(value.shape)} but dim {dim} "
                f"was captured as fixed at {captured} (captured shape {tuple(expected.shape)}); calibrate with "
                "inputs of the shape the model is used with")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
