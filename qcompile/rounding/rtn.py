"""RTN: round to nearest, the baseline every other method must beat.

The range of each group/channel is its min/max, or, with ``QuantSpec(observer="mse")``, the shrunk
range that minimises the weight's rounding error (the grid search of GPTQ's reference quantizer). On the
power grid, rounding is to nearest in the power domain, with the layer's exponent (``power_exponent``).
"""
from __future__ import annotations

import torch

from .. import primitives as P
from ..config import QuantSpec
from ..ir import QuantLayer, QuantParams
from ..quantizers import power_exponent
from .registry import BlockProblem, BlockSolution, check_options, register


def round_to_nearest(weight: torch.Tensor, layer: QuantLayer, spec: QuantSpec) -> QuantParams:
    """Nearest-rounding QuantParams of one weight (any layout; ``layer.axis`` gives the output axis)."""
    matrix = P.weight_matrix(weight.detach(), layer.axis).float()
    exponent = power_exponent(matrix, spec)
    scale, zero_point = P.weight_scale_zero_point(matrix, spec.bits, spec.symmetric, spec.group_size,
                                                  per_tensor=spec.granularity == "tensor", observer=spec.observer,
                                                  exponent=exponent)
    codes = P.quantize_weight(matrix, scale, zero_point, spec.bits, spec.symmetric, exponent)
    return QuantParams(weight_codes=codes, scale=scale, zero_point=zero_point.to(P.code_dtype(spec.symmetric)),
                       bits=spec.bits, symmetric=spec.symmetric, group_size=spec.group_size, axis=layer.axis,
                       shape=tuple(weight.shape), exponent=exponent)


@register("rtn")
def optimize_block(problem: BlockProblem) -> BlockSolution:
    """Round every weight to nearest; calibration data is not used."""
    check_options("rtn", problem.config.method_options, {})
    block = problem.block
    return BlockSolution({target: round_to_nearest(block.weight(target), block.layer_of(target), spec)
                          for target, spec in problem.specs.items()})
