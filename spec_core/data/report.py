"""Counting what was skipped and why, so bad data is reported instead of silently dropped."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_EXAMPLES = 5


@dataclass
class DataReport:
    """Skips by reason, with the first few locations (``file.jsonl:17``) and details of each."""

    records: int = 0  # records read (valid + skipped)
    valid: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    renamed_duplicate_ids: int = 0  # repeated ids get a '#k' suffix so sample ids stay unique
    files: list[str] = field(default_factory=list)

    def skip(self, reason: str, location: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(f"{location} ({detail})" if detail else location)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: DataReport) -> None:
        self.records += other.records
        self.valid += other.valid
        self.renamed_duplicate_ids += other.renamed_duplicate_ids
        self.files += other.files
        for reason, count in other.skipped.items():
            self.skipped[reason] += count
            shown = self.examples.setdefault(reason, [])
            shown += other.examples.get(reason, [])[: MAX_EXAMPLES - len(shown)]

    def one_line(self) -> str:
        """'3 malformed_json (first: a.jsonl:2), 1 empty_content (first: a.jsonl:7 (...))'."""
        if not self.skipped:
            return "nothing skipped"
        return ", ".join(
            f"{count} {reason} (first: {self.examples[reason][0]})"
            for reason, count in self.skipped.most_common()
        )

    def lines(self) -> list[str]:
        out = [f"records read: {self.records}, valid: {self.valid}, skipped: {self.num_skipped}"]
        for reason, count in self.skipped.most_common():
            out.append(f"  skipped {count:>6} {reason}: " + "; ".join(self.examples[reason]))
        if self.renamed_duplicate_ids:
            out.append(f"  renamed {self.renamed_duplicate_ids} duplicate ids (suffix '#k')")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "valid": self.valid,
            "skipped": dict(self.skipped.most_common()),
            "examples": {k: list(v) for k, v in self.examples.items()},
            "renamed_duplicate_ids": self.renamed_duplicate_ids,
            "files": list(self.files),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        return cls(
            records=data["records"],
            valid=data["valid"],
            skipped=Counter(data["skipped"]),
            examples={k: list(v) for k, v in data["examples"].items()},
            renamed_duplicate_ids=data.get("renamed_duplicate_ids", 0),
            files=list(data.get("files", [])),
        )
