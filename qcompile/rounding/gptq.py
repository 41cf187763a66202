"""GPTQ: Hessian-compensated rounding (Frantar et al. 2022, arXiv 2210.17323).

Per layer, with H = X^T X from the layer inputs (``layerwise``): columns are quantized one at a time
and each rounding error is spread over the not-yet-quantized columns through the upper Cholesky factor
of H^-1 (the optimal update of the remaining weights for the quadratic layer loss), in lazy batches of
``block_size`` columns. Options:

- ``damp`` (0.01): added to diag(H) as a fraction of its mean; a non-positive-definite H gets ten
  times more, up to ``max_damp_retries`` times, instead of failing;
- ``act_order`` (True): columns in order of decreasing diag(H); group scales are then computed up front
  from the weights in memory order ("static groups"), so that groups stay contiguous;
- ``block_size`` (128): columns per lazy update.
Without act_order, a group's scale is computed from the error-updated weights when the group starts,
as in the reference implementation. On the power grid each column is rounded in the power domain and its
error (in the weight domain) is spread the same way: GPTQ's update needs only the quantizer's output.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .. import primitives as P
from ..config import QuantSpec
from .layerwise import Solution, layer_objective, layerwise_params
from .registry import BlockProblem, BlockSolution, check_options, register

DEFAULTS = {"damp": 0.01, "act_order": True, "block_size": 128, "max_damp_retries": 6}


def inverse_hessian_factor(gram: torch.Tensor, damp: float, retries: int) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)^-1 with λ = damp · mean(diag H), raising λ tenfold until H is
    positive definite."""
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    base = float(torch.diag(gram).mean()) or 1.0
    level = damp * base
    for _ in range(retries + 1):
        factor, info = torch.linalg.cholesky_ex(gram + level * identity)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        level = max(level * 10, 1e-6 * base)
    raise ValueError("GPTQ: the Hessian is not positive definite even with damping; check the calibration data")


def gptq_solve(weight: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, options: Mapping[str, Any],
               exponent: float = 1.0) -> Solution:
    """GPTQ on one [rows, cols] weight with Gram matrix [cols, cols], on the grid of ``exponent``."""
    rows, cols = weight.shape
    qmin, qmax = spec.qrange
    group = cols if spec.group_size == -1 else spec.group_size
    per_tensor = spec.granularity == "tensor"
    w = weight.clone()
    gram = gram.clone()
    dead = torch.diag(gram) == 0
    gram[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale, zero_point = P.weight_scale_zero_point(w, spec.bits, spec.symmetric, spec.group_size, per_tensor,
                                                  spec.observer, exponent)
    act_order = bool(options["act_order"])
    order = torch.argsort(torch.diag(gram), descending=True) if act_order else torch.arange(cols, device=w.device)
    w, gram = w[:, order], gram[order][:, order]
    upper = inverse_hessian_factor(gram, float(options["damp"]), int(options["max_damp_retries"]))
    codes = torch.zeros_like(w)
    block_size = int(options["block_size"])
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        factor = upper[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            if not act_order and not per_tensor and spec.group_size > 0 and column % group == 0:
                fresh = torch.cat([w_block[:, i:], w[:, end:]], dim=1)[:, :group]
                s, z = P.weight_scale_zero_point(fresh, spec.bits, spec.symmetric, -1, observer=spec.observer,
                                                 exponent=exponent)
                scale[:, column // group], zero_point[:, column // group] = s[:, 0], z[:, 0]
            g = 0 if per_tensor else column // group
            s, z = scale[:, g], zero_point[:, g]
            q = P.quantize(w_block[:, i], s, z, qmin, qmax, exponent=exponent)
            codes[:, start + i] = q
            error = (w_block[:, i] - P.dequantize(q, s, z, exponent)) / factor[i, i]
            w_block[:, i:] -= error.unsqueeze(1) * factor[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    inverse = torch.argsort(order)
    codes = codes[:, inverse]
    dequantized = P.dequantize_weight(codes, scale, zero_point, exponent)
    return Solution(codes=codes, scale=scale, zero_point=zero_point,
                    objective=[layer_objective(weight, dequantized, gram[inverse][:, inverse])])


@register("gptq")
def optimize_block(problem: BlockProblem) -> BlockSolution:
    """GPTQ for every layer of the block, stage by stage (see ``layerwise``)."""
    options = check_options("gptq", problem.config.method_options, DEFAULTS)
    return BlockSolution(layerwise_params(problem.block, problem.inputs, problem.specs, gptq_solve, options))
