"""processor.validation: each rule, its reason, and that a valid event costs no object."""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor import validation
from processor.codec import Decoder
from processor.config import interpolate
from processor.deadletter import dlq_headers, headers_dict
from processor.devstack.samples import encode, make_order, make_view, with_changes
from processor.events import UNCHECKED, Event, EventKind, Source
from processor.metrics import Metrics
from processor.offsets import OffsetTracker
from processor.redrive import Decision, Redrive, RelayRecord
from processor.transport import Sender
from processor.validation import check, validate, validate_all
from processor.vendors.base import NotJSON, json_body
from processor.vendors.quicklizard import QuickLizardAdapter
from tests.unit.test_redrive import FakeWriter
from tests.unit.test_routing import relay

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
T = 1_764_000_000_000  # event time of the samples (2025-11-24)
KAFKA_TS = T + 5_000  # the message's Kafka timestamp
DOUBLES = [(VIEW, "product.price", "product.price", "product.price"),
           (ORDER, "order.total", "order.total", "order.total"),
           (ORDER, "order.items.1.unit_price", "order.items.unit_price", "order.items[1].unit_price")]
NOT_FINITE = [(math.nan, "NaN"), (math.inf, "Infinity"), (-math.inf, "-Infinity")]


def sample(kind: EventKind) -> dict:
    return make_view(1, 1, event_time=T) if kind is VIEW else make_order(1, 3, event_time=T)


def test_valid_events_have_no_violations_and_build_nothing():
    assert check(VIEW, sample(VIEW), KAFKA_TS) is None
    assert check(ORDER, sample(ORDER), KAFKA_TS) is None
    # what the schemas allow and the rules keep: a free product, a free order, an order without lines
    assert check(VIEW, with_changes(sample(VIEW), "product.price", 0.0), KAFKA_TS) is None
    assert check(ORDER, with_changes(sample(ORDER), "order.total", 0.0), KAFKA_TS) is None
    assert check(ORDER, with_changes(sample(ORDER), "order.items", []), KAFKA_TS) is None
    assert check(VIEW, with_changes(sample(VIEW), "product.name", ""), KAFKA_TS) is None


@pytest.mark.parametrize(("kind", "path", "key", "named"), DOUBLES)
@pytest.mark.parametrize(("value", "word"), NOT_FINITE)
def test_every_double_must_be_finite(kind, path, key, named, value, word):
    assert check(kind, with_changes(sample(kind), path, value), KAFKA_TS) == {key: f"{named} is {word}"}


@pytest.mark.parametrize(("kind", "path", "key", "named"), DOUBLES)
def test_amounts_are_not_negative(kind, path, key, named):
    assert check(kind, with_changes(sample(kind), path, -0.5), KAFKA_TS) == {key: f"{named} is negative (-0.5)"}


@pytest.mark.parametrize(("event_time", "why"), [
    (1_764_000_000, "event_time 1764000000 looks like seconds, not milliseconds"),
    (0, "event_time 0 is before 2001-01-01 (epoch milliseconds)"),
    (-1, "event_time -1 is before 2001-01-01 (epoch milliseconds)"),
    (-1_764_000_000_000, "event_time -1764000000000 is before 2001-01-01 (epoch milliseconds)"),
    (978_307_199_999, "event_time 978307199999 is before 2001-01-01 (epoch milliseconds)"),
    (KAFKA_TS + 86_400_001, f"event_time {KAFKA_TS + 86_400_001} is more than a day ahead of the message's timestamp"),
    (32_503_680_000_000, "event_time 32503680000000 is more than a day ahead of the message's timestamp"),
    (T * 1000, f"event_time {T * 1000} looks like microseconds, not milliseconds"),
])
@pytest.mark.parametrize("kind", [VIEW, ORDER])
def test_event_time_is_epoch_milliseconds_in_a_plausible_window(kind, event_time, why):
    assert check(kind, with_changes(sample(kind), "event_time", event_time), KAFKA_TS) == {"event_time": why}


