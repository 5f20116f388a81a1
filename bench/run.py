"""One benchmark run: stack up, pre-load, both ceilings, the scenarios, the latency, scaling and
backlog runs, the outage run; returns the results document that ``bench/results/latest.json`` holds."""

from __future__ import annotations

import datetime as dt
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.ceilings import adapter_floor, client_ceiling, decode_ceiling, mix_ceiling, planned_requests, vendor_ceiling
from bench.outage import OutageOptions, outage_run
from bench.outage import targets as outage_targets
from bench.scenarios import DLQ, RelayRun, Scenario, batch_window_ms
from bench.stack import Pacer, Stack, produce_all, workload_messages

TOPIC = "bench.events"
TARGETS = {"ratio": 0.6, "scaling": 1.7, "p99_over_window_ms": 250, "backlog_rss_mb": 300,
           "relay_over_bare_client": 1.4}


@dataclass
class Options:
    events: int = 200_000
    scenarios: list[str] = field(default_factory=lambda: ["a", "b", "c"])
    backlog: int = 1_000_000
    workers: int = 2
    latency_seconds: float = 15.0
    http_seconds: float = 3.0
    sample: int = 20_000
    partitions: int = 6
    transport: str = "aiohttp"
    workdir: Path | None = None
    profile_dir: Path | None = None
    outage: OutageOptions = field(default_factory=OutageOptions)  # seconds 0: no outage run


def _timeout(events: int) -> float:
    return 90 + events / 500  # generous: a stuck run fails, a slow one is measured


