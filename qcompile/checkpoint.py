"""Resumable quantization: each finished block's parameters on disk, so that an interrupted run resumes.

``qcompile.compile(..., checkpoint_dir=path)``: after each block, optimize writes ``block_<index>.safetensors``
(the QuantParams of the weights the block quantized and its activation params) and then rewrites
``manifest.json`` with the run's fingerprint and the finished blocks (name, file, sha256 and the scalar
fields of every param). Both writes are atomic (a temporary file, fsync, ``os.replace``), so a kill at any
moment leaves either the old or the new state. A rerun with the same model, calibration data and config
finds the same fingerprint and takes the finished blocks from disk: they are folded as before and the
calibration stream advances through them, so the result is bit-identical to an uninterrupted run; the
first unfinished block is optimized next. A directory holding another run (a different fingerprint) is
refused with ``CheckpointError``; so is a block file whose checksum does not match. Only JSON and
safetensors are read: nothing is unpickled.

The fingerprint hashes the config (``QuantConfig.fingerprint``), the blocks' names, every graph tensor's
name, shape, dtype and a strided sample of at most ``SAMPLE`` of its values, and the same for every
calibration input.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import QuantConfig
from .errors import CheckpointError
from .format import file_sha256
from .ir import ActivationParams, Partition, QuantParams

FORMAT = "qcompile.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLE = 4096
_WEIGHT_FIELDS = ("bits", "symmetric", "group_size", "axis", "shape", "exponent")


def _tensor_digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().reshape(-1)
    sample = flat[::max(1, flat.numel() // SAMPLE)].to("cpu", torch.float64)
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()


def run_fingerprint(gm: torch.nn.Module, partition: Partition, batches: list[list[Any]], config: QuantConfig) -> str:
    """A hash of what determines a run's result (see the module docstring)."""
    tensors = [(name, list(t.shape), str(t.dtype), _tensor_digest(t))
               for name, t in [*gm.named_parameters(), *gm.named_buffers()]]
    inputs = [[(list(v.shape), str(v.dtype), _tensor_digest(v)) if isinstance(v, torch.Tensor) else repr(v)
               for v in batch] for batch in batches]
    layers = [(layer.weight, None if layer.spec is None else layer.spec.bits) for layer in partition.layers]
    document = {"config": config.fingerprint(), "blocks": [block.name for block in partition.blocks],
                "layers": layers, "tensors": tensors, "inputs": inputs}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _atomic_write(path: Path, write) -> None:
    """``write(temporary_path)``, then make it ``path`` in one rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class RunCheckpoint:
    """The checkpoint directory of one run (``open`` validates or starts it)."""

    def __init__(self, directory: Path, fingerprint: str, blocks: dict[str, dict]):
        self.directory, self.fingerprint, self.blocks = directory, fingerprint, blocks

    @classmethod
    def open(cls, directory: str | os.PathLike, fingerprint: str) -> "RunCheckpoint":
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        manifest_path = directory / MANIFEST
        if not manifest_path.exists():
            return cls(directory, fingerprint, {})
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{manifest_path} is not a qcompile checkpoint manifest ({error}); delete the "
                                  "directory or pick another checkpoint_dir") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r} version "
                                  f"{manifest.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}; "
                                  "delete the directory or pick another checkpoint_dir")
        if manifest.get("fingerprint") != fingerprint:
            raise CheckpointError(f"checkpoint_dir {str(directory)!r} holds a run of a different model, calibration "
                                  "data or config (fingerprint mismatch), so its blocks cannot be reused: delete it, "
                                  "or pick another checkpoint_dir for this run")
        return cls(directory, fingerprint, dict(manifest.get("blocks", {})))

    def restore(self, block_name: str, device: torch.device
                ) -> tuple[dict[str, QuantParams], dict[str, ActivationParams]] | None:
        """The saved params of a finished block on ``device``, or None when the block is not finished."""
        entry = self.blocks.get(block_name)
        if entry is None:
            return None
        path = self.directory / entry["file"]
        if not path.exists() or file_sha256(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {str(path)!r} of block {block_name!r} is missing or does not match "
                                  "its checksum (truncated or modified); delete the checkpoint_dir to start over")
        tensors = load_file(str(path), device=str(device))
        weights = {target: QuantParams(
            weight_codes=tensors[f"weight/{target}/codes"], scale=tensors[f"weight/{target}/scale"],
            zero_point=tensors[f"weight/{target}/zero_point"],
            **{**fields, "shape": tuple(fields["shape"])}) for target, fields in entry["weights"].items()}
        activations = {name: ActivationParams(
            scale=tensors[f"activation/{name}/scale"], zero_point=tensors[f"activation/{name}/zero_point"], **fields)
            for name, fields in entry["activations"].items()}
        return weights, activations

    def save(self, block_index: int, block_name: str, weights: dict[str, QuantParams],
             activations: dict[str, ActivationParams]) -> None:
        """Write a finished block's params, then record it in the manifest (both atomically)."""
        tensors = {}
        for target, params in weights.items():
            for field, value in (("codes", params.weight_codes), ("scale", params.scale),
                                 ("zero_point", params.zero_point)):
                tensors[f"weight/{target}/{field}"] = value.detach().to("cpu").contiguous()
        for name, params in activations.items():
            tensors[f"activation/{name}/scale"] = params.scale.detach().to("cpu").contiguous()
            tensors[f"activation/{name}/zero_point"] = params.zero_point.detach().to("cpu").contiguous()
        path = self.directory / f"block_{block_index:05d}.safetensors"
        _atomic_write(path, lambda temporary: save_file(tensors, str(temporary)))
        self.blocks[block_name] = {
            "index": block_index, "file": path.name, "sha256": file_sha256(path),
            "weights": {t: {f: list(getattr(p, f)) if f == "shape" else getattr(p, f) for f in _WEIGHT_FIELDS}
                        for t, p in weights.items()},
            "activations": {n: {"bits": p.bits, "symmetric": p.symmetric} for n, p in activations.items()}}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                    "blocks": self.blocks}
        _atomic_write(self.directory / MANIFEST, lambda temporary: temporary.write_text(json.dumps(manifest, indent=1)))
