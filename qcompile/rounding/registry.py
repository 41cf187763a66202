"""The one interface of rounding optimizers and their registry.

A rounding optimizer is a function ``optimize_block(problem: BlockProblem) -> BlockSolution``: it
gets one block, its calibration data and the specs of the weights to quantize, and returns their
QuantParams (and, for methods that learn them, new activation params). Layer-wise methods collect
per-layer inputs inside the block; block-wise methods run the block with trainable fake quantizers
(``passes.fake_quant``) and back-propagate the block output loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from ..config import QuantConfig, QuantSpec
from ..errors import ConfigError
from ..ir import ActivationParams, Block, QuantParams


@dataclass
class BlockProblem:
    """What a rounding optimizer solves for one block.

    block:         the ``ir.Block`` (``block.graph_module`` runs it; ``block.weight(target)`` is a float weight);
    inputs:        per calibration batch, the block's input values from the already-quantized model;
    float_inputs:  the same values from the float model (QDrop mixes the two);
    targets:       per calibration batch, the float model's block outputs (``block.outputs`` order);
    specs:         weight target -> QuantSpec of the weights to quantize;
    activations:   value name -> observed ActivationParams of the values the block quantizes (empty
                   for weight-only configs);
    config:        the QuantConfig (``config.method_options`` holds the method's options).
    Batches are on the storage device (CPU when the model runs on an accelerator).
    """

    block: Block
    inputs: list[tuple[Any, ...]]
    float_inputs: list[tuple[Any, ...]]
    targets: list[tuple[Any, ...]]
    specs: Mapping[str, QuantSpec]
    activations: Mapping[str, ActivationParams]
    config: QuantConfig


@dataclass
class BlockSolution:
    """weights: weight target -> QuantParams for every spec of the problem; activations: learned
    ActivationParams replacing observed ones (only the values a method changed)."""

    weights: dict[str, QuantParams]
    activations: dict[str, ActivationParams] = field(default_factory=dict)


class RoundingOptimizer(Protocol):
    def __call__(self, problem: BlockProblem) -> BlockSolution: ...


_REGISTRY: dict[str, RoundingOptimizer] = {}
_GRADIENT_BASED: set[str] = set()


def register(name: str, gradient_based: bool = False) -> Callable[[RoundingOptimizer], RoundingOptimizer]:
    """Decorator: make ``fn`` selectable as ``QuantConfig(method=name)``; ``gradient_based``: it trains
    its variables by back-propagation (and so can learn power-grid exponents)."""
    def decorator(fn: RoundingOptimizer) -> RoundingOptimizer:
        if name in _REGISTRY:
            raise ValueError(f"rounding optimizer {name!r} is registered twice")
        _REGISTRY[name] = fn
        if gradient_based:
            _GRADIENT_BASED.add(name)
        return fn
    return decorator


def check_config(config: QuantConfig) -> None:
    """ConfigError when the config names an unknown method, or asks a method without gradients to learn
    a power-grid exponent."""
    get(config.method)
    specs = [("weight", config.weight), *((f"overrides[{k!r}]", v) for k, v in config.overrides.items())]
    for where, spec in specs:
        if spec is not None and spec.exponent == "learned" and config.method not in _GRADIENT_BASED:
            raise ConfigError(f"QuantConfig.{where}: exponent='learned' is trained by the gradient-based methods "
                              f"{sorted(_GRADIENT_BASED)}; {config.method!r} cannot learn it: use exponent='search' "
                              "(the data-free per-layer search) or a number")


def get(name: str) -> RoundingOptimizer:
    """The optimizer registered as ``name``; ConfigError listing the available ones otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown rounding method {name!r}; available: {available()}")
    return _REGISTRY[name]


def available() -> list[str]:
    """Names of the registered rounding optimizers."""
    return sorted(_REGISTRY)


def check_options(method: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``options``; ConfigError naming any option the method does not know."""
    unknown = set(options) - set(defaults)
    if unknown:
        raise ConfigError(f"method {method!r} has no option(s) {sorted(unknown)}; its options: {sorted(defaults)}")
    return {**defaults, **options}
