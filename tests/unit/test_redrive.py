"""Redrive: relay records read back, filters, one decision per record, settlement in record order through
the offset tracker (never past an unsettled record), and the write-back of what fails again."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from processor.codec import Decoder
from processor.deadletter import dlq_headers, headers_dict, replayed_headers
from processor.devstack.samples import encode, make_order, make_view
from processor.events import EventKind, Source
from processor.metrics import Metrics
from processor.offsets import OffsetTracker
from processor.redrive import Decision, Filters, Redrive, RelayRecord
from processor.transport import Sender
from tests.unit.test_delivery import FakeAdapter

DLQ = "shop.events.dlq"
VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER


def record(offset: int, value: bytes | None = None, vendor: str | None = "fake", error_class: str = "exhausted",
           status: int | None = 503, failed_ms: int = 5_000, replay_count: int = 0, original_offset: int = 40,
           ) -> RelayRecord:
    value = encode(VIEW, make_view(offset, offset)) if value is None else value
    original = Source("shop.events", 2, original_offset, 1_000, b"k", value, [("trace", b"t-1")])
    headers = dlq_headers(original, vendor, error_class, status, "HTTP 503", 6, failed_ms - 100, failed_ms,
                          replay_count)
    return RelayRecord.from_source(Source(DLQ, 0, offset, failed_ms, b"k", value, headers))


class FakeWriter:
    """Write-backs kept until the test acknowledges them."""

    def __init__(self) -> None:
        self.written: list[tuple[Source, list[tuple[str, bytes]], str, str, Any]] = []

    def write_back(self, source, headers, vendor, error_class, on_ack) -> None:  # type: ignore[no-untyped-def]
        self.written.append((source, headers, vendor, error_class, on_ack))

    def ack_all(self) -> None:
        for *_, on_ack in self.written:
            on_ack()


def adapter(kinds: list[str] | None = None) -> FakeAdapter:
    cfg = {"sites": {"default": {}}, "options": {}, "kinds": kinds,
           "retry": {"max_attempts": 1, "base_delay_ms": 1, "max_delay_ms": 1, "max_elapsed_s": 5}}
    return FakeAdapter(FakeAdapter.settings_model().model_validate(cfg))


def redrive(filters: Filters | None = None, kinds: list[str] | None = None, answer: Any = None,
            max_replays: int | None = 3) -> tuple[Redrive, OffsetTracker, FakeWriter, list[list[int]]]:
    tracker = OffsetTracker()
    tracker.assign(DLQ, 0)
    writer = FakeWriter()
    r = Redrive(adapter(kinds), Decoder(), tracker, filters, max_replays, writer, clock=lambda: 9.0)
    calls: list[list[int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        offsets = orjson.loads(request.content)
        calls.append(offsets)
        return httpx.Response(200, content=orjson.dumps([(answer or {}).get(o, "ok") for o in offsets]))

    r.attach(Sender(httpx.MockTransport(handler)), Metrics())
    return r, tracker, writer, calls


def test_a_record_reads_back_its_relay_fields():
    r = record(7, replay_count=2)
    assert (r.topic, r.partition, r.offset) == (DLQ, 0, 7)
    assert (r.vendor, r.error_class, r.http_status, r.attempts, r.replay_count) == ("fake", "exhausted", 503, 6, 2)
    assert (r.original_topic, r.original_partition, r.original_offset, r.original_timestamp_ms) == (
        "shop.events", 2, 40, 1_000)
    assert (r.first_failure_ms, r.last_failure_ms, r.failed_ms) == (4_900, 5_000, 5_000)
    assert r.original_where() == "shop.events[2]@40" and r.next_attempt_ms is None and r.due(0)


def test_a_record_without_relay_headers_has_defaults_not_errors():
    r = RelayRecord.from_source(Source(DLQ, 0, 3, 77, None, b"x", [("relay.attempts", b"many")]))
    assert (r.vendor, r.error_class, r.attempts, r.replay_count, r.original_offset) == ("none", "", 0, 0, None)
    assert r.failed_ms == 77  # the record's own timestamp when it says nothing
    parked = RelayRecord.from_source(Source(DLQ, 0, 3, 77, None, b"x", [("relay.next_attempt_ms", b"500")]))
    assert not parked.due(499) and parked.due(500)


def test_filters_select_exactly_what_they_name():
    r = record(1, failed_ms=5_000)
    assert Filters().matches(r)
    cases = {
        Filters(vendors=frozenset({"fake"})): True, Filters(vendors=frozenset({"qubit"})): False,
        Filters(error_classes=frozenset({"exhausted", "rejected"})): True,
        Filters(error_classes=frozenset({"rejected"})): False,
        Filters(status=503): True, Filters(status=500): False,
        Filters(since_ms=5_000): True, Filters(since_ms=5_001): False,
        Filters(until_ms=5_001): True, Filters(until_ms=5_000): False,  # until is exclusive
        Filters(topic="shop.events", partition=2, offsets=(40, 40)): True,
        Filters(topic="other"): False, Filters(partition=1): False, Filters(offsets=(41, 90)): False,
    }
    assert {f: f.matches(r) for f in cases} == cases
    assert Filters(error_classes=frozenset({"b", "a"}), status=5).as_dict() == {"error_classes": ["a", "b"],
                                                                                  "status": 5}


def test_one_decision_per_record():
    r, *_ = redrive(filters=Filters(error_classes=frozenset({"exhausted", "undecodable", "unroutable"})),
                    kinds=["product_view"])
    order = encode(ORDER, make_order(3))
    cases = [
        (record(0, vendor="qubit"), Decision.OTHER_VENDOR),
        (record(1, error_class="rejected"), Decision.FILTERED),
        (record(2, replay_count=3), Decision.AT_MAX),
        (record(3, value=b"plain text", vendor=None, error_class="undecodable"), Decision.UNDECODABLE),
        (record(4, value=order, vendor=None, error_class="undecodable"), Decision.NOT_TAKEN),  # views only
        (record(5, vendor=None, error_class="unroutable"), Decision.DELIVER),  # decodes now: goes to any taker
        (record(6), Decision.DELIVER),
    ]
    decided = [r.decide(rec) for rec, _ in cases]
    assert [d for d, _, _ in decided] == [want for _, want in cases]
    assert decided[2][2] == "replayed 3 times (maximum 3): HTTP 503"
    assert decided[3][2].startswith("bad_framing")
    event = decided[6][1]
    assert event is not None and (event.topic, event.partition, event.offset) == (DLQ, 0, 6)  # settles here
    assert event.timestamp_ms == 1_000 and event.kind is VIEW and event.record["event_id"]  # the original's


async def test_settled_in_order_and_never_committed_past_an_unsettled_write_back():
    r, tracker, writer, calls = redrive(answer={1: "reject"})
    records = [record(0), record(1), record(2, vendor="qubit"), record(3)]
    r.dispatch(r.triage(records))
    r.pipeline.flush()  # type: ignore[union-attr]
    assert await r.pipeline.drain(5)  # type: ignore[union-attr]
    assert calls == [[0, 1, 3]]
    assert len(writer.written) == 1 and r.counts["failed_again"] == 1
    assert tracker.commit_positions() == {(DLQ, 0): 1}  # 1 failed again: its write-back is not acknowledged yet
    writer.ack_all()
    assert tracker.commit_positions() == {(DLQ, 0): 4} and tracker.inflight == 0
    s = r.summary()
    assert (s["scanned"], s["replayed"], s["delivered"], s["failed_again"], s["skipped"]) == (4, 3, 2, 1, 1)
    await r.pipeline.close()  # type: ignore[union-attr]


async def test_a_write_back_keeps_the_original_and_counts_the_replay():
    r, _, writer, _ = redrive(answer={0: "reject"})
    r.dispatch(r.triage([record(0, replay_count=1)]))
    assert await r.pipeline.drain(5)  # type: ignore[union-attr]
    (source, headers, vendor, error_class, _), = writer.written
    h = headers_dict(headers)
    assert (vendor, error_class, h["relay.error_class"], h["relay.reason"]) == ("fake", "rejected", "rejected",
                                                                                 "bad event")
    assert (h["relay.replay_count"], h["relay.attempts"], h["relay.http_status"]) == ("2", "1", "200")
    assert (h["relay.first_failure_ms"], h["relay.last_failure_ms"]) == ("4900", "9000")
    assert (h["relay.original_topic"], h["relay.original_partition"], h["relay.original_offset"]) == (
        "shop.events", "2", "40")
    assert ("trace", b"t-1") in headers and source.value == record(0).source.value
    await r.pipeline.close()  # type: ignore[union-attr]


def test_still_undecodable_is_written_back_for_this_vendor_and_settles_on_ack():
    r, tracker, writer, _ = redrive()
    garbage = record(0, value=b"plain text", vendor=None, error_class="undecodable")
    r.dispatch(r.triage([garbage, record(1, vendor="x")]))
    assert tracker.commit_positions() == {(DLQ, 0): 0}
    (_, headers, vendor, error_class, _), = writer.written
    h = headers_dict(headers)
    assert (vendor, error_class, h["relay.vendor"], h["relay.replay_count"]) == ("fake", "undecodable", "fake", "1")
    assert h["relay.reason"].startswith("bad_framing") and [rep.decision for rep in r.reports] == [
        Decision.UNDECODABLE]
    writer.ack_all()
    assert tracker.commit_positions() == {(DLQ, 0): 2}


def test_replayed_headers_replace_the_outcome_and_keep_the_rest():
    original = Source("shop.events", 1, 9, 123, b"k", b"v", [("trace", b"t"), ("relay.replay_count", b"x")])
    first = dlq_headers(original, "qubit", "exhausted", 503, "HTTP 503", 6, 1_000, 2_000)
    again = replayed_headers(first, "qubit", "rejected", 400, "HTTP 400: e-mail a@b.example bad", 1, 3_000, 1)
    names = [n for n, _ in again]
    for name in ("relay.vendor", "relay.error_class", "relay.reason", "relay.first_failure_ms",
                 "relay.original_offset"):
        assert names.count(name) == 1, name
    assert [v for n, v in again if n == "relay.replay_count"] == [b"x", b"1"]  # the foreign value stays data
    h = headers_dict(again)
    assert (h["relay.error_class"], h["relay.http_status"], h["relay.attempts"]) == ("rejected", "400", "1")
    assert h["relay.reason"] == "HTTP 400: e-mail <email> bad"  # redacted as every reason
    assert (h["relay.first_failure_ms"], h["relay.last_failure_ms"], h["relay.replay_count"]) == ("1000", "3000", "1")
    assert (h["relay.original_topic"], h["relay.original_offset"], h["relay.original_timestamp_ms"]) == (
        "shop.events", "9", "123")
    assert ("trace", b"t") in again
    parked = replayed_headers([], "qubit", "exhausted", None, "timeout", 2, 5_000, 0,
                              extra=[("relay.next_attempt_ms", b"9000")])
    assert headers_dict(parked)["relay.first_failure_ms"] == "5000"
    assert headers_dict(parked)["relay.next_attempt_ms"] == "9000" and headers_dict(parked)["relay.http_status"] == ""


def test_a_record_with_foreign_digits_in_its_numbers_reads_them_as_missing():
    headers = [("relay.vendor", b"fake"), ("relay.attempts", "٣".encode()), ("relay.first_failure_ms", "³¹".encode()),
               ("relay.original_offset", b" 12"), ("relay.replay_count", "\uff11".encode()),
               ("relay.next_attempt_ms", b"-1"), ("relay.http_status", "\uff15\uff10\uff13".encode())]
    r = RelayRecord.from_source(Source(DLQ, 0, 3, 77, None, b"x", headers))
    assert (r.attempts, r.first_failure_ms, r.original_offset, r.replay_count, r.next_attempt_ms, r.http_status) == (
        0, None, None, 0, None, None)
    assert r.failed_ms == 77 and r.due(0)
