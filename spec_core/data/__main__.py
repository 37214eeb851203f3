"""``specflow data`` / ``python -m spec_core.data``: normalize + tokenize a dataset (cached)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from spec_core.errors import SpecflowError


def main(argv: Optional[list[str]] = None) -> int:
    from spec_core.assets import resolve_target
    from spec_core.config import load_config
    from spec_core.data.tokenize import prepare_dataset
    from spec_core.paths import RunPaths, cache_dir

    parser = argparse.ArgumentParser(
        prog="specflow data",
        description="Load, normalize and tokenize the configured dataset into Arrow (cached).",
    )
    parser.add_argument("--config", default=None, help="YAML preset (default: built-in defaults)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    work_dir = RunPaths.from_config(cfg).work_dir
    prepared = prepare_dataset(
        cfg.dataset, resolve_target(cfg), work_dir, cache_dir(cfg), progress=not args.quiet
    )
    if args.json:
        print(json.dumps(prepared.to_dict(), indent=2))
        return 0
    state = "cached" if prepared.cached else "tokenized"
    print(f"{state}: {prepared.train_path.parent} (key {prepared.cache_key})")
    for line in prepared.report.lines():
        print(line)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpecflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
