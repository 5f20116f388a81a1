"""Waiting on a condition with a bound: what the demo's tools, the tests and the benchmark do instead of sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(cond: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition", step: float = 0.1) -> Any:
    """``cond()``'s first truthy value, polling every ``step`` seconds; TimeoutError naming ``what`` after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(step)
