"""The benchmark's local stack and its instruments: the broker, the sandbox in fast mode,
pre-loaded topics, a /proc sampler for the relay's CPU and RSS, and a Prometheus scraper."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Producer

from processor.devstack.broker import LocalBroker, free_port
from processor.devstack.kafka_io import produce
from processor.devstack.samples import Workload, encode
from processor.devstack.waiting import wait_for

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def free_port_pair() -> int:
    """A port p with p and p+1 free (``processor run --workers 2`` serves metrics on port + i)."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no free pair of ports")


# -- the workload ---------------------------------------------------------------
def workload_messages(n: int, seed: int = 7) -> Iterator[tuple[bytes, bytes]]:
    """(key, Confluent-framed Avro value) for the benchmark: ``samples.Workload`` with 50k visitors
    (sessions of 1-6 product views, 4% of sessions ending in an order of 1-5 items)."""
    for kind, rec, key in itertools.islice(iter(Workload(visitors=50_000, seed=seed)), n):
        yield key, encode(kind, rec)


def produce_all(bootstrap: str, topic: str, messages: Iterable[tuple[bytes, bytes]]) -> int:
    """Produce every message (keyed: a visitor's events stay in one partition) in large batches, for a
    fast pre-load. Returns the count."""
    return produce(bootstrap, topic, messages, settings={
        "linger.ms": 50, "batch.size": 1_000_000, "queue.buffering.max.kbytes": 1_048_576})


def _kept(messages: Iterator[tuple[bytes, bytes]], keep: list[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
    for m in messages:
        keep.append(m)
        yield m


class Pacer(threading.Thread):
    """Produces ``values`` at ``rate`` messages/s (Kafka CreateTime = the moment of produce) for a
    bounded number of messages, or until ``stop``; the latency and outage runs' steady load."""

    def __init__(self, bootstrap: str, topic: str, values: list[tuple[bytes, bytes]], rate: float,
                 count: int) -> None:
        super().__init__(daemon=True, name="bench-pacer")
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 3,
                                  "queue.buffering.max.messages": 1_000_000})
        self.topic = topic
        self.values = values
        self.rate = rate
        self.count = count
        self.sent = 0
        self.error: BaseException | None = None
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Stop producing (what was sent is flushed): the outage run's load ends when its backlog drained."""
        self._stopped.set()

    def run(self) -> None:
        try:
            started = time.monotonic()
            source = itertools.cycle(self.values)
            while self.sent < self.count and not self._stopped.is_set():
                due = min(self.count, int((time.monotonic() - started) * self.rate) + 1)
                while self.sent < due:
                    key, value = next(source)
                    self.producer.produce(self.topic, key=key, value=value)
                    self.sent += 1
                self.producer.poll(0)
                time.sleep(0.002)
            self.producer.flush(30)
        except BaseException as exc:  # reported by the caller
            self.error = exc


# -- the stack --------------------------------------------------------------
class Stack:
    """Broker + sandbox (``processor sandbox --keep 0``: validation on, no faults, counts only)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.broker = LocalBroker(log_path=workdir / "broker.log")
        self.sandbox_port = free_port()
        self.sandbox_url = f"http://127.0.0.1:{self.sandbox_port}"
        self.sandbox: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Stack:
        self.broker.start()
        with open(self.workdir / "sandbox.log", "ab") as log:
            self.sandbox = subprocess.Popen(
                [sys.executable, "-m", "processor.cli", "sandbox", "--port", str(self.sandbox_port), "--keep", "0"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: http_get(f"{self.sandbox_url}/_sandbox/stats")[0] == 200, 30, "the sandbox")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sandbox is not None and self.sandbox.poll() is None:
            self.sandbox.terminate()
            try:
                self.sandbox.wait(10)
            except subprocess.TimeoutExpired:
                self.sandbox.kill()
        self.broker.stop()

    def pids(self) -> dict[str, int]:
        out = {}
        if self.sandbox is not None:
            out["sandbox"] = self.sandbox.pid
        if self.broker.proc is not None:
            out["broker"] = self.broker.proc.pid
        return out

    def reset_sandbox(self) -> None:
        req = urllib.request.Request(f"{self.sandbox_url}/_sandbox/reset", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5):
            pass


# -- the relay's process tree, from /proc ------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
            out.append(int(entry))
    return out


def proc_sample(pid: int) -> tuple[float, int, int] | None:
    """(cpu seconds of the process and its threads, RSS kB, peak RSS kB)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read().decode()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    rss = hwm = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return cpu, rss, hwm