@pytest.mark.parametrize("event_time", [978_307_200_000, KAFKA_TS + 86_400_000, KAFKA_TS - 10 * 365 * 86_400_000])
def test_event_time_window_bounds_are_inclusive(event_time):
    assert check(VIEW, with_changes(sample(VIEW), "event_time", event_time), KAFKA_TS) is None


@pytest.mark.parametrize(("kind", "path", "key", "named"), [
    (VIEW, "event_id", "event_id", "event_id"),
    (VIEW, "site_id", "site_id", "site_id"),
    (VIEW, "product.product_id", "product.product_id", "product.product_id"),
    (VIEW, "experiments.0.experience_id", "experiments.experience_id", "experiments[0].experience_id"),
    (VIEW, "experiments.0.variation_id", "experiments.variation_id", "experiments[0].variation_id"),
    (ORDER, "order.order_id", "order.order_id", "order.order_id"),
    (ORDER, "order.items.2.product_id", "order.items.product_id", "order.items[2].product_id"),
])
@pytest.mark.parametrize("empty", ["", "  "])
def test_ids_must_not_be_empty(kind, path, key, named, empty):
    assert check(kind, with_changes(sample(kind), path, empty), KAFKA_TS) == {key: f"{named} is empty"}


@pytest.mark.parametrize("quantity", [0, -1])
def test_a_line_sells_at_least_one_unit_and_the_reason_says_what_is_wrong(quantity):
    rec = with_changes(sample(ORDER), "order.items.1.quantity", quantity)
    assert check(ORDER, rec, KAFKA_TS) == {
        "order.items.quantity": f"order.items[1].quantity is {quantity}, not a count of units sold (at least 1)"}


def test_several_violations_each_named_and_the_first_element_of_a_list_kept():
    rec = with_changes(sample(ORDER), "order.items.0.unit_price", math.nan)
    rec = with_changes(rec, "order.items.2.unit_price", math.inf)
    rec = with_changes(rec, "event_time", 1_764_000_000)
    assert check(ORDER, rec, KAFKA_TS) == {
        "event_time": "event_time 1764000000 looks like seconds, not milliseconds",
        "order.items.unit_price": "order.items[0].unit_price is NaN"}
    assert validation.reason(check(ORDER, rec, KAFKA_TS), {"order.items.unit_price", "event_time"}) == (
        "event_time 1764000000 looks like seconds, not milliseconds; order.items[0].unit_price is NaN")


def event(kind: EventKind, rec: dict, ts: int | None = KAFKA_TS) -> Event:
    return Event.of(kind, rec, Source("shop.events", 0, 0, ts, b"k", b"v", None))


def test_validate_runs_once_and_keeps_the_result_on_the_event():
    ev = event(VIEW, with_changes(sample(VIEW), "product.price", math.nan))
    assert ev.invalid is UNCHECKED
    found = validate(ev)
    assert found == {"product.price": "product.price is NaN"} and ev.invalid is found
    ev.record["product"]["price"] = 1.0  # not looked at again
    assert validate(ev) is found
    ok = event(VIEW, sample(VIEW))
    validate_all([ok])
    assert ok.invalid is None


def test_without_a_kafka_timestamp_the_window_ends_a_day_after_now():
    now = int(time.time() * 1000)
    assert validate(event(VIEW, with_changes(sample(VIEW), "event_time", now), ts=None)) is None
    late = event(VIEW, with_changes(sample(VIEW), "event_time", now + 2 * 86_400_000), ts=None)
    assert "more than a day ahead" in validate(late)["event_time"]


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_a_price_is_valid_exactly_when_json_can_carry_it_and_it_is_not_negative(price):
    found = check(VIEW, with_changes(sample(VIEW), "product.price", price), KAFKA_TS)
    json_ok = math.isfinite(price)
    assert (found is None) == (json_ok and price >= 0)
    if found is not None:
        assert found["product.price"].startswith("product.price is ")


def strict(body: bytes):
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(body, parse_constant=refuse)


