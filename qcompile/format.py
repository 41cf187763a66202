"""The saved format of a QuantizedModel: JSON for the graph, safetensors for the tensors, no pickle.

A saved model is a directory with two files:

- ``tensors.safetensors``: every tensor the graph reads (packed weight codes, scales, zero points,
  float parameters and buffers), keyed by its get_attr target; tensors that share storage are saved
  once and aliased.
- ``graph.json``: ``format`` / ``format_version``; ``tensors`` (target -> safetensors key, whether it
  is a parameter); ``tensors_sha256`` (checksum of the tensors file); ``nodes`` (the FX graph: name,
  op, target, args, kwargs, qcompile metadata); ``codegen`` (pytree input/output specs of exported
  graphs); ``config`` and ``report``.

Loading resolves call targets only from ``torch.ops`` and a fixed list of modules (operator, math,
torch, torch.nn.functional), call_method only on public tensor methods, and refuses anything else,
unknown format versions, and tensors whose checksum does not match.
"""
from __future__ import annotations

import builtins
import hashlib
import importlib
import json
import math
import operator
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from .errors import SerializationError
from .ir import GM_CAPTURED_BY, GM_INPUT_NAMES, META_MODULE_PATH, META_ROLE, META_WEIGHT, ensure_submodule, fetch_attr

FORMAT = "qcompile.quantized_model"
FORMAT_VERSION = 2  # 2: codes packed densely (3-bit codes 3 bits each), power-grid exponents
GRAPH_FILE = "graph.json"
TENSORS_FILE = "tensors.safetensors"
SAVED_META = (META_MODULE_PATH, META_ROLE, META_WEIGHT)
FUNCTION_MODULES = {"operator": operator, "math": math, "torch": torch, "torch.nn.functional": torch.nn.functional,
                    "torch._C._nn": torch._C._nn, "builtins": builtins}
# Names a saved graph may call, per module: pure tensor / arithmetic functions, never I/O or eval.
ALLOWED_FUNCTIONS = {
    "operator": {"getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
                 "matmul", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert",
                 "lshift", "rshift", "index"},
    "math": {name for name in dir(math) if not name.startswith("_")},
    "torch": {name for name in dir(torch._C._VariableFunctions) if not name.startswith("_")},
    "torch.nn.functional": {name for name in dir(torch.nn.functional) if not name.startswith("_")} - {"torch"},
    "torch._C._nn": {name for name in dir(torch._C._nn) if not name.startswith("_")},
    "builtins": {"getattr"},
}
PYTREE_TYPE_PACKAGES = ("transformers.", "timm.", "torch.", "collections.", "builtins.")


def save(model, path: str | os.PathLike) -> None:
    """Write ``model`` (a QuantizedModel) to the directory ``path``."""
    from . import __version__
    gm = model.graph_module
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, table = _collect_tensors(gm)
    example = _encode_example(model.example_inputs, tensors)
    tensors_path = directory / TENSORS_FILE
    save_file(tensors, str(tensors_path))
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qcompile_version": __version__,
        "torch_version": torch.__version__,
        "captured_by": gm.meta.get(GM_CAPTURED_BY),
        "input_names": gm.meta.get(GM_INPUT_NAMES),
        "codegen": _encode_codegen(gm.graph),
        "nodes": [_encode_node(node) for node in gm.graph.nodes],
        "tensors": table,
        "tensors_sha256": file_sha256(tensors_path),
        "example_inputs": example,
        "config": model.config.to_dict(),
        "report": model.report().to_dict(),
    }
    (directory / GRAPH_FILE).write_text(json.dumps(document, indent=1))


