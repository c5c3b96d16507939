"""One record schema for every dataset, and the bookkeeping of records that were skipped."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import DataError


@dataclass(frozen=True)
class Record:
    """prompt -> target, teacher-forced. `answer` is the exact final answer where one exists
    (math), None for plain text. For plain LM corpora the prompt is empty and the target is text."""

    prompt: str
    target: str
    answer: str | None = None
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class BadRecord(ValueError):
    """Raised by an adapter for one raw record that cannot become a Record; it is counted, not fatal."""


class EmptyDataset(DataError):
    """No usable records: a clear error before training, never a crash deep inside it."""


@dataclass
class SkipLog:
    """Counts of what was skipped or cut and why, with the first few examples of each reason."""

    seen: int = 0
    kept: int = 0
    truncated: int = 0          # kept, but cut to fit max_length
    reasons: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)
    max_examples: int = 5

    def skip(self, reason: str, where: str = "") -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {reason}" if where else reason)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        cut = f", {self.truncated} truncated" if self.truncated else ""
        if not self.reasons:
            return f"{self.kept}/{self.seen} kept{cut}"
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        return f"{self.kept}/{self.seen} kept{cut}; skipped {self.skipped} ({why})"

    def to_dict(self) -> dict:
        return {"seen": self.seen, "kept": self.kept, "skipped": self.skipped, "truncated": self.truncated,
                "reasons": dict(self.reasons), "first_examples": list(self.examples)}


def require_text(raw: dict, key: str, *, allow_empty: bool = False) -> str:
    """raw[key] as a string, or BadRecord naming what is wrong."""
    if not isinstance(raw, dict):
        raise BadRecord(f"record is a {type(raw).__name__}, not an object")
    if key not in raw or raw[key] is None:
        raise BadRecord(f"missing field '{key}'")
    value = raw[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRecord(f"field '{key}' is a {type(value).__name__}, not text")
    if not allow_empty and not value.strip():
        raise BadRecord(f"empty field '{key}'")
    return value