def run(opts: Options, console: Console) -> dict[str, Any]:
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "events": opts.events, "cores": os.cpu_count(), "partitions": opts.partitions,
        "transport": opts.transport, "python": platform.python_version(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "latency_source": "the relay's processor_delivery_latency_seconds histogram (Kafka CreateTime -> vendor "
                          "2xx), summed over vendors and workers, quantiles interpolated inside buckets",
        "workdir": str(workdir), "scenarios": {},
    }
    relay_opts: dict[str, Any] = {} if opts.transport == "aiohttp" else {"http_transport": opts.transport}
    started = time.monotonic()
    with Stack(workdir) as stack:
        bootstrap = stack.broker.bootstrap
        stack.broker.create_topics({TOPIC: opts.partitions, DLQ: 1})  # each relay run creates its retry topics
        values: list[tuple[bytes, bytes]] = []
        doc["decode_ceiling_events_per_s"] = None
        if opts.scenarios:  # the pre-load and the decode ceiling serve the scenarios only
            t = time.perf_counter()
            values = list(workload_messages(opts.events))
            produce_all(bootstrap, TOPIC, values)
            doc["preload_seconds"] = round(time.perf_counter() - t, 2)
            doc["event_bytes_avg"] = round(sum(len(v) for _, v in values) / max(len(values), 1), 1)
            console.print(f"pre-loaded {opts.events} events into {TOPIC} ({opts.partitions} partitions) "
                          f"in {doc['preload_seconds']}s; work dir {workdir}")

            dec = decode_ceiling(bootstrap, TOPIC, opts.events)
            doc["decode_ceiling"] = dec
            doc["decode_ceiling_events_per_s"] = dec["events_per_s"]
            console.print(f"decode ceiling: {dec['events_per_s']:.0f} events/s")
        else:
            console.print(f"no scenario: no pre-load, no decode ceiling; work dir {workdir}")

        runs: dict[str, Scenario] = {}
        vendor_ceilings: dict[str, dict[str, Any]] = {}
        for key in opts.scenarios:
            sc = Scenario.build(key, stack.sandbox_url)
            for note in sc.notes:
                console.print(f"  scenario {key}: {note}")
            entry: dict[str, Any] = {"title": sc.title, "vendors": list(sc.vendors), "notes": sc.notes}
            doc["scenarios"][key] = entry
            if not sc.vendors:
                entry["skipped"] = "no vendor of this scenario is available yet"
                console.print(f"[yellow]scenario {key} skipped: no vendor available[/]")
                continue
            entry["floor"] = adapter_floor(sc.vendors, sc.env, values, opts.sample)
            console.print(f"scenario {key}: adapters' floor {entry['floor']['floor_cpu_us_per_event']} us/event "
                          f"(decode alone {entry['floor']['decode_cpu_us_per_event']}): decode ratio at most "
                          f"{entry['floor']['decode_over_floor']}")
            entry["http_ceiling"] = _http_ceiling(sc, values, opts, vendor_ceilings)
            entry["http_ceiling_requests_per_s"] = entry["http_ceiling"]["requests_per_s"]
            console.print(f"scenario {key} ({', '.join(sc.vendors)}): HTTP ceiling "
                          f"{entry['http_ceiling_requests_per_s']:.0f} requests/s "
                          f"({entry['http_ceiling']['events_per_s']:.0f} events/s); running the relay...")
            # the decode ceiling again next to this run: the machine drifts by a tenth between minutes
            entry["decode_ceiling"] = decode_ceiling(bootstrap, TOPIC, opts.events)
            stack.reset_sandbox()
            res = RelayRun(stack, workdir, f"scenario-{key}", sc, TOPIC, opts.events, profile_dir=opts.profile_dir,
                           **relay_opts).run(
                _timeout(opts.events)).as_dict()
            # a pre-loaded backlog's latency is its age: kept apart, the scenario's own is at half load below
            entry["drain_latency_ms"] = {q: res.pop(f"{q}_ms") for q in ("p50", "p95", "p99")}
            entry.update(res)
            entry["batch_window_ms"] = batch_window_ms({"vendors": sc.vendors})
            _ratio(entry, entry["decode_ceiling"]["events_per_s"])
            runs[key] = sc
            console.print(f"  {res['relay_events_per_s']:.0f} events/s end to end ({_steady(res):.0f} steady), "
                          f"{res['relay_requests_per_s']:.0f} requests/s, ratio {entry['ratio']} "
                          f"({entry['binding']}-bound)")
            if res["dead_lettered"] or res["error_requests"]:
                console.print(f"  [yellow]{res['dead_lettered']} dead-lettered, {res['error_requests']} failed "
                              f"requests: see {res['log']}[/]")
            entry.update({f"{q}_ms": None for q in ("p50", "p95", "p99")})  # no latency run: not measured
            if opts.latency_seconds > 0:
                lat = _latency_run(stack, workdir, sc, entry, values, opts, relay_opts, console)
                entry["half_load"] = lat
                entry.update({f"{q}_ms": lat[f"{q}_ms"] for q in ("p50", "p95", "p99")})
        if runs:
            doc["client_ceiling"] = _client_ceiling(runs, doc, values, opts, console)
            top = "c" if "c" in runs else max(runs, key=lambda k: len(runs[k].vendors))
            doc["http_ceiling_scenario"] = top
            doc["http_ceiling_requests_per_s"] = doc["scenarios"][top]["http_ceiling_requests_per_s"]
            doc["http_ceiling_by_vendor"] = vendor_ceilings

        lat_key = "c" if "c" in runs else next(iter(runs), None)
        if lat_key is not None and "half_load" in doc["scenarios"][lat_key]:
            doc["latency"] = doc["scenarios"][lat_key]["half_load"]
        scale_key = "a" if "a" in runs else next(iter(runs), None)
        if opts.workers > 1 and scale_key is not None:
            one = doc["scenarios"][scale_key]
            console.print(f"scaling: scenario {scale_key} with --workers {opts.workers}...")
            res = RelayRun(stack, workdir, f"scaling-{opts.workers}w", runs[scale_key], TOPIC, opts.events,
                           workers=opts.workers, **relay_opts).run(_timeout(opts.events)).as_dict()
            res.pop("per_vendor")
            doc["scaling"] = {
                "scenario": scale_key, "workers": opts.workers,
                "one_worker_events_per_s": one["relay_events_per_s"], "one_worker_steady_events_per_s": _steady(one),
                **res,
                "speedup": round(_steady(res) / max(_steady(one), 1e-9), 2),
                "speedup_end_to_end": round(res["relay_events_per_s"] / max(one["relay_events_per_s"], 1e-9), 2)}
            per_core = [_per_relay_core(r) for r in (one, res)]
            if None not in per_core:  # what each core the relays got did: is the machine or the relay the limit?
                doc["scaling"]["steady_events_per_relay_core"] = {"one_worker": per_core[0], "workers": per_core[1]}
                doc["scaling"]["per_core_efficiency"] = round(per_core[1] / per_core[0], 2)  # type: ignore[operator]
            console.print(f"  {_steady(res):.0f} events/s steady = {doc['scaling']['speedup']}x one worker "
                          f"({doc['scaling']['speedup_end_to_end']}x end to end)")
            for label, run in (("one worker", one), (f"{opts.workers} workers", res)):
                if run.get("steady_cores_used"):
                    console.print(f"  cores used, steady, {label}: " + ", ".join(
                        f"{k} {v}" for k, v in run["steady_cores_used"].items()) + f" (of {doc['cores']})")
        if opts.backlog > 0 and scale_key is not None:
            doc["backlog"] = _backlog_run(stack, workdir, runs[scale_key], opts, relay_opts, console)
        if opts.outage.seconds > 0 and opts.outage.shapes:
            doc["outage"] = outage_run(stack, workdir, opts.outage, relay_opts, console)
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["targets"] = _targets(doc)
    return doc


