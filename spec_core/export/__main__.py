"""``python -m spec_core.export``: errors as one line on stderr, exit status 2."""

import sys

from spec_core.errors import SpecflowError
from spec_core.export.cli import main

try:
    sys.exit(main())
except SpecflowError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
