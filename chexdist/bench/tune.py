"""`chexdist bench tune`: Ray Tune trials vs the engine (the suite itself lives in chexdist.tuning.tuner)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def tune_suite(**options: Any) -> Iterator[dict[str, Any]]:
    from chexdist.tuning.tuner import (
        tune_suite as suite,  # Ray is imported only when this suite runs
    )

    return suite(**options)
