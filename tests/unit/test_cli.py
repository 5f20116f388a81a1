"""``processor run``'s last words: whatever ends the process goes through the same secret masking as every
log line, and an uncaught error exits 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from processor.vendors.quicklizard import QuickLizardAdapter

SECRET = "ql-very-secret-key-4711"

# the real CLI, with a relay that fails at once with the secret in its error's message
FAILING_RELAY = """
import sys
from processor.app import Relay

async def run(self):
    raise RuntimeError("cannot connect with client_key=" + self.config.vendors["quicklizard"].sites["default"]
                       .client_key.get_secret_value())

Relay.run = run
from processor.cli import main
sys.argv = ["processor", "run", "--config", sys.argv[1]]
main()
"""


def test_an_uncaught_error_is_logged_masked_and_exits_1(tmp_path: Path):
    cfg = {"kafka": {"bootstrap_servers": "127.0.0.1:9", "group_id": "g", "topics": ["t"]},
           "deadletter": {"topic": "t.dlq"}, "logging": {"format": "json"},
           "vendors": {"quicklizard": QuickLizardAdapter.example_settings("http://127.0.0.1:9")}}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-c", FAILING_RELAY, str(path)], capture_output=True, text=True,
                         env={**os.environ, "QUICKLIZARD_CLIENT_KEY": SECRET}, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert SECRET not in text, text
    assert "RuntimeError: cannot connect with client_key=***" in text, text
    assert '"level":"critical"' in text  # through the logging setup, one JSON line
