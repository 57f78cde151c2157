"""`python -m chexdist.cli ...` runs the `chexdist` command."""

import sys

from chexdist.cli.main import main

sys.exit(main())
