"""The printed table and the JSON results file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table


def _f(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(doc: dict[str, Any]) -> Table:
    t = Table(title=f"event relay benchmark: {doc['events']:,} events, {doc['cores']} cores, "
                    f"decode ceiling {_f(doc.get('decode_ceiling_events_per_s'))} events/s")
    cols = ("run", "vendors", "events/s", "deliveries/s", "requests/s", "HTTP ceiling req/s", "ratio",
            "p50 ms", "p95 ms", "p99 ms", "peak RSS MB", "CPU s/1k")
    for c in cols:
        t.add_column(c, justify="left" if c in ("run", "vendors") else "right")
    for key, sc in doc["scenarios"].items():
        if "skipped" in sc:
            t.add_row(f"scenario {key}", "-", "skipped", *[""] * (len(cols) - 3))
            continue
        t.add_row(f"scenario {key}", ", ".join(sc["vendors"]), _f(sc["relay_events_per_s"]),
                  _f(sc["vendor_deliveries_per_s"]), _f(sc["relay_requests_per_s"]),
                  _f(sc["http_ceiling_requests_per_s"]), f"{sc['ratio']:.2f} ({sc['binding']})",
                  _f(sc["p50_ms"]), _f(sc["p95_ms"]), _f(sc["p99_ms"]), _f(sc["peak_rss_mb"]),
                  _f(sc["cpu_s_per_1k"], 3))
    if "scaling" in doc:
        r = doc["scaling"]
        t.add_row(f"--workers {r['workers']} ({r['scenario']})", f"{r['speedup']}x one worker",
                  _f(r["relay_events_per_s"]), _f(r["vendor_deliveries_per_s"]), _f(r["relay_requests_per_s"]),
                  "", "", _f(r["p50_ms"]), _f(r["p95_ms"]), _f(r["p99_ms"]), _f(r["peak_rss_mb"]),
                  _f(r["cpu_s_per_1k"], 3))
    if "backlog" in doc:
        r = doc["backlog"]
        t.add_row(f"backlog {r['events']:,} ({r['scenario']})", f"in-flight limit {r['max_inflight_events']:,}",
                  _f(r["relay_events_per_s"]), _f(r["vendor_deliveries_per_s"]), _f(r["relay_requests_per_s"]),
                  "", "", _f(r["p50_ms"]), _f(r["p95_ms"]), _f(r["p99_ms"]), _f(r["peak_rss_mb"]),
                  _f(r["cpu_s_per_1k"], 3))
    return t


def print_report(doc: dict[str, Any], console: Console) -> None:
    console.print(table(doc))
    console.print("scenario latency: a run of its own at half the scenario's measured rate (Kafka timestamp -> "
                  "vendor ack, the relay's histogram); in the --workers and backlog rows it includes the wait in "
                  "the pre-loaded backlog.")
    for name, t in doc.get("targets", {}).items():
        mark = "[green]met[/]" if t["met"] else "[red]missed[/]"
        console.print(f"  target {name}: want {t['want']}, got {t['got']}: {mark}")


def write(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
