"""The whole path through the real CLI: Kafka -> Avro -> batches -> HTTP -> dead letters -> commits."""

from __future__ import annotations

from processor.deadletter import headers_dict
from processor.devstack.kafka_io import committed, end_offsets, produce, read_all
from processor.devstack.samples import encode, make_order, make_view, with_changes
from processor.events import EventKind
from tests.integration.conftest import quicklizard_vendor, relay_config, wait_for

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER


def sample_messages(n: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(start, start + n):
        if i % 10 == 9:
            rec = make_order(i, items=1 + i % 3, event_time=1_700_000_000_000 + i)
            rec["event_id"] = f"e{i}"
            out.append((f"v{i % 17}".encode(), encode(ORDER, rec)))
        else:
            rec = make_view(i, i, event_time=1_700_000_000_000 + i)
            rec["event_id"] = f"e{i}"
            out.append((f"v{i % 17}".encode(), encode(VIEW, rec)))
    return out


def expected_rows(messages: list[tuple[bytes, bytes]]) -> int:
    from processor.codec import Decoder

    d = Decoder()
    rows = 0
    for _, value in messages:
        kind, rec = d.decode(value)
        rows += 1 if kind is VIEW else len(rec["order"]["items"])
    return rows


def test_events_delivered_rejects_dead_lettered_offsets_committed(broker, topics, sandbox, relays):
    good = sample_messages(300)
    # a view without any URL: QuickLizard requires permalink, so it is rejected for that vendor
    bad_rec = with_changes(with_changes(make_view(5, 5), "product.url", None), "page.url", None)
    bad = [(b"bad", encode(VIEW, bad_rec))]
    garbage = [(b"junk", b"\x00\x00\x00\x00\x07not avro"), (b"junk2", b"plain text")]
    produce(broker.bootstrap, topics.events, good[:150] + bad + garbage + good[150:],
            headers=[("trace", b"t-1")])

    relay = relays(relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)}))
    relay.wait_ready()
    rows = expected_rows(good)
    wait_for(lambda: sandbox.stats().get("quicklizard", {}).get("accepted", 0) >= rows, 60, "deliveries")
    total = len(good) + len(bad) + len(garbage)
    wait_for(lambda: sum(committed(broker.bootstrap, topics.group, topics.events).values()) == total, 30,
             "offsets committed to the end")
    assert committed(broker.bootstrap, topics.group, topics.events) == end_offsets(broker.bootstrap, topics.events)

    items = sandbox.received("quicklizard")
    assert len(items) == rows  # each event exactly once in a clean run
    assert {i["client_key"] for i in items} == {"ql-secret-key"}
    views = [i for i in items if i["event"] == "view"]
    assert len(views) == len([m for m in good if m[1][4] == 1])
    assert {v["product_id"] for v in views} == {f"P-{i:05d}" for i in range(300) if i % 10 != 9}

    dlq = read_all(broker.bootstrap, topics.dlq, expect=3)
    assert len(dlq) == 3
    by_class = {headers_dict(m.headers())["relay.error_class"]: m for m in dlq}
    assert set(by_class) == {"rejected", "undecodable"} and len(dlq) == 3
    rej = by_class["rejected"]
    h = headers_dict(rej.headers())
    assert rej.value() == bad[0][1] and rej.key() == b"bad"
    assert h["relay.vendor"] == "quicklizard"
    assert h["relay.reason"] == "missing required field product.url"
    assert h["relay.original_topic"] == topics.events
    assert int(h["relay.original_offset"]) >= 0 and h["relay.replay_count"] == "0"
    assert int(h["relay.attempts"]) == 1 and h["relay.first_failure_ms"] and h["relay.last_failure_ms"]
    assert ("trace", b"t-1") in rej.headers()
    undecodable = [m for m in dlq if headers_dict(m.headers())["relay.error_class"] == "undecodable"]
    assert {m.value() for m in undecodable} == {g[1] for g in garbage}
    assert {headers_dict(m.headers())["relay.reason"].split(":")[0] for m in undecodable} == {
        "unknown_schema", "bad_framing"}

    assert relay.metric("processor_vendor_events_total", vendor="quicklizard", outcome="delivered") == len(good)
    assert relay.metric("processor_vendor_events_total", vendor="quicklizard", outcome="dead_lettered") == 1
    assert relay.metric("processor_decode_failures_total", reason="bad_framing") == 1
    assert relay.metric("processor_events_consumed_total") == total
    assert relay.metric("processor_dlq_events_total", error_class="undecodable") == 2
    wait_for(lambda: relay.metric("processor_committed_offset") == total, 10, "committed-offset gauge")
    # the lag gauge is refreshed every 2 s (KafkaSource.lag_every_s), not with each commit
    wait_for(lambda: relay.metric("processor_consumer_lag") == 0, 10, "lag gauge at 0")
    from tests.integration.conftest import http_text

    assert http_text(f"{relay.metrics_url}/healthz")[0] == 200
    assert http_text(f"{relay.metrics_url}/readyz")[0] == 200
    assert relay.stop() == 0
    assert '"level": "error"' not in relay.log()
    assert "ql-secret-key" not in relay.log()
