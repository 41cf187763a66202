"""allocate: importance-based mixed precision, one bit width per layer under a size budget.

Reads the partition, the calibration batches (placeholder values) and ``QuantConfig.mixed_precision``;
returns the partition with each free layer's spec set to its chosen width (a layer an override matches
keeps its spec and counts at its fixed size), and an ``Allocation`` for the report. The graph is not
changed.

For every free weight W and candidate width b, nearest rounding with the layer's spec at b gives the
candidate's exact size (``QuantParams.nbytes``: packed codes + scales + zero points, what fold stores) and
its error ΔW_b = W - Q_b(W). The estimated loss increase of each candidate (the score; Yvinec et al.,
gradient-based PTQ best practices, arXiv 2308.07662, on importance-based bit allocation):

- "fisher": ½ Σ_i F_ii ΔW_i², F the diagonal of J^T J (J: the Jacobian of the model's floating outputs
  with respect to W), estimated per batch as E[(J^T ε)²] with Rademacher ε (``FISHER_DRAWS`` draws): the
  Fisher information of a Gaussian output model, i.e. the second-order output error;
- "hessian": the layer's own output error Σ ||op(x, W) - op(x, Q_b)||² on the float model's inputs
  (= tr(ΔW X^T X ΔW^T) for a linear layer), run by the op itself, so convs and lookups need no unfolding;
- "output_error": Σ ||f(W) - f(W with only this layer at Q_b)||² over the model's floating outputs
  (L · |candidates| forward passes per batch).

The allocation minimises Σ score under Σ bytes ≤ target_bits · elements / 8: a multiple-choice knapsack,
solved exactly by dynamic programming over byte costs in units of their greatest common divisor
(``solve_knapsack``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..config import QuantConfig
from ..errors import ConfigError
from ..ir import Partition, QuantLayer, QuantParams, copy_graph_module, fetch_attr, values_to
from ..rounding.rtn import round_to_nearest

FISHER_DRAWS = 2
MAX_DP_WORK = 200_000_000   # layers x candidates x capacity states the solver may visit


@dataclass
class KnapsackSolution:
    """choices: the candidate index per item; exact: whether it is optimal for the budget itself; else it
    is optimal for any budget at most ``slack`` below it (costs were rounded up to coarser units)."""

    choices: list[int]
    exact: bool
    slack: int


def solve_knapsack(costs: list[list[int]], losses: list[list[float]], budget: int,
                   max_work: int = MAX_DP_WORK) -> KnapsackSolution:
    """Pick one candidate per item minimising Σ losses[i][choice] with Σ costs[i][choice] <= budget.

    Dynamic programming over the extra cost above each item's cheapest candidate, in units of the
    greatest common divisor of those extras: exact. When the state count would exceed ``max_work``, the
    extras are rounded up to a coarser unit u (feasible, and optimal for budget - items · u). Raises
    ValueError when even the cheapest choice exceeds the budget.
    """
    base = sum(min(row) for row in costs)
    if base > budget:
        raise ValueError(f"the cheapest choice needs {base} but the budget is {budget}")
    extras = [[cost - min(row) for cost in row] for row in costs]
    capacity = budget - base
    unit = math.gcd(*(extra for row in extras for extra in row if extra))
    if unit == 0:  # every candidate costs the same
        return KnapsackSolution([int(np.argmin(row)) for row in losses], True, 0)
    states = capacity // unit
    per_state = sum(len(row) for row in costs)
    exact = states * per_state <= max_work
    if not exact:
        unit = -(-capacity // max(max_work // per_state, 1))
        states = capacity // unit
    weights = [[-(-extra // unit) for extra in row] for row in extras]
    best = np.zeros(states + 1)
    choice = np.zeros((len(costs), states + 1), dtype=np.int8)
    for item, (item_weights, item_losses) in enumerate(zip(weights, losses)):
        updated = np.full(states + 1, np.inf)
        for index, (weight, loss) in enumerate(zip(item_weights, item_losses)):
            if weight > states:
                continue
            candidate = np.full(states + 1, np.inf)
            candidate[weight:] = best[:states + 1 - weight] + loss
            better = candidate < updated
            updated[better] = candidate[better]
            choice[item, better] = index
        best = updated
    picks, remaining = [], states
    for item in reversed(range(len(costs))):
        index = int(choice[item, remaining])
        picks.append(index)
        remaining -= weights[item][index]
    return KnapsackSolution(picks[::-1], exact, 0 if exact else len(costs) * unit)


@dataclass
class LayerAllocation:
    """One weight: its module path, the chosen bits, and per candidate width its bytes and score
    (None for a weight an override pins)."""

    weight: str
    path: str
    bits: int
    elements: int
    nbytes: int
    candidates: dict[int, dict[str, float]] | None = None


@dataclass
class Allocation:
    """What allocate chose: target and achieved average bits per quantized weight element (codes,
    scales and zero points), the byte budget and use, the score, and whether the solver's answer is
    exact (else optimal for a budget ``slack_bytes`` tighter)."""

    target_bits: float
    achieved_bits: float
    budget_bytes: int
    used_bytes: int
    score: str
    exact: bool
    slack_bytes: int
    layers: list[LayerAllocation] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def allocate(gm: fx.GraphModule, partition: Partition, batches: list[list[Any]], config: QuantConfig,
             device: torch.device) -> tuple[Partition, Allocation]:
    """The partition with mixed-precision specs, and the allocation (see the module docstring)."""
    mixed = config.mixed_precision
    first_layer: dict[str, QuantLayer] = {}
    for layer in partition.layers:
        if layer.quantized:
            first_layer.setdefault(layer.weight, layer)
    free = {t: layer for t, layer in first_layer.items() if config.weight_spec_for(layer.module_path)[1] is None}
    pinned = {t: round_to_nearest(fetch_attr(gm, t), layer, layer.spec).nbytes()
              for t, layer in first_layer.items() if t not in free}
    candidates = {t: {bits: round_to_nearest(fetch_attr(gm, t), layer, dataclasses.replace(layer.spec, bits=bits))
                      for bits in mixed.candidates} for t, layer in free.items()}
    elements = {t: fetch_attr(gm, t).numel() for t in first_layer}
    budget = int(mixed.target_bits * sum(elements.values()) // 8)
    scores = SCORES[mixed.score](gm, partition.layers, free, candidates, batches, device)
    targets = list(free)
    costs = [[candidates[t][b].nbytes() for b in mixed.candidates] for t in targets]
    losses = [[scores[t][b] for b in mixed.candidates] for t in targets]
    fixed = sum(pinned.values())
    try:
        solution = solve_knapsack(costs, losses, budget - fixed)
    except ValueError:
        smallest = (fixed + sum(min(row) for row in costs)) * 8 / sum(elements.values())
        raise ConfigError(f"MixedPrecision(target_bits={mixed.target_bits}) is below the smallest size these "
                          f"candidates allow: {smallest:.3f} bits per weight (every free layer at "
                          f"{min(mixed.candidates)} bits, scales and zero points included); raise target_bits or "
                          "add a narrower candidate") from None
    chosen = {t: mixed.candidates[i] for t, i in zip(targets, solution.choices)}
    rows = []
    for target, layer in first_layer.items():
        if target in free:
            bits = chosen[target]
            nbytes = candidates[target][bits].nbytes()
            detail = {b: {"bytes": candidates[target][b].nbytes(), "score": scores[target][b]}
                      for b in mixed.candidates}
        else:
            bits, nbytes, detail = layer.spec.bits, pinned[target], None
        rows.append(LayerAllocation(target, layer.module_path, bits, elements[target], nbytes, detail))
    used = sum(row.nbytes for row in rows)
    allocation = Allocation(mixed.target_bits, used * 8 / sum(elements.values()), budget, used, mixed.score,
                            solution.exact, solution.slack, rows)
    return _with_bits(partition, chosen), allocation


def _with_bits(partition: Partition, bits: dict[str, int]) -> Partition:
    """The partition with each layer reading a weight in ``bits`` at that width."""
    def relayer(layer: QuantLayer) -> QuantLayer:
        if layer.weight in bits and layer.quantized:
            return dataclasses.replace(layer, spec=dataclasses.replace(layer.spec, bits=bits[layer.weight]))
        return layer
    blocks = [dataclasses.replace(block, layers=[relayer(layer) for layer in block.layers])
              for block in partition.blocks]
    return dataclasses.replace(partition, blocks=blocks, layers=[relayer(layer) for layer in partition.layers])


def _flat_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm called with its placeholders' values in order, returning its outputs as a pytree."""
    flat = copy_graph_module(gm, "FlatGraph")
    flat.graph._codegen = fx.graph.CodeGen()
    flat.recompile()
    return flat


