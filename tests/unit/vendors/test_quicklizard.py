"""QuickLizard adapter against the document's examples, and against its sandbox twin."""

from __future__ import annotations

import orjson
import pytest

from processor.devstack.samples import as_event, make_order, make_view, with_changes
from processor.events import EventKind
from processor.sandbox.quicklizard import validate_event
from processor.vendors.base import Response, Verdict
from processor.vendors.quicklizard import QuickLizardAdapter
from tests.unit.vendors.conftest import exchange

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER


def adapter(**site):
    model = QuickLizardAdapter.settings_model()
    return QuickLizardAdapter(model.model_validate({
        "sites": {"default": {"client_key": "YOUR_CLIENT_KEY", **site}}, "options": {},
    }))


def test_view_matches_document_example():
    rec = make_view(1, 1)
    rec["product"].update(product_id="123-AA-X23", price=123.41, url="https://yourstore.com/123-AA-X23/")
    rec["visitor"]["vendor_ids"]["quicklizard_vid"] = "DASDAS-#CCCC-NA"
    plan = adapter(tags=["user:new"], channel="online").plan([as_event(VIEW, rec)])
    assert not plan.rejected
    (req,) = plan.requests
    assert req.url == "https://evt.quicklizard.com/events"
    assert orjson.loads(req.content) == [{
        "client_key": "YOUR_CLIENT_KEY", "price": 123.41, "product_id": "123-AA-X23", "event": "view",
        "permalink": "https://yourstore.com/123-AA-X23/", "vid": "DASDAS-#CCCC-NA",
        "tags": ["user:new"], "channels": ["online"],
    }]


def test_order_is_one_conversion_per_item_with_total_price():
    rec = make_order(1, items=2)
    rec["order"]["items"][0].update(product_id="123-AA-X23", unit_price=123.41, quantity=1)
    rec["order"]["items"][1].update(product_id="455DD-AA-X23", unit_price=20.0, quantity=3)
    rec["visitor"]["vendor_ids"]["quicklizard_vid"] = "DASDAS-#CCCC-NA"
    (req,) = adapter(tags=["user:new"], channel="online").plan([as_event(ORDER, rec)]).requests
    rows = orjson.loads(req.content)
    assert rows == [
        {"client_key": "YOUR_CLIENT_KEY", "price": 123.41, "product_id": "123-AA-X23", "event": "conversion",
         "vid": "DASDAS-#CCCC-NA", "tags": ["user:new"], "channels": ["online"], "units": 1},
        {"client_key": "YOUR_CLIENT_KEY", "price": 60.0, "product_id": "455DD-AA-X23", "event": "conversion",
         "vid": "DASDAS-#CCCC-NA", "tags": ["user:new"], "channels": ["online"], "units": 3},
    ]
    assert all(validate_event(r) is None for r in rows)


def test_price_is_always_a_float():
    rec = with_changes(make_view(1, 1), "product.price", 10.0)
    (req,) = adapter().plan([as_event(VIEW, rec)]).requests
    assert b'"price":10.0' in req.content


def test_missing_required_fields_are_rejected_naming_the_field():
    good = as_event(VIEW, make_view(1, 1), 0)
    no_url = as_event(VIEW, with_changes(with_changes(make_view(2, 1), "product.url", None), "page.url", None), 1)
    no_items = as_event(ORDER, with_changes(make_order(3), "order.items", []), 2)
    plan = adapter().plan([good, no_url, no_items])
    assert [(e.source.offset, r) for e, r in plan.rejected] == [(1, "missing required field product.url")]
    assert plan.filtered == [no_items]  # an order without lines has nothing to send: filtered, not dead
    assert plan.requests[0].events == [good]


