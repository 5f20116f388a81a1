"""``processor dlq``'s pure parts: time and offset arguments, the rate cap, the inspection's counts and
pending/replayed split, masking of samples and vendor payloads, and the summaries."""

from __future__ import annotations

import json

import pytest

from processor.codec import Decoder
from processor.deadletter import dlq_headers
from processor.devstack.samples import as_event, encode, make_order, make_view
from processor.dlq import Inspection, RateCap, parse_offsets, parse_when
from processor.dlq import replay as replay_module
from processor.dlq.view import inspection_doc, inspection_text, mask_record, masked_request, replay_text, sample
from processor.events import EventKind, Source
from processor.redrive import Filters, RelayRecord
from processor.vendors import adapter_class

ORDER = EventKind.ORDER
NOW = 1_800_000_000_000


def test_times_are_relative_or_iso():
    assert parse_when("2h", NOW) == NOW - 2 * 3_600_000
    assert parse_when("90s", NOW) == NOW - 90_000 and parse_when("1.5d", NOW) == NOW - 36 * 3_600_000
    assert parse_when("2026-12-01T08:00:00Z", NOW) == 1_796_112_000_000
    assert parse_when("2026-12-01T08:00:00", NOW) == 1_796_112_000_000  # UTC unless it says
    assert parse_when("2026-12-01T09:00:00+01:00", NOW) == 1_796_112_000_000
    with pytest.raises(ValueError, match="neither a relative time"):
        parse_when("yesterday", NOW)


def test_offsets_are_an_inclusive_range():
    assert parse_offsets("5-9") == (5, 9) and parse_offsets("7") == (7, 7)
    for bad in ("9-5", "a-b", "-3"):
        with pytest.raises(ValueError):
            parse_offsets(bad)


async def test_the_rate_cap_spaces_events(monkeypatch):
    slept: list[float] = []
    clock = [100.0]

    async def fake_sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    monkeypatch.setattr(replay_module.asyncio, "sleep", fake_sleep)
    monkeypatch.setattr(replay_module.time, "monotonic", lambda: clock[0])
    cap = RateCap(10)
    for _ in range(3):
        await cap.take(5)  # 15 events at 10/s: the first 5 at once, then 0.5 s per 5
    assert slept == [0.5, 0.5]
    await RateCap(None).take(1000)
    assert slept == [0.5, 0.5]


def relay_record(offset: int, vendor: str | None, error_class: str = "exhausted", status: int | None = 500,
                 failed_ms: int = NOW, replay_count: int = 0, value: bytes = b"x") -> RelayRecord:
    src = Source("shop.events", 0, offset, 1, b"k", value, [])
    headers = dlq_headers(src, vendor, error_class, status, f"HTTP {status}", 3, failed_ms, failed_ms, replay_count)
    return RelayRecord.from_source(Source("dlq", 0, offset, failed_ms, b"k", value, headers))


def test_inspection_counts_and_splits_pending_from_replayed_by_each_vendors_position():
    found = Inspection("dlq", Filters())
    found.positions = {"qubit": {0: 2}, "convert": {0: None}}
    records = [relay_record(0, "qubit"), relay_record(1, "qubit", "rejected", None, NOW - 5),
               relay_record(2, "qubit", replay_count=1), relay_record(3, None, "undecodable", None, NOW + 5),
               relay_record(4, "convert")]
    for r in records:
        found.add(r, show=1)
    assert found.counts == {("qubit", "exhausted", "500"): 2, ("qubit", "rejected", ""): 1,
                            ("none", "undecodable", ""): 1, ("convert", "exhausted", "500"): 1}
    assert (found.pending["qubit"], found.replayed["qubit"]) == (1, 2)
    assert (found.pending["convert"], found.replayed["convert"]) == (1, 0)  # nothing committed: all pending
    assert found.unassigned_pending == {"qubit": 1, "convert": 1}
    assert (found.oldest_ms, found.newest_ms) == (NOW - 5, NOW + 5)
    assert found.replay_counts == {0: 4, 1: 1} and len(found.samples) == 1
    doc = inspection_doc(found, Decoder(), lambda v: f"g.replay.{v}")
    assert doc["vendors"]["qubit"] == {"group": "g.replay.qubit", "position": {"0": 2}, "records": 3, "pending": 1,
                                       "replayed": 2, "unassigned_pending": 1}
    assert doc["samples"][0]["payload_error"].startswith("bad_framing")
    text = inspection_text(doc)
    assert "qubit         exhausted         500        2" in text and "pending      1, plus 1 of no vendor" in text
    json.dumps(doc)  # one JSON document


