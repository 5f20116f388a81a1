"""Bad input through the real CLI: every poison message lands in the dead-letter topic with a precise
reason or is delivered; the partition never stops and the relay never exits."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import Producer

from processor.codec import confluent_frame
from processor.deadletter import headers_dict
from processor.devstack.kafka_io import committed, end_offsets, read_all
from processor.devstack.samples import encode, make_order, make_view
from processor.events import EventKind
from tests.integration.conftest import Topics, quicklizard_vendor, relay_config, wait_for

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
FOREIGN = [("relay.replay_count", b"x"), ("relay.error_class", b"foreign"), ("relay.vendor", b"\xff\xfe")]
NOT_UTF8 = [("trace", b"\xff\xfe\xfd")]
FUTURE_MS = 4_102_444_800_000  # 2100-01-01
OTHER = {"type": "record", "name": "Other", "namespace": "x", "fields": [{"name": "a", "type": "int"}]}
SCHEMA_ID_OF_OTHER = 7


@dataclass
class Case:
    name: str
    value: bytes | None
    headers: list[tuple[str, bytes]] | None = None
    timestamp_ms: int | None = None
    rows: collections.Counter[str] | None = None  # product_id -> rows QuickLizard must receive (delivered)
    error_class: str | None = None  # dead-lettered: relay.error_class
    reason: str | None = None  # ... and relay.reason starts with this


def view(p: int, **changes: Any) -> tuple[bytes, collections.Counter[str]]:
    rec = make_view(p, p, event_time=1_700_000_000_000 + p)
    rec["event_id"] = f"bad-input-{p}"
    for path, value in changes.items():
        section, _, field = path.partition("__")
        if field:
            rec[section][field] = value
        else:
            rec[section] = value
    return encode(VIEW, rec), collections.Counter({rec["product"]["product_id"]: 1})


def view_body(p: int) -> bytes:
    return view(p)[0][5:]


def not_utf8_view() -> bytes:
    value = bytearray(view(30)[0])
    at = value.index(b"shop-1")
    value[at:at + 6] = b"\xff\xfe\xfd\xfc\xfb\xfa"  # same length, so the framing stays valid
    return bytes(value)


def delivered(name: str, value_rows: tuple[bytes, collections.Counter[str]], **kw: Any) -> Case:
    value, rows = value_rows
    return Case(name, value, rows=rows, **kw)


def cases() -> list[Case]:
    good = [delivered(f"good {p}", view(p)) for p in range(1, 11)]
    huge = make_order(600, items=1000)
    huge["event_id"] = "bad-input-huge-order"
    huge_rows = collections.Counter(item["product_id"] for item in huge["order"]["items"])
    dup_value, dup_rows = view(503)
    undecodable = "undecodable"
    out = [
        *good,
        Case("bad magic byte", b"\x07not avro at all", error_class=undecodable,
             reason="bad_framing: unknown magic byte 0x07"),
        Case("unknown schema id", confluent_frame(99, view_body(31)), error_class=undecodable,
             reason="unknown_schema: schema id 99 is not in the local schema map"),
        Case("truncated Avro", view(32)[0][:-20], error_class=undecodable,
             reason="truncated: body ends before the schema does"),
        Case("empty value", b"", error_class=undecodable, reason="empty: message has no value"),
        Case("tombstone", None, error_class=undecodable, reason="empty: message has no value"),
        Case("valid Avro of another canonical record", confluent_frame(1, encode(ORDER, make_order(33))[5:]),
             error_class=undecodable,
             reason="invalid_data: does not decode as shop.events.ProductView (schema id 1) but as "
                    "shop.events.OrderCompleted: framed with the wrong schema id"),
        Case("valid Avro of a record the relay does not route", confluent_frame(SCHEMA_ID_OF_OTHER, b"\x02"),
             error_class="unroutable", reason="a valid Avro record of a schema the relay does not route"),
        Case("non-UTF-8 string", not_utf8_view(), error_class=undecodable,
             reason="invalid_data: a string in the body is not valid UTF-8"),
        Case("trailing bytes", view(34)[0] + b"\x00\x00", error_class=undecodable,
             reason="invalid_data: 2 bytes left after the record"),
        delivered("oversize message (300 KB permalink, over the batch's max_bytes)",
                  view(501, product__url="https://shop.example.com/p/" + "x" * 300_000)),
        Case("huge order (1000 lines)", encode(ORDER, huge), rows=huge_rows),
        delivered("future event time", view(502, event_time=FUTURE_MS)),
        delivered("future Kafka timestamp", view(506), timestamp_ms=FUTURE_MS),
        Case("duplicate event id (first)", dup_value, rows=dup_rows),
        Case("duplicate event id (second)", dup_value, rows=dup_rows),
        delivered("foreign relay.* headers on a valid message", view(504), headers=FOREIGN),
        Case("foreign relay.* headers on an undecodable message", b"\x07junk", headers=FOREIGN,
             error_class=undecodable, reason="bad_framing: unknown magic byte 0x07"),
        delivered("non-UTF-8 header value on a valid message", view(505), headers=NOT_UTF8),
        Case("non-UTF-8 header value on an undecodable message", b"\x07junk", headers=NOT_UTF8,
             error_class=undecodable, reason="bad_framing: unknown magic byte 0x07"),
        *[delivered(f"good after {p}", view(p)) for p in range(2001, 2011)],
    ]
    return out


def produce_in_order(bootstrap: str, topic: str, batch: list[Case]) -> None:
    """One partition, one message at a time in order, each with its own headers and timestamp."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "log_level": 3,
                  "message.max.bytes": 2_000_000})
    for i, case in enumerate(batch):
        kwargs: dict[str, Any] = {"key": f"k{i}".encode(), "value": case.value, "partition": 0,
                                  "headers": case.headers}
        if case.timestamp_ms is not None:
            kwargs["timestamp"] = case.timestamp_ms
        p.produce(topic, **kwargs)
    assert p.flush(60) == 0


