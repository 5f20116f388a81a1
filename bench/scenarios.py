"""Which vendors each scenario sends to, the relay config for it, and one measured relay run.

Vendors are configured exactly as the demo configures them: each adapter's
``example_settings(sandbox_url)`` + ``example_env``, with the adapter's own
default batch limits, concurrency and retry policy (what an operator gets).
A vendor whose adapter or sandbox twin is not there yet is skipped with a note.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bench.stack import (
    Pacer,
    ProcWatch,
    Stack,
    free_port_pair,
    histogram_quantiles,
    http_get,
    scrape,
    total,
)
from processor.devstack.broker import LOCAL_CONSUMER_SETTINGS
from processor.devstack.waiting import wait_for
from processor.sandbox.server import available_twins
from processor.vendors import adapter_class

ALL = ("qubit", "quicklizard", "convert", "tracardi", "convead")
SCENARIOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "a": ("array vendors (Qubit, QuickLizard; Convert in its batched v1 mode when the adapter offers it)",
          ("qubit", "quicklizard", "convert:batched")),
    "b": ("per-visitor and per-event vendors (Convert in the document's format, Tracardi, Convead)",
          ("convert", "tracardi", "convead")),
    "c": ("all five vendors", ALL),
}
DLQ = "bench.dlq"
RETRY_PREFIX = "bench.retry"  # parking: one retry topic per vendor and relay run, bench.retry.<run>.<ns>.<vendor>
T = TypeVar("T")


def _batched_choice(model: type[Any]) -> tuple[str, Any] | None:
    """(field, value) that selects a batched API (many visitors a request) in a settings model."""
    fields = getattr(model, "model_fields", {})
    for name in ("api", "mode", "format", "api_version"):
        f = fields.get(name)
        if f is not None and "v1" in str(f.annotation):
            return name, "v1"
    return None


def batched_settings(cls: type[Any], settings: dict[str, Any]) -> dict[str, Any] | None:
    """``settings`` switched to the adapter's batched mode (Convert's v1 API, per site or as an
    option), or None when the adapter offers none."""
    choice = _batched_choice(cls.Site)
    if choice is not None:
        name, value = choice
        return {**settings, "sites": {k: {**site, name: value} for k, site in settings["sites"].items()}}
    choice = _batched_choice(getattr(cls, "Options", object))
    if choice is not None:
        name, value = choice
        return {**settings, "options": {**settings.get("options", {}), name: value}}
    return None


def vendor_settings(spec: str, sandbox_url: str) -> tuple[str, dict[str, Any], dict[str, str]] | str:
    """(name, settings, env) for a vendor spec (``convert:batched``), or a note saying why it is skipped."""
    name, _, variant = spec.partition(":")
    if name not in available_twins():
        return f"{name}: no sandbox twin yet"
    try:
        cls = adapter_class(name)
        settings = dict(cls.example_settings(sandbox_url))
    except (ImportError, AttributeError, NotImplementedError) as exc:
        return f"{name}: no adapter with example settings yet ({type(exc).__name__})"
    if variant == "batched":
        batched = batched_settings(cls, settings)
        if batched is None:
            return f"{name}: the adapter offers no batched mode"
        settings = batched
    return name, settings, dict(cls.example_env)


@dataclass
class Scenario:
    key: str
    title: str
    vendors: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)  # vendor -> "convert:batched" when a variant

    @classmethod
    def build(cls, key: str, sandbox_url: str, title: str | None = None,
              specs: tuple[str, ...] | None = None) -> Scenario:
        """One of ``SCENARIOS``, or (``title``, ``specs``) of the caller's own (the outage run's)."""
        if title is None or specs is None:
            title, specs = SCENARIOS[key]
        sc = cls(key, title)
        for spec in specs:
            got = vendor_settings(spec, sandbox_url)
            if isinstance(got, str):
                sc.notes.append(got)
                continue
            name, settings, env = got
            sc.vendors[name] = settings
            sc.env.update(env)
            sc.tags[name] = spec
            if spec.endswith(":batched"):
                sc.notes.append(f"{name}: in its batched mode (v1 API)")
        return sc


def relay_config(bootstrap: str, topic: str, group: str, vendors: dict[str, Any], metrics_port: int,
                 retry_prefix: str = RETRY_PREFIX, **relay: Any) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": group, "topics": [topic],
                  "client": dict(LOCAL_CONSUMER_SETTINGS)},
        "deadletter": {"topic": DLQ},
        "parking": {"topic_prefix": retry_prefix},
        "relay": {"shutdown_grace_s": 20, **relay},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "logging": {"level": "INFO", "format": "json"},
        "vendors": vendors,
    }


def batch_window_ms(config: dict[str, Any]) -> int:
    """The longest max_wait_ms of the configured vendors (explicit, else the adapter's default)."""
    waits = []
    for name, settings in config["vendors"].items():
        batch = settings.get("batch") or {}
        waits.append(batch.get("max_wait_ms") or adapter_class(name).default_batch.max_wait_ms)
    return max(waits, default=0)


@dataclass
class RunResult:
    seconds: float
    events: int
    delivered: float
    filtered: float
    dead_lettered: float
    requests: float
    error_requests: float
    cpu_s: float
    peak_rss_mb: float
    latency_ms: dict[str, float | None]
    per_vendor: dict[str, dict[str, float]]
    log: str
    stack_cpu_s: dict[str, float] = field(default_factory=dict)  # the sandbox's and the broker's
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (seconds, events settled)
    cpu_marks: list[dict[str, float]] = field(default_factory=list)  # CPU seconds at each timeline point

    def _steady_span(self) -> tuple[int, int] | None:
        """Timeline indexes of 10% and 90% settled; None when that stretch is under 2 s: settlements come
        a batch at a time, too lumpy to time shorter."""
        lo = next((i for i, (_, n) in enumerate(self.timeline) if n >= 0.1 * self.events), None)
        hi = next((i for i, (_, n) in enumerate(self.timeline) if n >= 0.9 * self.events), None)
        if lo is None or hi is None or self.timeline[hi][0] - self.timeline[lo][0] < 2.0:
            return None
        return lo, hi

    def steady_rate(self) -> float | None:
        """Events/s between 10% and 90% settled: the rate without start-up and the last batch window."""
        span = self._steady_span()
        if span is None:
            return None
        (t0, n0), (t1, n1) = self.timeline[span[0]], self.timeline[span[1]]
        return (n1 - n0) / (t1 - t0)

    def steady_cores(self) -> dict[str, float] | None:
        """Cores the relay (all workers), the sandbox and the broker used between 10% and 90% settled,
        and their total: how much of the machine the steady stretch had."""
        span = self._steady_span()
        if span is None or len(self.cpu_marks) != len(self.timeline):
            return None
        dt = self.timeline[span[1]][0] - self.timeline[span[0]][0]
        a, b = self.cpu_marks[span[0]], self.cpu_marks[span[1]]
        cores = {k: round((b[k] - a[k]) / dt, 2) for k in b}
        cores["total"] = round(sum(cores.values()), 2)
        return cores

    def as_dict(self) -> dict[str, Any]:
        s = max(self.seconds, 1e-9)
        return {
            "seconds": round(self.seconds, 3),
            "events_measured": self.events,
            "relay_events_per_s": round(self.events / s, 1),
            "steady_events_per_s": None if (r := self.steady_rate()) is None else round(r, 1),
            "relay_requests_per_s": round(self.requests / s, 1),
            "vendor_deliveries_per_s": round(self.delivered / s, 1),
            "p50_ms": _r(self.latency_ms["p50"]),
            "p95_ms": _r(self.latency_ms["p95"]),
            "p99_ms": _r(self.latency_ms["p99"]),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "cpu_s_per_1k": round(self.cpu_s / max(self.events, 1) * 1000, 4),
            "relay_cpu_us_per_request": round(self.cpu_s / max(self.requests, 1) * 1e6, 1),
            # cores busy during the run: the relay's, and what the sandbox and the broker took beside it
            "cores_used": {"relay": round(self.cpu_s / s, 2),
                           **{k: round(v / s, 2) for k, v in self.stack_cpu_s.items()}},
            "steady_cores_used": self.steady_cores(),
            "requests": int(self.requests),
            "error_requests": int(self.error_requests),
            "delivered": int(self.delivered),
            "filtered": int(self.filtered),
            "dead_lettered": int(self.dead_lettered),
            "per_vendor": self.per_vendor,
            "timeline": [(round(t, 2), int(n)) for t, n in self.timeline[:: max(1, len(self.timeline) // 60)]],
            "log": self.log,
        }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


class RelayRun:
    """``processor run`` (optionally ``--workers N``) against a pre-loaded topic, measured from the moment
    every worker is assigned (``/readyz``) until every event is settled by every vendor (counted by the
    relay's ``processor_vendor_events_total``: delivered, filtered or dead-lettered)."""

    def __init__(self, stack: Stack, workdir: Path, name: str, scenario: Scenario, topic: str, events: int,
                 workers: int = 1, pacer: Pacer | None = None, profile_dir: Path | None = None,
                 **relay: Any) -> None:
        self.stack = stack
        self.name = name
        self.scenario = scenario
        self.events = events
        self.workers = workers
        self.pacer = pacer
        port = free_port_pair() if workers > 1 else 0
        ns = time.time_ns()
        # retry topics of its own: a later run's redrive (a new group, from the earliest offset) must not
        # deliver what an earlier run parked
        self.retry_prefix = f"{RETRY_PREFIX}.{name}.{ns}"
        self.config = relay_config(stack.broker.bootstrap, topic, f"bench-{name}-{ns}", scenario.vendors, port,
                                   self.retry_prefix, **relay)
        self.config_path = workdir / f"{name}.yaml"
        self.log_path = workdir / f"{name}.log"
        self.ports: list[int] = []
        self._port = port
        self.profile_dir = profile_dir

    def _ports(self) -> list[int]:
        if self.workers > 1:
            return [self._port + i for i in range(self.workers)]
        for line in self.log_path.read_text(errors="replace").splitlines():  # port 0: read it from the log
            if "metrics on http://" in line:
                return [int(line.split("metrics on http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])]
        return []

    def _settled(self, samples: list[Any]) -> float:
        return min((total(samples, "processor_vendor_events_total", vendor=v) for v in self.config["vendors"]),
                   default=0.0)

    def run(self, timeout_s: float) -> RunResult:
        return self.launch(lambda proc, watch: self._measure(proc, watch, timeout_s))

    def launch(self, measure: Callable[[subprocess.Popen[bytes], ProcWatch], T]) -> T:
        """Start the relay, ``measure`` it (with its /proc sampler), stop it (SIGTERM, then kill)."""
        self.stack.broker.create_topics({f"{self.retry_prefix}.{v}": 1 for v in self.config["vendors"]})
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        cmd = [sys.executable, "-m", "processor.cli", "run", "--config", str(self.config_path)]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        with open(self.log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **self.scenario.env})
        watch = ProcWatch(proc.pid)
        watch.start()
        try:
            return measure(proc, watch)
        finally:
            watch.stop()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _profile(self, pid: int) -> subprocess.Popen[bytes] | None:
        """py-spy (``pip install py-spy``) on the relay while it is measured: collapsed stacks, one line per
        stack with its sample count (``bench/profile.py`` summarises them)."""
        if self.profile_dir is None:
            return None
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"{self.name}.txt"
        cmd = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--output", str(out),
               *os.environ.get("BENCH_PYSPY_ARGS", "").split()]
        if self.workers > 1:
            cmd.append("--subprocesses")
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _alive(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"relay {self.name} exited with {proc.returncode}:\n{tail}")

    def wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Until every worker answers /readyz (joined its group); its metrics ports are then known."""
        def ready() -> bool:
            self._alive(proc)
            self.ports = self._ports()
            return len(self.ports) == self.workers and all(
                http_get(f"http://127.0.0.1:{p}/readyz", 2)[0] == 200 for p in self.ports)

        wait_for(ready, 90, f"relay {self.name} to join the group", 0.02)

    def _measure(self, proc: subprocess.Popen[bytes], watch: ProcWatch, timeout_s: float) -> RunResult:
        self.wait_ready(proc)
        others = {name: ProcWatch(pid) for name, pid in self.stack.pids().items()}
        t0 = time.monotonic()
        cpu0 = watch.cpu_seconds()
        others0 = {name: w.cpu_seconds() for name, w in others.items()}
        before = scrape(self.ports)  # a worker may have started before the others joined
        settled0 = self._settled(before)
        profiler = self._profile(proc.pid)
        if self.pacer is not None:
            self.pacer.start()
        deadline = t0 + timeout_s
        timeline: list[tuple[float, float]] = []
        cpu_marks: list[dict[str, float]] = []
        while True:
            self._alive(proc)
            if self.pacer is not None and self.pacer.error is not None:
                raise RuntimeError(f"the load producer failed: {self.pacer.error}")
            settled = self._settled(scrape(self.ports, ("processor_vendor_events_total",),
                                           only=("processor_vendor_events_total",)))
            timeline.append((time.monotonic() - t0, settled - settled0))
            cpu_marks.append({"relay": watch.cpu_seconds(), **{k: w.cpu_seconds() for k, w in others.items()}})
            if settled >= self.events:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"relay {self.name}: {settled:.0f} of {self.events} events settled after "
                                   f"{timeout_s:.0f}s; see {self.log_path}")
            time.sleep(0.1)  # 10 Hz: each scrape renders only the one counter (a full one costs the relay ~2 ms)
        t1 = time.monotonic()
        cpu1 = watch.cpu_seconds()
        stack_cpu = {name: w.cpu_seconds() - others0[name] for name, w in others.items()}
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            profiler.wait(60)
        peak = watch.peak_rss_mb()
        samples = scrape(self.ports)
        q = histogram_quantiles(samples, "processor_delivery_latency_seconds", (0.5, 0.95, 0.99))
        def diff(name: str, **labels: str) -> float:
            return total(samples, name, **labels) - total(before, name, **labels)

        per_vendor = {}
        for v in self.config["vendors"]:
            per_vendor[v] = {
                "requests": diff("processor_vendor_requests_total", vendor=v),
                "delivered": diff("processor_vendor_events_total", vendor=v, outcome="delivered"),
                "filtered": diff("processor_vendor_events_total", vendor=v, outcome="filtered"),
                "dead_lettered": diff("processor_vendor_events_total", vendor=v, outcome="dead_lettered"),
            }
        return RunResult(
            seconds=t1 - t0,
            events=int(self.events - settled0),
            delivered=sum(p["delivered"] for p in per_vendor.values()),
            filtered=sum(p["filtered"] for p in per_vendor.values()),
            dead_lettered=sum(p["dead_lettered"] for p in per_vendor.values()),
            requests=sum(p["requests"] for p in per_vendor.values()),
            error_requests=sum(diff("processor_vendor_requests_total", status_class=c)
                               for c in ("error", "4xx", "5xx")),
            cpu_s=cpu1 - cpu0,
            peak_rss_mb=peak,
            latency_ms={k: (None if v is None else v * 1000) for k, v in zip(("p50", "p95", "p99"), q.values(),
                                                                               strict=True)},
            per_vendor=per_vendor,
            log=str(self.log_path),
            stack_cpu_s=stack_cpu,
            timeline=timeline,
            cpu_marks=cpu_marks,
        )
