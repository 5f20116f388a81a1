"""The outage run (issue 12): vendors on a steady stream, one of them broken for a while.

Qubit, QuickLizard, Tracardi and Convead (unless ``vendors`` names others; each with its example settings
against the sandbox) take a paced stream of ``rate`` events/s. For each fault shape, on a fresh topic,
retry topics and relay: ``before_s`` of steady load, then one vendor (``vendor``: Convead unless chosen)
broken in the sandbox for ``seconds``, then healed; the load goes on until its parked backlog is drained
(at most ``drain_max_s``), then stops and every event is waited for. Everything is read from the relay's
own metrics, sampled twice a second:

* healthy vendors' delivered rate during the outage / before it (``processor_vendor_events_total``);
* the parked backlog (``processor_parked_events``; and parked minus redriven, from the counters);
* the time from the heal until the backlog is empty, and the redrive's delivered rate over it
  (``processor_redriven_events_total``) against the broken vendor's own delivered rate before the outage;
* per vendor, each event once: lost = produced - (delivered + filtered + dead-lettered + expired), when
  nothing is still parked or unsettled at the end (a redriven event counts once: ``vendor_events``
  minus ``redriven`` by outcome); the sandbox's accepted count checks delivered from the vendor's side.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.scenarios import RelayRun, Scenario
from bench.stack import Pacer, ProcWatch, Stack, proc_sample, scrape, total, workload_messages

VENDORS = ("qubit", "quicklizard", "tracardi", "convead")
BROKEN = "convead"  # the default broken vendor (the table); ``--outage-vendor`` picks another
EVENT_TWINS = ("qubit", "tracardi", "convead")  # their sandbox twins count accepted events (QuickLizard: rows)
# (sandbox faults, how the issue names it, healthy vendors' rate during / before measured before isolation)
SHAPES: dict[str, tuple[dict[str, Any], str, float]] = {
    "hang": ({"timeout_rate": 1.0, "hang_s": 30.0}, "requests hang past the client timeout", 0.23),
    "503": ({"error_rate": 1.0, "error_status": 503}, "503 at once", 0.46),
    "429": ({"throttle_rate": 1.0, "retry_after_s": 5.0}, "429 with Retry-After: 5", 0.35),
}
TARGETS = {"healthy_ratio": 0.9, "rss_mb": 300, "drain_ratio": 1.0}
OUTCOMES = ("delivered", "filtered", "dead_lettered", "parked")
REDRIVEN = ("delivered", "filtered", "dead_lettered", "parked", "expired")
PREFIXES = ("processor_vendor_events_total", "processor_redriven_events_total", "processor_parked_",
            "processor_vendor_breaker_state", "processor_vendor_concurrency_limit", "processor_inflight_events",
            "processor_source_paused")


@dataclass
class OutageOptions:
    seconds: float = 60.0
    rate: float = 1500.0
    before_s: float = 20.0
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    drain_max_s: float | None = None  # default: max(60, 3 x seconds)
    partitions: int = 6
    vendor: str = BROKEN  # the one broken
    vendors: tuple[str, ...] = VENDORS  # all of them, the broken one among them

    @property
    def drain_cap_s(self) -> float:
        return self.drain_max_s if self.drain_max_s is not None else max(60.0, 3 * self.seconds)


def outage_scenario(sandbox_url: str, broken: str = BROKEN, vendors: tuple[str, ...] = VENDORS) -> Scenario:
    return Scenario.build("outage", sandbox_url, f"{', '.join(vendors)} on a steady stream, {broken} broken",
                          vendors)


# -- what one scrape says, per vendor -----------------------------------------------------
def snapshot(ports: list[int], vendors: list[str]) -> dict[str, dict[str, float]]:
    samples = scrape(ports, PREFIXES)
    out = {}
    for v in vendors:
        c = {o: total(samples, "processor_vendor_events_total", vendor=v, outcome=o) for o in OUTCOMES}
        c.update({f"redriven_{o}": total(samples, "processor_redriven_events_total", vendor=v, outcome=o)
                  for o in REDRIVEN})
        c["backlog"] = total(samples, "processor_parked_events", vendor=v)
        c["breaker"] = total(samples, "processor_vendor_breaker_state", vendor=v)
        c["limit"] = total(samples, "processor_vendor_concurrency_limit", vendor=v)
        c["inflight"] = total(samples, "processor_inflight_events", vendor=v)
        c["source_paused"] = total(samples, "processor_source_paused")
        for why in ("breaker_open", "budget_full", "retry_budget"):
            c[f"parked_{why}"] = total(samples, "processor_parked_total", vendor=v, reason=why)
        out[v] = c
    return out


def settled_once(c: dict[str, float]) -> float:
    """Events the live path settled, each once: a parked event redriven later counts as parked only."""
    return sum(c[o] - c[f"redriven_{o}"] for o in OUTCOMES)


def outstanding(c: dict[str, float]) -> float:
    """Parked records not yet taken back and settled by the redrive (a record parked again counts again)."""
    return c["parked"] - sum(c[f"redriven_{o}"] for o in REDRIVEN)


def final_counts(c: dict[str, float], produced: int, accepted: float | None = None) -> dict[str, Any]:
    """Each produced event's final outcome: delivered (live or redriven), filtered, dead-lettered, or expired on
    the retry topic. Not final at the end: still parked, or not yet settled by the live path (unconsumed or in
    flight; at least once, they are delivered later). ``lost`` (produced minus final outcomes) only when every
    event is final, else None; ``accepted`` (the sandbox's count, where its twin counts events) checks the
    relay's delivered count from the vendor's side."""
    out: dict[str, Any] = {
        "produced": produced, "delivered": c["delivered"], "filtered": c["filtered"],
        "dead_lettered": c["dead_lettered"], "expired": c["redriven_expired"],
        "parked": c["parked"] - c["redriven_parked"], "redriven_delivered": c["redriven_delivered"],
        "still_parked": max(0.0, outstanding(c)), "unsettled": produced - settled_once(c)}
    out = {k: int(v) for k, v in out.items()}
    final = sum(out[k] for k in ("delivered", "filtered", "dead_lettered", "expired"))
    out["not_final_at_end"] = produced - final
    out["lost"] = produced - final if out["still_parked"] == 0 and out["unsettled"] == 0 else None
    if accepted is not None:
        out["vendor_accepted_minus_delivered"] = int(accepted - c["delivered"])
    return out


@dataclass
class Mark:
    t: float
    phase: str
    counts: dict[str, dict[str, float]]
    rss_mb: float = 0.0


def rate(marks: list[Mark], i: int, j: int, vendor: str, key: str = "delivered") -> float:
    a, b = marks[i], marks[j]
    return (b.counts[vendor][key] - a.counts[vendor][key]) / max(b.t - a.t, 1e-9)


def index_at(marks: list[Mark], t: float) -> int:
    """The first mark at or after ``t`` (the last one if none)."""
    return next((i for i, m in enumerate(marks) if m.t >= t), len(marks) - 1)


def summarise(marks: list[Mark], t_fault: float, t_heal: float, t_drained: float | None, before_s: float,
              vendors: list[str], broken: str = BROKEN) -> dict[str, Any]:
    """The rates and times of one shape from its marks (pure: unit-tested)."""
    i0 = index_at(marks, t_fault - 0.75 * before_s)  # the first quarter of the stretch is start-up
    i_fault, i_heal = index_at(marks, t_fault), index_at(marks, t_heal)
    healthy = {}
    for v in vendors:
        if v == broken:
            continue
        before, during = rate(marks, i0, i_fault, v), rate(marks, i_fault, i_heal, v)
        healthy[v] = {"before_per_s": round(before, 1), "during_per_s": round(during, 1),
                      "ratio": round(during / before, 3) if before else None}
    normal = rate(marks, i0, i_fault, broken)
    back = marks[i_heal:]
    peak_backlog = max((m.counts[broken]["backlog"] for m in marks), default=0.0)
    peak_outstanding = max((outstanding(m.counts[broken]) for m in marks), default=0.0)
    closed = next((m.t for m in back if m.counts[broken]["breaker"] == 0), None)
    start_redriven = marks[i_heal].counts[broken]["redriven_delivered"]
    first = next((m.t for m in back if m.counts[broken]["redriven_delivered"] > start_redriven), None)
    recovery: dict[str, Any] = {
        "breaker_closed_after_s": None if closed is None else round(max(0.0, closed - t_heal), 1),
        "first_redrive_after_s": None if first is None else round(first - t_heal, 1),
        "drained": t_drained is not None,
        "drain_seconds": None if t_drained is None else round(t_drained - t_heal, 1),
    }
    if peak_outstanding == 0:
        recovery["nothing_parked"] = True  # no backlog to drain (a short 429 is retried in place)
    elif t_drained is not None:
        i_end = index_at(marks, t_drained)
        redriven = marks[i_end].counts[broken]["redriven_delivered"] - start_redriven
        recovery["redriven_delivered"] = int(redriven)
        recovery["drain_rate_per_s"] = round(redriven / max(t_drained - t_heal, 1e-9), 1)
        if first is not None and t_drained > first:
            recovery["drain_rate_after_first_redrive_per_s"] = round(redriven / (t_drained - first), 1)
        recovery["drain_ratio"] = round(recovery["drain_rate_per_s"] / normal, 3) if normal else None
    ratios = [h["ratio"] for h in healthy.values() if h["ratio"] is not None]
    return {
        "healthy": healthy, "healthy_ratio_min": min(ratios, default=None),
        "broken": {"vendor": broken, "normal_per_s": round(normal, 1),
                   "during_per_s": round(rate(marks, i_fault, i_heal, broken), 1)},
        "parked_backlog_peak": int(peak_backlog), "parked_outstanding_peak": int(peak_outstanding),
        "recovery": recovery,
    }


def _sandbox(url: str, path: str, method: str = "GET", body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read() or b"null")


class OutageShape:
    """One fault shape: a fresh topic, retry topics and relay; the phases; the results."""

    def __init__(self, stack: Stack, workdir: Path, sc: Scenario, shape: str, opts: OutageOptions,
                 values: list[tuple[bytes, bytes]], relay_opts: dict[str, Any]) -> None:
        self.stack, self.sc, self.shape, self.opts = stack, sc, shape, opts
        self.broken = opts.vendor
        self.topic = f"bench.outage.{shape}.{time.time_ns()}"
        stack.broker.create_topics({self.topic: opts.partitions})
        self.pacer = Pacer(stack.broker.bootstrap, self.topic, values, opts.rate,
                           int(opts.rate * (opts.before_s + opts.seconds + opts.drain_cap_s + 60)))
        self.relay = RelayRun(stack, workdir, f"outage-{shape}", sc, self.topic, 0, **relay_opts)
        self.marks: list[Mark] = []

    def run(self, console: Console) -> dict[str, Any]:
        self.stack.reset_sandbox()
        _sandbox(self.stack.sandbox_url, f"/_sandbox/faults/{self.broken}", "DELETE")
        return self.relay.launch(lambda proc, watch: self._measure(proc, watch, console))

    def _mark(self, proc: subprocess.Popen[bytes], t0: float, phase: str) -> Mark:
        self.relay._alive(proc)
        if self.pacer.error is not None:
            raise RuntimeError(f"the load producer failed: {self.pacer.error}")
        m = Mark(time.monotonic() - t0, phase, snapshot(self.relay.ports, list(self.sc.vendors)))
        sample = proc_sample(proc.pid)
        m.rss_mb = sample[1] / 1024 if sample else 0.0
        self.marks.append(m)
        return m

    def _until(self, proc: subprocess.Popen[bytes], t0: float, phase: str, end: float,
               done: Callable[[Mark], bool] = lambda m: False) -> float | None:
        """Mark every 0.5 s until ``end`` (seconds after t0) or until ``done``; the time it was done."""
        while True:
            m = self._mark(proc, t0, phase)
            if done(m):
                return m.t
            if m.t >= end:
                return None
            time.sleep(min(0.5, max(0.0, end - m.t)))

    def _measure(self, proc: subprocess.Popen[bytes], watch: ProcWatch, console: Console) -> dict[str, Any]:
        o, url, b = self.opts, self.stack.sandbox_url, self.broken
        faults, title, _ = SHAPES[self.shape]
        load = [round(x, 2) for x in os.getloadavg()]
        self.relay.wait_ready(proc)
        t0 = time.monotonic()
        cpu0 = watch.cpu_seconds()
        self.pacer.start()
        self._until(proc, t0, "before", o.before_s)
        _sandbox(url, f"/_sandbox/faults/{self.broken}", "PUT", faults)
        t_fault = time.monotonic() - t0
        console.print(f"  {self.shape}: {self.broken} broken ({title}) at {t_fault:.1f}s for {o.seconds:g}s...")
        self._until(proc, t0, "outage", t_fault + o.seconds)
        _sandbox(url, f"/_sandbox/faults/{self.broken}", "DELETE")
        t_heal = time.monotonic() - t0
        self._mark(proc, t0, "drain")

        emptied: list[float] = []  # when the counters first said every parked record was redriven and settled

        def drained(m: Mark) -> bool:  # and the relay's backlog gauge agrees (it is refreshed every 2 s)
            c = m.counts[self.broken]
            if outstanding(c) > 0:
                emptied.clear()  # parked again since (the breaker was still open, say)
            elif not emptied:
                emptied.append(m.t)
            return bool(emptied) and c["backlog"] == 0

        t_gauge = self._until(proc, t0, "drain", t_heal + o.drain_cap_s, drained)
        t_drained = emptied[0] if emptied and t_gauge is not None else None
        self.pacer.stop()
        self.pacer.join(60)
        produced = self.pacer.sent

        def settled(m: Mark) -> bool:
            return all(settled_once(c) >= produced and outstanding(c) <= 0 for c in m.counts.values())

        t_settled = self._until(proc, t0, "settle", self.marks[-1].t + 60, settled)
        t_end = t_settled or self.marks[-1].t
        cpu = watch.cpu_seconds() - cpu0
        last = self.marks[-1].counts
        stats = _sandbox(url, "/_sandbox/stats")
        per_vendor = {v: final_counts(c, produced, stats.get(v, {}).get("accepted", 0) if v in EVENT_TWINS else None)
                      for v, c in last.items()}
        lost = [p["lost"] for p in per_vendor.values()]
        out = {
            "shape": self.shape, "fault": faults, "title": title, "load_average_at_start": load,
            "rate_events_per_s": o.rate, "before_s": o.before_s, "outage_s": o.seconds,
            "fault_at_s": round(t_fault, 1), "healed_at_s": round(t_heal, 1), "produced": produced,
            **summarise(self.marks, t_fault, t_heal, t_drained, o.before_s, list(self.sc.vendors), self.broken),
            "backlog_gauge_zero_after_s": None if t_gauge is None else round(t_gauge - t_heal, 1),
            "parked_total": {why: int(last[self.broken][f"parked_{why}"])
                             for why in ("breaker_open", "budget_full", "retry_budget")},
            "peak_rss_mb": round(watch.peak_rss_mb(), 1),
            "relay_cores_used": round(cpu / max(t_end, 1e-9), 2),
            "per_vendor": per_vendor,
            "lost": None if None in lost else sum(lost),  # type: ignore[arg-type]
            "not_final_at_end": sum(p["not_final_at_end"] for p in per_vendor.values()),
            "still_parked": sum(p["still_parked"] for p in per_vendor.values()),
            "settled": t_settled is not None,
            "sandbox": {v: {k: stats.get(v, {}).get(k, 0) for k in ("requests", "accepted", "rejected", "faults")}
                        for v in self.sc.vendors},
            "timeline": [(round(m.t, 1), m.phase, *(int(m.counts[v]["delivered"]) for v in self.sc.vendors),
                          int(outstanding(m.counts[b])), int(m.counts[b]["backlog"]), int(m.counts[b]["limit"]),
                          int(m.counts[b]["inflight"]), int(m.counts[b]["source_paused"]), round(m.rss_mb))
                         for m in self.marks[:: max(1, len(self.marks) // 120)]],
            "timeline_columns": ["t_s", "phase", *(f"{v}_delivered" for v in self.sc.vendors),
                                 f"{b}_parked_outstanding", f"{b}_parked_backlog_gauge", f"{b}_concurrency_limit",
                                 f"{b}_inflight_events", "source_paused", "relay_rss_mb"],
            "log": str(self.relay.log_path),
        }
        r = out["recovery"]
        console.print(f"  {self.shape}: healthy during/before min {out['healthy_ratio_min']}, peak backlog "
                      f"{out['parked_backlog_peak']}, drained {r['drain_seconds']}s after the heal at "
                      f"{r.get('drain_rate_per_s')}/s ({self.broken} normally {out['broken']['normal_per_s']}/s), "
                      f"peak RSS {out['peak_rss_mb']} MB, lost {out['lost']} "
                      f"(not final at the end: {out['not_final_at_end']})")
        return out


def outage_run(stack: Stack, workdir: Path, opts: OutageOptions, relay_opts: dict[str, Any],
               console: Console) -> dict[str, Any]:
    sc = outage_scenario(stack.sandbox_url, opts.vendor, opts.vendors)
    doc: dict[str, Any] = {
        "vendors": list(sc.vendors), "broken": opts.vendor, "rate_events_per_s": opts.rate, "before_s": opts.before_s,
        "outage_s": opts.seconds, "drain_max_s": opts.drain_cap_s, "partitions": opts.partitions,
        "notes": sc.notes, "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "shapes": {},
        # measured on the landed relay in the setup only (Convead broken among the four)
        "before_isolation": ({k: SHAPES[k][2] for k in SHAPES}
                             if (opts.vendor, tuple(opts.vendors)) == (BROKEN, VENDORS) else {}),
    }
    if opts.vendor not in sc.vendors or len(sc.vendors) < 2:
        doc["skipped"] = f"needs {opts.vendor} and a healthy vendor: {'; '.join(sc.notes)}"
        return doc
    values = list(workload_messages(int(min(100_000, max(1_000, opts.rate * 60))), seed=13))
    console.print(f"outage: {', '.join(sc.vendors)} at {opts.rate:g} events/s; {opts.vendor} broken for "
                  f"{opts.seconds:g}s after {opts.before_s:g}s, shapes {', '.join(opts.shapes)}")
    for shape in opts.shapes:
        doc["shapes"][shape] = OutageShape(stack, workdir, sc, shape, opts, values, relay_opts).run(console)
    shapes = doc["shapes"].values()
    ratios = [s["healthy_ratio_min"] for s in shapes if s["healthy_ratio_min"] is not None]
    drains = [s["recovery"].get("drain_ratio") for s in shapes if not s["recovery"].get("nothing_parked")]
    doc["healthy_ratio_min"] = min(ratios, default=None)
    doc["peak_rss_mb"] = max((s["peak_rss_mb"] for s in shapes), default=None)
    lost = [s["lost"] for s in shapes]
    doc["lost"] = None if None in lost else sum(lost)  # type: ignore[arg-type]
    doc["not_final_at_end"] = sum(s["not_final_at_end"] for s in shapes)
    doc["drains_measured"] = len(drains)  # shapes that parked anything
    doc["drain_ratio_min"] = None if None in drains or not drains else min(drains)  # type: ignore[type-var]
    return doc


def targets(doc: dict[str, Any]) -> dict[str, Any]:
    """Met or missed, for the results file's ``targets``."""
    if doc.get("skipped") or not doc["shapes"]:
        return {}
    ratio, rss, drain = doc["healthy_ratio_min"], doc["peak_rss_mb"], doc["drain_ratio_min"]
    return {
        "outage_healthy_ratio": {"want": f">= {TARGETS['healthy_ratio']} in every shape", "got": ratio,
                                 "met": ratio is not None and ratio >= TARGETS["healthy_ratio"]},
        "outage_rss": {"want": f"<= {TARGETS['rss_mb']} MB", "got": rss, "met": rss <= TARGETS["rss_mb"]},
        "outage_lost": {"want": "0 (every event final at the end)",
                        "got": doc["lost"] if doc["lost"] is not None else f"{doc['not_final_at_end']} not final",
                        "met": doc["lost"] == 0},
        "outage_drain": {"want": f"redriven/s >= {TARGETS['drain_ratio']}x {doc['broken']}'s rate before, every shape",
                         "got": drain if doc["drains_measured"] else "nothing parked",
                         "met": not doc["drains_measured"] or (drain is not None and drain >= TARGETS["drain_ratio"])},
    }