@pytest.fixture
def one_partition(broker) -> Topics:
    return Topics(broker, partitions=1)


def test_poison_messages_are_dead_lettered_precisely_or_delivered(broker, one_partition, sandbox, relays,
                                                                  tmp_path):
    topics = one_partition
    other = tmp_path / "x.Other.avsc"
    other.write_text(json.dumps(OTHER))
    batch = cases()
    produce_in_order(broker.bootstrap, topics.events, batch)
    vendor = quicklizard_vendor(sandbox, batch={"max_events": 50, "max_bytes": 100_000, "max_wait_ms": 200})
    cfg = relay_config(broker, topics, sandbox, {"quicklizard": vendor})
    cfg["schema_registry"] = {"local_ids": {1: "shop.events.ProductView", 2: "shop.events.OrderCompleted",
                                            SCHEMA_ID_OF_OTHER: str(other)}}
    relay = relays(cfg)
    relay.wait_ready()

    want_rows: collections.Counter[str] = collections.Counter()
    for case in batch:
        want_rows.update(case.rows or {})
    dead = {i: case for i, case in enumerate(batch) if case.error_class}
    wait_for(lambda: relay.alive_or_fail() and committed(broker.bootstrap, topics.group, topics.events)
             == {0: len(batch)}, 90, "the partition committed to its end")
    assert end_offsets(broker.bootstrap, topics.events) == {0: len(batch)}

    # dead letters: exactly the poison messages, each with its precise reason, original bytes and headers
    dlq = read_all(broker.bootstrap, topics.dlq, expect=len(dead), timeout_s=30)
    assert len(dlq) == len(dead)
    by_offset = {int(headers_dict(m.headers())["relay.original_offset"]): m for m in dlq}
    assert set(by_offset) == set(dead)
    for offset, case in dead.items():
        m = by_offset[offset]
        h = headers_dict(m.headers())
        assert (h["relay.error_class"], h["relay.vendor"]) == (case.error_class, "none"), case.name
        assert h["relay.reason"].startswith(case.reason), (case.name, h["relay.reason"])
        assert (m.value() or b"") == (case.value or b""), case.name
        kept = [hd for hd in m.headers() if not hd[0].startswith("relay.")]
        assert kept == [hd for hd in case.headers or [] if not hd[0].startswith("relay.")], case.name
        if case.headers == FOREIGN:  # foreign relay.* values are data: kept as they were, ours beside them
            assert ("relay.replay_count", b"x") in m.headers() and ("relay.vendor", b"\xff\xfe") in m.headers()

    # deliveries: every other message's rows, each exactly as often as produced
    wait_for(lambda: sum(1 for _ in sandbox.received("quicklizard")) >= sum(want_rows.values()), 30,
             "the rows at the vendor")
    got = collections.Counter(item["product_id"] for item in sandbox.received("quicklizard"))
    assert got == want_rows
    long_link = [i for i in sandbox.received("quicklizard") if i["product_id"] == "P-00501"]
    assert len(long_link[0]["permalink"]) > 300_000

    decoded_failures = relay.metric("processor_decode_failures_total")
    assert decoded_failures == sum(1 for c in dead.values() if c.error_class == "undecodable")
    relay.alive_or_fail()
    assert relay.stop() == 0
    delivered = sum(1 for c in batch if c.rows)
    print(f"bad input: {len(batch)} messages, {delivered} delivered ({sum(want_rows.values())} rows), "
          f"{len(dead)} dead-lettered, lost {len(batch) - delivered - len(dead)}, "
          f"duplicates {sum(got.values()) - sum(want_rows.values())}")


