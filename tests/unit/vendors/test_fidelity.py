"""Vendor fidelity, per rule and per vendor: an event breaking a validation rule is rejected naming the
field by each vendor that needs that field; every other vendor sends a request that parses as strict
RFC 8259 JSON, holds no null, and that the vendor's sandbox twin accepts."""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import parse_qs

import pytest
from pydantic import ValidationError

from processor.config import interpolate
from processor.devstack.samples import make_order, make_view, with_changes
from processor.events import Event, EventKind, Source
from processor.vendors import REGISTRY, adapter_class
from processor.vendors.base import Adapter, Plan, VendorRequest, Verdict
from processor.vendors.convead import form_quote
from processor.vendors.tracardi import TracardiSite
from tests.unit.vendors.conftest import exchange

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
VENDORS = sorted(REGISTRY)
T = 1_764_000_000_000  # the samples' event time (2025-11-24)
KAFKA_TS = T + 5_000  # the message's Kafka timestamp
# every double the canonical schemas carry: (kind, with_changes path, validation key, the reason's name)
DOUBLES = [(VIEW, "product.price", "product.price", "product.price"),
           (ORDER, "order.total", "order.total", "order.total"),
           (ORDER, "order.items.1.unit_price", "order.items.unit_price", "order.items[1].unit_price")]
NOT_FINITE = [(math.nan, "NaN"), (math.inf, "Infinity"), (-math.inf, "-Infinity")]
EVENT_TIMES = [(1_764_000_000, "event_time 1764000000 looks like seconds, not milliseconds"),
               (0, "event_time 0 is before 2001-01-01 (epoch milliseconds)"),
               (-5, "event_time -5 is before 2001-01-01 (epoch milliseconds)"),
               (32_503_680_000_000, "event_time 32503680000000 is more than a day ahead of the message's timestamp")]


def build(name: str, url: str) -> Adapter[Any, Any]:
    cls = adapter_class(name)
    section = interpolate(cls.example_settings(url), "", cls.example_env)
    return cls(cls.settings_model().model_validate(section))


def sample(kind: EventKind, n: int = 1) -> dict[str, Any]:
    return make_view(n, n, event_time=T) if kind is VIEW else make_order(n, 3, event_time=T)


def event(kind: EventKind, rec: dict[str, Any], offset: int = 0) -> Event:
    return Event.of(kind, rec, Source("shop.events", 0, offset, KAFKA_TS, b"k", b"v", None))


def strict_json(raw: bytes | str) -> Any:
    """RFC 8259 JSON: NaN, Infinity and -Infinity refused (Python's json takes them by default)."""
    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} is not JSON")
    return json.loads(raw, parse_constant=refuse)


