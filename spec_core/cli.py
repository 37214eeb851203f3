"""The ``specflow`` command: one entry point that dispatches to each stage's own CLI.

Each stage module owns its arguments (``main(argv) -> int``) so it also runs as
``python -m spec_core.<module>``. User errors print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

from spec_core.utils.cli import run_main

COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("spec_core.data.__main__", "normalize + tokenize a dataset (cached)"),
    "regenerate": ("spec_core.data.regenerate", "regenerate assistant turns with the target"),
    "vocab": ("spec_core.vocab", "build the draft vocabulary map and coverage report"),
    "produce": ("spec_core.streaming.producer", "run a hidden-state producer"),
    "train": ("spec_core.training.launcher", "train a draft with torchrun"),
    "export": ("spec_core.export", "convert a checkpoint to a HuggingFace draft dir"),
    "evaluate": ("spec_core.evaluate", "measure real speculative-decoding acceptance"),
    "dry-run": ("spec_core.dry_run", "check a config against the target without loading weights"),
    "demo": ("flows.pipeline", "run the whole pipeline (Prefect) on a config"),
}


def usage() -> str:
    lines = ["usage: specflow <command> [args]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"specflow: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_main(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
