"""The dashboard and the alert rules against the real thing: a real Prometheus server scrapes a relay
running on the local stack (broker, vendor sandbox) with events flowing and faults injected, every
dashboard query returns data, and an alert rule fires when its condition is made true."""

from __future__ import annotations

import http.server
import json
import math
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from processor.devstack.broker import free_port
from processor.devstack.kafka_io import produce
from processor.devstack.samples import encode, make_view, with_changes
from processor.events import EventKind
from processor.metrics import relay_version
from tests.deploy.tools import RULES, concrete, dashboard_targets, load_dashboard, tool
from tests.integration.conftest import http_json, http_text, wait_for
from tests.integration.test_all_vendors import start_relay, wait_settled, workload_messages

REFUSING = "convead"  # answers every request 400: its events are rejected and dead-lettered
FLAKY = "qubit"       # answers the first request of every chunk 503: retried
PARKING = "quicklizard"  # down (503) for the first two chunks: its breaker opens, its events park, then redrive
# what Grafana makes of $__rate_interval with a 1 s scrape interval (four scrape intervals, plus one)
RATE_INTERVAL = "5s"
CHUNKS = 4
# the alert evaluated live; its `for` is dropped here (the promtool unit tests cover `for`)
LIVE_ALERT = "RelayVendorErrorRatioHigh"


# kube-state-metrics as the cluster would expose the relay's container (the Restarts panel and the restart
# alerts read it): a static exposition on loopback, scraped with its own labels kept (honor_labels)
KSM_EXPOSITION = (b'kube_pod_container_status_restarts_total{namespace="e2e",pod="event-relay-0",container="relay"} 2\n'
                  b'kube_pod_container_status_restarts_total{namespace="e2e",pod="other-0",container="app"} 5\n')


class _KsmHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(KSM_EXPOSITION)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def kube_state_metrics() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KsmHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(10)