def test_samples_mask_the_customers_contact_fields_and_e_mails():
    order = make_order(3)  # n % 3 == 0: has a customer
    order["page"]["url"] = "https://shop.example.com/thanks?mail=sam@example.org"
    r = relay_record(0, "qubit", value=encode(ORDER, order))
    shown = sample(r, Decoder())
    customer = shown["payload"]["customer"]
    assert customer == {"email": "***", "phone": "***", "first_name": "***", "last_name": "***"}
    assert shown["payload"]["page"]["url"] == "https://shop.example.com/thanks?mail=<email>"
    assert shown["payload"]["order"] == order["order"] and shown["kind"] == "order"
    assert mask_record({"customer": None, "a": ["x@y.example"], "source": "event-relay@0.1.0"}) == {
        "customer": None, "a": ["<email>"], "source": "event-relay@0.1.0"}


def test_planned_requests_are_shown_without_secrets_or_pii():
    ql = adapter_class("quicklizard")
    adapter = ql(ql.settings_model().model_validate({"sites": {"default": {"client_key": "ql-secret"}},
                                                     "options": {}}))
    plan = adapter.plan([as_event(EventKind.PRODUCT_VIEW, make_view(1, 1), 0)])
    shown = masked_request(adapter, plan.requests[0])
    assert "ql-secret" not in json.dumps(shown) and '"client_key":"***"' in shown["body"]

    cv = adapter_class("convead")
    adapter = cv(cv.settings_model().model_validate(
        {"sites": {"default": {"app_key": "k3y/with space", "domain": "shop.example.com", "send_visitor_info": True}},
         "options": {}}))
    plan = adapter.plan([as_event(ORDER, make_order(3), 0)])
    shown = masked_request(adapter, plan.requests[0])
    text = json.dumps(shown)
    for secret_or_pii in ("k3y", "user3", "7946", "Sam", "Example"):
        assert secret_or_pii not in text, secret_or_pii
    assert "app_key=***" in shown["body"]


def test_replay_summary_says_what_happened_and_how_to_resume():
    base = {"vendor": "qubit", "group": "g.replay.qubit", "dry_run": False, "total": 10, "scanned": 6,
            "replayed": 4, "delivered": 3, "filtered_by_vendor": 0, "failed_again": 1, "skipped": 2,
            "skipped_other_vendor": 2, "skipped_by_filter": 0, "skipped_kind_not_taken": 0, "at_max_replays": 0,
            "still_undecodable": 0, "pending": 4, "complete": False, "interrupted": True, "committed": {"0": 6},
            "reports": [], "elapsed_s": 1.0}
    text = replay_text(base)
    assert "6 of 10 records scanned, 4 replayed" in text and "delivered 3" in text and "failed again 1" in text
    assert "stopped with 4 records pending; position 0@6; run the same command again to resume" in text
    done = replay_text({**base, "pending": 0, "complete": True, "interrupted": False})
    assert "done in 1.0s; position 0@6" in done


def test_progress_off_a_terminal_is_a_log_line(caplog):
    from processor.dlq.view import ProgressReporter

    report = ProgressReporter("qubit", interval_s=0, tty=False)
    with caplog.at_level("INFO", logger="processor.dlq.view"):
        report({"total": 100, "scanned": 40, "replayed": 30, "delivered": 25, "skipped": 10, "failed_again": 1,
                "rate": 20.0})
    assert caplog.messages == ["replay to qubit: 40 of 100 scanned, 30 replayed, 25 delivered, 10 skipped, "
                               "1 failed again, 20 records/s, eta 3s"]
