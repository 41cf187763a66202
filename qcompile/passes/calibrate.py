"""calibrate: stream calibration data through the blocks, and observe activation ranges.

``CalibrationStream`` keeps, per calibration batch, the values live between two blocks in two
environments: the float model's and the quantized model's (block k sees the outputs of the already
quantized blocks 0..k-1; the float outputs are the targets). Values no quantized layer influences are
shared by both. A value is dropped once no later block reads it, so only one block boundary lives in
memory; it is kept on CPU when the model runs on an accelerator.

``observe_activations`` runs a block and records, with ``RangeObserver``, the range of every value
the block quantizes (``Block.activations``), giving per-tensor ``ActivationParams``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import fx

from .. import primitives as P
from ..config import QuantSpec
from ..errors import CalibrationError
from ..ir import ActivationParams, Block, Partition, values_to


class CalibrationStream:
    """Block-by-block float and quantized activations of every calibration batch.

    batches: the placeholder values of each batch (``capture.flatten_inputs``); device: where blocks
    run; dependent: names of the values that quantization changes.
    """

    def __init__(self, gm: fx.GraphModule, partition: Partition, batches: list[list[Any]],
                 device: torch.device, dependent: set[str]):
        self.device = device
        self.store = torch.device("cpu") if device.type != "cpu" else device
        self.dependent = dependent
        placeholders = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
        self.float_env = [dict(zip(placeholders, (self._stored(v) for v in values))) for values in batches]
        self.quant_env = [dict() for _ in batches]
        self.last_reader: dict[str, int] = {}
        for block in partition.blocks:
            for name in block.inputs:
                self.last_reader[name] = block.index

    def __len__(self) -> int:
        return len(self.float_env)

    def _stored(self, value: Any) -> Any:
        return value.detach().to(self.store) if isinstance(value, torch.Tensor) else value

    def inputs(self, block: Block, batch: int, quantized: bool) -> tuple:
        """The block's input values for one batch (on the storage device: CPU for accelerator models)."""
        float_env, quant_env = self.float_env[batch], self.quant_env[batch]
        env = quant_env if quantized else float_env
        return tuple(env[name] if name in env else float_env[name] for name in block.inputs)

    def to_device(self, values: tuple) -> tuple:
        """Values moved to the device the blocks run on."""
        return values_to(values, self.device)

    def run(self, module: torch.nn.Module, block: Block, quantized_inputs: bool) -> list[tuple]:
        """``module`` (the block, float or quantized) on every batch; outputs on the storage device."""
        outputs = []
        with torch.no_grad():
            for batch in range(len(self)):
                result = module(*self.to_device(self.inputs(block, batch, quantized_inputs)))
                _check_finite(result, block, batch)
                outputs.append(tuple(self._stored(value) for value in result))
        return outputs

    def advance(self, block: Block, float_outputs: list[tuple], quant_outputs: list[tuple]) -> None:
        """Store the block's outputs as the next blocks' inputs and drop values nobody reads anymore."""
        for batch in range(len(self)):
            for env, values in ((self.float_env[batch], float_outputs[batch]),
                                (self.quant_env[batch], quant_outputs[batch])):
                for name, value in zip(block.outputs, values):
                    if env is self.float_env[batch] or name in self.dependent:
                        env[name] = value
                for name in [n for n in env if self.last_reader.get(n, -1) <= block.index]:
                    del env[name]


def _check_finite(result: Iterable[Any], block: Block, batch: int) -> None:
    for name, value in zip(block.outputs, result):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise CalibrationError(f"NaN/Inf in the activations of block {block.name!r} (value {name}) on "
                                   f"calibration batch {batch}; check the model and the calibration data")


class RangeObserver:
    """Running min/max of a tensor stream plus a bounded uniform sample of its values (for the
    percentile and MSE observers)."""

    def __init__(self, spec: QuantSpec, sample_per_batch: int = 1 << 16, max_samples: int = 1 << 20,
                 seed: int = 0):
        self.spec = spec
        self.min = torch.tensor(float("inf"))
        self.max = torch.tensor(float("-inf"))
        self.samples: list[torch.Tensor] = []
        self.sample_per_batch = sample_per_batch
        self.max_batches = max(1, max_samples // sample_per_batch)
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if not torch.isfinite(x).all():
            raise CalibrationError("NaN/Inf in an activation being observed")
        self.min = torch.minimum(self.min, x.min().cpu())
        self.max = torch.maximum(self.max, x.max().cpu())
        if self.spec.observer != "minmax" and len(self.samples) < self.max_batches:
            if x.numel() > self.sample_per_batch:
                index = torch.randint(x.numel(), (self.sample_per_batch,), generator=self.generator)
                x = x[index.to(x.device)]
            self.samples.append(x.cpu())

    def params(self) -> ActivationParams:
        spec = self.spec
        low, high = self.min.reshape(1), self.max.reshape(1)
        if spec.observer != "minmax":
            values = torch.cat(self.samples)
            if spec.observer == "percentile":
                q = torch.tensor([1.0 - spec.percentile / 100.0, spec.percentile / 100.0])
                low, high = torch.quantile(values, q).split(1)
            else:
                low, high = P.mse_clip_range(values.reshape(1, -1), low, high, spec.bits, spec.symmetric)
        scale, zero_point = P.scale_zero_point(low, high, spec.bits, spec.symmetric)
        return ActivationParams(scale=scale.reshape(()), zero_point=zero_point.reshape(()).to(P.code_dtype(spec.symmetric)),
                                bits=spec.bits, symmetric=spec.symmetric)


def observe_activations(block: Block, stream: CalibrationStream, spec: QuantSpec, seed: int
                        ) -> dict[str, ActivationParams]:
    """Per-tensor params of the block's activations (``block.activations``), keyed by the name of the
    node making the value, observed on the quantized stream with the block's weights still float."""
    observers = {name: RangeObserver(spec, seed=seed) for name in block.activations}

    class _Recorder(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node.name in observers:
                observers[node.name].update(value)
            return value

    recorder = _Recorder(block.graph_module)
    with torch.no_grad():
        for batch in range(len(stream)):
            recorder.run(*stream.to_device(stream.inputs(block, batch, quantized=True)))
    return {name: observer.params() for name, observer in observers.items()}
