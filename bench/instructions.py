"""Instructions per event of each adapter's ``plan()``, counted by valgrind's callgrind.

Timings on a shared 2-core machine drift by ±10% from one minute to the next; instruction counts do not,
so a change to an adapter's per-event path can be measured exactly (cache misses are not counted: the
end-to-end effect still comes from ``make bench``)::

    python -m bench.instructions                       # qubit, quicklizard, convert:batched
    python -m bench.instructions convert tracardi      # any vendor, ``name:batched`` for a batched mode

Needs valgrind (Debian package ``valgrind``); ~50 s a vendor. Each vendor is counted twice, planning the same
batches of 3,000 workload events once and three times after a warm-up; the difference over twice the events
is the cost of ``plan()`` per event, with start-up and workload generation cancelled out. The hash seed is
fixed: with random ones, dict and set probing alone moves the count by up to ±10%.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Any

EVENTS, BATCH = 3_000, 500
DEFAULT = ("qubit", "quicklizard", "convert:batched")


def adapter_and_batches(spec: str) -> tuple[Any, list[list[Any]]]:
    """The vendor's adapter as the benchmark configures it, and batches of decoded workload events."""
    from bench.ceilings import decoded_events
    from bench.scenarios import vendor_settings
    from bench.stack import workload_messages
    from processor.config import interpolate
    from processor.vendors import adapter_class

    got = vendor_settings(spec, "http://127.0.0.1:9")
    if isinstance(got, str):
        raise SystemExit(got)
    name, settings, env = got
    cls = adapter_class(name)
    adapter = cls(cls.settings_model().model_validate(interpolate(settings, "", env)))
    events = [e for e in decoded_events(list(workload_messages(EVENTS))) if adapter.takes(e.kind)]
    return adapter, [events[i:i + BATCH] for i in range(0, len(events), BATCH)]


def _child(spec: str, reps: int) -> None:
    adapter, batches = adapter_and_batches(spec)
    for _ in range(1 + reps):  # the first pass warms caches and lazy imports
        for batch in batches:
            adapter.plan(batch)


def _count(spec: str, reps: int) -> int:
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
           "bench.instructions", "--child", spec, str(reps)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same string hashes, so the same dict and set probes
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stderr
    found = re.search(r"Collected : (\d+)", out)
    if found is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{out[-2000:]}")
    return int(found.group(1))


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        _child(argv[1], int(argv[2]))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind: apt-get install valgrind")
    for spec in argv or DEFAULT:
        events = sum(map(len, adapter_and_batches(spec)[1]))
        per_event = (_count(spec, 3) - _count(spec, 1)) / (2 * events)
        print(f"{spec:20s} {per_event:8,.0f} instructions/event in plan()", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
