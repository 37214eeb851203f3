"""``python -m spec_core.export``: errors as one line on stderr, exit status 2."""

import sys

from spec_core.export.cli import main
from spec_core.utils.cli import run_main

sys.exit(run_main(main))