class PrometheusProcess:
    def __init__(self, workdir: Path, target: str, ksm_target: str) -> None:
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == LIVE_ALERT:
                    rule["for"] = "0s"
        (workdir / "rules.yaml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            # the labels the ServiceMonitor gives the relay's targets in Kubernetes
            "scrape_configs": [{"job_name": "event-relay", "static_configs": [
                {"targets": [target], "labels": {"namespace": "e2e", "pod": "event-relay-0"}}]},
                {"job_name": "kube-state-metrics", "honor_labels": True, "static_configs": [
                    {"targets": [ksm_target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address={self.url[7:]}",
                 "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        wait_for(lambda: self.alive() and http_text(f"{self.url}/-/ready")[0] == 200, 30, "prometheus to be ready")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
        return True

    def api(self, path: str, **params: Any) -> Any:
        body = http_json(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert body["status"] == "success", body
        return body["data"]

    def value(self, expr: str) -> float | None:
        """The instant value of a one-series expression (None while it has no data)."""
        result = self.api("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def query_range(self, expr: str, start: float) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=start, end=time.time(), step=1)["result"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


@pytest.fixture
def prometheus(tmp_path: Path, kube_state_metrics: str) -> Iterator[Callable[[str], PrometheusProcess]]:
    started: list[PrometheusProcess] = []

    def start(target: str) -> PrometheusProcess:
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        started.append(PrometheusProcess(workdir, target, kube_state_metrics))
        return started[-1]

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.stop()


def no_profile_view(i: int) -> bytes:
    view = make_view(900 + i, i)
    del view["visitor"]["vendor_ids"]["tracardi_profile_id"]
    return encode(EventKind.PRODUCT_VIEW, with_changes(view, "event_id", f"no-profile-{i}"))


def finite_points(result: list[dict[str, Any]]) -> int:
    return sum(1 for series in result for _, v in series["values"] if math.isfinite(float(v)))


def test_prometheus_scrapes_the_relay_and_every_panel_has_data(broker, topics, sandbox, relays, prometheus):
    start = time.time()
    messages, kinds = workload_messages()
    sandbox.faults(REFUSING, error_rate=1.0, error_status=400)
    relay, _ = start_relay(broker, topics, sandbox, relays)
    prom = prometheus(f"127.0.0.1:{relay.metrics_port}")
    wait_for(lambda: prom.value('up{job="event-relay"}') == 1, 30, "prometheus to scrape the relay")

    # events arrive in chunks, each once Prometheus has seen the one before: every counter then grows
    # between two scrapes, and rates and quantiles have something to show (a series' first sample is not
    # an increase). Each chunk carries an undecodable message and a view without a Tracardi profile id
    # (Tracardi creates the profile: the profile_created note).
    consumed = 0
    kinds[EventKind.PRODUCT_VIEW] += CHUNKS
    sandbox.faults(PARKING, error_rate=1.0, error_status=503)
    for i in range(CHUNKS):
        if i == 2:
            sandbox.faults(PARKING)  # recovered: what it parked is redriven
        chunk = [(b"garbage-%d" % i, b"not an avro message"), (b"no-profile-%d" % i, no_profile_view(i)),
                 *messages[i::CHUNKS]]
        sandbox.faults(FLAKY, burst=1, error_status=503)
        produce(broker.bootstrap, topics.events, chunk)
        consumed += len(chunk)
        wait_for(lambda n=consumed: prom.value("sum(processor_events_consumed_total)") == n, 30,
                 f"prometheus to see {consumed} events consumed")
    wait_for(lambda: relay.metric("processor_parked_total", vendor=PARKING) > 0
             and relay.metric("processor_redriven_events_total", vendor=PARKING, outcome="delivered")
             == relay.metric("processor_parked_total", vendor=PARKING), 90, f"{PARKING}'s parked events redriven")
    settled = wait_settled(relay, kinds)
    assert settled[REFUSING]["dead_lettered"] > 0 and settled[REFUSING]["delivered"] == 0
    wait_for(lambda: prom.value(f'sum(processor_vendor_events_total{{vendor="{REFUSING}", outcome="dead_lettered"}})')
             == settled[REFUSING]["dead_lettered"], 30, "prometheus to scrape the settled counts")

    missing = []
    for title, expr in dashboard_targets(load_dashboard()):
        result = prom.query_range(concrete(expr, RATE_INTERVAL), start)
        if not finite_points(result):
            missing.append((title, expr))
    assert not missing, json.dumps(missing, indent=1)

    # the panels show what happened: rejections and 5xx, dead letters of both kinds
    def series(title: str) -> list[dict[str, str]]:
        expr = next(e for t, e in dashboard_targets(load_dashboard()) if t == title)  # the panel's first query
        return [s["metric"] for s in prom.query_range(concrete(expr, RATE_INTERVAL), start)]

    assert {"vendor": REFUSING, "status_class": "4xx"} in series("Vendor requests by status class")
    assert {"vendor": FLAKY, "status_class": "5xx"} in series("Vendor requests by status class")
    dead = series("Dead letters by vendor and error class")
    assert {"vendor": REFUSING, "error_class": "rejected"} in dead
    assert {"vendor": "none", "error_class": "undecodable"} in dead
    # the process panels: the relay's own memory and version, its container's restarts from kube-state-metrics
    assert prom.value('max(process_resident_memory_bytes{job="event-relay"})') > 10_000_000  # type: ignore[operator]
    assert series("Build info") == [{"pod": "event-relay-0", "version": relay_version()}]
    restarts = next(e for t, e in dashboard_targets(load_dashboard()) if t == "Restarts" and "kube_" in e)
    assert [s["metric"] for s in prom.query_range(concrete(restarts, RATE_INTERVAL), start)] == [
        {"pod": "event-relay-0"}]

    # the refusing vendor's error ratio fires its alert; the vendors that answered well stay silent (the
    # flaky one and the one down for two chunks may fire too: their errors are real)
    def firing() -> dict[str, dict[str, str]]:
        found = {a["labels"]["vendor"]: a["labels"] for a in prom.api("alerts")["alerts"]
                 if a["labels"]["alertname"] == LIVE_ALERT and a["state"] == "firing"}
        return found if REFUSING in found else {}

    alerts = wait_for(firing, 30, f"{LIVE_ALERT} to fire for {REFUSING}")
    assert set(alerts) <= {REFUSING, FLAKY, PARKING}
    assert alerts[REFUSING]["namespace"] == "e2e" and alerts[REFUSING]["severity"] == "warning"
    assert relay.stop() == 0
