"""report.compress: every candidate compress tried, what it cost and what it kept."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["Candidate", "CompressReport"]


@dataclass
class Candidate:
    """One model compress built: its pipeline and what was measured of it.

    stage: "structure" (built to find the strength that meets the target, not yet recovered)
        or "recovered" (trained back by distill, then scored).
    speedup: fp32 latency / this model's, both on the same machine, interleaved.
    size: this model's weight bytes / fp32's. macs: its MACs / fp32's.
    drop: the fp32 score minus this one (positive: worse); accepted: drop <= max_drop (a
        structure that keeps the score is accepted as it is).
    """

    pipeline: str
    stage: str
    speedup: float
    size: float
    macs: float
    score: float
    drop: float
    accepted: bool = False
    seconds: float = 0.0
    why: str = ""


@dataclass
class CompressReport:
    """What compress did: the target, the fp32 baseline, every candidate and the one returned."""

    target: dict
    max_drop: float
    backend: str
    score_name: str
    baseline_score: float
    baseline_latency: float = 0.0
    candidates: list[Candidate] = field(default_factory=list)
    chosen: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Candidate | None:
        return self.candidates[self.chosen] if self.chosen is not None else None

    def pareto(self) -> list[Candidate]:
        """The candidates no other beats on both speed-up and score, by speed-up."""
        front = [c for c in self.candidates
                 if not any(o.speedup >= c.speedup and o.score >= c.score and (o.speedup, o.score) != (c.speedup, c.score)
                            for o in self.candidates)]
        return sorted(front, key=lambda c: c.speedup)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"compress: target {_target_text(self.target)}, max drop {self.max_drop:g} of {self.score_name} "
                 f"(fp32 {self.baseline_score:.4f}), backend {self.backend}, {self.seconds:.0f} s"]
        lines.append(f"{'#':>2}  {'stage':<10} {'speedup':>7} {'size':>6} {'MACs':>6} {'score':>7} {'drop':>7}  pipeline")
        for i, c in enumerate(self.candidates):
            mark = "*" if i == self.chosen else ("+" if c.accepted else " ")
            lines.append(f"{i:>2}{mark} {c.stage:<10} {c.speedup:>6.2f}x {c.size:>6.3f} {c.macs:>6.3f} "
                         f"{c.score:>7.4f} {c.drop:>+7.4f}  {c.pipeline}" + (f"  ({c.why})" if c.why else ""))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, path) -> None:
        """The candidates' score against speed-up, the Pareto front joined, as a PNG at `path`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for stage, marker in (("structure", "x"), ("recovered", "o")):
            pts = [c for c in self.candidates if c.stage == stage]
            ax.scatter([c.speedup for c in pts], [c.score for c in pts], marker=marker, label=stage)
        front = self.pareto()
        ax.plot([c.speedup for c in front], [c.score for c in front], "k--", lw=0.8, label="Pareto front")
        ax.scatter([1.0], [self.baseline_score], marker="*", s=120, label="fp32")
        ax.axhline(self.baseline_score - self.max_drop, color="grey", lw=0.8, ls=":", label="max drop")
        if self.best is not None:
            ax.scatter([self.best.speedup], [self.best.score], s=160, facecolors="none", edgecolors="red",
                       label="returned")
        ax.set_xlabel(f"speed-up over fp32 ({self.backend})")
        ax.set_ylabel(self.score_name)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _target_text(target: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in target.items())
