"""The printed table and the JSON results file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table


def scaling_label(r: dict[str, Any]) -> str:
    """The speedup, and what each core the workers got did against one worker's core."""
    label = f"{r['speedup']}x one worker (steady)"
    if r.get("per_core_efficiency") is not None:
        label += f"; {r['per_core_efficiency']}x per relay core"
    return label


def _f(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


COLUMNS = ("run", "vendors", "events/s", "steady ev/s", "deliveries/s", "requests/s", "HTTP ceiling req/s",
           "decode ceiling ev/s", "ratio", "adapters' floor", "p50 ms", "p95 ms", "p99 ms", "peak RSS MB", "CPU s/1k")


def _decode(sc: dict[str, Any]) -> str:
    """The scenario's own decode ceiling (measured next to it) and the adapters' floor ratio."""
    return _f(sc.get("decode_ceiling", {}).get("events_per_s"))


def _floor(sc: dict[str, Any]) -> str:
    return _f(sc.get("floor", {}).get("decode_over_floor"), 2)


def table(doc: dict[str, Any]) -> Table:
    t = Table(title=f"event relay benchmark: {doc['events']:,} events, {doc['cores']} cores, "
                    f"decode ceiling {_f(doc.get('decode_ceiling_events_per_s'))} events/s")
    cols = COLUMNS
    for c in cols:
        t.add_column(c, justify="left" if c in ("run", "vendors") else "right")
    for key, sc in doc["scenarios"].items():
        if "skipped" in sc:
            t.add_row(f"scenario {key}", "-", "skipped", *[""] * (len(cols) - 3))
            continue
        t.add_row(f"scenario {key}", ", ".join(sc["vendors"]), _f(sc["relay_events_per_s"]),
                  _f(sc["steady_events_per_s"]),
                  _f(sc["vendor_deliveries_per_s"]), _f(sc["relay_requests_per_s"]),
                  _f(sc["http_ceiling_requests_per_s"]), _decode(sc), f"{sc['ratio']:.2f} ({sc['binding']})",
                  _floor(sc), _f(sc["p50_ms"]), _f(sc["p95_ms"]), _f(sc["p99_ms"]), _f(sc["peak_rss_mb"]),
                  _f(sc["cpu_s_per_1k"], 3))
    extra_runs = {
        "scaling": lambda r: (f"--workers {r['workers']} ({r['scenario']})", scaling_label(r)),
        "backlog": lambda r: (f"backlog {r['events']:,} ({r['scenario']})",
                              f"in-flight limit {r['max_inflight_events']:,}"),
    }
    for key, labels in extra_runs.items():
        if key in doc:
            r = doc[key]
            t.add_row(*labels(r), _f(r["relay_events_per_s"]), _f(r["steady_events_per_s"]),
                      _f(r["vendor_deliveries_per_s"]), _f(r["relay_requests_per_s"]), "", "", "", "",
                      _f(r["p50_ms"]), _f(r["p95_ms"]), _f(r["p99_ms"]), _f(r["peak_rss_mb"]),
                      _f(r["cpu_s_per_1k"], 3))
    return t


OUTAGE_HEAD = ("fault", "before isolation", "healthy during ÷ before (min)", "per vendor",
               "peak parked backlog", "drained after heal s", "redriven/s", "broken vendor's rate before /s",
               "peak RSS MB", "lost")
LEFT = ("fault", "per vendor")


def outage_rows(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per fault shape of the outage run (empty when it did not run)."""
    o = doc.get("outage") or {}
    rows = []
    shapes = o.get("shapes", {})
    order = ("hang", "503", "429")  # the order (the results file sorts its keys)
    for shape in sorted(shapes, key=lambda k: order.index(k) if k in order else len(order)):
        r = shapes[shape]
        rec = r["recovery"]
        per = ", ".join(f"{v} {_f(h['ratio'], 2)}" for v, h in r["healthy"].items())
        rows.append((f"{shape}: {r['title']}", _f(o["before_isolation"].get(shape), 2),
                     _f(r["healthy_ratio_min"], 2), per, _f(r["parked_backlog_peak"]),
                     _f(rec["drain_seconds"], 1) if rec["drained"] else "not drained",
                     _f(rec.get("drain_rate_per_s")), _f(r["broken"]["normal_per_s"]), _f(r["peak_rss_mb"]),
                     _f(r["lost"]) if r["lost"] is not None else f"? ({r['not_final_at_end']:,} pairs not final)"))
    return rows


def outage_table(doc: dict[str, Any]) -> Table:
    o = doc["outage"]
    t = Table(title=f"outage run: {', '.join(o['vendors'])} at {o['rate_events_per_s']:,.0f} events/s, "
                    f"{o['broken']} broken for {o['outage_s']:g} s after {o['before_s']:g} s")
    for c in OUTAGE_HEAD:
        t.add_column(c, justify="left" if c in LEFT else "right")
    for row in outage_rows(doc):
        t.add_row(*row)
    return t


def print_report(doc: dict[str, Any], console: Console) -> None:
    if doc.get("outage", {}).get("shapes"):
        console.print(outage_table(doc))
        o = doc["outage"]
        healthy = ", ".join(v for v in o["vendors"] if v != o["broken"])
        console.print(f"outage: healthy = {healthy}; their delivered rate during the outage ÷ the last 3/4 of the "
                      "stretch before; drained = every parked event redriven and settled, from the heal; redriven/s "
                      "over that time.")
    if not doc["scenarios"]:
        _targets(doc, console)
        return
    console.print(table(doc))
    console.print("events/s: every pre-loaded event settled by every vendor, from the group join on; steady: "
                  "10% -> 90% settled (no start-up, no last batch window), what ratio and scaling use.")
    console.print("scenario latency: a run of its own at half the scenario's measured rate (Kafka timestamp -> "
                  "vendor ack, the relay's histogram); in the --workers and backlog rows it includes the wait in "
                  "the pre-loaded backlog.")
    if "client_ceiling" in doc:
        console.print(client_table(doc))
    _targets(doc, console)


def client_table(doc: dict[str, Any]) -> Table:
    """The client ceiling row: the relay's sender and aiohttp's own client on the same requests, and each
    scenario's relay CPU a request, all in, over the bare client's."""
    c = doc["client_ceiling"]
    t = Table(title=f"client ceiling: {c['vendor']}'s requests, {c['concurrency']} concurrent, median of "
                    f"{c['rounds']} alternating rounds of {c['requests_per_round']:,}")
    cols = ("relay sender us/req", "aiohttp client us/req", "sender ÷ aiohttp",
            *(col for k, sc in doc["scenarios"].items() if "relay_over_bare_client" in sc
              for col in (f"scenario {k}: relay all in ÷ aiohttp",
                          f"scenario {k}: adapters' floor + aiohttp ÷ aiohttp")))
    for col in cols:
        t.add_column(col, justify="right")
    t.add_row(_f(c["relay_sender_cpu_us_per_request"], 1), _f(c["aiohttp_cpu_us_per_request"], 1),
              _f(c["sender_over_aiohttp"], 2),
              *(_f(sc.get(k), 2) for sc in doc["scenarios"].values() if "relay_over_bare_client" in sc
                for k in ("relay_over_bare_client", "floor_over_bare_client")))
    return t


def _targets(doc: dict[str, Any], console: Console) -> None:
    for name, t in doc.get("targets", {}).items():
        mark = "[green]met[/]" if t["met"] else "[red]missed[/]"
        console.print(f"  target {name}: want {t['want']}, got {t['got']}: {mark}")


def write(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")


def markdown(doc: dict[str, Any]) -> str:
    """The table as Markdown, for the READMEs: ``python -m bench.report bench/results/latest.json``."""
    head = COLUMNS
    rows = [head, tuple("---" if c in ("run", "vendors", "ratio") else "---:" for c in head)]

    def row(name: str, vendors: str, r: dict[str, Any], ceilings: tuple[str, ...] = ("", "", "", ""),
            latency: bool = True) -> tuple[str, ...]:
        lat = [_f(r[k]) for k in ("p50_ms", "p95_ms", "p99_ms")] if latency else ["(backlog)", "", ""]
        return (name, vendors, _f(r["relay_events_per_s"]), _f(r["steady_events_per_s"]),
                _f(r["vendor_deliveries_per_s"]), _f(r["relay_requests_per_s"]), *ceilings, *lat,
                _f(r["peak_rss_mb"]), _f(r["cpu_s_per_1k"], 3))

    for key, sc in doc["scenarios"].items():
        if "skipped" not in sc:
            rows.append(row(f"scenario {key}", ", ".join(sc["vendors"]), sc, (
                _f(sc["http_ceiling_requests_per_s"]), _decode(sc), f"{sc['ratio']:.2f} ({sc['binding']})",
                _floor(sc))))
    if "scaling" in doc:
        r = doc["scaling"]
        rows.append(row(f"`--workers {r['workers']}` ({r['scenario']})", scaling_label(r), r, latency=False))
    if "backlog" in doc:
        r = doc["backlog"]
        rows.append(row(f"backlog {r['events']:,} ({r['scenario']})",
                        f"in-flight limit {r['max_inflight_events']:,}", r, latency=False))
    text = "\n".join("| " + " | ".join(r) + " |" for r in rows) if len(rows) > 2 else ""
    if outage_rows(doc):
        out = [OUTAGE_HEAD, tuple("---" if c in LEFT else "---:" for c in OUTAGE_HEAD),
               *outage_rows(doc)]
        text += ("\n\n" if text else "") + "\n".join("| " + " | ".join(r) + " |" for r in out)
    return text


if __name__ == "__main__":
    import sys

    import orjson as _orjson

    print(markdown(_orjson.loads(Path(sys.argv[1]).read_bytes())))
