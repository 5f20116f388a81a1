"""``processor run --workers N``: N relay processes in one consumer group, in one pod.

Python decodes on one core per process; N workers use N cores. The parent
starts the children, forwards SIGTERM/SIGINT, and exits with the worst exit
code. Worker i serves its metrics on ``metrics.port + i`` (port 0 stays 0).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def run_workers(config_path: str, workers: int, base_port: int) -> int:
    procs: list[subprocess.Popen[bytes]] = []
    for i in range(workers):
        env = dict(os.environ)
        env["PROCESSOR__METRICS__PORT"] = str(base_port + i if base_port else 0)
        procs.append(subprocess.Popen([sys.executable, "-m", "processor.cli", "run", "--config", config_path],
                                      env=env))

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):  # one failed: stop the others
            forward(signal.SIGTERM, None)
        time.sleep(0.2)
    return max((p.returncode or 0) for p in procs)
