"""Checkpoint -> HF draft dir for every algorithm: one reader, one writer, one validator.

``checkpoint`` reads a training checkpoint without a process group, ``writer`` asks the draft's
algorithm for its engine layout and writes + validates the dir, ``validate`` is the checklist,
``speculators`` writes vLLM's speculators-format twin, ``cli`` is ``specflow export``.
"""

from spec_core.export.checkpoint import DraftCheckpoint, read_checkpoint, resolve_export_source
from spec_core.export.cli import main
from spec_core.export.speculators import write_speculators_dir
from spec_core.export.validate import validate_export
from spec_core.export.writer import ExportResult, export_draft

__all__ = [
    "DraftCheckpoint",
    "ExportResult",
    "export_draft",
    "main",
    "read_checkpoint",
    "resolve_export_source",
    "validate_export",
    "write_speculators_dir",
]
