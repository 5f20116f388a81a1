"""``make run``: the whole local stack, with events flowing until Ctrl-C.

Starts the Kafka-protocol broker on loopback, creates the topics, starts the
vendor sandbox, writes a relay config for every vendor that has a twin, runs
``processor run`` against it, produces a steady stream of sample events (with
an occasional undecodable one, to show the dead-letter topic) and prints a
live table of what each vendor received.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Producer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from processor.devstack.broker import LOCAL_CONSUMER_SETTINGS, LocalBroker
from processor.devstack.samples import Workload, encode
from processor.sandbox.server import available_twins
from processor.vendors import REGISTRY, adapter_class

TOPIC, DLQ = "shop.events", "shop.events.dlq"
WORKDIR = Path(".demo")


def demo_config(bootstrap: str, sandbox_url: str, metrics_port: int) -> tuple[dict[str, Any], dict[str, str]]:
    vendors: dict[str, Any] = {}
    env: dict[str, str] = {}
    for name in available_twins():
        cls = adapter_class(name)
        try:
            settings = cls.example_settings(sandbox_url)
        except NotImplementedError:
            continue
        vendors[name] = {**settings, "batch": {"max_events": 200, "max_wait_ms": 500}}
        env.update(cls.example_env)
    config = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": "event-relay-demo", "topics": [TOPIC],
                  "client": dict(LOCAL_CONSUMER_SETTINGS)},
        # one record a produce batch: the local broker reports a partition's end as the first offset of its
        # last batch, so `processor dlq` and the parked backlog would stop short of the end (local only)
        "deadletter": {"topic": DLQ, "producer": {"batch.num.messages": 1}},
        "relay": {"shutdown_grace_s": 10},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "logging": {"format": "json"},
        "vendors": vendors,
    }
    return config, env


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return ""


def delivered_by_vendor(metrics_text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("processor_vendor_events_total{") and 'outcome="delivered"' in line:
            vendor = line.split('vendor="', 1)[1].split('"', 1)[0]
            out[vendor] = out.get(vendor, 0) + float(line.rsplit(" ", 1)[1])
    return out


def metric_sum(metrics_text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _table(produced: int, vendors: list[str], sandbox_url: str, metrics_url: str) -> Table:
    stats = json.loads(_get(f"{sandbox_url}/_sandbox/stats") or "{}")
    metrics = _get(f"{metrics_url}/metrics")
    delivered = delivered_by_vendor(metrics)
    dead = metric_sum(metrics, "processor_dlq_events_total")
    consumed = metric_sum(metrics, "processor_events_consumed_total")
    t = Table(title=f"events produced: {produced}   consumed: {consumed:.0f}   dead-lettered: {dead:.0f}")
    for col in ("vendor", "sandbox requests", "sandbox accepted rows", "relay delivered events"):
        t.add_column(col, justify="right" if col != "vendor" else "left")
    for v in vendors:
        s = stats.get(v, {})
        t.add_row(v, str(s.get("requests", 0)), str(s.get("accepted", 0)), f"{delivered.get(v, 0):.0f}")
    return t


def run_demo(rate: float = 50.0, metrics_port: int = 9400, sandbox_port: int = 8088) -> int:
    console = Console()
    WORKDIR.mkdir(exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    broker = LocalBroker(log_path=WORKDIR / "broker.log")
    producer: Producer | None = None
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        console.print("[bold]starting the local Kafka-protocol broker[/]")
        broker.start()
        broker.create_topics({TOPIC: 3, DLQ: 1, **{f"{TOPIC}.retry.{v}": 1 for v in REGISTRY}})
        sandbox_url = f"http://127.0.0.1:{sandbox_port}"
        with open(WORKDIR / "sandbox.log", "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "processor.cli", "sandbox", "--port",
                                           str(sandbox_port)], stdout=log, stderr=subprocess.STDOUT))
        config, env = demo_config(broker.bootstrap, sandbox_url, metrics_port)
        cfg_path = WORKDIR / "relay.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        with open(WORKDIR / "relay.log", "ab") as log:
            relay = subprocess.Popen([sys.executable, "-m", "processor.cli", "run", "--config", str(cfg_path)],
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        procs.append(relay)
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        vendors = list(config["vendors"])
        console.print(f"""
[bold]local stack is up[/]
  broker        {broker.bootstrap}   topics {TOPIC} (3 partitions), {DLQ}, {TOPIC}.retry.<vendor>
  sandbox       {sandbox_url}/_sandbox/stats   (what each vendor twin accepted)
  relay         {metrics_url}/metrics   {metrics_url}/readyz
  relay config  {cfg_path}   logs in {WORKDIR}/  (relay.log, sandbox.log, broker.log)
  vendors       {", ".join(vendors)}
producing ~{rate:g} events/s (1 in 200 undecodable, to show the dead-letter topic); Ctrl-C stops everything.
""")
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 10, "log_level": 3})
        workload = iter(Workload(visitors=2000, start_ms=int(time.time() * 1000)))
        produced = 0
        started = time.monotonic()
        with Live(_table(produced, vendors, sandbox_url, metrics_url), console=console, refresh_per_second=1) as live:
            next_draw = 0.0
            while not stop:
                if relay.poll() is not None:
                    console.print(f"[red]relay exited with {relay.returncode}; see {WORKDIR}/relay.log[/]")
                    return 1
                due = int((time.monotonic() - started) * rate)
                while produced < due:
                    kind, rec, key = next(workload)
                    rec["event_time"] = int(time.time() * 1000)
                    value = encode(kind, rec) if produced % 200 != 199 else b"\x00\x00\x00\x00\x09broken"
                    producer.produce(TOPIC, key=key, value=value)
                    produced += 1
                producer.poll(0)
                if time.monotonic() >= next_draw:
                    live.update(_table(produced, vendors, sandbox_url, metrics_url))
                    next_draw = time.monotonic() + 1
                time.sleep(0.02)
        producer.flush(10)
        console.print("stopping the relay (it drains and commits)...")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        producer = None  # freed before the broker goes, so librdkafka has nothing to reconnect
        broker.stop()
        console.print("stopped.")
