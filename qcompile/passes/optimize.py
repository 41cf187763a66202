"""optimize: drive a rounding optimizer over the blocks, sequentially, with progress.

For each block in order: float targets from the float stream; activation ranges observed on the
quantized stream (when activations are quantized); the optimizer's QuantParams for the block's
weights (a weight shared with an earlier block keeps its params); the block folded with them; its
quantized outputs feed the next block. Reads a Partition; returns an OptimizeResult; the model graph
itself is not changed (fold does that). With a checkpoint (``qcompile.checkpoint``), finished blocks come
from disk and each newly optimized block is written there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from .. import rounding
from ..checkpoint import RunCheckpoint
from ..config import QuantConfig
from ..errors import QCompileError
from ..ir import ActivationParams, Block, Partition, QuantParams
from ..rounding.registry import BlockProblem, BlockSolution
from .calibrate import CalibrationStream, observe_activations
from .fold import fold


@dataclass
class BlockStats:
    """name, number of quantized layers, relative output error vs float, wall seconds."""

    name: str
    layers: int
    output_error: float
    seconds: float


@dataclass
class OptimizeResult:
    weight_params: dict[str, QuantParams] = field(default_factory=dict)
    activation_params: dict[str, ActivationParams] = field(default_factory=dict)
    blocks: list[BlockStats] = field(default_factory=list)


def optimize(gm: fx.GraphModule, partition: Partition, batches: list[list[Any]], config: QuantConfig,
             device: torch.device, progress: bool = True, checkpoint: RunCheckpoint | None = None) -> OptimizeResult:
    """Quantize the blocks of ``partition`` one after the other on the calibration ``batches``
    (placeholder values per batch). With a ``checkpoint``, blocks it holds are taken from it and every
    block optimized here is saved to it."""
    optimizer = rounding.get(config.method)
    stream = CalibrationStream(gm, partition, batches, device, partition.dependent)
    result = OptimizeResult()
    bar = tqdm(partition.blocks, desc=f"qcompile {config.method}", unit="block", disable=not progress)
    for block in bar:
        start = time.perf_counter()
        bar.set_postfix_str(block.name[-40:])
        targets = stream.run(block.graph_module, block, quantized_inputs=False)
        restored = checkpoint.restore(block.name, device) if checkpoint is not None else None
        if restored is None:
            weights, activations = _solve_block(optimizer, block, stream, targets, result, config)
            if checkpoint is not None:
                checkpoint.save(block.index, block.name, weights, activations)
        else:
            weights, activations = restored
        result.weight_params.update(weights)
        result.activation_params.update(activations)
        fold(block.graph_module, block.layers, result.weight_params, activations)
        quantized = stream.run(block.graph_module, block, quantized_inputs=True)
        error = _output_error(block, targets, quantized)
        stream.advance(block, targets, quantized)
        result.blocks.append(BlockStats(block.name, len(weights), error, time.perf_counter() - start))
        bar.set_postfix_str(f"{block.name[-30:]} err={error:.2e}")
    return result


def _solve_block(optimizer, block: Block, stream: CalibrationStream, targets: list[tuple], result: OptimizeResult,
                 config: QuantConfig) -> tuple[dict[str, QuantParams], dict[str, ActivationParams]]:
    """Run the rounding optimizer on one block: the QuantParams of the weights it quantizes first and the
    params of the activations it owns (observed, or learned by the method)."""
    activations = (observe_activations(block, stream, config.activation, config.seed)
                   if config.activation is not None else {})
    specs = {}
    for layer in block.layers:
        if layer.quantized and layer.weight not in result.weight_params:
            specs.setdefault(layer.weight, layer.spec)
    problem = BlockProblem(
        block, inputs=[stream.inputs(block, batch, quantized=True) for batch in range(len(stream))],
        float_inputs=[stream.inputs(block, batch, quantized=False) for batch in range(len(stream))],
        targets=targets, specs=specs, activations=activations, config=config)
    torch.manual_seed(config.seed + block.index)
    solution = optimizer(problem)
    _check_solution(config.method, block, specs, activations, solution)
    return solution.weights, {**activations, **solution.activations}


def _check_solution(method: str, block: Block, specs: dict, activations: dict, solution: BlockSolution) -> None:
    missing = set(specs) - set(solution.weights)
    if missing:
        raise QCompileError(f"rounding method {method!r} returned no parameters for {sorted(missing)} in block "
                            f"{block.name!r}")
    unknown = set(solution.activations) - set(activations)
    if unknown:
        raise QCompileError(f"rounding method {method!r} returned activation params for values the block does not "
                            f"quantize: {sorted(unknown)} in block {block.name!r}")
    for name, value in solution.weights.items():
        value.validate(name)


def _output_error(block: Block, targets: list[tuple], quantized: list[tuple]) -> float:
    """Relative squared error of the block's main output over all batches."""
    index = block.outputs.index(block.main_output)
    num = den = 0.0
    for target, approx in zip(targets, quantized):
        reference, value = target[index], approx[index]
        if not (isinstance(reference, torch.Tensor) and reference.is_floating_point()):
            return float("nan")
        num += (reference.float() - value.float()).pow(2).sum().item()
        den += reference.float().pow(2).sum().item()
    return num / den if den > 0 else 0.0
