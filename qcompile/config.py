"""Quantization configuration: frozen, validated dataclasses and named presets.

A ``QuantSpec`` says how one tensor is quantized (bits, grouping, symmetry, how its range is chosen);
a ``QuantConfig`` says how a whole model is: the weight spec, the optional activation spec, the
rounding method and per-layer overrides by module-path glob.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .errors import ConfigError
from .primitives import quant_range

GRANULARITIES = ("channel", "group", "tensor")
WEIGHT_OBSERVERS = ("minmax", "mse")
ACTIVATION_OBSERVERS = ("minmax", "percentile", "mse")
BLOCK_GRANULARITIES = ("block", "layer")
ACTIVATION_SCOPES = ("inputs", "static")
GRIDS = ("uniform", "power")
EXPONENT_MODES = ("search", "learned")
MIXED_PRECISION_SCORES = ("fisher", "hessian", "output_error")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    bits:        2..8.
    group_size:  -1 (one scale per output channel or per tensor) or the number of consecutive input
                 elements that share a scale; it must divide the layer's input dimension (for a conv,
                 in_channels/groups * kernel elements).
    symmetric:   codes in [-2^(b-1), 2^(b-1)-1] with zero point 0, else [0, 2^b-1] with a zero point.
    granularity: "channel" | "group" | "tensor"; inferred from group_size when left None.
    observer:    how the range is chosen: "minmax", "mse" (clip-ratio search), "percentile" (activations).
    percentile:  the percentile of |x| used by the percentile observer.
    grid:        "uniform", or "power": the weight is quantized as sign(w)·|w|^a on the uniform grid and
                 mapped back with the inverse power (NUPES, weights only).
    exponent:    the power grid's a: a float in (0, 2], "search" (per layer, the data-free search on the
                 weight error; the default) or "learned" (searched, then trained with the rounding
                 variables by the gradient-based methods). None for the uniform grid.
    """

    bits: int = 8
    group_size: int = -1
    symmetric: bool = True
    granularity: str | None = None
    observer: str = "minmax"
    percentile: float = 99.99
    grid: str = "uniform"
    exponent: float | str | None = None

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"QuantSpec.bits must be an integer in 2..8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or not (self.group_size == -1 or self.group_size >= 2):
            raise ConfigError(f"QuantSpec.group_size must be -1 or an integer >= 2, got {self.group_size!r}")
        granularity = self.granularity
        if granularity is None:
            granularity = "group" if self.group_size > 0 else "channel"
            object.__setattr__(self, "granularity", granularity)
        if granularity not in GRANULARITIES:
            raise ConfigError(f"QuantSpec.granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if (granularity == "group") != (self.group_size > 0):
            raise ConfigError(
                f"QuantSpec(granularity={granularity!r}, group_size={self.group_size}): 'group' needs a "
                "positive group_size and 'channel'/'tensor' need group_size=-1")
        if self.observer not in ACTIVATION_OBSERVERS:
            raise ConfigError(f"QuantSpec.observer must be one of {ACTIVATION_OBSERVERS}, got {self.observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"QuantSpec.percentile must be in (50, 100], got {self.percentile!r}")
        if self.grid not in GRIDS:
            raise ConfigError(f"QuantSpec.grid must be one of {GRIDS}, got {self.grid!r}")
        if self.grid == "uniform" and self.exponent is not None:
            raise ConfigError(f"QuantSpec.exponent={self.exponent!r} needs grid='power'")
        if self.grid == "power":
            if self.exponent is None:
                object.__setattr__(self, "exponent", "search")
            elif isinstance(self.exponent, (int, float)) and not isinstance(self.exponent, bool):
                if not 0 < self.exponent <= 2:
                    raise ConfigError(f"QuantSpec.exponent must be in (0, 2], got {self.exponent!r}")
                object.__setattr__(self, "exponent", float(self.exponent))
            elif self.exponent not in EXPONENT_MODES:
                raise ConfigError(f"QuantSpec.exponent must be a number in (0, 2] or one of {EXPONENT_MODES}, "
                                  f"got {self.exponent!r}")

    @property
    def qrange(self) -> tuple[int, int]:
        """(qmin, qmax) of this spec's codes."""
        return quant_range(self.bits, self.symmetric)


@dataclass(frozen=True)
class MixedPrecision:
    """Importance-based bit widths per layer under a size budget (``passes/allocate.py``).

    target_bits: the budget, as average stored bits per quantized weight element: packed codes plus
                 scales and zero points, over every quantized weight (layers an override pins count
                 with their fixed size).
    candidates:  the bit widths a layer may get.
    score:       how a layer's loss increase at each width is estimated on the calibration data:
                 "fisher" (diagonal Fisher/Gauss-Newton of the model outputs times the squared weight
                 error), "hessian" (the layer's own output error, tr(ΔW X^T X ΔW^T)) or "output_error"
                 (the model output error with only that layer quantized).
    """

    target_bits: float
    candidates: tuple[int, ...] = (2, 3, 4, 8)
    score: str = "fisher"

    def __post_init__(self):
        if isinstance(self.target_bits, bool) or not isinstance(self.target_bits, (int, float)) \
                or not 0 < self.target_bits <= 32:
            raise ConfigError(f"MixedPrecision.target_bits must be a number in (0, 32], got {self.target_bits!r}")
        candidates = tuple(self.candidates)
        if not candidates or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in candidates):
            raise ConfigError(f"MixedPrecision.candidates must be bit widths in 2..8, got {self.candidates!r}")
        object.__setattr__(self, "candidates", tuple(sorted(set(candidates))))
        object.__setattr__(self, "target_bits", float(self.target_bits))
        if self.score not in MIXED_PRECISION_SCORES:
            raise ConfigError(f"MixedPrecision.score must be one of {MIXED_PRECISION_SCORES}, got {self.score!r}")


@dataclass(frozen=True)
class QuantConfig:
    """How a whole model is quantized.

    weight:          the spec of every quantizable weight (linear, conv, matmul with a parameter).
    activation:      None (weight-only) or the spec of quantized activations (per tensor).
    activation_scope: which values an activation spec quantizes. "inputs": the inputs of quantized ops
                     (integer GEMMs with float outputs, e.g. onnxruntime's MatMulIntegerToFloat; the LLM
                     choice, the residual stream stays float). "static": also the outputs of quantized
                     ops (after a directly following ReLU) and of the residual adds joining quantized
                     values: full-integer graphs (onnxruntime's QLinearConv / QLinearAdd; the CNN choice).
    method:          the rounding optimizer's registered name (``qcompile.rounding.available()``).
    method_options:  keyword options for that optimizer.
    granularity:     "block" (residual blocks / transformer layers) or "layer" (one quantizable op a block).
    overrides:       module-path glob -> QuantSpec (that layer's weight spec) or None (keep it float);
                     the first matching glob wins.
    mixed_precision: None, or a MixedPrecision: the bit width of every layer that no override pins is
                     chosen from its candidates under a size budget (the weight spec gives the rest).
    seed:            seeds every random choice (sample order, initialisations) for reproducible runs.
    """

    weight: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8))
    activation: QuantSpec | None = None
    activation_scope: str = "inputs"
    method: str = "rtn"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    granularity: str = "block"
    overrides: Mapping[str, QuantSpec | None] = field(default_factory=dict)
    mixed_precision: MixedPrecision | None = None
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.weight, QuantSpec):
            raise ConfigError(f"QuantConfig.weight must be a QuantSpec, got {type(self.weight).__name__}")
        for where, spec in [("weight", self.weight), *((f"overrides[{k!r}]", v) for k, v in self.overrides.items())]:
            if isinstance(spec, QuantSpec) and spec.observer not in WEIGHT_OBSERVERS:
                raise ConfigError(f"QuantConfig.{where}.observer must be one of {WEIGHT_OBSERVERS} "
                                  f"('{spec.observer}' is for activations)")
        if self.activation is not None:
            if not isinstance(self.activation, QuantSpec):
                raise ConfigError("QuantConfig.activation must be None or a QuantSpec")
            if self.activation.granularity != "tensor":
                raise ConfigError("activations are quantized per tensor: use QuantSpec(..., granularity='tensor')")
        if self.activation_scope not in ACTIVATION_SCOPES:
            raise ConfigError(f"QuantConfig.activation_scope must be one of {ACTIVATION_SCOPES}, "
                              f"got {self.activation_scope!r}")
        if self.granularity not in BLOCK_GRANULARITIES:
            raise ConfigError(f"QuantConfig.granularity must be one of {BLOCK_GRANULARITIES}, got {self.granularity!r}")
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError("QuantConfig.method must be the name of a registered rounding optimizer")
        for pattern, spec in self.overrides.items():
            if not isinstance(pattern, str) or not (spec is None or isinstance(spec, QuantSpec)):
                raise ConfigError(f"QuantConfig.overrides[{pattern!r}] must map a glob string to a QuantSpec or None")
        if self.mixed_precision is not None and not isinstance(self.mixed_precision, MixedPrecision):
            raise ConfigError("QuantConfig.mixed_precision must be None or a MixedPrecision")
        if self.activation is not None and self.activation.grid != "uniform":
            raise ConfigError("activations are quantized on the uniform grid: the power grid is for weights")
        object.__setattr__(self, "method_options", MappingProxyType(dict(self.method_options)))
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))

    def weight_spec_for(self, module_path: str) -> tuple[QuantSpec | None, str | None]:
        """(spec, matching glob) for the layer at ``module_path``: the first matching override, else ``weight``."""
        for pattern, spec in self.overrides.items():
            if fnmatch.fnmatchcase(module_path, pattern):
                return spec, pattern
        return self.weight, None

    def to_dict(self) -> dict:
        """A JSON-ready description (saved beside a quantized model; hashed for checkpoints)."""
        return {
            "weight": dataclasses.asdict(self.weight),
            "activation": None if self.activation is None else dataclasses.asdict(self.activation),
            "activation_scope": self.activation_scope,
            "method": self.method,
            "method_options": dict(self.method_options),
            "granularity": self.granularity,
            "overrides": {k: None if v is None else dataclasses.asdict(v) for k, v in self.overrides.items()},
            "mixed_precision": None if self.mixed_precision is None else dataclasses.asdict(self.mixed_precision),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        activation, mixed = data.get("activation"), data.get("mixed_precision")
        return cls(
            weight=QuantSpec(**data["weight"]),
            activation=None if activation is None else QuantSpec(**activation),
            activation_scope=data.get("activation_scope", "inputs"),
            method=data["method"],
            method_options=data.get("method_options", {}),
            granularity=data.get("granularity", "block"),
            overrides={k: None if v is None else QuantSpec(**v) for k, v in data.get("overrides", {}).items()},
            mixed_precision=None if mixed is None else MixedPrecision(
                **{**mixed, "candidates": tuple(mixed["candidates"])}),
            seed=data.get("seed", 0),
        )

    def fingerprint(self) -> str:
        """A stable hash of the config (sha256 of its canonical JSON)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


_W8 = QuantSpec(bits=8, symmetric=True)
_A8 = QuantSpec(bits=8, symmetric=False, granularity="tensor")
# scheme name -> (weight spec, activation spec, activation scope); a preset is "<scheme>-<method>".
SCHEMES = {
    "w8a16": (_W8, None, "inputs"),
    "w4a16": (QuantSpec(bits=4, symmetric=False), None, "inputs"),
    "w4g128": (QuantSpec(bits=4, group_size=128, symmetric=False), None, "inputs"),
    "w3a16": (QuantSpec(bits=3, symmetric=False), None, "inputs"),
    "w3g128": (QuantSpec(bits=3, group_size=128, symmetric=False), None, "inputs"),
    "w2g128": (QuantSpec(bits=2, group_size=128, symmetric=False), None, "inputs"),
    "w8a8": (_W8, _A8, "inputs"),
    "w8a8-static": (_W8, _A8, "static"),
}
PRESET_METHODS = ("rtn", "gptq", "comq", "adaround", "brecq", "signround")

PRESETS: Mapping[str, QuantConfig] = MappingProxyType({
    f"{scheme}-{method}": QuantConfig(weight=weight, activation=activation, activation_scope=scope, method=method)
    for scheme, (weight, activation, scope) in SCHEMES.items() for method in PRESET_METHODS})


def resolve_config(config: "QuantConfig | str") -> QuantConfig:
    """A QuantConfig, given one or the name of a preset."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ConfigError(f"unknown preset {config!r}; presets: {sorted(PRESETS)}")
        return PRESETS[config]
    raise ConfigError(f"config must be a QuantConfig or a preset name, got {type(config).__name__}")