def _float_outputs(outputs: Any) -> list[torch.Tensor]:
    return [value for value in pytree.tree_leaves(outputs)
            if isinstance(value, torch.Tensor) and value.is_floating_point()]


def _fisher_scores(gm, layers, free, candidates, batches, device) -> dict[str, dict[int, float]]:
    flat = _flat_module(gm)
    fisher = {t: torch.zeros_like(fetch_attr(gm, t), dtype=torch.float32) for t in free}
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        params = {t: fetch_attr(gm, t).detach().requires_grad_() for t in free}
        outputs = _float_outputs(torch.func.functional_call(flat, params, values_to(batch, device)))
        if not outputs:
            raise ConfigError("MixedPrecision(score='fisher') needs a model with floating-point outputs; "
                              "use score='hessian'")
        for draw in range(FISHER_DRAWS):
            signs = [torch.randint(0, 2, out.shape, generator=generator).to(out.device, out.dtype) * 2 - 1
                     for out in outputs]
            projection = sum((out * sign).sum() for out, sign in zip(outputs, signs))
            grads = torch.autograd.grad(projection, list(params.values()), retain_graph=draw + 1 < FISHER_DRAWS,
                                        allow_unused=True)
            for target, grad in zip(params, grads):
                if grad is not None:
                    fisher[target] += grad.detach().float().pow(2)
    def score(target: str, params: QuantParams) -> float:
        weight = fetch_attr(gm, target).detach().float()
        error = weight - params.dequantize().to(weight.device)
        return 0.5 * float((fisher[target] * error.pow(2)).sum()) / (len(batches) * FISHER_DRAWS)
    return {t: {b: score(t, params) for b, params in by_bits.items()} for t, by_bits in candidates.items()}


