"""Block reconstruction by gradient descent: the engine behind AdaRound, BRECQ/QDrop and SignRound.

The block runs as a trainable copy (``passes.fake_quant``) whose weights come from
``quantizers.WeightQuantizer`` and whose quantized activations pass through
``quantizers.ActivationQuantizer``. Each step takes one calibration batch (in a seeded random order),
runs the copy on the block's inputs from the already-quantized model, and minimises the squared error
against the float model's block outputs (``squared_error``). The recipe's knobs are the choices the gradient-based PTQ study (Yvinec et al.,
arXiv 2308.07662) compares; each method is a set of defaults for them:

- ``loss``: "block" (all block outputs) | "layer" (each quantized layer's output against the float
  layer output on the float inputs, with the layer's input detached: AdaRound's asymmetric
  layer-wise reconstruction, all layers of the block at once);
- ``rounding``: "sigmoid" (AdaRound's rectified sigmoid + annealed regularizer, weight ``reg_weight``,
  β from ``beta[0]`` to ``beta[1]`` after a ``warmup`` fraction of the steps without it) | "offset"
  (SignRound's additive V in [-0.5, 0.5]);
- ``learn``: "rounding" | "scale" | "clip" (see ``quantizers``);
- ``optimizer``: "adam" | "signsgd" (p -= lr · sign(grad)); ``lr`` (None: 1 / iters, SignRound's
  default) for the rounding variables, ``scale_lr`` (None: lr) for scales, clip ratios and learned
  power-grid exponents (``QuantSpec(grid="power", exponent="learned")``), ``act_lr``
  for LSQ activation steps (when the config quantizes activations), ``schedule``: "constant" | "linear"
  decay to 0;
- ``iters``; ``qdrop``: QDrop's probability of taking each element of the block inputs and of each
  quantized activation from the float model (0: off);
- ``keep_best``: keep the variables of the step with the lowest loss (SignRound; only meaningful when
  the training forward is the hard-rounded one, so "offset" rounding);
- ``amp``: run the block under bf16 autocast (off by default: autocast also lowers the precision of
  the arithmetic a block may hold besides its layers, such as rotary angles; a bf16 model trains in
  bf16 without it, the quantizer math staying float32); ``compile``: torch.compile the trainable block.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import ConfigError
from ..ir import module_device, values_to
from ..passes.fake_quant import insert_fake_quant
from ..quantizers import LEARNABLES, ROUNDINGS, ActivationQuantizer, WeightQuantizer
from .registry import BlockProblem, BlockSolution, RoundingOptimizer, check_options, register

RECIPE_DEFAULTS: dict[str, Any] = {
    "loss": "block", "rounding": "offset", "learn": "rounding", "optimizer": "adam", "lr": 1e-3,
    "scale_lr": None, "act_lr": 4e-5, "schedule": "constant", "iters": 500, "reg_weight": 0.01,
    "beta": (20.0, 2.0), "warmup": 0.2, "qdrop": 0.0, "clip_floor": 0.5, "keep_best": False, "amp": False,
    "compile": False,
}
CHOICES = {"loss": ("block", "layer"), "rounding": ROUNDINGS, "learn": LEARNABLES,
           "optimizer": ("adam", "signsgd"), "schedule": ("constant", "linear")}


class SignSGD(torch.optim.Optimizer):
    """Signed gradient descent: p <- p - lr · sign(grad) (SignRound's optimizer)."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(torch.sign(param.grad), alpha=-group["lr"])


def check_recipe(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the values of a recipe; ConfigError naming the option and its allowed values."""
    for key, allowed in CHOICES.items():
        if options[key] not in allowed:
            raise ConfigError(f"method {method!r}: option {key}={options[key]!r} is not one of {allowed}")
    if not isinstance(options["iters"], int) or options["iters"] < 1:
        raise ConfigError(f"method {method!r}: iters must be a positive integer, got {options['iters']!r}")
    if not 0.0 <= options["qdrop"] < 1.0:
        raise ConfigError(f"method {method!r}: qdrop must be in [0, 1), got {options['qdrop']!r}")
    if not 0.0 < options["clip_floor"] <= 1.0:
        raise ConfigError(f"method {method!r}: clip_floor must be in (0, 1], got {options['clip_floor']!r}")
    return dict(options)


def recipe_method(name: str, defaults: Mapping[str, Any]) -> RoundingOptimizer:
    """Register ``name`` as the block-reconstruction method with these recipe defaults."""
    @register(name, gradient_based=True)
    def optimize_block(problem: BlockProblem) -> BlockSolution:
        return reconstruct(problem, check_recipe(name, check_options(name, problem.config.method_options, defaults)))
    return optimize_block


def reconstruct(problem: BlockProblem, options: Mapping[str, Any]) -> BlockSolution:
    """Learn the block's quantization parameters with the recipe ``options`` (see the module docstring)."""
    block, iters = problem.block, int(options["iters"])
    device = module_device(block.graph_module)
    weights = {target: WeightQuantizer(block.weight(target), block.layer_of(target), spec, options["rounding"],
                                       options["learn"], options["clip_floor"]).to(device)
               for target, spec in problem.specs.items()}
    activations = {name: ActivationQuantizer(params, learn=options["act_lr"] > 0, drop_prob=options["qdrop"]).to(device)
                   for name, params in problem.activations.items()}
    layer_loss = options["loss"] == "layer"
    layers = [layer for layer in block.layers if layer.weight in problem.specs] if layer_loss else []
    layer_outputs = [layer.node for layer in layers]
    trainable = insert_fake_quant(block.graph_module, weights, activations, detach_layers=layers,
                                  extra_outputs=layer_outputs)
    reference = insert_fake_quant(block.graph_module, {}, {}, extra_outputs=layer_outputs) if layer_loss else None
    run = torch.compile(trainable) if options["compile"] else trainable
    optimizer, scheduler = _optimizer(weights, activations, options)
    amp = bool(options["amp"])
    outputs = len(block.outputs)
    best_loss, best_state = float("inf"), None
    order = _batch_order(len(problem.inputs), iters)
    trainable.train()
    for step, batch in enumerate(order):
        inputs = _mixed_inputs(problem, batch, options["qdrop"], device)
        if layer_loss:
            with torch.no_grad():
                targets = reference(*values_to(problem.float_inputs[batch], device))[outputs:]
        else:
            targets = values_to(problem.targets[batch], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            produced = run(*inputs)
        loss = squared_error(produced[outputs:] if layer_loss else produced, targets)
        if options["keep_best"]:
            value = loss.item()
            if value < best_loss:
                best_loss, best_state = value, _snapshot(weights, activations)
        if options["rounding"] == "sigmoid":
            beta = _annealed_beta(step, iters, options["warmup"], options["beta"])
            if beta is not None:
                loss = loss + options["reg_weight"] * sum(q.regularizer(beta) for q in weights.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        for quantizer in (*weights.values(), *activations.values()):
            quantizer.project_()
    if best_state is not None:
        _restore(weights, activations, best_state)
    return BlockSolution(weights={target: q.quant_params() for target, q in weights.items()},
                         activations={name: q.activation_params() for name, q in activations.items()
                                      if q.scale.requires_grad})


def squared_error(produced: tuple, targets: tuple) -> torch.Tensor:
    """Σ over the trainable floating-point outputs of the squared error summed over the feature dim and
    averaged over the others (BRECQ's convention, which the regularizer weight assumes): the feature
    dim is dim 1 of 4-D/5-D image tensors (N, C, H, W) and the last dim otherwise ([N, F], [B, T, H])."""
    total = None
    for value, target in zip(produced, targets):
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad):
            continue
        features = value.shape[1] if value.dim() >= 4 else value.shape[-1] if value.dim() else 1
        error = (value.float() - target.float()).pow(2).sum() * features / max(value.numel(), 1)
        total = error if total is None else total + error
    if total is None:
        raise ValueError("the block has no trainable output: no quantized weight reaches its outputs")
    return total


def _optimizer(weights: dict, activations: dict, options: Mapping[str, Any]):
    lr = options["lr"] if options["lr"] is not None else 1.0 / options["iters"]
    scale_lr = options["scale_lr"] if options["scale_lr"] is not None else lr
    groups = [{"params": [q.rounding for q in weights.values()], "lr": lr}]
    ranges = [p for q in weights.values() for p in (q.clip_low, q.clip_high, q.log_scale, q.exponent)
              if isinstance(p, torch.nn.Parameter)]
    if ranges:
        groups.append({"params": ranges, "lr": scale_lr})
    steps = [q.scale for q in activations.values() if q.scale.requires_grad]
    if steps:
        groups.append({"params": steps, "lr": options["act_lr"]})
    optimizer = torch.optim.Adam(groups) if options["optimizer"] == "adam" else SignSGD(groups, lr)
    iters = options["iters"]
    decay = (lambda step: max(0.0, 1.0 - step / iters)) if options["schedule"] == "linear" else (lambda step: 1.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, decay)


def _annealed_beta(step: int, iters: int, warmup: float, beta: tuple[float, float]) -> float | None:
    """AdaRound's β: None (no regularizer) during warm-up, then linear from beta[0] to beta[1]."""
    start = int(warmup * iters)
    if step < start:
        return None
    progress = (step - start) / max(iters - start, 1)
    return beta[1] + (beta[0] - beta[1]) * (1.0 - progress)


def _batch_order(batches: int, iters: int) -> list[int]:
    """Batch indices for ``iters`` steps: seeded random permutations, one after another."""
    order: list[int] = []
    while len(order) < iters:
        order.extend(torch.randperm(batches).tolist())
    return order[:iters]


def _mixed_inputs(problem: BlockProblem, batch: int, drop: float, device: torch.device) -> tuple:
    """The quantized-model inputs of ``batch``; with QDrop, each element taken from the float model's
    inputs with probability ``drop``."""
    if drop <= 0:
        return values_to(problem.inputs[batch], device)
    mixed = []
    for value, float_value in zip(problem.inputs[batch], problem.float_inputs[batch]):
        if (isinstance(value, torch.Tensor) and value.is_floating_point() and value is not float_value
                and isinstance(float_value, torch.Tensor) and float_value.shape == value.shape):
            value, float_value = value.to(device), float_value.to(device)
            value = torch.where(torch.rand_like(value, dtype=torch.float32) < drop, float_value, value)
        mixed.append(value)
    return values_to(mixed, device)


def _snapshot(weights: dict, activations: dict) -> list[torch.Tensor]:
    return [p.detach().clone() for q in (*weights.values(), *activations.values()) for p in q.parameters()]


@torch.no_grad()
def _restore(weights: dict, activations: dict, state: list[torch.Tensor]) -> None:
    params = [p for q in (*weights.values(), *activations.values()) for p in q.parameters()]
    for param, saved in zip(params, state):
        param.copy_(saved)
