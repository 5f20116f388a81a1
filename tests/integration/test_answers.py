"""Vendor answers and the network path, through ``processor run`` in the production shape (schema registry,
parking on): a misbehaving server in front of each of the five twins, a closed port, an HTTPS twin whose
certificate no trust store knows, and an HTTPS twin reached only through a forward proxy."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from typing import Any

import httpx
import pytest

from processor.config import load_config
from processor.deadletter import headers_dict
from processor.devstack.demo import demo_config
from processor.devstack.kafka_io import produce, read_all
from processor.devstack.samples import as_event, encode, make_view
from processor.events import EventKind
from processor.sandbox import SandboxServer
from processor.vendors import REGISTRY, adapter_class
from tests.certs import TestCA
from tests.integration.conftest import _REGISTRY, wait_for
from tests.integration.front import PAGE, Front
from tests.proxy import ForwardProxy

FAST = {"max_attempts": 8, "base_delay_ms": 20, "max_delay_ms": 200, "max_elapsed_s": 30}
BAD = ["html", "empty", "other_json", "oversize"]
# Convert and Convead document no body: a 200 with an empty body is their success answer
NO_BODY = {"convert", "convead"}


def views(n: int) -> tuple[list[tuple[bytes, bytes]], list[dict[str, Any]]]:
    msgs, recs = [], []
    for i in range(n):
        rec = make_view(i, i % 7)
        rec["event_id"] = f"answers-{i}"
        recs.append(rec)
        msgs.append((f"k{i % 11}".encode(), encode(EventKind.PRODUCT_VIEW, rec)))
    return msgs, recs


def items_at_a_twin(relay: Any, env: dict[str, str], front: str, recs: list[dict[str, Any]]) -> dict[str, int]:
    """What each twin holds once every one of ``recs`` reached it once: the relay's own adapters' plan of them
    sent straight to a fresh sandbox (a view is one item at most twins, one per experience at Convert's)."""
    cfg = load_config(relay.config_path, env=env)

    async def run() -> dict[str, int]:
        server = SandboxServer("127.0.0.1", 0)
        await server.start()
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                for name, settings in cfg.enabled_vendors().items():
                    base_url = str(settings.base_url).replace(front, server.url)
                    a = adapter_class(name)(settings.model_copy(update={"base_url": base_url}))
                    for req in a.plan([as_event(EventKind.PRODUCT_VIEW, r, i) for i, r in enumerate(recs)]).requests:
                        await client.request(req.method, req.url, content=req.content, headers=dict(req.headers))
            return {v: c.get("accepted", 0) for v, c in server.sandbox.stats.items()}
        finally:
            await server.stop()

    return asyncio.run(run())


def wait_final(relay: Any, n: int, vendors: Any = REGISTRY, timeout_s: float = 120) -> dict[str, dict[str, float]]:
    """Wait until each vendor gave every one of ``n`` events its final outcome (delivered, filtered or
    dead-lettered, live or redriven: parking is on the way, never the end); the counts by outcome."""
    def final(v: str) -> dict[str, float]:
        return {o: relay.metric("processor_vendor_events_total", vendor=v, outcome=o)
                for o in ("delivered", "filtered", "dead_lettered")}

    for v in vendors:
        wait_for(lambda v=v: relay.alive_or_fail() and sum(final(v).values()) >= n, timeout_s, f"{v} to settle {n}")
    out = {v: final(v) for v in vendors}
    assert all(sum(c.values()) == n for c in out.values()), out
    return out


def five_vendors(broker: Any, topics: Any, url: str, **per_vendor: Any) -> tuple[dict[str, Any], dict[str, str]]:
    config, env = demo_config(broker.bootstrap, url, 0)
    config = {**config, "kafka": {**config["kafka"], "group_id": topics.group, "topics": [topics.events]},
              "deadletter": {"topic": topics.dlq}, "schema_registry": {"url": _REGISTRY[0].url},
              "relay": {"shutdown_grace_s": 10, "commit_interval_s": 0.5}}
    for vendor in config["vendors"].values():
        vendor.update({"retry": dict(FAST), "max_answer_bytes": 4096,
                       "batch": {"max_events": 20, "max_wait_ms": 200}, **per_vendor})
    return config, env


def test_an_answer_that_is_not_the_vendors_success_is_never_delivered(broker, topics, sandbox, relays):
    """In front of every twin: its first requests answered by a page, an empty body (where the vendor
    documents a body), JSON of another shape and a body over the limit, then the twin's own answers;
    Convead's answered by a page for good. Every event is at the twin or dead-lettered naming the answer,
    and the relay counts delivered exactly what the twins received."""
    plan = {v: [a for a in BAD if not (a == "empty" and v in NO_BODY)] for v in REGISTRY}
    plan["convead"] = ["html"] * 100_000
    messages, recs = views(60)
    produce(broker.bootstrap, topics.events, messages)
    with Front(sandbox.url, plan) as front:
        # the breaker stays closed through the few bad answers (the answers, not the breaker, are the test)
        config, env = five_vendors(broker, topics, front.url, breaker={"consecutive_failures": 1000,
                                                                       "min_requests": 1000})
        config["vendors"]["convead"]["retry"] = {**FAST, "max_elapsed_s": 4}
        relay = relays(config, "answers", env=env)
        relay.wait_ready()
        settled = wait_final(relay, 60)
        served = dict(front.counts)
    stats = sandbox.stats()
    items = items_at_a_twin(relay, env, front.url, recs)
    dead = int(sum(c["dead_lettered"] for c in settled.values()))
    dlq = [headers_dict(m.headers()) for m in read_all(broker.bootstrap, topics.dlq, expect=dead)]
    # nothing counted delivered that the twin did not receive: each holds exactly the delivered events' items
    assert {v: stats.get(v, {}).get("accepted", 0) for v in settled} == {
        v: items[v] if c["delivered"] else 0 for v, c in settled.items()}, settled
    for vendor, counts in settled.items():
        bad = sum(n for (v, answer), n in served.items() if v == vendor and answer != "forward")
        assert relay.metric("processor_vendor_unrecognised_answers_total", vendor=vendor) == bad, vendor
        reasons = [h["relay.reason"] for h in dlq if h["relay.vendor"] == vendor]
        assert len(reasons) == counts["dead_lettered"]
        if vendor == "convead":  # a page for good: every event dead-lettered, the reason naming the page
            assert counts["delivered"] == 0 and counts["dead_lettered"] == 60
            assert {r.split(" (after")[0] for r in reasons} == {
                f"unrecognised answer: HTTP 200 text/html, {len(PAGE)} bytes: {PAGE[:48].decode()!r}"}
        else:  # each bad answer once, then the twin's own: everything at the twin
            assert counts["delivered"] == 60 and counts["dead_lettered"] == 0, (vendor, counts)
            assert {a for (v, a) in served if v == vendor} == {*plan[vendor], "forward"}
    log = relay.log()
    for vendor in REGISTRY:
        assert f'"msg":"{vendor}: an answer that is not {vendor}\'s success answer' in log, vendor
    assert relay.stop() == 0


def _vendor(settings: dict[str, Any], base_url: str, **over: Any) -> dict[str, Any]:
    return {**settings, "base_url": base_url, "retry": dict(FAST), "batch": {"max_events": 20, "max_wait_ms": 200},
            **over}


def test_a_closed_port_and_an_unknown_certificate_authority_are_named(broker, topics, sandbox, relays, tmp_path):
    """QuickLizard's port is closed, Tracardi's HTTPS twin has a certificate from a CA no trust store knows,
    Qubit is fine: the metrics and logs name each failure, refusals leave QuickLizard's concurrency limit
    where it was, and Qubit delivers everything meanwhile."""
    messages, _ = views(40)
    produce(broker.bootstrap, topics.events, messages)
    unknown = TestCA(tmp_path / "unknown-ca")
    with socket.socket() as bound, Front(sandbox.url, ssl_context=unknown.server_context()) as https_twin:
        bound.bind(("127.0.0.1", 0))  # bound, never listening: every connection is refused
        closed = bound.getsockname()[1]
        config, env = five_vendors(broker, topics, sandbox.url)
        v = config["vendors"]
        config["vendors"] = {
            "qubit": v["qubit"],
            "quicklizard": _vendor(v["quicklizard"], f"http://127.0.0.1:{closed}/quicklizard/events", concurrency=8),
            "tracardi": _vendor(v["tracardi"], f"{https_twin.url}/tracardi", concurrency=8)}
        relay = relays(config, "transport", env=env)
        relay.wait_ready()
        for vendor, error in (("quicklizard", "connection_refused"), ("tracardi", "tls_verify_failed")):
            wait_for(lambda v=vendor, e=error: relay.alive_or_fail() and relay.metric(
                "processor_vendor_transport_errors_total", vendor=v, error=e) >= 5, 60, f"{vendor}: 5 x {error}")
        wait_final(relay, 40, ["qubit"])
        assert relay.metric("processor_vendor_events_total", vendor="qubit", outcome="delivered") == 40
        for vendor in ("quicklizard", "tracardi"):
            # refusals and certificate failures are not back-pressure: the limit is where it was
            assert relay.metric("processor_vendor_concurrency_limit", vendor=vendor) == 8, vendor
            assert relay.metric("processor_vendor_events_total", vendor=vendor, outcome="delivered") == 0
        assert https_twin.counts == Counter()  # no request got through the handshake
        assert relay.stop() == 0
    log = relay.log()
    tls = [line for line in log.splitlines() if "TLS verification failed" in line]
    assert len(tls) == 1 and '"level":"error"' in tls[0], tls
    assert "tracardi: TLS verification failed for host 127.0.0.1: unable to get local issuer certificate" in tls[0]
    assert "connection refused (after" in log and "timeout" not in log


@pytest.mark.parametrize("how", ["HTTPS_PROXY", "relay.proxy"])
def test_an_https_twin_through_a_forward_proxy(broker, topics, sandbox, relays, tmp_path, how):
    """Tracardi's HTTPS twin is known as tracardi.test, a name only the forward proxy resolves: every
    Tracardi request goes through the proxy (CONNECT), set by HTTPS_PROXY or by relay.proxy with credentials
    from the environment; QuickLizard's twin on 127.0.0.1 is in NO_PROXY and the proxy never sees it."""
    messages, _ = views(40)
    produce(broker.bootstrap, topics.events, messages)
    ca = TestCA(tmp_path / "ca", hosts=("tracardi.test",))
    with (ForwardProxy(hosts={"tracardi.test": "127.0.0.1"}) as proxy,
          Front(sandbox.url, ssl_context=ca.server_context()) as https_twin):
        config, env = five_vendors(broker, topics, sandbox.url)
        v = config["vendors"]
        config["vendors"] = {
            "quicklizard": v["quicklizard"],
            "tracardi": _vendor(v["tracardi"], f"https://tracardi.test:{https_twin.port}/tracardi")}
        env = {**env, "SSL_CERT_FILE": str(ca.ca_path)}  # the twin's CA, trusted by the relay
        if how == "HTTPS_PROXY":
            env.update(HTTPS_PROXY=proxy.url, HTTP_PROXY=proxy.url, NO_PROXY="127.0.0.1")
        else:
            config["relay"] = {**config["relay"], "proxy": "http://${PROXY_USER}:${PROXY_PASSWORD}@" + proxy.url[7:],
                               "no_proxy": "127.0.0.1"}
            env.update(PROXY_USER="relay", PROXY_PASSWORD="pr0xy-s3cret")
        relay = relays(config, "proxied", env=env)
        relay.wait_ready()
        settled = wait_final(relay, 40, ["quicklizard", "tracardi"])
        assert relay.stop() == 0
    assert settled["tracardi"]["delivered"] == settled["quicklizard"]["delivered"] == 40, settled
    assert sandbox.stats()["tracardi"]["accepted"] == 40
    assert https_twin.counts[("tracardi", "forward")] >= 2  # every request arrived through a tunnel
    assert proxy.seen
    assert {(s.method, s.target) for s in proxy.seen} == {("CONNECT", f"tracardi.test:{https_twin.port}")}
    if how == "relay.proxy":
        assert {s.authorization for s in proxy.seen} == {"Basic cmVsYXk6cHIweHktczNjcmV0"}  # relay:pr0xy-s3cret
        assert "pr0xy-s3cret" not in relay.log()
