"""Int8Report: which ops the int8 backend runs as int8 kernels, which stay float and why.

Read it as `fxopt.backends.int8.int8_report(compiled)` (or `.int8_report` on the
lowered module); `str()` is a readable summary, `to_dict()` is JSON-ready.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch.fx as fx


@dataclass
class Int8Report:
    """int8_ops: (node, kernel) per op lowered to an int8 kernel. float_ops: (node,
    reason) per compute op that runs in float. quantize / dequantize: how many
    float<->int8 crossings the lowered graph holds."""

    engine: str = ""
    int8_ops: list[tuple[str, str]] = field(default_factory=list)
    float_ops: list[tuple[str, str]] = field(default_factory=list)
    quantize: int = 0
    dequantize: int = 0
    checked: str = "not checked: no calibration batches"   # how the kernels were checked against fake-quant
    engine_notes: list[str] = field(default_factory=list)  # engines passed over, and why

    def add_float(self, node: fx.Node, reason: str) -> None:
        if not any(name == node.name for name, _ in self.float_ops):
            self.float_ops.append((node.name, reason))

    def reason_for(self, node: str) -> str | None:
        """Why `node` runs in float (None: it runs as an int8 kernel, or is not compute)."""
        return next((r for n, r in self.float_ops if n == node), None)

    def kernels(self) -> dict[str, int]:
        """kernel name -> how many ops use it."""
        out: dict[str, int] = defaultdict(int)
        for _, kernel in self.int8_ops:
            out[kernel] += 1
        return dict(out)

    def to_dict(self) -> dict:
        return {"engine": self.engine, "int8_ops": [list(o) for o in self.int8_ops],
                "float_ops": [list(o) for o in self.float_ops],
                "quantize": self.quantize, "dequantize": self.dequantize, "checked": self.checked,
                "engine_notes": list(self.engine_notes)}

    def __str__(self) -> str:
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(self.kernels().items()))
        lines = [f"int8 ({self.engine}): {len(self.int8_ops)} ops on int8 kernels ({kernels}), "
                 f"{len(self.float_ops)} ops in float, {self.quantize} quantize / "
                 f"{self.dequantize} dequantize", f"  {self.checked}"]
        lines += [f"  {note}" for note in self.engine_notes]
        by_reason: dict[str, list[str]] = defaultdict(list)
        for name, reason in self.float_ops:
            by_reason[reason].append(name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            lines.append(f"  float  {reason}: {shown}")
        return "\n".join(lines)
