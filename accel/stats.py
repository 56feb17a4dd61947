"""Per-request counts of transformer passes computed and reused, per CFG branch (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BranchStats:
    computed: int = 0
    skipped: int = 0
    skipped_steps: list[int] = field(default_factory=list)
    run: int = 0  # skipped steps in a row, up to the latest pass

    def record(self, step: int, skipped: bool) -> None:
        if skipped:
            self.skipped += 1
            self.skipped_steps.append(step)
            self.run += 1
        else:
            self.computed += 1
            self.run = 0


@dataclass
class CacheStats:
    """`method` is None for a request without step caching (every pass computed)."""

    method: str | None = None
    branches: dict[str, BranchStats] = field(default_factory=dict)

    def branch(self, name: str) -> BranchStats:
        return self.branches.setdefault(name, BranchStats())

    @property
    def computed(self) -> int:
        return sum(b.computed for b in self.branches.values())

    @property
    def skipped(self) -> int:
        return sum(b.skipped for b in self.branches.values())

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "computed": self.computed,
            "skipped": self.skipped,
            "branches": {name: {"computed": b.computed, "skipped": b.skipped, "skippedSteps": b.skipped_steps}
                         for name, b in self.branches.items()},
        }
