"""Job functions for the fault tests (imported by the real worker from the repo root)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def sleep(spec: dict[str, Any]) -> dict[str, Any]:
    time.sleep(float(spec["seconds"]))
    return {"slept": spec["seconds"]}


def slow_first_time(spec: dict[str, Any]) -> dict[str, Any]:
    """Sleeps long on the first attempt (to be killed), returns at once when retried."""
    marker = Path(spec["marker"])
    if not marker.exists():
        marker.write_text("started")
        time.sleep(120)
    return {"attempted": True}
