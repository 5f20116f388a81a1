"""The benchmark harness end to end on a few hundred events: it runs, and its results file has every
key the issue names with sane values. Timing is never asserted here; ``make bench`` measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_KEYS = ("relay_events_per_s", "relay_requests_per_s", "vendor_deliveries_per_s", "p50_ms", "p99_ms",
                 "peak_rss_mb", "cpu_s_per_1k", "ratio", "http_ceiling_requests_per_s",
                 "relay_cpu_us_per_request")


@pytest.mark.timeout(210)
def test_bench_smoke_run_writes_sane_results(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    cmd = [sys.executable, "-m", "bench", "--events", "300", "--scenarios", "a,c", "--backlog", "1000",
           "--workers", "2", "--latency-seconds", "1", "--http-seconds", "0.2", "--out", str(out),
           "--workdir", str(tmp_path / "work"),
           "--outage-seconds", "3", "--outage-before", "3", "--outage-rate", "200", "--outage-shapes", "503"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())

    assert doc["events"] == 300
    assert doc["cores"] >= 1
    assert doc["decode_ceiling_events_per_s"] > 0
    assert doc["http_ceiling_requests_per_s"] > 0
    ran = {k: s for k, s in doc["scenarios"].items() if "skipped" not in s}
    assert ran, doc["scenarios"]  # quicklizard always exists, so scenario a and c run
    for key, sc in ran.items():
        missing = [k for k in SCENARIO_KEYS if k not in sc]
        assert not missing, (key, missing)
        assert sc["relay_events_per_s"] > 0 and sc["vendor_deliveries_per_s"] > 0
        assert sc["relay_requests_per_s"] > 0 and sc["requests"] > 0
        assert sc["delivered"] + sc["filtered"] + sc["dead_lettered"] == 300 * len(sc["vendors"])
        assert 0 < sc["peak_rss_mb"] < 4000
        assert sc["cpu_s_per_1k"] > 0
        assert 0 < sc["ratio"] == max(sc["ratio_decode"], sc["ratio_http"])
        assert sc["p50_ms"] is not None and sc["p50_ms"] <= sc["p99_ms"]
    client = doc["client_ceiling"]  # scenario c has Convead: its form POSTs, through both clients
    assert client["vendor"] == "convead" and client["non_2xx"] == {"relay_sender": 0, "aiohttp": 0}
    assert client["relay_sender_cpu_us_per_request"] > 0 and client["aiohttp_cpu_us_per_request"] > 0
    assert ran["c"]["relay_over_bare_client"] > 0 and "relay_over_bare_client" not in ran["a"]
    assert ran["c"]["floor_over_bare_client"] > 1
    for sc in ran.values():  # each scenario: its own decode ceiling next to it, and the adapters' floor
        assert sc["decode_ceiling"]["events_per_s"] > 0 and sc["floor"]["decode_over_floor"] > 0
    assert doc["scaling"]["workers"] == 2 and doc["scaling"]["relay_events_per_s"] > 0
    assert doc["backlog"]["events"] == 1000 and doc["backlog"]["peak_rss_mb"] > 0
    assert set(doc["targets"]) >= {f"ratio_{k}" for k in ran} | {"scaling", "backlog_rss", "outage_lost"}

    outage = doc["outage"]["shapes"]["503"]  # Convead answering 503 for 3 s: parked, then redriven
    assert outage["produced"] > 0 and outage["fault"] == {"error_rate": 1.0, "error_status": 503}
    assert sum(outage["parked_total"].values()) > 0 and outage["recovery"]["drained"]
    for vendor, counts in outage["per_vendor"].items():
        assert counts["unsettled"] == 0 and counts["produced"] == outage["produced"], (vendor, counts)
        assert counts["lost"] == 0 and counts["still_parked"] == 0, (vendor, counts)
        assert counts.get("vendor_accepted_minus_delivered", 0) == 0, (vendor, counts)
    assert outage["per_vendor"]["convead"]["redriven_delivered"] > 0
    assert set(outage["healthy"]) == {"qubit", "quicklizard", "tracardi"}