# relay.* numbers in digits str.isdigit() or int() take but the relay never writes (superscripts,
# Arabic-Indic), on a message that claims to be a relay record of ours (original topic and offset)
NON_ASCII_DIGITS = [("relay.original_topic", b"elsewhere"), ("relay.original_offset", "³¹".encode()),
                    ("relay.first_failure_ms", "³¹".encode()), ("relay.attempts", "١٢".encode()),
                    ("relay.replay_count", "³".encode()), ("relay.next_attempt_ms", "\uff11".encode())]


def test_non_ascii_digits_in_relay_headers_are_data_on_the_dead_letter_and_park_paths(broker, one_partition,
                                                                                      sandbox, relays):
    topics = one_partition
    sandbox.faults("quicklizard", error_rate=1.0, error_status=503)  # valid events are parked, then redriven
    batch = [
        *[delivered(f"valid {p}", view(p), headers=NON_ASCII_DIGITS) for p in range(1, 6)],
        Case("undecodable", b"\x07junk", headers=NON_ASCII_DIGITS, error_class="undecodable"),
        Case("unknown schema id", confluent_frame(99, view_body(6)), headers=NON_ASCII_DIGITS,
             error_class="undecodable"),
        *[delivered(f"plain {p}", view(p)) for p in range(7, 10)],
    ]
    produce_in_order(broker.bootstrap, topics.events, batch)
    vendor = quicklizard_vendor(sandbox, retry={"max_attempts": 2, "base_delay_ms": 50, "max_delay_ms": 100,
                                                "park_after_s": 0.5, "max_elapsed_s": 600})
    relay = relays(relay_config(broker, topics, sandbox, {"quicklizard": vendor}))
    wait_for(lambda: relay.alive_or_fail() and relay.metric("processor_parked_total", vendor="quicklizard") >= 8,
             60, "the valid events parked")
    dlq = read_all(broker.bootstrap, topics.dlq, expect=2, timeout_s=30)
    assert sorted(int(headers_dict(m.headers())["relay.original_offset"]) for m in dlq) == [5, 6]
    for m in dlq:
        h = headers_dict(m.headers())
        assert (h["relay.original_topic"], h["relay.replay_count"], h["relay.attempts"]) == (topics.events, "0", "0")
        assert ("relay.first_failure_ms", "³¹".encode()) in m.headers()  # the foreign value kept, as data

    sandbox.faults("quicklizard")  # recovered: the parked events are redriven
    want = collections.Counter(f"P-{p:05d}" for p in [*range(1, 6), *range(7, 10)])
    wait_for(lambda: relay.alive_or_fail() and collections.Counter(
        i["product_id"] for i in sandbox.received("quicklizard")) >= want, 60, "every valid event delivered")
    wait_for(lambda: committed(broker.bootstrap, topics.group, topics.events) == {0: len(batch)}, 30,
             "the partition committed to its end")
    assert relay.stop() == 0
