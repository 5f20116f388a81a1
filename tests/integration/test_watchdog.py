"""SIGTERM always ends the process: when something blocks past the grace and the close margin (here the
event loop itself, blocked on purpose in the drain), the watchdog writes every thread's stack to the log
and exits non-zero."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from processor.consumer import CLOSE_MARGIN_S
from processor.devstack.broker import free_port
from tests.integration.conftest import http_text, quicklizard_vendor, relay_config, wait_for

# the real CLI, with the drain replaced by one that blocks the event loop (a hang no await can bound)
BLOCKED_DRAIN = """
import sys, time
from processor.app import Relay

async def drain_blocking_the_loop(self, grace_s):
    time.sleep(3600)

Relay._drain = drain_blocking_the_loop
from processor.cli import main
sys.argv = ["processor", "run", "--config", sys.argv[1]]
main()
"""


def test_a_loop_blocked_past_the_grace_ends_in_a_stack_dump_and_a_non_zero_exit(broker, topics, sandbox,
                                                                                 tmp_path: Path):
    grace = 1.0
    port = free_port()
    cfg = relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)}, shutdown_grace_s=grace)
    cfg["metrics"] = {"host": "127.0.0.1", "port": port}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "relay.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-c", BLOCKED_DRAIN, str(path)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "QL_CLIENT_KEY": "ql-secret-key"})
    try:
        wait_for(lambda: proc.poll() is None and http_text(f"http://127.0.0.1:{port}/readyz")[0] == 200, 60,
                 "relay ready")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(grace + CLOSE_MARGIN_S + 10)
        took = time.monotonic() - sent
        text = log_path.read_text(errors="replace")
        print(f"\nloop blocked in the drain: exit {rc} after {took:.1f}s (grace {grace:g}s + margin "
              f"{CLOSE_MARGIN_S:g}s)")
        assert rc == 1, text[-3000:]
        assert grace + CLOSE_MARGIN_S - 1 < took < grace + CLOSE_MARGIN_S + 5
        assert "watchdog: exiting with every thread's stack if not stopped within" in text
        dump = text[text.index("Timeout ("):]
        assert "most recent call first" in dump and "drain_blocking_the_loop" in dump  # where it hung
        assert dump.count("Thread 0x") >= 2  # every thread, not only the blocked one
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