def no_null(value: Any, path: str = "") -> None:
    assert value is not None, f"{path or 'body'} is null"
    if isinstance(value, dict):
        for k, v in value.items():
            no_null(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            no_null(v, f"{path}[{i}]")


def body(name: str, req: VendorRequest) -> Any:
    """The request's JSON, parsed strictly (Convead: the form's ``data`` field); no null anywhere."""
    if name == "convead":
        form = parse_qs(req.content.decode("ascii"), strict_parsing=True)
        doc = strict_json(form["data"][0])
    else:
        doc = strict_json(req.content)
    no_null(doc)
    return doc


async def delivered(name: str, adapter: Adapter[Any, Any], plan: Plan) -> list[Any]:
    """Every request of ``plan`` sent to the twin: each parses strictly and every event is delivered."""
    assert plan.requests
    docs = [body(name, req) for req in plan.requests]
    for resp, outcomes in await exchange(adapter, plan.requests):
        assert [o.verdict for o in outcomes] == [Verdict.DELIVERED] * len(outcomes), (resp.status, resp.body)
    return docs


@pytest.mark.parametrize("name", VENDORS)
@pytest.mark.parametrize(("kind", "path", "key", "named"), DOUBLES)
@pytest.mark.parametrize(("value", "word"), NOT_FINITE)
async def test_a_double_json_cannot_carry_is_dead_lettered_naming_it_or_not_sent(sandbox, name, kind, path, key,
                                                                                named, value, word):
    a = build(name, sandbox.url)
    ev = event(kind, with_changes(sample(kind), path, value))
    plan = a.plan([ev])
    if key in a.needs:
        assert plan.rejected == [(ev, f"{named} is {word}")] and not plan.requests
    else:
        assert not plan.rejected
        await delivered(name, a, plan)


@pytest.mark.parametrize("name", VENDORS)
@pytest.mark.parametrize(("event_time", "why"), EVENT_TIMES)
@pytest.mark.parametrize("kind", [VIEW, ORDER])
async def test_an_implausible_event_time_is_dead_lettered_by_the_vendors_that_send_it(sandbox, name, event_time,
                                                                                     why, kind):
    a = build(name, sandbox.url)
    ev = event(kind, with_changes(sample(kind), "event_time", event_time))
    plan = a.plan([ev])
    if "event_time" in a.needs:
        assert name in ("qubit", "tracardi")
        assert plan.rejected == [(ev, why)] and not plan.requests
    else:  # the vendor sends no time: the event goes as it would with any other time
        assert not plan.rejected
        await delivered(name, a, plan)


async def test_the_times_sent_are_the_event_time_in_each_documents_form(sandbox):
    views = [event(VIEW, sample(VIEW, 1), 0), event(VIEW, sample(VIEW, 2), 1)]
    qubit = build("qubit", sandbox.url)
    (doc,) = await delivered("qubit", qubit, qubit.plan(views))
    assert [row["meta"]["ts"] for row in doc["events"]] == [T, T]  # epoch milliseconds
    tracardi = build("tracardi", sandbox.url)
    docs = await delivered("tracardi", tracardi, tracardi.plan(views))
    assert {e["time"]["create"] for d in docs for e in d["events"]} == {"2025-11-24T16:00:00.000Z"}


@pytest.mark.parametrize("name", VENDORS)
@pytest.mark.parametrize("quantity", [0, -1])
async def test_a_line_without_units_is_named_for_what_is_wrong(sandbox, name, quantity):
    a = build(name, sandbox.url)
    ev = event(ORDER, with_changes(sample(ORDER), "order.items.0.quantity", quantity))
    plan = a.plan([ev])
    if name == "qubit":  # sends the order's total, not its lines
        await delivered(name, a, plan)
    else:
        assert plan.rejected == [
            (ev, f"order.items[0].quantity is {quantity}, not a count of units sold (at least 1)")]


@pytest.mark.parametrize("name", VENDORS)
@pytest.mark.parametrize(("kind", "path", "named"), [
    (VIEW, "product.product_id", "product.product_id"), (VIEW, "event_id", "event_id"),
    (VIEW, "site_id", "site_id"), (ORDER, "order.order_id", "order.order_id"),
    (ORDER, "order.items.2.product_id", "order.items[2].product_id"),
    (VIEW, "experiments.0.experience_id", "experiments[0].experience_id")])
async def test_an_empty_id_is_dead_lettered_by_the_vendors_that_send_it(sandbox, name, kind, path, named):
    a = build(name, sandbox.url)
    ev = event(kind, with_changes(sample(kind), path, ""))
    plan = a.plan([ev])
    key = {"order.items[2].product_id": "order.items.product_id",
           "experiments[0].experience_id": "experiments.experience_id"}.get(named, named)
    if key in a.needs:
        assert plan.rejected == [(ev, f"{named} is empty")]
    else:
        assert not plan.rejected
        await delivered(name, a, plan)


# -- where the documents are silent: each adapter's decision (its docstring says it) ----------------------

@pytest.mark.parametrize("name", VENDORS)
async def test_a_free_product_and_a_free_order_are_sent_as_zero(sandbox, name):
    a = build(name, sandbox.url)
    order = with_changes(with_changes(sample(ORDER), "order.total", 0.0), "order.items",
                         [{**sample(ORDER)["order"]["items"][0], "unit_price": 0.0, "quantity": 1}])
    events = [event(VIEW, with_changes(sample(VIEW), "product.price", 0.0), 0), event(ORDER, order, 1)]
    plan = a.plan(events)
    assert not plan.rejected
    docs = await delivered(name, a, plan)
    raw = b"".join(r.content for r in plan.requests)
    prices = {"quicklizard": lambda: [row["price"] for d in docs for row in d],
              "convead": lambda: [d["properties"].get("price", d["properties"].get("revenue")) for d in docs],
              "tracardi": lambda: [e["properties"].get("price", e["properties"].get("value"))
                                   for d in docs for e in d["events"]],
              "qubit": lambda: [row["basket"]["total"]["value"] for d in docs for row in d["events"]
                                if "basket" in row],
              "convert": lambda: [row["r"] for d in docs for row in d["ev"] if "r" in row]}[name]()
    assert prices and all(p == 0 and isinstance(p, float) for p in prices)
    assert b"null" not in raw


async def test_an_empty_product_name_is_left_out_not_sent_empty(sandbox):
    rec = with_changes(with_changes(sample(VIEW), "product.name", ""), "page.title", None)
    for name in VENDORS:
        a = build(name, sandbox.url)
        plan = a.plan([event(VIEW, rec)])
        docs = await delivered(name, a, plan)
        assert '""' not in json.dumps(docs), name  # no empty string sent for the name
    order = with_changes(sample(ORDER), "order.items.0.name", "")
    tracardi = build("tracardi", sandbox.url)
    (doc,) = await delivered("tracardi", tracardi, tracardi.plan([event(ORDER, order)]))
    assert "product" not in doc["events"][0]["properties"]["items"][0]


@pytest.mark.parametrize("name", VENDORS)
async def test_an_order_without_lines_is_a_purchase_by_its_revenue(sandbox, name):
    a = build(name, sandbox.url)
    gift = with_changes(sample(ORDER), "order.items", [])
    total = gift["order"]["total"]
    plan = a.plan([event(ORDER, gift)])
    assert not plan.rejected
    if name == "quicklizard":  # conversions are per product sold: nothing to report
        assert plan.filtered and not plan.requests
        return
    (doc,) = await delivered(name, a, plan)
    if name == "convert":
        (tr,) = [row for row in doc["ev"] if row["evt"] == "tr"]
        assert (tr["r"], tr["prc"]) == (total, 0)
    elif name == "convead":
        assert doc["type"] == "purchase" and doc["properties"] == {"order_id": "O-1-1", "revenue": total}
    elif name == "tracardi":
        props = doc["events"][0]["properties"]
        assert (props["value"], props["items"], props["itemCount"]) == (total, [], 0)
    else:
        assert doc["events"][0]["basket"]["total"]["value"] == total


@pytest.mark.parametrize("name", VENDORS)
def test_a_site_id_no_config_names_is_dead_lettered_naming_it(name):
    cls = adapter_class(name)
    section = interpolate(cls.example_settings("http://127.0.0.1:1"), "", cls.example_env)
    section["sites"] = {"shop-1": next(iter(section["sites"].values()))}  # no 'default'
    a = cls(cls.settings_model().model_validate(section))
    ev = event(VIEW, sample(VIEW, 3) | {"site_id": "shop-9"})
    assert a.plan([ev]).rejected == [(ev, f"no {name} site config for site_id 'shop-9' and no 'default'")]


def test_quicklizard_overflowing_line_price_is_rejected_naming_the_unit_price():
    a = build("quicklizard", "http://127.0.0.1:1")
    ev = event(ORDER, with_changes(with_changes(sample(ORDER), "order.items.2.unit_price", 1e308),
                                   "order.items.2.quantity", 3))
    assert a.plan([ev]).rejected == [
        (ev, "invalid field order.items[2].unit_price: unit price x quantity is not a finite number")]


# -- the twins answer what their vendor would: strict JSON, no null where a number belongs -----------------

# vendor -> (kind, a function giving the parsed body's number to poison, as (container, key))
POISON = {
    "quicklizard": (VIEW, lambda doc: (doc[0], "price")),
    "qubit": (ORDER, lambda doc: (doc["events"][0]["basket"]["total"], "value")),
    "convert": (ORDER, lambda doc: (next(r for r in doc["ev"] if r["evt"] == "tr"), "r")),
    "tracardi": (VIEW, lambda doc: (doc["events"][0]["properties"], "price")),
    "convead": (VIEW, lambda doc: (doc["properties"], "price")),
}


def poisoned(name: str, req: VendorRequest, literal: bytes) -> bytes:
    """The request's body with the POISON number written as ``literal`` (NaN, Infinity, null)."""
    doc = body(name, req)
    box, key = POISON[name][1](doc)
    box[key] = "__POISON__"
    text = json.dumps(doc, separators=(",", ":")).encode().replace(b'"__POISON__"', literal)
    if name != "convead":
        return text
    form = parse_qs(req.content.decode("ascii"))
    return b"&".join(k.encode() + b"=" + (form_quote(text) if k == "data" else form_quote(v[0].encode()))
                     for k, v in form.items())


@pytest.mark.parametrize("name", VENDORS)
@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"null"])
async def test_twins_parse_strictly_and_refuse_a_missing_number(sandbox, name, literal):
    a = build(name, sandbox.url)
    kind = POISON[name][0]
    (req,) = a.plan([event(kind, sample(kind))]).requests
    req.content = poisoned(name, req, literal)
    ((resp, outcomes),) = await exchange(a, [req])
    if name == "tracardi" and literal == b"null":
        # Tracardi's event properties are free-form: it stores a null price as given (which is why the
        # relay never sends one: product.price is among its needs)
        assert outcomes[0].verdict is Verdict.DELIVERED
        return
    assert outcomes[0].verdict is Verdict.REJECTED, (resp.status, resp.body)
    if literal != b"null":  # not JSON: the request itself is refused
        assert resp.status in (400, 422)
    assert sandbox.sandbox.stats[name]["rejected"] >= 1
    assert not sandbox.sandbox.received.get(name)


async def test_qubits_twin_refuses_a_time_in_seconds(sandbox):
    a = build("qubit", sandbox.url)
    (req,) = a.plan([event(VIEW, sample(VIEW))]).requests
    req.content = req.content.replace(str(T).encode(), b"1764000000")
    ((_, (outcome,)),) = await exchange(a, [req])
    assert outcome.verdict is Verdict.REJECTED and outcome.reason == "qubit failed: Invalid meta.ts"


def test_tracardis_static_context_may_not_hold_null():
    with pytest.raises(ValidationError, match=r"system\.owner is null or not a finite number"):
        TracardiSite.model_validate({"source_id": "s", "context": {"system": {"owner": None}}})
    with pytest.raises(ValidationError, match="ratio is null or not a finite number"):
        TracardiSite.model_validate({"source_id": "s", "event_options": {"ratio": math.nan}})
