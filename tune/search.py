"""Ray Tune search entry: `python tune/search.py --space tune/spaces/default.yaml --shards shards/nih ...`,
the same as `chexdist tune ...` (the search lives in the package, chexdist/tuning/)."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chexdist.cli.tuning import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