def _http_ceiling(sc: Scenario, values: list[tuple[bytes, bytes]], opts: Options,
                  cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    planned, sampled = planned_requests(sc.vendors, sc.env, values, opts.sample)
    per_vendor = {}
    for name, (adapter, requests) in planned.items():
        tag = sc.tags[name]  # convert:batched in scenario a, convert in b and c
        if tag not in cache:
            cache[tag] = vendor_ceiling(adapter, requests, opts.transport, opts.http_seconds) if requests else {
                "requests_per_s": 0.0, "events_per_s": 0.0, "concurrency": adapter.settings.concurrency,
                "non_2xx": 0}
        per_vendor[name] = {**cache[tag], "requests_per_event": round(len(requests) / max(sampled, 1), 4)}
    return {**mix_ceiling(per_vendor), "sampled_events": sampled, "per_vendor": per_vendor}


def _client_ceiling(runs: dict[str, Scenario], doc: dict[str, Any], values: list[tuple[bytes, bytes]],
                    opts: Options, console: Console) -> dict[str, Any]:
    """The relay's sender against aiohttp's own client on the smallest requests of the run (Convead's form
    POSTs where it ran), and the relay's CPU a request (all in) against the bare client's in each scenario
    that sends that vendor's requests (an array vendor's few big requests make the ratio meaningless)."""
    first = next(iter(runs.values()))
    vendor = "convead" if any("convead" in sc.vendors for sc in runs.values()) else next(iter(first.vendors))
    sc = next(sc for sc in runs.values() if vendor in sc.vendors)
    planned, _ = planned_requests({vendor: sc.vendors[vendor]}, sc.env, values, opts.sample)
    adapter, requests = planned[vendor]
    out = client_ceiling(adapter, requests, count=max(500, int(2000 * opts.http_seconds / 3)))
    bare = out["aiohttp_cpu_us_per_request"]
    with_vendor = [key for key, sc in runs.items() if vendor in sc.vendors]  # requests of a like kind only
    for key in with_vendor:
        entry = doc["scenarios"][key]
        entry["relay_over_bare_client"] = round(entry["relay_cpu_us_per_request"] / max(bare, 1e-9), 2)
        floor = entry.get("floor", {}).get("floor_cpu_us_per_request")
        if floor is not None:  # a relay doing nothing but the adapters' floor and the bare client's work
            entry["floor_over_bare_client"] = round((floor + bare) / max(bare, 1e-9), 2)
    console.print(f"client ceiling ({vendor}, {out['concurrency']} concurrent): relay sender "
                  f"{out['relay_sender_cpu_us_per_request']} us/request, aiohttp's client {bare} us/request "
                  f"({out['sender_over_aiohttp']}x); relay all in over the bare client: " + ", ".join(
                      f"{k} {doc['scenarios'][k]['relay_over_bare_client']}x (the adapters' floor alone: "
                      f"{doc['scenarios'][k].get('floor_over_bare_client')}x)" for k in with_vendor))
    return out


def _per_relay_core(res: dict[str, Any]) -> float | None:
    """Steady events/s per core the relay used in that stretch."""
    cores = res.get("steady_cores_used") or {}
    rate = res.get("steady_events_per_s")
    return round(rate / cores["relay"], 1) if rate and cores.get("relay") else None


def _steady(res: dict[str, Any]) -> float:
    """The steady rate (10% -> 90% settled) when the run was long enough to have one, else end to end."""
    return res.get("steady_events_per_s") or res["relay_events_per_s"]


def _ratio(entry: dict[str, Any], decode_eps: float) -> None:
    """Steady rates against the ceilings (which are steady rates too): the end-to-end rate of a finite
    backlog also pays start-up and the last batch window, up to 2 s here, whatever the throughput."""
    steady = _steady(entry)
    requests_per_event = entry["requests"] / max(entry["events_measured"], 1)
    by_decode = steady / max(decode_eps, 1e-9)
    by_http = steady * requests_per_event / max(entry["http_ceiling_requests_per_s"], 1e-9)
    entry["ratio_decode"] = round(by_decode, 3)
    entry["ratio_http"] = round(by_http, 3)
    entry["ratio"] = round(max(by_decode, by_http), 3)
    entry["binding"] = "decode" if by_decode >= by_http else "http"


def _latency_run(stack: Stack, workdir: Path, sc: Scenario, measured: dict[str, Any],
                 values: list[tuple[bytes, bytes]], opts: Options, relay_opts: dict[str, Any],
                 console: Console) -> dict[str, Any]:
    rate = max(1.0, _steady(measured) / 2)
    count = max(1, int(rate * opts.latency_seconds))
    topic = f"bench.latency.{sc.key}.{time.time_ns()}"
    stack.broker.create_topics({topic: opts.partitions})
    console.print(f"latency: scenario {sc.key} at {rate:.0f} events/s (half its max) for {opts.latency_seconds:g}s...")
    pacer = Pacer(stack.broker.bootstrap, topic, values, rate, count)
    res = RelayRun(stack, workdir, f"latency-{sc.key}", sc, topic, count, pacer=pacer, **relay_opts).run(
        _timeout(count) + opts.latency_seconds).as_dict()
    res.pop("per_vendor")
    window = batch_window_ms({"vendors": sc.vendors})
    out = {"scenario": sc.key, "rate_events_per_s": round(rate, 1), "events": count, "batch_window_ms": window,
           "target_p99_ms": window + TARGETS["p99_over_window_ms"], **res}
    console.print(f"  p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms (batch window {window} ms)")
    return out


def _backlog_run(stack: Stack, workdir: Path, sc: Scenario, opts: Options, relay_opts: dict[str, Any],
                 console: Console) -> dict[str, Any]:
    topic = f"bench.backlog.{time.time_ns()}"
    stack.broker.create_topics({topic: opts.partitions})
    t = time.perf_counter()
    produce_all(stack.broker.bootstrap, topic, workload_messages(opts.backlog, seed=11))
    console.print(f"backlog: {opts.backlog} events waiting ({time.perf_counter() - t:.0f}s to load); "
                  f"scenario {sc.key}...")
    stack.reset_sandbox()
    res = RelayRun(stack, workdir, "backlog", sc, topic, opts.backlog, **relay_opts).run(
        _timeout(opts.backlog)).as_dict()
    res.pop("per_vendor")
    from processor.config import RelayConfig

    out = {"scenario": sc.key, "events": opts.backlog,
           "max_inflight_events": RelayConfig().max_inflight_events, **res}
    console.print(f"  {res['relay_events_per_s']:.0f} events/s, peak RSS {res['peak_rss_mb']} MB")
    return out


def _targets(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, sc in doc["scenarios"].items():
        if "ratio" in sc:
            out[f"ratio_{key}"] = {"want": f">= {TARGETS['ratio']}", "got": sc["ratio"],
                                   "met": sc["ratio"] >= TARGETS["ratio"]}
    if "scaling" in doc:
        s = doc["scaling"]
        out["scaling"] = {"want": f">= {TARGETS['scaling']}x", "got": s["speedup"],
                          "met": s["speedup"] >= TARGETS["scaling"]}
    if "latency" in doc and doc["latency"]["p99_ms"] is not None:
        lat = doc["latency"]
        out["p99_half_load"] = {"want": f"<= {lat['target_p99_ms']} ms", "got": lat["p99_ms"],
                                "met": lat["p99_ms"] <= lat["target_p99_ms"]}
    if "backlog" in doc:
        b = doc["backlog"]
        out["backlog_rss"] = {"want": f"<= {TARGETS['backlog_rss_mb']} MB", "got": b["peak_rss_mb"],
                              "met": b["peak_rss_mb"] <= TARGETS["backlog_rss_mb"]}
    b = doc["scenarios"].get("b", {})
    if "relay_over_bare_client" in b:
        out["request_cost_b"] = {"want": f"<= {TARGETS['relay_over_bare_client']}x aiohttp's client a request",
                                 "got": b["relay_over_bare_client"],
                                 "met": b["relay_over_bare_client"] <= TARGETS["relay_over_bare_client"]}
    if "outage" in doc:
        out.update(outage_targets(doc["outage"]))
    return out
