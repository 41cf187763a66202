"""COMQ: backprop-free coordinate-wise minimization (Zhang et al. 2024, arXiv 2403.07134).

Minimises the layer loss trace((W - Q) H (W - Q)^T), H = X^T X, with Q = scale ⊙ (codes - zero_point),
by coordinate descent. Each step fixes everything but one coordinate and sets it to its exact minimiser:

- a code q_rj (all rows at once, each row at its own column): the loss is a parabola in Q_rj with
  vertex W_rj + (Σ_{k≠j} H_jk E_rk) / H_jj (E = W - Q), so the best code is that vertex rounded to the
  grid and clamped: dot products and a rounding, no back-propagation;
- a scale s_rg of row r, group g (codes fixed): the loss is a parabola in s_rg with closed-form vertex
  a_g^T H (E + s_rg a_g) / a_g^T H a_g, a_g = codes - zero_point on the group.

So the loss never increases. On the power grid (NUPES) Q = sign(a)·|s·a|^(1/α) = s^(1/α) · b with
b = sign(a)·|a|^(1/α): the loss is still a parabola in t = s^(1/α), so the scale step solves for t with b
in place of a, and a code step takes the grid point nearest the vertex in the weight domain. ``G = E H`` is kept up to date with rank-one updates, which makes a sweep
cost rows·cols² flops at matrix speed. Codes start from nearest rounding. Options: ``sweeps`` (3);
``greedy`` (True): each row visits its columns by decreasing |W_rj|·||x_j||, the paper's greedy order;
``update_scales`` (True); ``damp`` (0.01): λ = damp · mean(diag H) added to diag(H), as in GPTQ, so that
a rank-deficient H (fewer calibration samples than inputs, dead inputs) still penalises moving W off the
calibration subspace.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .. import primitives as P
from ..config import QuantSpec
from .layerwise import Solution, layer_objective, layerwise_params
from .registry import BlockProblem, BlockSolution, check_options, register

DEFAULTS = {"sweeps": 3, "greedy": True, "update_scales": True, "damp": 0.01}


def comq_solve(weight: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, options: Mapping[str, Any],
               exponent: float = 1.0) -> Solution:
    """COMQ on one [rows, cols] weight with Gram matrix [cols, cols], on the grid of ``exponent``;
    ``objective`` holds the layer loss after the nearest-rounding start and after each sweep."""
    rows, cols = weight.shape
    qmin, qmax = spec.qrange
    per_tensor = spec.granularity == "tensor"
    diagonal = torch.diag(gram)
    gram = gram + float(options["damp"]) * float(diagonal.mean()) * torch.eye(cols, dtype=gram.dtype,
                                                                               device=gram.device)
    scale, zero_point = P.weight_scale_zero_point(weight, spec.bits, spec.symmetric, spec.group_size, per_tensor,
                                                  spec.observer, exponent)
    codes = P.quantize_weight(weight, scale, zero_point, spec.bits, spec.symmetric, exponent).float()
    scale_full, zero_full = P.expand_groups(scale, rows, cols), P.expand_groups(zero_point, rows, cols)
    error = weight - P.dequantize(codes, scale_full, zero_full, exponent)
    g_matrix = error @ gram
    diagonal = torch.diag(gram)
    safe_diagonal = torch.where(diagonal > 0, diagonal, torch.ones_like(diagonal))
    if options["greedy"]:
        order = torch.argsort(weight.abs() * diagonal.clamp_min(0).sqrt().unsqueeze(0), dim=1, descending=True)
    else:
        order = torch.arange(cols, device=weight.device).expand(rows, cols)
    row_index = torch.arange(rows, device=weight.device)
    history = [layer_objective(weight, weight - error, gram)]
    for _ in range(int(options["sweeps"])):
        for step in range(cols):
            column = order[:, step]
            e, g, h = error[row_index, column], g_matrix[row_index, column], safe_diagonal[column]
            s, z = scale_full[row_index, column], zero_full[row_index, column]
            vertex = weight[row_index, column] + (g - h * e) / h
            code = P.nearest_grid_code(vertex, s, z, qmin, qmax, exponent)
            new_error = weight[row_index, column] - P.dequantize(code, s, z, exponent)
            change = torch.where(diagonal[column] > 0, new_error - e, torch.zeros_like(e))
            codes[row_index, column] = torch.where(diagonal[column] > 0, code, codes[row_index, column])
            error[row_index, column] += change
            g_matrix += change.unsqueeze(1) * gram[column]
        if options["update_scales"] and not per_tensor:
            _update_scales(weight, codes, scale, zero_point, gram, error, g_matrix, exponent)
            scale_full = P.expand_groups(scale, rows, cols)
        history.append(layer_objective(weight, weight - error, gram))
    return Solution(codes=codes, scale=scale, zero_point=zero_point, objective=history)


def _update_scales(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   gram: torch.Tensor, error: torch.Tensor, g_matrix: torch.Tensor, exponent: float) -> None:
    """Each group's scale set to its exact minimiser with the codes and other scales fixed (in place):
    the weight is t · b with t = s^(1/α), b = sign(a)·|a|^(1/α), a = codes - zero point (α = 1: t = s)."""
    rows, cols = weight.shape
    n_groups = scale.shape[1]
    size = cols // n_groups
    centered = P.from_power_domain(codes - P.expand_groups(zero_point, rows, cols), exponent)
    for group in range(n_groups):
        span = slice(group * size, (group + 1) * size)
        a = centered[:, span]
        curvature = ((a @ gram[span, span]) * a).sum(1)
        old = P.from_power_domain(scale[:, group], exponent)
        numerator = (a * g_matrix[:, span]).sum(1) + old * curvature
        new = torch.where(curvature > 0, numerator / curvature.clamp_min(1e-30), old)
        new = torch.where(new > P.SCALE_EPS, new, old)
        change = new - old
        delta_error = -change.unsqueeze(1) * a
        error[:, span] += delta_error
        g_matrix += delta_error @ gram[span]
        scale[:, group] = P.to_power_domain(new, exponent)


@register("comq")
def optimize_block(problem: BlockProblem) -> BlockSolution:
    """COMQ for every layer of the block, stage by stage (see ``layerwise``)."""
    options = check_options("comq", problem.config.method_options, DEFAULTS)
    return BlockSolution(layerwise_params(problem.block, problem.inputs, problem.specs, comq_solve, options))