def test_site_selection_and_missing_site():
    model = QuickLizardAdapter.settings_model()
    a = QuickLizardAdapter(model.model_validate({
        "sites": {"shop-2": {"client_key": "K2", "endpoint": "https://sdk-events.quicklizard.com/events"}},
        "options": {},
    }))
    e1 = as_event(VIEW, make_view(1, 1, site_id="shop-1"), 0)
    e2 = as_event(VIEW, make_view(1, 1, site_id="shop-2"), 1)
    plan = a.plan([e1, e2])
    assert "no quicklizard site config for site_id 'shop-1'" in plan.rejected[0][1]
    assert plan.requests[0].url == "https://sdk-events.quicklizard.com/events"


def test_partial_failure_maps_back_to_the_failed_event_only():
    events = [as_event(VIEW, make_view(i, i), i) for i in range(3)] + [as_event(ORDER, make_order(5, 2), 3)]
    a = adapter()
    (req,) = a.plan(events).requests
    rows = orjson.loads(req.content)
    failed = [rows[1], rows[4]]  # second view and the order's second line
    body = orjson.dumps({"processed": [rows[0], rows[2], rows[3]], "failed": failed, "errors": ["bad", "worse"]})
    outcomes = a.interpret(req, Response(200, {}, body))
    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED, Verdict.REJECTED, Verdict.DELIVERED,
                                             Verdict.REJECTED]
    assert outcomes[1].reason == "quicklizard failed: bad"
    assert outcomes[3].reason == "quicklizard failed: worse"


def planned(a):
    events = [as_event(VIEW, make_view(i, i), i) for i in range(3)] + [as_event(ORDER, make_order(5, 2), 3)]
    (req,) = a.plan(events).requests
    return req, orjson.loads(req.content)


def test_a_failed_row_matching_none_sent_fails_closed():
    """Only events whose rows are all among the processed ones are delivered; the rest are dead letters."""
    a = adapter()
    req, rows = planned(a)
    stray = {**rows[1], "product_id": "rewritten-by-the-vendor"}
    body = orjson.dumps({"processed": [rows[0], rows[3], rows[4]], "failed": [stray], "errors": ["bad price"]})
    outcomes = a.interpret(req, Response(200, {}, body))
    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED, Verdict.REJECTED, Verdict.REJECTED,
                                             Verdict.DELIVERED]
    assert outcomes[1].reason == ("quicklizard failed 1 row(s) that match none sent, and this event's rows are "
                                  "not among the processed ones")
    for failed in ([stray], ["not an object"]):
        body = orjson.dumps({"processed": [], "failed": failed, "errors": ["x"]})
        assert {o.verdict for o in a.interpret(req, Response(200, {}, body))} == {Verdict.REJECTED}
    for processed in (None, "nonsense"):  # not the document's three arrays: an answer we do not know
        body = orjson.dumps({"processed": processed, "failed": [stray], "errors": ["x"]})
        assert {o.reason.split(":")[0] for o in a.interpret(req, Response(200, {}, body))} == {"unrecognised answer"}
    body = orjson.dumps({"processed": [], "failed": {"a": 1}, "errors": []})
    assert {o.verdict for o in a.interpret(req, Response(200, {}, body))} == {Verdict.RETRYABLE}


def test_rows_echoed_with_another_number_format_or_key_order_still_match():
    a = adapter()
    order = with_changes(make_order(5, 1), "order.items.0.unit_price", 10.0)
    (req,) = a.plan([as_event(VIEW, make_view(1, 1), 0), as_event(ORDER, order, 1)]).requests
    rows = orjson.loads(req.content)
    echoed = dict(reversed(list(rows[1].items())))
    assert echoed["price"] == 10.0
    echoed["price"] = 10  # a server in another language writes 10.0 as 10
    body = orjson.dumps({"processed": rows[:1], "failed": [echoed], "errors": ["bad"]})
    assert b'"price":10,' in body or b'"price":10}' in body
    assert [o.verdict for o in a.interpret(req, Response(200, {}, body))] == [Verdict.DELIVERED, Verdict.REJECTED]


