"""Render docs/families.json (written by the family tests, tests/conftest.py) into the README's
family table between its markers: ``python scripts/families_table.py`` after a test run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"
COLUMNS = [
    ("hf_capture", "HF capture"),
    ("hf_e2e", "HF train → export → lossless decode"),
    ("vllm_capture", "vLLM capture"),
    ("vllm_serve", "vLLM serving our draft"),
    ("sglang_hooks", "SGLang hooks"),
]
NOT_RUN = {
    "vllm_capture": "not run: `make vllm-test` (tests/test_families_vllm.py) records it",
    "vllm_serve": "not run: no per-family test of vLLM serving our draft yet",
}


def cell(outcome: dict | None, lane: str) -> str:
    if outcome is None:
        return f"❌ {NOT_RUN.get(lane, 'not run')}"
    return ("✅ " if outcome["ok"] else "❌ ") + outcome["reason"].replace("|", "/")


def table(results: dict) -> str:
    head = "| family | " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    rows = [
        f"| {family} | " + " | ".join(cell(lanes.get(lane), lane) for lane, _ in COLUMNS) + " |"
        for family, lanes in sorted(results.items())
    ]
    return "\n".join([head, rule, *rows])


def main() -> int:
    results = json.loads((ROOT / "docs" / "families.json").read_text())
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + table(results) + "\n" + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
