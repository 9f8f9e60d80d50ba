"""Fault injection for the tests that kill or stall a run at a chosen moment (a save, the export, a rank's step).

`AUTOMOE_TEST_PAUSE="POINT=SECONDS[,POINT=SECONDS]"` makes the run sleep that long when it reaches POINT, e.g.
`save_6` (step 6's checkpoint written, not yet committed), `export` (final weights written, not yet renamed into
place) or `step_3_rank1` (rank 1 before step 3). Unset, nothing happens.
"""

from __future__ import annotations

import os
import time

PAUSE_ENV = "AUTOMOE_TEST_PAUSE"


def pause_point(name: str) -> None:
    for item in filter(None, os.environ.get(PAUSE_ENV, "").split(",")):
        point, _, seconds = item.partition("=")
        if point == name:
            time.sleep(float(seconds))