@pytest.mark.parametrize(("status", "verdict"), [(500, Verdict.RETRYABLE), (429, Verdict.RETRYABLE),
                                                 (400, Verdict.REJECTED), (501, Verdict.REJECTED)])
def test_status_classes(status, verdict):
    a = adapter()
    (req,) = a.plan([as_event(VIEW, make_view(1, 1))]).requests
    assert a.interpret(req, Response(status, {}, b"{}"))[0].verdict is verdict


@pytest.mark.parametrize(("row", "problem"), [
    ({"client_key": "k", "price": 1, "product_id": "p", "event": "view", "permalink": "u"}, "price must be"),
    ({"client_key": "k", "price": 1.0, "product_id": "p", "event": "view"}, "missing permalink"),
    ({"client_key": "k", "price": 1.0, "product_id": "p", "event": "conversion", "channels": ["a", "b"]},
     "single channel"),
    ({"client_key": "k", "price": 1.0, "product_id": "p", "event": "view", "permalink": "u", "x": 1},
     "unknown field"),
])
def test_twin_rejects_what_the_document_forbids(row, problem):
    assert problem in validate_event(row)


async def test_adapter_output_is_accepted_by_the_twin(sandbox):
    a = QuickLizardAdapter(QuickLizardAdapter.settings_model().model_validate({
        "base_url": f"{sandbox.url}/quicklizard/events",
        "sites": {"default": {"client_key": "K", "channel": "online"}}, "options": {},
    }))
    events = [as_event(VIEW, make_view(i, i), i) for i in range(5)] + [as_event(ORDER, make_order(7, 3), 5)]
    plan = a.plan(events)
    ((resp, outcomes),) = await exchange(a, plan.requests)
    assert resp.status == 200
    assert all(o.verdict is Verdict.DELIVERED for o in outcomes)
    assert len(sandbox.sandbox.received["quicklizard"]) == 5 + 3


async def test_injected_partial_failures_reject_only_those_events(sandbox):
    from processor.sandbox import Faults

    sandbox.sandbox.faults["quicklizard"] = Faults(partial_failure_rate=0.5)
    a = QuickLizardAdapter(QuickLizardAdapter.settings_model().model_validate({
        "base_url": f"{sandbox.url}/quicklizard/events", "sites": {"default": {"client_key": "K"}}, "options": {},
    }))
    events = [as_event(VIEW, make_view(i, i), i) for i in range(40)]
    ((_, outcomes),) = await exchange(a, a.plan(events).requests)
    rejected = sum(o.verdict is Verdict.REJECTED for o in outcomes)
    assert 0 < rejected < 40
    assert len(sandbox.sandbox.received["quicklizard"]) == 40 - rejected


@pytest.mark.parametrize("sites", [
    {"default": {"client_key": "K"}},
    {"default": {"client_key": "K", "tags": ["a", "b"], "channel": "online", "send_vid": False}},
    {"shop-1": {"client_key": "K1", "channel": "web"},
     "shop-2": {"client_key": "K2", "endpoint": "https://sdk-events.quicklizard.com/events", "tags": ["t"]}},
    {"shop-2": {"client_key": "K2"}, "shop-3": {"client_key": "K3"}},  # two sites, one URL
])
def test_build_makes_what_the_plain_rows_of_each_event_make(sites):
    """``build`` builds most views inline: its requests, their context, rejections and filtered events
    are those of ``rows`` called on each event in turn, grouped by URL in order of each URL's first row."""
    from tests.unit.vendors.conftest import plain_build, varied_events

    a = QuickLizardAdapter(QuickLizardAdapter.settings_model().model_validate({"sites": sites, "options": {}}))
    events = varied_events()
    groups, rejected, filtered = plain_build(a, events, a.rows)
    plan = a.build(events)
    assert [(r.url, r.content, r.events, r.context) for r in plan.requests] == [
        (url, orjson.dumps(rows), evs, (rows, counts)) for url, (evs, rows, counts) in groups.items()]
    assert plan.rejected == rejected and rejected and plan.filtered == filtered and filtered
