"""What the relay does with a vendor's throttling and setup answers, through the real CLI in the production
shape (schema registry configured, parking on), with a misbehaving server on loopback in front of the
twins: a Retry-After of ``inf``, ``1e400``, ``-1``, garbage, a far-future date or a day dead-letters nothing
and delays nothing past the clamp; ``Retry-After: 0`` or a past date gets a few requests a second, not
thousands; a 307, 308 or 401 on one site dead-letters nothing and the other sites and vendors flow."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from processor.deadletter import headers_dict
from processor.devstack.kafka_io import committed, end_offsets, read_all
from processor.vendors import adapter_class
from tests.integration.conftest import relay_config, wait_for
from tests.integration.test_isolation import Stream, tracardi_ids

ENV = {k: v for name in ("tracardi", "convead", "quicklizard", "qubit")
       for k, v in adapter_class(name).example_env.items()}
CLAMP_S = 2.0  # the vendor's retry.max_retry_after_s in these tests
WINDOW_S = 30.0  # the redrive's own cadence, a loaded machine: what "delivered within the clamp" allows


class Front:
    """A server on loopback in front of the sandbox: a request whose path contains a rule's key is answered
    by the rule (status, headers), any other is forwarded to the twin as it is. ``injected`` records each
    answer it made up: (monotonic time, rule key, status)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rules: dict[str, tuple[int, dict[str, str]]] = {}
        self.injected: list[tuple[float, str, int]] = []
        self.forwarded: Counter[str] = Counter()
        self.lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with front.lock:
                    rule = next(((k, r) for k, r in front.rules.items() if k in self.path), None)
                    if rule is not None:
                        front.injected.append((time.monotonic(), rule[0], rule[1][0]))
                if rule is not None:
                    status, headers = rule[1]
                    self._answer(status, headers, b'{"error": "injected"}', "application/json")
                    return
                req = urllib.request.Request(front.upstream + self.path, data=body, method="POST", headers={
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length",
                                                                               "connection")})
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        status, content, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
                except urllib.error.HTTPError as e:
                    status, content, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
                with front.lock:
                    front.forwarded[self.path.split("?")[0]] += 1
                self._answer(status, {}, content, ctype)

            def _answer(self, status: int, headers: dict[str, str], content: bytes, ctype: str) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if ctype:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, key: str, status: int | None = None, **headers: str) -> None:
        """From now on answer requests whose path contains ``key`` with ``status`` (None: forward them)."""
        with self.lock:
            if status is None:
                self.rules.pop(key, None)
            else:
                self.rules[key] = (status, {k.replace("_", "-"): v for k, v in headers.items()})

    def count(self, key: str, since: float = 0.0) -> int:
        with self.lock:
            return sum(1 for t, k, _ in self.injected if k == key and t >= since)

    def span(self, key: str, since: float) -> float:
        """Seconds from the first answer made up for ``key`` since ``since`` until now (0 if none yet)."""
        with self.lock:
            times = [t for t, k, _ in self.injected if k == key and t >= since]
        return time.monotonic() - times[0] if times else 0.0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def front(sandbox: Any) -> Any:
    f = Front(sandbox.url)
    yield f
    f.close()


_PRODUCT = re.compile(r"(?:\bP-|/p/)0*(\d+)\b")


def ids(sandbox: Any, vendor: str) -> set[int]:
    """The event numbers a twin received (view ``n`` carries product id ``P-<n>`` and URL ``.../p/<n>``)."""
    return {int(m) for item in sandbox.received(vendor) for m in _PRODUCT.findall(json.dumps(item))}


RETRY = {"max_attempts": 4, "base_delay_ms": 50, "max_delay_ms": 1000, "park_after_s": 2, "max_elapsed_s": 600,
         "max_retry_after_s": CLAMP_S, "setup_retry_s": 1}


def throttled_vendor(name: str, front: Front) -> dict[str, Any]:
    cls = adapter_class(name)
    settings = cls.example_settings(front.url)
    return {**settings, "batch": {"max_events": 50, "max_wait_ms": 100}, "retry": RETRY}


FAR_FUTURE = format_datetime(datetime.now(UTC) + timedelta(days=3650), usegmt=True)
PAST = "Wed, 21 Oct 2015 07:28:00 GMT"
ODD_RETRY_AFTER = ["inf", "1e400", "-1", "soon, please", FAR_FUTURE, "86400"]
PATHS = {"quicklizard": "/quicklizard/", "convead": "/convead/"}