@pytest.mark.parametrize(("obj", "path"), [
    ({"a": [1.0, {"price": math.nan}]}, "a[1].price"), ([math.inf], "[0]"), ({"x": -math.inf}, "x"),
    ({"p": None}, "p"), (None, "body")])
def test_json_body_refuses_what_orjson_would_write_as_null(obj, path):
    with pytest.raises(NotJSON) as exc:
        json_body(obj)
    assert str(exc.value) == f"{path} would be sent as null"


def test_json_body_is_strict_json_and_keeps_null_inside_strings():
    obj = {"name": "nullable null", "price": 0.0, "n": [1, 2.5]}
    assert strict(json_body(obj)) == obj


# -- where validation runs: routing before the fan-out, the redrive on each record read back -------------

def test_routing_validates_each_event_once_before_any_vendor_plans_it(monkeypatch):
    calls = []
    real = validation.check
    monkeypatch.setattr(validation, "check", lambda *a: calls.append(a[0]) or real(*a))
    r = relay()  # qubit (every kind) and quicklizard (orders)
    r.tracker.assign("t", 0)
    events = [Event.of(kind, rec, Source("t", 0, i, KAFKA_TS, b"k", b"v", None)) for i, (kind, rec) in enumerate([
        (VIEW, sample(VIEW)), (ORDER, with_changes(sample(ORDER), "order.items.0.unit_price", math.nan)),
        (ORDER, with_changes(sample(ORDER), "event_time", 1_764_000_000))])]
    r.router.route(events)
    assert calls == [VIEW, ORDER, ORDER]  # once each, before the fan-out
    assert [e.invalid for e in events] == [None, {"order.items.unit_price": "order.items[0].unit_price is NaN"},
                                           {"event_time": "event_time 1764000000 looks like seconds, not milliseconds"}]
    qubit, quicklizard = r.pipelines["qubit"].adapter, r.pipelines["quicklizard"].adapter
    assert [(e.offset, why) for e, why in qubit.plan(events).rejected] == [
        (2, "event_time 1764000000 looks like seconds, not milliseconds")]
    assert [(e.offset, why) for e, why in quicklizard.plan(events[1:]).rejected] == [
        (1, "order.items[0].unit_price is NaN")]
    assert len(calls) == 3  # the adapters did not check again


async def test_a_replayed_or_redriven_event_is_validated_as_a_live_one():
    settings = interpolate(QuickLizardAdapter.example_settings("http://127.0.0.1:9"), "",
                           QuickLizardAdapter.example_env)
    ql = QuickLizardAdapter(QuickLizardAdapter.settings_model().model_validate(settings))
    tracker = OffsetTracker()
    tracker.assign("dlq", 0)
    writer = FakeWriter()
    r = Redrive(ql, Decoder(), tracker, None, 3, writer, clock=lambda: 9.0)
    sent = []
    r.attach(Sender(httpx.MockTransport(lambda req: sent.append(req) or httpx.Response(500))), Metrics())
    value = encode(VIEW, with_changes(sample(VIEW), "product.price", math.nan))
    original = Source("shop.events", 2, 40, KAFKA_TS, b"k", value, None)
    headers = dlq_headers(original, "quicklizard", "exhausted", 503, "HTTP 503", 6, KAFKA_TS, KAFKA_TS, 0)
    rec = RelayRecord.from_source(Source("dlq", 0, 0, KAFKA_TS + 9_000, b"k", value, headers))
    t = r.triage([rec])
    assert t.decisions == [Decision.DELIVER] and t.events[0].invalid == {"product.price": "product.price is NaN"}
    r.dispatch(t)
    assert await r.pipeline.drain(5)
    assert sent == []  # never sent: QuickLizard needs the price
    ((_, written, vendor, error_class, _),) = writer.written
    h = headers_dict(written)
    assert (vendor, error_class, h["relay.reason"], h["relay.replay_count"]) == (
        "quicklizard", "rejected", "product.price is NaN", "1")


# -- the hand-tuned check against a plain reference of the same rules -------------------------------------

