"""What every stage's command line shares: its ``--config`` + overrides arguments, and how a user
error ends it.

Each stage owns ``main(argv) -> int`` so it runs as ``specflow <stage>`` and as
``python -m spec_core.<module>``; both entry points go through ``run_main`` so a bad config or
input reads the same either way: one ``error: ...`` line on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Optional

from spec_core.config import Config, load_config
from spec_core.errors import SpecflowError

USER_ERROR_EXIT = 2


def config_parser(prog: str, description: Optional[str]) -> argparse.ArgumentParser:
    """A parser that already takes the run's config: a YAML preset and dotted overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML preset (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser


def parse_config_args(
    parser: argparse.ArgumentParser, argv: Optional[list[str]]
) -> tuple[argparse.Namespace, Config]:
    """``argv`` parsed by a ``config_parser``, and the config its ``--config`` and overrides
    make (a bad one raises ``ConfigError``, which ``run_main`` prints as one line)."""
    args = parser.parse_args(argv)
    return args, load_config(args.config, args.overrides)


def run_main(
    main: Callable[[Optional[list[str]]], Optional[int]], argv: Optional[list[str]] = None
) -> int:
    """``main(argv)``'s exit status; a ``SpecflowError`` becomes one line and status 2."""
    try:
        return int(main(argv) or 0)
    except SpecflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