class ProcWatch(threading.Thread):
    """Samples a process and its children (``--workers N``) every ``step`` seconds: CPU seconds
    (kept per pid, so a child that exits still counts) and peak RSS (VmHWM, per process)."""

    def __init__(self, pid: int, step: float = 0.25) -> None:
        super().__init__(daemon=True, name="bench-procwatch")
        self.root = pid
        self.step = step
        self.cpu: dict[int, float] = {}
        self.peak_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> None:
        pids = [self.root, *_children(self.root)]
        with self._lock:
            for pid in pids:
                s = proc_sample(pid)
                if s is None:
                    continue
                cpu, rss, hwm = s
                self.cpu[pid] = cpu
                self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), rss, hwm)

    def run(self) -> None:
        while not self._stop.wait(self.step):
            self.sample()

    def cpu_seconds(self) -> float:
        self.sample()
        with self._lock:
            return sum(self.cpu.values())

    def peak_rss_mb(self) -> float:
        """The largest peak RSS of one process of the tree (a worker's, with ``--workers N``)."""
        self.sample()
        with self._lock:
            workers = {p: kb for p, kb in self.peak_kb.items() if p != self.root or len(self.peak_kb) == 1}
            return max(workers.values(), default=0) / 1024

    def stop(self) -> None:
        self._stop.set()


# -- Prometheus text --------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str, prefixes: tuple[str, ...] = ("processor_",)) -> list[Sample]:
    out = []
    for line in text.splitlines():
        if not line.startswith(prefixes):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels: dict[str, str] = {}
        if rest:
            for part in rest.rstrip("}").split('",'):
                if "=" in part:
                    k, _, v = part.partition("=")
                    labels[k.strip(",")] = v.strip('"')
        out.append(Sample(name, labels, float(value)))
    return out


def scrape(ports: list[int], prefixes: tuple[str, ...] = ("processor_",), only: tuple[str, ...] = ()) -> list[Sample]:
    """The relay's samples whose names start with one of ``prefixes``; ``only`` (sample names) asks the
    relay to render just those (``/metrics?name[]=``): what a scrape ten times a second costs the relay."""
    out: list[Sample] = []
    query = "?" + "&".join(f"name[]={name}" for name in only) if only else ""
    for port in ports:
        status, body = http_get(f"http://127.0.0.1:{port}/metrics{query}")
        if status == 200:
            out += parse_metrics(body.decode(), prefixes)
    return out


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def histogram_quantiles(samples: list[Sample], name: str, qs: tuple[float, ...]) -> dict[float, float | None]:
    """Quantiles of a Prometheus histogram summed over every label set (vendors, workers), with the
    linear interpolation inside a bucket that ``histogram_quantile`` uses."""
    buckets: dict[float, float] = {}
    for s in samples:
        if s.name == f"{name}_bucket":
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
    bounds = sorted(buckets)
    count = buckets.get(float("inf"), 0.0)
    out: dict[float, float | None] = {}
    for q in qs:
        if not count:
            out[q] = None
            continue
        rank = q * count
        prev_bound, prev_count = 0.0, 0.0
        value = None
        for b in bounds:
            c = buckets[b]
            if c >= rank:
                if b == float("inf"):
                    value = prev_bound  # beyond the last finite bucket: its bound is all we know
                else:
                    value = prev_bound + (b - prev_bound) * ((rank - prev_count) / (c - prev_count) if c > prev_count
                                                             else 1.0)
                break
            prev_bound, prev_count = b, c
        out[q] = value
    return out