def reference(kind: EventKind, rec: dict, reference_ms: int) -> dict[str, str] | None:
    """The rules written plainly, one field at a time: what ``check`` must answer."""
    out: dict[str, str] = {}

    def amount(key: str, name: str, x: float) -> None:
        why = ("is NaN" if math.isnan(x) else "is Infinity" if x == math.inf else "is -Infinity" if x == -math.inf
               else f"is negative ({x!r})" if x < 0 else None)
        if why:
            out.setdefault(key, f"{name} {why}")

    def ident(key: str, name: str, value: str) -> None:
        if value.strip() == "":
            out.setdefault(key, f"{name} is empty")

    ms, latest = rec["event_time"], reference_ms + validation.MAX_AHEAD_MS
    if ms < validation.MIN_EVENT_TIME_MS:
        seconds = validation.MIN_EVENT_TIME_MS // 1000 <= ms <= latest // 1000
        out["event_time"] = (f"event_time {ms} looks like seconds, not milliseconds" if seconds
                             else f"event_time {ms} is before 2001-01-01 (epoch milliseconds)")
    elif ms > latest:
        micro = validation.MIN_EVENT_TIME_MS * 1000 <= ms <= latest * 1000
        out["event_time"] = (f"event_time {ms} looks like microseconds, not milliseconds" if micro
                             else f"event_time {ms} is more than a day ahead of the message's timestamp")
    ident("event_id", "event_id", rec["event_id"])
    ident("site_id", "site_id", rec["site_id"])
    for i, b in enumerate(rec["experiments"]):
        ident("experiments.experience_id", f"experiments[{i}].experience_id", b["experience_id"])
        ident("experiments.variation_id", f"experiments[{i}].variation_id", b["variation_id"])
    if kind is VIEW:
        amount("product.price", "product.price", rec["product"]["price"])
        ident("product.product_id", "product.product_id", rec["product"]["product_id"])
        return out or None
    amount("order.total", "order.total", rec["order"]["total"])
    ident("order.order_id", "order.order_id", rec["order"]["order_id"])
    for i, item in enumerate(rec["order"]["items"]):
        amount("order.items.unit_price", f"order.items[{i}].unit_price", item["unit_price"])
        if item["quantity"] < 1:
            out.setdefault("order.items.quantity",
                           f"order.items[{i}].quantity is {item['quantity']}, not a count of units sold (at least 1)")
        ident("order.items.product_id", f"order.items[{i}].product_id", item["product_id"])
    return out or None


IDS = st.sampled_from(["P-1", "", " ", "\t", "x y"])
AMOUNTS = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1e308, 5e-324]))
TIMES = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(0, 10**17),
                  st.sampled_from([978_307_199, 978_307_200, 978_307_199_999, 978_307_200_000, KAFKA_TS + 86_400_000,
                                   KAFKA_TS + 86_400_001, 978_307_200_000_000, (KAFKA_TS + 86_400_000) * 1000]))


@given(kind=st.sampled_from([VIEW, ORDER]), event_time=TIMES, event_id=IDS, site_id=IDS, pid=IDS,
       price=AMOUNTS, experiments=st.lists(st.tuples(IDS, IDS), max_size=3),
       lines=st.lists(st.tuples(IDS, AMOUNTS, st.integers(-3, 4)), max_size=4))
def test_check_answers_what_the_plain_rules_do(kind, event_time, event_id, site_id, pid, price, experiments, lines):
    rec = sample(kind)
    rec.update(event_time=event_time, event_id=event_id, site_id=site_id,
               experiments=[{"experience_id": e, "variation_id": v} for e, v in experiments])
    if kind is VIEW:
        rec["product"].update(product_id=pid, price=price)
    else:
        template = rec["order"]["items"][0]
        rec["order"].update(order_id=pid, total=price, items=[
            {**template, "product_id": p, "unit_price": u, "quantity": q} for p, u, q in lines])
    assert check(kind, rec, KAFKA_TS) == reference(kind, rec, KAFKA_TS)
