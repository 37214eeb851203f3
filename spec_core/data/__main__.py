"""``specflow data`` / ``python -m spec_core.data``: normalize + tokenize a dataset (cached)."""

from __future__ import annotations

import json
import sys
from typing import Optional

from spec_core.utils.cli import config_parser, parse_config_args, run_main


def main(argv: Optional[list[str]] = None) -> int:
    from spec_core.assets import resolve_target
    from spec_core.data.tokenize import prepare_run_dataset

    parser = config_parser(
        "specflow data",
        "Load, normalize and tokenize the configured dataset into Arrow (cached).",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args, cfg = parse_config_args(parser, argv)
    prepared = prepare_run_dataset(cfg, resolve_target(cfg), progress=not args.quiet)
    if args.json:
        print(json.dumps(prepared.to_dict(), indent=2))
        return 0
    state = "cached" if prepared.cached else "tokenized"
    print(f"{state}: {prepared.train_path.parent} (key {prepared.cache_key})")
    for line in prepared.report.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
