"""Trainable fake quantizers: the differentiable forms of the primitives, as modules.

``WeightQuantizer`` holds one weight as its [rows, cols] matrix (``primitives.weight_matrix``) and
returns its fake-quantized form, in the parameter's layout and dtype, from learnable variables:

- rounding "sigmoid" (AdaRound, Nagel et al. 2020, arXiv 2004.10568): codes floor(w / s) + h(V) with
  the rectified sigmoid h(V) = clamp(sigmoid(V) (ζ - γ) + γ, 0, 1), ζ = 1.1, γ = -0.1, V initialised
  so that h(V) is the fractional part of w / s (the soft weight starts equal to the float weight);
  ``regularizer(β)`` = Σ 1 - |2 h(V) - 1|^β pushes h to 0 or 1; the hard codes round up where V >= 0.
- rounding "offset" (SignRound, Cheng et al. 2023, arXiv 2309.05516): codes round(w / s + V) with
  V in [-0.5, 0.5], initialised to 0 (nearest rounding), straight-through gradient of round.
- learn "clip" (SignRound): the range [α · min, β · max] with α, β in [``clip_floor``, 1], scale and
  zero point recomputed from it each call; learn "scale": s · exp(t) with a learnable log-ratio t per
  group (the "rounding + scales" degree of freedom of gradient-based PTQ); learn "rounding": fixed s.

Power grid (NUPES, arXiv 2308.05600): the codes quantize u = sign(w)·|w|^a and the weight is
sign(y)·|y|^(1/a) of the dequantized y; the range bounds are kept in the weight domain and mapped with
the current a, so that with ``exponent="learned"`` a is a learnable scalar trained with the other
variables (straight through the rounding, exactly through both power maps).

``ActivationQuantizer``: per-tensor activation fake quantization with the LSQ step size (Esser et al.
2020, arXiv 1902.08153: straight-through rounding, gradient scaled by 1 / sqrt(n · qmax)) and QDrop
(Wei et al. 2022, arXiv 2203.05740): in training mode each element keeps its float value with
probability ``drop_prob``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import primitives as P
from .config import QuantSpec
from .ir import ActivationParams, QuantLayer, QuantParams

SIGMOID_LOW, SIGMOID_HIGH = -0.1, 1.1    # γ, ζ of AdaRound's rectified sigmoid
ROUNDINGS = ("sigmoid", "offset")
LEARNABLES = ("rounding", "scale", "clip")
LEARNED_EXPONENT_RANGE = (0.1, 2.0)


def power_exponent(matrix: torch.Tensor, spec: QuantSpec, gram: torch.Tensor | None = None) -> float:
    """The grid exponent of a [rows, cols] weight matrix under ``spec``: 1.0 on the uniform grid, the
    spec's number, or (``"search"``, and the start of ``"learned"``) the search's choice: on the weight
    error (data-free), or on the layer output error when the Gram matrix [cols, cols] of its inputs is given."""
    if spec.grid == "uniform":
        return 1.0
    if isinstance(spec.exponent, float):
        return spec.exponent
    return P.search_power_exponent(matrix, spec.bits, spec.symmetric, spec.group_size,
                                   per_tensor=spec.granularity == "tensor", observer=spec.observer, gram=gram)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) (ζ - γ) + γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (SIGMOID_HIGH - SIGMOID_LOW) + SIGMOID_LOW, 0.0, 1.0)


def rectified_sigmoid_inverse(p: torch.Tensor) -> torch.Tensor:
    """V with h(V) = p for p in [0, 1) (the logit of the stretched value)."""
    stretched = (p - SIGMOID_LOW) / (SIGMOID_HIGH - SIGMOID_LOW)
    return torch.log(stretched / (1.0 - stretched))


class WeightQuantizer(nn.Module):
    """Learnable fake quantization of one weight (see the module docstring).

    weight: the float parameter; layer: its QuantLayer (output axis); spec: bits, grouping, symmetry,
    and the observer of the initial range; rounding: "sigmoid" | "offset"; learn: "rounding" | "scale" |
    "clip"; clip_floor: the lower bound of the clip ratios.
    """

    def __init__(self, weight: torch.Tensor, layer: QuantLayer, spec: QuantSpec, rounding: str = "offset",
                 learn: str = "rounding", clip_floor: float = 0.5):
        super().__init__()
        self.spec, self.rounding_mode, self.clip_floor = spec, rounding, clip_floor
        self.axis, self.shape, self.dtype = layer.axis, tuple(weight.shape), weight.dtype
        matrix = P.weight_matrix(weight.detach(), layer.axis).float()
        self.register_buffer("matrix", matrix)
        exponent = power_exponent(matrix, spec)
        self.exponent = nn.Parameter(torch.tensor(exponent)) if spec.exponent == "learned" else exponent
        u_min, u_max = P.weight_range(matrix, spec.bits, spec.symmetric, spec.group_size,
                                      per_tensor=spec.granularity == "tensor", observer=spec.observer,
                                      exponent=exponent)
        self.register_buffer("w_min", P.from_power_domain(u_min, exponent))
        self.register_buffer("w_max", P.from_power_domain(u_max, exponent))
        self.clip_low = nn.Parameter(torch.ones_like(u_min)) if learn == "clip" else None
        self.clip_high = nn.Parameter(torch.ones_like(u_max)) if learn == "clip" else None
        self.log_scale = nn.Parameter(torch.zeros_like(u_min)) if learn == "scale" else None
        if rounding == "sigmoid":
            with torch.no_grad():
                scaled = P.to_power_domain(matrix, exponent) / self._expanded(self.scale_zero_point()[0])
                initial = rectified_sigmoid_inverse(scaled - torch.floor(scaled))
        else:
            initial = torch.zeros_like(matrix)
        self.rounding = nn.Parameter(initial)

    def _expanded(self, t: torch.Tensor) -> torch.Tensor:
        return P.expand_groups(t, *self.matrix.shape)

    def scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current scale and zero point (of the power domain), [rows | 1, n_groups]."""
        low, high = P.to_power_domain(self.w_min, self.exponent), P.to_power_domain(self.w_max, self.exponent)
        if self.clip_low is not None:
            low, high = low * self.clip_low, high * self.clip_high
        scale, zero_point = P.scale_zero_point(low, high, self.spec.bits, self.spec.symmetric)
        if self.log_scale is not None:
            scale = scale * torch.exp(self.log_scale)
        return scale, zero_point

    def codes(self, hard: bool) -> torch.Tensor:
        """Float codes [rows, cols] in [qmin, qmax]: soft (training) or hard (integer valued)."""
        qmin, qmax = self.spec.qrange
        scale, zero_point = self.scale_zero_point()
        scaled = P.to_power_domain(self.matrix, self.exponent) / self._expanded(scale)
        if self.rounding_mode == "sigmoid":
            up = (self.rounding >= 0).float() if hard else rectified_sigmoid(self.rounding)
            codes = torch.floor(scaled).detach() + up
        else:
            codes = torch.round(scaled + self.rounding) if hard else P.round_ste(scaled + self.rounding)
        return torch.clamp(codes + self._expanded(zero_point), qmin, qmax)

    def forward(self, hard: bool = False) -> torch.Tensor:
        """The fake-quantized weight in the parameter's layout and dtype."""
        scale, zero_point = self.scale_zero_point()
        matrix = P.dequantize(self.codes(hard), self._expanded(scale), self._expanded(zero_point), self.exponent)
        return P.weight_from_matrix(matrix, self.axis, self.shape).to(self.dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's rounding regularizer Σ 1 - |2 h(V) - 1|^β (sigmoid rounding only)."""
        return (1.0 - (2.0 * rectified_sigmoid(self.rounding) - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the variables to their domains after an optimizer step."""
        if self.rounding_mode == "offset":
            self.rounding.clamp_(-0.5, 0.5)
        if self.clip_low is not None:
            self.clip_low.clamp_(self.clip_floor, 1.0)
            self.clip_high.clamp_(self.clip_floor, 1.0)
        if isinstance(self.exponent, nn.Parameter):
            self.exponent.clamp_(*LEARNED_EXPONENT_RANGE)

    @torch.no_grad()
    def quant_params(self) -> QuantParams:
        """The hard-rounded result as QuantParams."""
        scale, zero_point = self.scale_zero_point()
        dtype = P.code_dtype(self.spec.symmetric)
        return QuantParams(weight_codes=self.codes(hard=True).to(dtype), scale=scale.float().clone(),
                           zero_point=zero_point.to(dtype), bits=self.spec.bits, symmetric=self.spec.symmetric,
                           group_size=self.spec.group_size, axis=self.axis, shape=self.shape,
                           exponent=float(self.exponent))


class ActivationQuantizer(nn.Module):
    """Per-tensor fake quantization of an activation from observed ``params``; ``learn``: the step size
    is a parameter (LSQ); ``drop_prob``: QDrop's probability of keeping an element float in training."""

    def __init__(self, params: ActivationParams, learn: bool = True, drop_prob: float = 0.0):
        super().__init__()
        self.bits, self.symmetric, self.drop_prob = params.bits, params.symmetric, drop_prob
        scale = params.scale.detach().float().clone().reshape(())
        if learn:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", params.zero_point.detach().float().clone().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = P.quant_range(self.bits, self.symmetric)
        scale = self.scale
        if scale.requires_grad:
            gradient_scale = 1.0 / math.sqrt(max(x[0].numel(), 1) * max(qmax, 1))
            scale = scale * gradient_scale + (scale - scale * gradient_scale).detach()
        codes = P.quantize(x, scale, self.zero_point, qmin, qmax, rounding=P.round_ste)
        quantized = P.dequantize(codes, scale, self.zero_point).to(x.dtype)
        if self.training and self.drop_prob > 0:
            quantized = torch.where(torch.rand_like(x, dtype=torch.float32) < self.drop_prob, x, quantized)
        return quantized

    @torch.no_grad()
    def project_(self) -> None:
        self.scale.clamp_(min=P.SCALE_EPS)

    def activation_params(self) -> ActivationParams:
        return ActivationParams(scale=self.scale.detach().float().clone(),
                                zero_point=self.zero_point.to(P.code_dtype(self.symmetric)),
                                bits=self.bits, symmetric=self.symmetric)