class _LayerOutputError(fx.Interpreter):
    """Runs the float model; at each layer reading a weight of ``weights``, re-runs its op with every
    candidate weight and adds up the squared difference of the outputs (per weight: over all its readers)."""

    def __init__(self, gm: fx.GraphModule, layers: list[QuantLayer], candidates: dict[str, dict[int, QuantParams]]):
        super().__init__(gm)
        self.layers = {layer.node: layer for layer in layers if layer.weight in candidates}
        self.candidates = candidates
        self.scores = {t: {b: 0.0 for b in by_bits} for t, by_bits in candidates.items()}

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        layer = self.layers.get(node.name)
        if layer is not None and node.op == "call_function":
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            for bits, params in self.candidates[layer.weight].items():
                args = list(args)
                weight = args[layer.weight_index]
                args[layer.weight_index] = params.dequantize().to(weight.device, weight.dtype)
                changed = node.target(*args, **kwargs)
                self.scores[layer.weight][bits] += float((changed.float() - result.float()).pow(2).sum())
        return result


def _hessian_scores(gm, layers, free, candidates, batches, device) -> dict[str, dict[int, float]]:
    interpreter = _LayerOutputError(gm, [layer for layer in layers if layer.quantized], candidates)
    with torch.no_grad():
        for batch in batches:
            interpreter.run(*values_to(batch, device))
    return interpreter.scores


def _output_error_scores(gm, layers, free, candidates, batches, device) -> dict[str, dict[int, float]]:
    flat = _flat_module(gm)
    scores = {t: {b: 0.0 for b in by_bits} for t, by_bits in candidates.items()}
    with torch.no_grad():
        for batch in batches:
            values = values_to(batch, device)
            reference = _float_outputs(flat(*values))
            for target, by_bits in candidates.items():
                weight = fetch_attr(gm, target)
                for bits, params in by_bits.items():
                    replaced = {target: params.dequantize().to(weight.device, weight.dtype)}
                    outputs = _float_outputs(torch.func.functional_call(flat, replaced, values))
                    scores[target][bits] += sum(float((out.float() - ref.float()).pow(2).sum())
                                                for out, ref in zip(outputs, reference))
    return scores


SCORES = {"fisher": _fisher_scores, "hessian": _hessian_scores, "output_error": _output_error_scores}
