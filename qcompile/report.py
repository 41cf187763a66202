"""What ``QuantizedModel.report()`` returns: a row per quantizable layer, a row per block, totals."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class LayerRow:
    """One quantizable layer. weight_error_rtn / weight_error: relative squared weight error
    ||W - Q(W)||^2 / ||W||^2 of nearest rounding and of the chosen method; bytes: what its weight
    takes now (packed codes + scales + zero points, or the float tensor)."""

    path: str
    op: str
    status: str                       # "quantized" or "float: <reason>"
    weight: str = ""                  # the weight's get_attr target
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    activation_bits: int | None = None
    weight_error_rtn: float | None = None
    weight_error: float | None = None
    exponent: float | None = None     # the grid exponent (1.0: uniform; NUPES power grid otherwise)
    block: str | None = None
    float_bytes: int = 0
    bytes: int = 0


@dataclass
class BlockRow:
    name: str
    layers: int
    output_error: float
    seconds: float


@dataclass
class Report:
    method: str
    layers: list[LayerRow]
    blocks: list[BlockRow]
    model_float_bytes: int
    model_bytes: int
    capture_seconds: float = 0.0
    quantize_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    mixed_precision: dict | None = None   # passes.allocate.Allocation.to_dict(): budget, choice, scores

    @property
    def compression(self) -> float:
        return self.model_float_bytes / self.model_bytes if self.model_bytes else float("nan")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        return cls(**{**data, "layers": [LayerRow(**row) for row in data["layers"]],
                      "blocks": [BlockRow(**row) for row in data["blocks"]]})

    def __str__(self) -> str:
        header = (f"{'layer':<44} {'op':<7} {'bits':>4} {'group':>5} {'grid a':>6} {'a-bits':>6} {'err rtn':>9} "
                  f"{'err':>9} {'bytes':>10}  status")
        lines = [header, "-" * len(header)]
        for row in self.layers:
            fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            lines.append(f"{row.path[-44:]:<44} {row.op:<7} {fmt(row.bits, 'd'):>4} {fmt(row.group_size, 'd'):>5} "
                         f"{fmt(row.exponent, '.2f'):>6} {fmt(row.activation_bits, 'd'):>6} "
                         f"{fmt(row.weight_error_rtn, '.2e'):>9} "
                         f"{fmt(row.weight_error, '.2e'):>9} {row.bytes:>10}  {row.status}")
        lines.append("")
        lines.append(f"{'block':<44} {'layers':>6} {'output err':>10} {'seconds':>8}")
        for block in self.blocks:
            lines.append(f"{block.name[-44:]:<44} {block.layers:>6} {block.output_error:>10.2e} {block.seconds:>8.2f}")
        lines.append("")
        lines.append(f"method {self.method}: model {self.model_float_bytes / 2**20:.2f} MiB float -> "
                     f"{self.model_bytes / 2**20:.2f} MiB ({self.compression:.2f}x smaller); capture "
                     f"{self.capture_seconds:.1f}s, quantization {self.quantize_seconds:.1f}s")
        if self.mixed_precision is not None:
            mixed = self.mixed_precision
            lines.append(f"mixed precision ({mixed['score']} scores): {mixed['achieved_bits']:.3f} bits per weight "
                         f"for a target of {mixed['target_bits']:.3f} ({mixed['used_bytes']} of {mixed['budget_bytes']} bytes"
                         f"{'' if mixed['exact'] else '; optimal within ' + str(mixed['slack_bytes']) + ' bytes'})")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)
