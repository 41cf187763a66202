"""The one interface of rounding optimizers and their registry.

A rounding optimizer is a function

    optimize_block(block, inputs, targets, specs, config) -> dict[weight target, QuantParams]

block:   the ``ir.Block`` (its ``graph_module`` runs it; ``block.weight(target)`` is a float weight);
inputs:  per calibration batch, the block's input values from the already-quantized model;
targets: per calibration batch, the float model's block outputs (``block.outputs`` order;
         ``block.main_output`` names the one value crossing a block cut);
specs:   weight target -> QuantSpec of the weights this call must quantize;
config:  the QuantConfig (``config.method_options`` holds the method's options).

Layer-wise methods collect per-layer inputs inside the block with hooks; block-wise methods run the
block with soft-quantized weights and back-propagate the block output loss.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

from ..config import QuantConfig, QuantSpec
from ..errors import ConfigError
from ..ir import Block, QuantParams


class RoundingOptimizer(Protocol):
    def __call__(self, block: Block, inputs: list[tuple[Any, ...]], targets: list[tuple[Any, ...]],
                 specs: Mapping[str, QuantSpec], config: QuantConfig) -> dict[str, QuantParams]: ...


_REGISTRY: dict[str, RoundingOptimizer] = {}


def register(name: str) -> Callable[[RoundingOptimizer], RoundingOptimizer]:
    """Decorator: make ``fn`` selectable as ``QuantConfig(method=name)``."""
    def decorator(fn: RoundingOptimizer) -> RoundingOptimizer:
        if name in _REGISTRY:
            raise ValueError(f"rounding optimizer {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn
    return decorator


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
