"""`python -m chexdist ...` runs the `chexdist` command (for environments without the console script)."""

import sys

from chexdist.cli.main import main

sys.exit(main())