def load(path: str | os.PathLike):
    """Read a QuantizedModel written by ``QuantizedModel.save``; never unpickles."""
    from .api import QuantizedModel
    from .config import QuantConfig
    from .report import Report
    directory = Path(path)
    graph_path, tensors_path = directory / GRAPH_FILE, directory / TENSORS_FILE
    if not graph_path.is_file() or not tensors_path.is_file():
        raise SerializationError(f"{directory} is not a saved qcompile model: it needs {GRAPH_FILE} and {TENSORS_FILE}")
    try:
        document = json.loads(graph_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SerializationError(f"{graph_path} is not valid JSON (truncated or corrupted?): {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SerializationError(f"{graph_path} is not a qcompile model file (format {document.get('format')!r})"
                                 if isinstance(document, dict) else f"{graph_path} is not a qcompile model file")
    if document.get("format_version") != FORMAT_VERSION:
        raise SerializationError(f"{graph_path} has format version {document.get('format_version')!r}; this "
                                 f"qcompile reads version {FORMAT_VERSION}: re-save it with a matching qcompile")
    if file_sha256(tensors_path) != document.get("tensors_sha256"):
        raise SerializationError(f"{tensors_path} does not match the checksum in {GRAPH_FILE}: the file was "
                                 "truncated or modified; re-save the model")
    try:
        stored = load_file(str(tensors_path))
        gm = _decode_graph_module(document, stored)
        example = _decode_example(document["example_inputs"], stored)
        config = QuantConfig.from_dict(document["config"])
        report = Report.from_dict(document["report"])
    except SerializationError:
        raise
    except Exception as error:  # noqa: BLE001 - any malformed content is a format error
        raise SerializationError(f"cannot read {directory}: {type(error).__name__}: {error}") from None
    return QuantizedModel(gm, config, report, example)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _collect_tensors(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors behind the graph's get_attr targets (shared storage saved once) and their table."""
    tensors, table, by_storage = {}, {}, {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in table:
            continue
        value = fetch_attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            raise SerializationError(f"node {node.name} reads {node.target!r}, a {type(value).__name__}; only tensor "
                                     "attributes can be saved")
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()),
               value.dtype)
        saved_as = by_storage.setdefault(key, node.target)
        if saved_as == node.target:
            tensors[node.target] = value.detach().cpu().contiguous()
        table[node.target] = {"key": saved_as, "parameter": isinstance(value, torch.nn.Parameter),
                              "requires_grad": bool(value.requires_grad)}
    return tensors, table


EXAMPLE_PREFIX = "__example__/"


def _encode_example(example: tuple[tuple, dict], tensors: dict[str, torch.Tensor]) -> dict:
    """The example inputs (kept for export) as a pytree spec and leaves; tensors go into ``tensors``."""
    leaves, spec = pytree.tree_flatten(example)
    encoded = []
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors[f"{EXAMPLE_PREFIX}{index}"] = leaf.detach().cpu().contiguous()
            encoded.append({"~": "tensor", "key": f"{EXAMPLE_PREFIX}{index}"})
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            encoded.append(leaf)
        else:
            raise SerializationError(f"example input of type {type(leaf).__name__} cannot be saved")
    return {"spec": pytree.treespec_dumps(spec), "leaves": encoded}


def _decode_example(example: dict, stored: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
    leaves = [stored[leaf["key"]] if isinstance(leaf, dict) and leaf.get("~") == "tensor" else leaf
              for leaf in example["leaves"]]
    return pytree.tree_unflatten(leaves, pytree.treespec_loads(example["spec"]))


def _encode_codegen(graph: fx.Graph) -> dict | None:
    if not isinstance(graph._codegen, _PyTreeCodeGen):
        return None
    info = graph._codegen.pytree_info
    return {"orig_args": list(info.orig_args), "in_spec": pytree.treespec_dumps(info.in_spec),
            "out_spec": None if info.out_spec is None else pytree.treespec_dumps(info.out_spec)}


def _encode_node(node: fx.Node) -> dict:
    return {"name": node.name, "op": node.op, "target": _encode_target(node),
            "args": _encode_value(node.args, node), "kwargs": _encode_value(dict(node.kwargs), node),
            "meta": {key: node.meta[key] for key in SAVED_META if key in node.meta}}


def _encode_target(node: fx.Node) -> Any:
    target = node.target
    if node.op in ("placeholder", "get_attr", "output"):
        return target
    if node.op == "call_method":
        return target
    if node.op == "call_function":
        if isinstance(target, torch._ops.OpOverload):
            return {"op": target._schema.name, "overload": target._overloadname}
        name = getattr(target, "__name__", None)
        for module_name, module in FUNCTION_MODULES.items():
            if name in ALLOWED_FUNCTIONS[module_name] and getattr(module, name, None) is target:
                return {"function": module_name, "name": name}
    raise SerializationError(f"node {node.name} ({node.op} {target!r}) cannot be saved: qcompile saves graphs of "
                             "torch ops, operator functions and tensor methods only")


def _encode_value(value: Any, node: fx.Node) -> Any:
    if isinstance(value, fx.Node):
        return {"~": "node", "name": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"~": "float", "value": repr(value)}
    if isinstance(value, list):
        return [_encode_value(v, node) for v in value]
    if isinstance(value, tuple):
        return {"~": "tuple", "items": [_encode_value(v, node) for v in value]}
    if isinstance(value, dict):
        return {"~": "dict", "items": [[k, _encode_value(v, node)] for k, v in value.items()]}
    if isinstance(value, torch.dtype):
        return {"~": "dtype", "name": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"~": "device", "name": str(value)}
    if isinstance(value, torch.layout):
        return {"~": "layout", "name": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"~": "memory_format", "name": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"~": "slice", "items": [_encode_value(v, node) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"~": "ellipsis"}
    raise SerializationError(f"node {node.name} has an argument of type {type(value).__name__} that cannot be saved")


def _decode_value(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode_value(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value.get("~")
    if kind == "node":
        return env[value["name"]]
    if kind == "float":
        return float(value["value"])
    if kind == "tuple":
        return tuple(_decode_value(v, env) for v in value["items"])
    if kind == "dict":
        return {k: _decode_value(v, env) for k, v in value["items"]}
    if kind in ("dtype", "layout", "memory_format"):
        result = getattr(torch, value["name"], None)
        if not isinstance(result, (torch.dtype, torch.layout, torch.memory_format)):
            raise SerializationError(f"unknown torch {kind} {value['name']!r}")
        return result
    if kind == "device":
        return torch.device(value["name"])
    if kind == "slice":
        return slice(*(_decode_value(v, env) for v in value["items"]))
    if kind == "ellipsis":
        return Ellipsis
    raise SerializationError(f"unknown value encoding {kind!r}")


def _decode_target(op: str, target: Any) -> Any:
    if op in ("placeholder", "get_attr", "output"):
        return target
    if op == "call_method":
        if not isinstance(target, str) or target.startswith("_") or not hasattr(torch.Tensor, target):
            raise SerializationError(f"refusing call_method {target!r}: not a public tensor method")
        return target
    if op == "call_function" and isinstance(target, dict):
        if "op" in target:
            namespace, _, name = target["op"].partition("::")
            try:
                return getattr(getattr(getattr(torch.ops, namespace), name), target["overload"])
            except (AttributeError, RuntimeError):
                raise SerializationError(f"unknown op {target['op']}.{target['overload']} (a newer torch or an "
                                         "unregistered custom op?)") from None
        module_name, name = target.get("function"), target.get("name")
        if name in ALLOWED_FUNCTIONS.get(module_name, ()):
            return getattr(FUNCTION_MODULES[module_name], name)
    raise SerializationError(f"refusing node target {target!r} of op {op!r}: not an allowed function")


def _decode_graph_module(document: dict, stored: dict[str, torch.Tensor]) -> fx.GraphModule:
    root = torch.nn.Module()
    for target, entry in document["tensors"].items():
        tensor = stored[entry["key"]]
        owner_path, _, attr = target.rpartition(".")
        owner = ensure_submodule(root, owner_path)
        if entry["parameter"]:
            owner.register_parameter(attr, torch.nn.Parameter(tensor, requires_grad=entry["requires_grad"]))
        else:
            owner.register_buffer(attr, tensor)
    graph = fx.Graph()
    codegen = document.get("codegen")
    if codegen is not None:
        _import_pytree_types(codegen)
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(
            codegen["orig_args"], pytree.treespec_loads(codegen["in_spec"]),
            None if codegen["out_spec"] is None else pytree.treespec_loads(codegen["out_spec"])))
    env: dict[str, fx.Node] = {}
    for entry in document["nodes"]:
        op = entry["op"]
        if op not in ("placeholder", "get_attr", "call_function", "call_method", "output"):
            raise SerializationError(f"refusing node {entry['name']!r} with op {op!r}")
        if op == "get_attr" and entry["target"] not in document["tensors"]:
            raise SerializationError(f"node {entry['name']!r} reads {entry['target']!r}, which is not saved")
        target, args = _decode_target(op, entry["target"]), _decode_value(entry["args"], env)
        if target is getattr and not (len(args) == 2 and isinstance(args[1], str) and not args[1].startswith("_")):
            raise SerializationError(f"refusing node {entry['name']!r}: getattr of a private attribute")
        node = graph.create_node(op, target, args, _decode_value(entry["kwargs"], env), name=entry["name"])
        node.meta.update({k: v for k, v in entry.get("meta", {}).items() if k in SAVED_META})
        env[entry["name"]] = node
    graph.lint()
    gm = fx.GraphModule(root, graph, "QuantizedGraph")
    if document.get("captured_by"):
        gm.meta[GM_CAPTURED_BY] = document["captured_by"]
    if document.get("input_names") is not None:
        gm.meta[GM_INPUT_NAMES] = document["input_names"]
    return gm


def _import_pytree_types(codegen: dict) -> None:
    """Import the modules that define the pytree node types named in the specs (so that they are
    registered), from a fixed list of packages only."""
    names = set()

    def walk(item):
        if isinstance(item, dict):
            if isinstance(item.get("type"), str):
                names.add(item["type"])
            for child in item.get("children_spec", []):
                walk(child)
    for key in ("in_spec", "out_spec"):
        if codegen.get(key):
            walk(json.loads(codegen[key])[1])
    for name in names:
        module = name.rpartition(".")[0]
        if not name.startswith(PYTREE_TYPE_PACKAGES):
            raise SerializationError(f"refusing pytree type {name!r} from an unknown package")
        if module and module != "builtins":
            importlib.import_module(module)