@pytest.mark.parametrize("vendor", ["quicklizard", "convead"])  # an array vendor, a one-event-a-request vendor
def test_a_throttling_vendor_with_any_retry_after_loses_nothing_and_is_not_hammered(vendor, broker, topics,
                                                                                    sandbox, front, relays):
    vendors = {vendor: throttled_vendor(vendor, front),
               "tracardi": {**adapter_class("tracardi").example_settings(sandbox.url),
                            "batch": {"max_events": 50, "max_wait_ms": 100}}}
    relay = relays(relay_config(broker, topics, sandbox, vendors), env=ENV)
    relay.wait_ready()
    stream = Stream(broker.bootstrap, topics.events, per_tick=10)
    key = PATHS[vendor]
    wait_for(lambda: stream.produced >= 100 and len(ids(sandbox, vendor)) >= 50, 60, "a steady stream")

    for value in ODD_RETRY_AFTER:
        front.answer(key, 429, Retry_After=value)
        before = front.count(key)
        wait_for(lambda b=before: front.count(key) >= b + 3, 30, f"throttled with Retry-After: {value}")
        during = stream.produced
        wait_for(lambda n=during: set(range(n)) <= tracardi_ids(sandbox), WINDOW_S,
                 f"the other vendor delivering meanwhile ({value})")
        front.answer(key)  # the throttle ends
        mark = stream.produced
        wait_for(lambda n=mark: set(range(n)) <= ids(sandbox, vendor), CLAMP_S + WINDOW_S,
                 f"everything delivered after Retry-After: {value}")

    rates = {}
    for value in ("0", PAST):  # no usable Retry-After: the relay's own backoff, growing
        start = time.monotonic()
        front.answer(key, 429, Retry_After=value)
        wait_for(lambda s=start: front.span(key, s) >= 5, 30, f"5 s of throttling with Retry-After: {value}")
        front.answer(key)
        span = front.span(key, start)
        asked = front.count(key, start)
        rates[value] = asked / span
        # a few requests a second (the backoff caps at retry.max_delay_ms, 1 s here), not thousands
        assert asked <= 10 * span + 10, (value, asked, span)
        mark = stream.produced
        wait_for(lambda n=mark: set(range(n)) <= ids(sandbox, vendor), CLAMP_S + WINDOW_S,
                 f"everything delivered after Retry-After: {value}")

    total = stream.stop()
    everything = set(range(total))
    wait_for(lambda: everything <= ids(sandbox, vendor), CLAMP_S + WINDOW_S, "everything at the vendor")
    wait_for(lambda: everything <= tracardi_ids(sandbox), WINDOW_S, "everything at the other vendor")
    wait_for(lambda: committed(broker.bootstrap, topics.group, topics.events)
             == end_offsets(broker.bootstrap, topics.events), 30, "commits to the end")
    dead = [headers_dict(m.headers()) for m in read_all(broker.bootstrap, topics.dlq, idle_s=1)]
    assert dead == []
    log = relay.log()
    assert log.count("clamped to retry.max_retry_after_s") == 1  # once per vendor
    print(f"\n{vendor}: requests a second while throttled without a usable Retry-After: "
          + ", ".join(f"{v!r} {r:.1f}/s" for v, r in rates.items()))
    assert relay.stop() == 0


def qubit_two_sites(front: Front) -> dict[str, Any]:
    settings = adapter_class("qubit").example_settings(front.url)
    return {**settings, "sites": {"shop-1": {"tracking_id": "shopone", "vertical": "ecommerce"},
                                  "shop-2": {"tracking_id": "shoptwo", "vertical": "ecommerce"}},
            "batch": {"max_events": 50, "max_wait_ms": 100}, "retry": RETRY}


def test_a_setup_error_on_one_site_dead_letters_nothing_and_the_rest_flows(broker, topics, sandbox, front,
                                                                          relays):
    vendors = {"qubit": qubit_two_sites(front),
               "tracardi": {**adapter_class("tracardi").example_settings(sandbox.url),
                            "batch": {"max_events": 50, "max_wait_ms": 100}}}
    relay = relays(relay_config(broker, topics, sandbox, vendors), env=ENV)
    relay.wait_ready()
    stream = Stream(broker.bootstrap, topics.events, per_tick=10, sites=("shop-1", "shop-2"))
    wait_for(lambda: stream.produced >= 100 and len(ids(sandbox, "qubit")) >= 50, 60, "a steady stream")
    key = "/events/shopone"
    moved = "https://tracking.example/v2/events/shopone"
    for status in (307, 308, 401):
        front.answer(key, status, Location=moved)
        before = front.count(key)
        wait_for(lambda b=before: front.count(key) >= b + 3, 30, f"HTTP {status} on site shop-1")
        assert relay.metric("processor_vendor_setup_held_sites", vendor="qubit") == 1
        # meanwhile, the other site of the vendor and the other vendor receive what is produced
        mark = stream.produced
        wait_for(lambda n=mark: {i for i in range(n) if i % 2} <= ids(sandbox, "qubit"), WINDOW_S,
                 f"site shop-2 delivering during HTTP {status}")
        wait_for(lambda n=mark: set(range(n)) <= tracardi_ids(sandbox), WINDOW_S,
                 f"the other vendor delivering during HTTP {status}")
    assert relay.metric("processor_vendor_setup_errors_total", vendor="qubit", status_class="3xx") >= 6
    assert relay.metric("processor_vendor_setup_errors_total", vendor="qubit", status_class="4xx") >= 3
    front.answer(key)  # the vendor answers normally again
    total = stream.stop()
    everything = set(range(total))
    wait_for(lambda: everything <= ids(sandbox, "qubit"), WINDOW_S, "everything at the vendor once it answers")
    wait_for(lambda: everything <= tracardi_ids(sandbox), WINDOW_S, "everything at the other vendor")
    wait_for(lambda: relay.metric("processor_vendor_setup_held_sites", vendor="qubit") == 0, 10, "no site held")
    wait_for(lambda: committed(broker.bootstrap, topics.group, topics.events)
             == end_offsets(broker.bootstrap, topics.events), 30, "commits to the end")
    assert read_all(broker.bootstrap, topics.dlq, idle_s=1) == []
    lines = [json.loads(line) for line in relay.log().splitlines() if line.startswith("{")]
    said = " ".join(e["msg"] for e in lines if e.get("level") == "error" and "setup" in e.get("msg", ""))
    for status in (307, 308, 401):
        assert f"HTTP {status}" in said, said
    # the Location named, the site's tracking id (a credential of Qubit's) redacted in it
    assert "shop-1" in said and "Location: https://tracking.example/v2/events/<redacted>" in said
    assert "shopone" not in said and "shop-2" not in said
    assert relay.stop() == 0
