"""``specflow export`` / ``python -m spec_core.export``: DCP checkpoint -> HF draft dir."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from spec_core.export.writer import export_draft
from spec_core.models.common.config import CONFIG_FILE
from spec_core.models.common.hf import DTYPES


def main(argv: Optional[list[str]] = None) -> int:
    """``specflow export --checkpoint CKPT --out DIR``: DCP checkpoint -> HF draft dir."""
    parser = argparse.ArgumentParser(prog="specflow export", description=main.__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="iter_* dir, checkpoints dir or run dir"
    )
    parser.add_argument("--out", required=True, help="output HF dir")
    parser.add_argument(
        "--select",
        default="latest",
        choices=("latest", "best"),
        help="which checkpoint of a run/checkpoints dir",
    )
    parser.add_argument("--target", default=None, help="target HF dir (checks; needed for --embed)")
    parser.add_argument(
        "--prune-vocab-map",
        default=None,
        help="vocab_map.safetensors: post-prune a full-vocab head to its tokens",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="weight dtype (default: the checkpoint's)",
    )
    parser.add_argument(
        "--embed", action="store_true", help="include embed_tokens copied from the target"
    )
    parser.add_argument("--speculators", default=None, help="also write a speculators-format dir")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output dir")
    args = parser.parse_args(argv)
    target = args.target or _target_from_run(args.checkpoint)
    result = export_draft(
        args.checkpoint,
        args.out,
        select=args.select,
        target_dir=target,
        vocab_map=args.prune_vocab_map,
        dtype=args.dtype,
        include_embedding=args.embed,
        speculators_dir=args.speculators,
        provenance={"target_dir": str(target) if target else None},
        overwrite=args.force,
    )
    print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    return 0


def _target_from_run(checkpoint: str) -> Optional[str]:
    """The target dir recorded in the run's ``train_job.json``, when the checkpoint has one."""
    path = Path(checkpoint).expanduser().resolve()
    for parent in [path, *path.parents][:4]:
        job = parent / "train_job.json"
        if job.is_file():
            target = json.loads(job.read_text()).get("target_dir")
            if target and (Path(target) / CONFIG_FILE).is_file():
                return str(target)
    return None
