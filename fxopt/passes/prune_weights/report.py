"""SparsityReport: what prune-weights pruned and what the zeros could save in storage.

Read it as `compiled.report.sparsity`; `str()` is a table, `to_dict()` is JSON-ready
(the masks themselves are in `.masks`, not in the dict). Per pruned weight, in its own
dtype (`value_bytes` per value):

    dense           numel * value_bytes
    csr             (rows + 1) * 8 + nnz * (8 + value_bytes)     rows = dim 0; the rest is
                    flattened into columns; int64 indices, what Tensor.to_sparse_csr() stores
    bitmask         ceil(numel / 8) + nnz * value_bytes          one bit per entry + the nonzeros
    2:4             numel / 2 * value_bytes + numel / 8          (pattern=2:4 only) the kept half
                    and a 2-bit position per kept value: torch's semi-structured layout for
                    fp16 / bf16 weights

These are sizes, not speed: a dense kernel on CPU still multiplies the zeros, so latency
does not change; only the inductor backend's 2:4 path on CUDA (fp16 / bf16 linears)
runs a sparse kernel. `nnz` counts the weight's nonzeros after pruning (entries that
were zero before are not stored either); `pruned` counts the entries the mask removed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

INDEX_BYTES = 8      # torch.int64: the crow / col indices of Tensor.to_sparse_csr()
SPEED_NOTE = ("storage only: on CPU the dense kernels still run over the zeros, so latency is "
              "unchanged; a sparse kernel runs only for 2:4 linears on CUDA (backend inductor, fp16/bf16)")


def csr_bytes(rows: int, nnz: int, value_bytes: int) -> int:
    """Bytes of a CSR matrix with `rows` rows and `nnz` stored values (int64 indices)."""
    return (rows + 1) * INDEX_BYTES + nnz * (INDEX_BYTES + value_bytes)


def bitmask_bytes(numel: int, nnz: int, value_bytes: int) -> int:
    """Bytes of a one-bit-per-entry mask plus the `nnz` nonzero values."""
    return math.ceil(numel / 8) + nnz * value_bytes


def semi_structured_bytes(numel: int, value_bytes: int) -> int:
    """Bytes of a 2:4 weight: half its values kept, plus a 2-bit position per kept value."""
    return numel // 2 * value_bytes + numel // 8


@dataclass
class LayerSparsity:
    """One pruned weight: what was pruned and its size in each storage format."""

    weight: str                 # FQN
    path: str                   # module path of the op that reads it
    kind: str                   # linear | conv
    shape: tuple[int, ...]
    dtype: str
    numel: int
    pruned: int                 # entries the mask removes
    nnz: int                    # nonzeros left in the weight
    dense_bytes: int
    csr_bytes: int
    bitmask_bytes: int
    semi_structured_bytes: int | None = None   # pattern=2:4 only

    @classmethod
    def measure(cls, weight: str, path: str, kind: str, pruned_weight: torch.Tensor, mask: torch.Tensor,
                two_four: bool) -> "LayerSparsity":
        w = pruned_weight
        numel, nnz, size = w.numel(), int(torch.count_nonzero(w)), w.element_size()
        return cls(weight, path, kind, tuple(w.shape), str(w.dtype).removeprefix("torch."), numel,
                   int((~mask).sum()), nnz, numel * size, csr_bytes(w.shape[0], nnz, size),
                   bitmask_bytes(numel, nnz, size), semi_structured_bytes(numel, size) if two_four else None)

    @property
    def sparsity(self) -> float:
        """Share of the entries the mask removed."""
        return self.pruned / self.numel if self.numel else 0.0

    @property
    def sizes(self) -> dict[str, int]:
        out = {"dense": self.dense_bytes, "csr": self.csr_bytes, "bitmask": self.bitmask_bytes}
        if self.semi_structured_bytes is not None:
            out["2:4"] = self.semi_structured_bytes
        return out

    @property
    def smallest(self) -> str:
        """The format that stores this weight in the fewest bytes (on a tie: dense, then 2:4)."""
        sizes, rank = self.sizes, ("dense", "2:4", "bitmask", "csr")
        return min(sizes, key=lambda k: (sizes[k], rank.index(k)))

    def to_dict(self) -> dict:
        return {"weight": self.weight, "path": self.path, "kind": self.kind, "shape": list(self.shape),
                "dtype": self.dtype, "numel": self.numel, "pruned": self.pruned, "nnz": self.nnz,
                "sparsity": self.sparsity, "dense_bytes": self.dense_bytes, "csr_bytes": self.csr_bytes,
                "bitmask_bytes": self.bitmask_bytes, "semi_structured_bytes": self.semi_structured_bytes,
                "smallest": self.smallest}


@dataclass
class SparsityReport:
    """Per pruned weight (graph order) a LayerSparsity; `skipped` lists (weight or node, why
    it was not pruned); `masks` the keep-masks by weight FQN (True = kept)."""

    pattern: str = "unstructured"
    scope: str = "layer"
    requested: float = 0.5
    layers: list[LayerSparsity] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def pruned(self) -> int:
        return sum(r.pruned for r in self.layers)

    @property
    def nnz(self) -> int:
        return sum(r.nnz for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Share of all pruned weights' entries that the masks removed."""
        return self.pruned / self.numel if self.numel else 0.0

    def bytes(self, fmt: str | None = None) -> int:
        """Total bytes of the pruned weights stored as `fmt` (dense | csr | bitmask | 2:4),
        or each in its smallest format when fmt is None."""
        return sum(r.sizes[fmt or r.smallest] for r in self.layers)

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "scope": self.scope, "requested": self.requested,
                "numel": self.numel, "pruned": self.pruned, "nnz": self.nnz, "sparsity": self.sparsity,
                "dense_bytes": self.bytes("dense"), "smallest_bytes": self.bytes(),
                "layers": [r.to_dict() for r in self.layers], "skipped": [list(s) for s in self.skipped],
                "notes": list(self.notes), "speed": SPEED_NOTE}

    def __str__(self) -> str:
        what = self.pattern if self.pattern == "2:4" else \
            f"{self.requested:g} {'per layer' if self.scope == 'layer' else 'global'}"
        lines = [f"prune-weights ({what}): {self.pruned} of {self.numel} weights pruned "
                 f"({self.sparsity:.2%}) in {len(self.layers)} layers; stored in the smallest format "
                 f"{_kib(self.bytes())} instead of {_kib(self.bytes('dense'))} dense", f"  {SPEED_NOTE}"]
        header = ("weight", "shape", "sparsity", "nnz", "dense", "csr", "bitmask", "2:4", "smallest")
        rows = [header] + [(r.weight, "x".join(map(str, r.shape)), f"{r.sparsity:.2%}", str(r.nnz),
                            _kib(r.dense_bytes), _kib(r.csr_bytes), _kib(r.bitmask_bytes),
                            "-" if r.semi_structured_bytes is None else _kib(r.semi_structured_bytes),
                            r.smallest) for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines += [f"  not pruned: {name}: {why}" for name, why in self.skipped]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"
