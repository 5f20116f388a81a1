"""Tracardi adapter against the document's tracker-payload examples, and against its sandbox twin."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from processor.config import load_config
from processor.devstack.samples import as_event, make_order, make_view, with_changes
from processor.events import EventKind
from processor.sandbox import Faults
from processor.sandbox.tracardi import KNOWN_SOURCES, new_profile_id, validate_payload
from processor.vendors.base import Response, Verdict
from processor.vendors.tracardi import _EXACT_MS, SESSION_NAMESPACE, TracardiAdapter, _iso
from tests.unit.vendors.conftest import exchange

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
SOURCE = "3ee63fc6-490a-4fd8-bfb3-bf0c8c8d3387"  # the document's example source id (known to the twin)
DOC_SESSION, DOC_PROFILE = "bfb3-bf0c8c8d3387-3ee63fc6-490a-4fd8", "bf0c8c8d3387-3ee63fc6-490a-4fd8bfb3"
DOC_CONTEXT = {"system": "webstore-backend", "webstore": {"url": "http://magento-store.com", "name": "Shoe store"},
               "client": {"browser": "Mozilla Firefox"}}
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z


def adapter(base_url=None, options=None, **site):
    settings = {"sites": {"default": {"source_id": SOURCE, **site}}, "options": options or {}}
    if base_url:
        settings["base_url"] = base_url
    return TracardiAdapter(TracardiAdapter.settings_model().model_validate(settings))


def bare_page(rec, **page):
    """The record with every optional page field empty, then ``page`` set."""
    rec["page"] = {k: None for k in rec["page"]} | page
    return rec


def body(req):
    return orjson.loads(req.content)


def test_full_payload_matches_document_example():
    # The document's full example: its source/session/profile/context, and its third event
    # ("product-in-basket", properties product + price, options) for an equivalent product view.
    rec = bare_page(make_view(1, 1, event_time=T0), browser="Mozilla Firefox")
    rec["product"].update(name="Adidas sneakers", price=34.43, sku=None, url=None, image_url=None)
    rec["visitor"]["vendor_ids"].update(tracardi_profile_id=DOC_PROFILE, tracardi_session_id=DOC_SESSION)
    a = adapter(context={k: v for k, v in DOC_CONTEXT.items() if k != "client"},
                event_types={"product_view": "product-in-basket"}, event_options={"profile": False, "logs": False})
    plan = a.plan([as_event(VIEW, rec)])
    assert not plan.rejected
    (req,) = plan.requests
    assert req.url == "http://localhost:8686/track"
    assert req.headers == {"Content-Type": "application/json", "User-Agent": "event-relay/0.1"}
    # Omitted: the document's empty top-level "properties" and "options". Added: what the canonical event
    # carries beyond the document's example (event id, product id, currency, categories, event time).
    assert body(req) == {
        "source": {"id": SOURCE},
        "session": {"id": DOC_SESSION},
        "profile": {"id": DOC_PROFILE},
        "context": DOC_CONTEXT,
        "events": [{
            "id": rec["event_id"],
            "type": "product-in-basket",
            "properties": {"product": "Adidas sneakers", "price": 34.43, "productId": "P-00001", "currency": "GBP",
                           "categories": ["trainers", "shirts"]},
            "options": {"profile": False, "logs": False},
            "context": {"time": "2023-11-14T22:13:20.000Z"},
        }],
    }
    assert validate_payload(body(req)) == []


def test_minimal_payload_matches_document_example_without_profile():
    # The document's minimal payload: source, session and events only (no profile: Tracardi creates one).
    rec = bare_page(make_view(1, 1, event_time=T0), url="https://shop.example.com/p/1", title="My Page")
    del rec["visitor"]["vendor_ids"]["tracardi_profile_id"]
    rec["visitor"]["vendor_ids"]["tracardi_session_id"] = "d6823ba7013e-8dd8-4fc1-bd14-f14dc4b1"
    (req,) = adapter(source_id="f14dc4b1-8dd8-4fc1-bd14-d6823ba7013e").plan([as_event(VIEW, rec)]).requests
    got = body(req)
    assert set(got) == {"source", "session", "events"}
    assert got["source"] == {"id": "f14dc4b1-8dd8-4fc1-bd14-d6823ba7013e"}
    assert got["session"] == {"id": "d6823ba7013e-8dd8-4fc1-bd14-f14dc4b1"}
    assert got["events"] == [{
        "id": rec["event_id"], "type": "product-view",
        "properties": {"product": "Trail runner model 1", "price": 11.25, "productId": "P-00001", "currency": "GBP",
                       "categories": ["trainers", "shirts"], "sku": "SKU-00001-42",
                       "url": "https://shop.example.com/p/1", "imageUrl": "https://cdn.example.com/img/1.jpg"},
        "context": {"time": "2023-11-14T22:13:20.000Z",
                    "page": {"url": "https://shop.example.com/p/1", "title": "My Page"}},
    }]


def test_order_is_one_purchase_event_with_its_items():
    rec = make_order(4, items=2)
    (req,) = adapter(tags=["relay"]).plan([as_event(ORDER, rec)]).requests
    got = body(req)
    assert got["context"]["client"] == {"browser": "other", "device": "mobile", "userAgent": rec["page"]["user_agent"],
                                        "language": "en-GB", "country": "GB"}
    (ev,) = got["events"]
    assert ev["type"] == "purchase-order" and ev["tags"] == ["relay"]
    lines = rec["order"]["items"]
    assert ev["properties"] == {
        "orderId": "O-4-1", "total": rec["order"]["total"], "currency": "GBP", "itemCount": 1 + 2,
        "items": [{"productId": li["product_id"], "product": li["name"], "quantity": li["quantity"],
                   "price": li["unit_price"], "categories": li["categories"], "sku": li["sku"], "url": li["url"]}
                  for li in lines],
    }
    assert "customer" not in req.content.decode() and "@example.com" not in req.content.decode()


def test_one_payload_per_profile_and_session():
    events = [as_event(VIEW, make_view(1, 5, session=1), 0), as_event(VIEW, make_view(2, 6), 1),
              as_event(VIEW, make_view(1, 7, session=2), 2), as_event(ORDER, make_order(1, session=1), 3),
              as_event(VIEW, make_view(2, 8), 4)]
    reqs = adapter().plan(events).requests
    assert [[e.source.offset for e in r.events] for r in reqs] == [[0, 3], [1, 4], [2]]
    for r in reqs:
        ids = r.events[0].record["visitor"]["vendor_ids"]
        got = body(r)
        assert got["profile"] == {"id": ids["tracardi_profile_id"]}
        assert got["session"] == {"id": ids["tracardi_session_id"]}
        assert [e["id"] for e in got["events"]] == [e.event_id for e in r.events]  # canonical ids: idempotent


def test_missing_session_id_is_derived_from_the_canonical_session():
    recs = [make_view(1, p) for p in (1, 2)]
    for rec in recs:
        del rec["visitor"]["vendor_ids"]["tracardi_session_id"]
    (req,) = adapter().plan([as_event(VIEW, r, i) for i, r in enumerate(recs)]).requests
    expected = str(uuid.uuid5(SESSION_NAMESPACE, "shop-1/v00000001-s1"))
    assert body(req)["session"] == {"id": expected}
    (again,) = adapter().plan([as_event(VIEW, recs[0])]).requests  # a retry lands in the same session
    assert body(again)["session"] == {"id": expected}


def test_without_profile_send_or_skip():
    rec = make_view(1, 1)
    del rec["visitor"]["vendor_ids"]["tracardi_profile_id"]
    ev = as_event(VIEW, rec)
    (req,) = adapter().plan([ev]).requests
    assert "profile" not in body(req)
    plan = adapter(options={"without_profile": "skip"}).plan([ev, as_event(VIEW, make_view(2, 1), 1)])
    assert plan.filtered == [ev] and [r.events[0].source.offset for r in plan.requests] == [1]


def test_missing_required_fields_are_rejected_naming_the_field():
    good = as_event(VIEW, make_view(1, 1), 0)
    cases = [(VIEW, "product.product_id", make_view(2, 1)), (ORDER, "order.order_id", make_order(3)),
             (ORDER, "order.items.1.product_id", make_order(4)), (VIEW, "event_id", make_view(5, 1))]
    bad = [as_event(kind, with_changes(rec, path, ""), i + 1) for i, (kind, path, rec) in enumerate(cases)]
    plan = adapter().plan([good, *bad])
    assert [(e.source.offset, r) for e, r in plan.rejected] == [
        (1, "product.product_id is empty"), (2, "order.order_id is empty"),
        (3, "order.items[1].product_id is empty"), (4, "event_id is empty")]
    assert [r.events for r in plan.requests] == [[good]]


def test_site_selection_base_url_types_and_missing_site():
    a = TracardiAdapter(TracardiAdapter.settings_model().model_validate({
        "base_url": "https://cdp.example.com/", "options": {"event_types": {"order": "order-completed"}},
        "sites": {"shop-2": {"source_id": "S2", "base_url": "https://eu.cdp.example.com",
                             "event_types": {"product_view": "pdp-view"}},
                  "shop-3": {"source_id": "S3"}},
    }))
    evs = [as_event(VIEW, make_view(1, 1, site_id="shop-1"), 0), as_event(VIEW, make_view(1, 1, site_id="shop-2"), 1),
           as_event(ORDER, make_order(1, site_id="shop-2"), 2), as_event(ORDER, make_order(1, site_id="shop-3"), 3),
           as_event(VIEW, make_view(1, 1, site_id="shop-3"), 4)]
    plan = a.plan(evs)
    assert "no tracardi site config for site_id 'shop-1'" in plan.rejected[0][1]
    r2, r3 = plan.requests
    assert r2.url == "https://eu.cdp.example.com/track" and r3.url == "https://cdp.example.com/track"
    assert [e["type"] for e in body(r2)["events"]] == ["pdp-view", "order-completed"]
    assert body(r3)["source"] == {"id": "S3"}
    assert [e["type"] for e in body(r3)["events"]] == ["order-completed", "product-view"]  # defaults fill in


@pytest.mark.parametrize(("settings", "field"), [
    ({"sites": {"default": {"source_id": ""}}, "options": {}}, "source_id"),
    ({"sites": {"default": {"source_id": "s", "event_types": {"order": " "}}}, "options": {}}, "event_types.order"),
    ({"sites": {"default": {"source_id": "s"}}, "options": {"without_profile": "drop"}}, "without_profile"),
    ({"sites": {"default": {"source_id": "s", "typo": 1}}, "options": {}}, "typo"),
])
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        TracardiAdapter.settings_model().model_validate(settings)


def plan_one(a, n=1, offset=0, **ids):
    rec = make_view(n, 1)
    rec["visitor"]["vendor_ids"].update(ids)
    (req,) = a.plan([as_event(VIEW, rec, offset)]).requests
    return req


@pytest.mark.parametrize(("sent", "answered", "note"), [
    (True, "same", None), (True, "other", "profile_changed"), (False, "other", "profile_created"),
])
def test_profile_id_in_the_answer_is_noted_when_it_changes(sent, answered, note):
    a = adapter()
    req = plan_one(a) if sent else plan_one(a, tracardi_profile_id="")
    pid = body(req).get("profile", {}).get("id")
    profile = {"same": pid, "other": str(uuid.uuid4()), None: None}[answered]
    resp = Response(200, {}, orjson.dumps({"profile": {"id": profile}, "session": {"id": "s"}}) if profile else b"ok")
    (out,) = a.interpret(req, resp)
    assert out.verdict is Verdict.DELIVERED and out.note == note
    assert note is None or note in a.notes
    assert pid is None or pid not in out.reason


@pytest.mark.parametrize(("status", "verdict", "detail", "reason", "note"), [
    (401, Verdict.REJECTED, "Access denied", "check sites.default.source_id", "bad_source"),
    (422, Verdict.REJECTED, [{"loc": ["body", "events", 0, "type"], "msg": "field required", "type": "x"}],
     "HTTP 422: Tracardi rejected the tracker payload: body.events.0.type: field required", None),
    (406, Verdict.REJECTED, "Event product-view is invalid", "HTTP 406: Tracardi event validation failed: Event", None),
    (500, Verdict.RETRYABLE, "boom", "HTTP 500", None), (503, Verdict.RETRYABLE, None, "HTTP 503", None),
    (429, Verdict.RETRYABLE, None, "HTTP 429", None), (400, Verdict.REJECTED, None, "HTTP 400", None),
    (501, Verdict.REJECTED, None, "HTTP 501", None),
])
def test_status_classes(status, verdict, detail, reason, note):
    a = adapter()
    req = plan_one(a)
    (out,) = a.interpret(req, Response(status, {}, orjson.dumps({"detail": detail})))
    assert (out.verdict, out.note) == (verdict, note)
    assert reason in out.reason and SOURCE not in out.reason


def test_a_failed_payload_fails_only_its_own_events():
    a = adapter()
    events = [as_event(VIEW, make_view(n, n), n) for n in range(1, 4)] + [as_event(ORDER, make_order(2), 4)]
    reqs = a.plan(events).requests
    assert [len(r.events) for r in reqs] == [1, 2, 1]
    ok = orjson.dumps({"profile": {"id": "0d2d9dc5-0d60-471e-956f-8766dcb8aba2"}})
    answers = [Response(200, {}, ok), Response(406, {}, b'{"detail": "bad"}'), Response(200, {}, ok)]
    verdicts = [[o.verdict for o in a.interpret(r, resp)] for r, resp in zip(reqs, answers, strict=True)]
    assert verdicts == [[Verdict.DELIVERED], [Verdict.REJECTED, Verdict.REJECTED], [Verdict.DELIVERED]]


def valid():
    return {"source": {"id": SOURCE}, "session": {"id": "s"}, "events": [{"type": "page-view"}]}


@pytest.mark.parametrize(("change", "loc"), [
    ({"source": None}, ["body", "source"]),
    ({"source": {"name": "x"}}, ["body", "source", "id"]),
    ({"session": {"id": 5}}, ["body", "session", "id"]),
    ({"profile": "abc"}, ["body", "profile"]),
    ({"context": []}, ["body", "context"]),
    ({"events": None}, ["body", "events"]),
    ({"events": []}, ["body", "events"]),
    ({"events": [{"properties": {}}]}, ["body", "events", 0, "type"]),
    ({"events": [{"type": " "}]}, ["body", "events", 0, "type"]),
    ({"events": [{"type": "t", "properties": [1]}]}, ["body", "events", 0, "properties"]),
    ({"events": [{"type": "t", "id": 7}]}, ["body", "events", 0, "id"]),
    ({"events": [{"type": "t", "tags": "a"}]}, ["body", "events", 0, "tags"]),
])
def test_twin_rejects_what_the_server_model_forbids(change, loc):
    payload = {k: v for k, v in (valid() | change).items() if v is not None}
    assert [e["loc"] for e in validate_payload(payload)] == [loc]


def test_twin_accepts_optional_and_unknown_fields():
    assert validate_payload(valid() | {"profile": None, "session": None, "unknown": 1, "metadata": {}}) == []


def twin_adapter(sandbox, **site):
    return adapter(f"{sandbox.url}/tracardi", **site)


async def test_adapter_output_is_accepted_by_the_twin(sandbox):
    a = twin_adapter(sandbox, context={"system": "event-relay"}, event_options={"saveEvent": True})
    events = [as_event(VIEW, make_view(n, n), n) for n in range(5)] + [as_event(ORDER, make_order(3), 5)]
    plan = a.plan(events)
    results = await exchange(a, plan.requests)
    assert [resp.status for resp, _ in results] == [200] * 5
    for req, (resp, outcomes) in zip(plan.requests, results, strict=True):
        assert all(o.verdict is Verdict.DELIVERED and o.note is None for o in outcomes)
        assert resp.json()["profile"] == body(req)["profile"]
    rows = list(sandbox.sandbox.received["tracardi"])
    assert sorted(r["id"] for r in rows) == sorted(e.event_id for e in events)


async def test_twin_answers_a_new_profile_for_an_unknown_or_missing_one(sandbox):
    a = twin_adapter(sandbox)
    unknown = plan_one(a, 1, 0, tracardi_profile_id="not-in-tracardi")
    missing = plan_one(a, 2, 1, tracardi_profile_id="")
    ((r1, (o1,)), (_, (o2,))) = await exchange(a, [unknown, missing])
    assert r1.json()["profile"]["id"] == new_profile_id(body(unknown)["session"]["id"])
    assert (o1.verdict, o1.note, o2.verdict, o2.note) == (Verdict.DELIVERED, "profile_changed",
                                                          Verdict.DELIVERED, "profile_created")


async def test_twin_refuses_an_unknown_source_and_a_bad_payload(sandbox):
    assert "wrong-source" not in KNOWN_SOURCES
    a = twin_adapter(sandbox, source_id="wrong-source")
    ((resp, (out,)),) = await exchange(a, [plan_one(a)])
    assert resp.status == 401 and (out.verdict, out.note) == (Verdict.REJECTED, "bad_source")
    a = twin_adapter(sandbox)
    req = plan_one(a)
    req.content = req.content.replace(b'"type":"product-view"', b'"type":""')
    ((resp, (out,)),) = await exchange(a, [req])
    assert resp.status == 422 and out.verdict is Verdict.REJECTED and "body.events.0.type" in out.reason
    assert sandbox.sandbox.stats["tracardi"]["rejected"] == 2 and "tracardi" not in sandbox.sandbox.received


async def test_injected_partial_failures_reject_only_those_payloads(sandbox):
    sandbox.sandbox.faults["tracardi"] = Faults(partial_failure_rate=0.5)
    a = twin_adapter(sandbox)
    events = [as_event(VIEW, make_view(n, p), n * 2 + p) for n in range(20) for p in (1, 2)]
    plan = a.plan(events)
    assert len(plan.requests) == 20
    results = await exchange(a, plan.requests)
    failed = [req for req, (resp, _) in zip(plan.requests, results, strict=True) if resp.status == 406]
    assert 0 < len(failed) < 20
    for _, outcomes in results:
        assert len({o.verdict for o in outcomes}) == 1  # a payload's events share its fate
    rejected = sum(o.verdict is Verdict.REJECTED for _, outs in results for o in outs)
    assert rejected == 2 * len(failed)
    assert len(sandbox.sandbox.received["tracardi"]) == 40 - rejected


async def test_injected_upstream_errors_are_retryable(sandbox):
    sandbox.sandbox.faults["tracardi"] = Faults(burst=1, error_status=503)
    a = twin_adapter(sandbox)
    ((resp, (out,)),) = await exchange(a, [plan_one(a)])
    assert resp.status == 503 and out.verdict is Verdict.RETRYABLE


async def test_example_settings_validate_and_work_with_the_twin(sandbox, tmp_path):
    cfg = {"kafka": {"bootstrap_servers": "k:9092", "topics": ["t"]}, "deadletter": {"topic": "t.dlq"},
           "vendors": {"tracardi": TracardiAdapter.example_settings(sandbox.url)}}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    settings = load_config(path, TracardiAdapter.example_env).vendors["tracardi"]
    assert settings.sites["default"].source_id.get_secret_value() in KNOWN_SOURCES
    assert SOURCE not in repr(settings)
    a = TracardiAdapter(settings)
    events = [as_event(VIEW, make_view(1, 1), 0), as_event(ORDER, make_order(1), 1)]
    ((resp, outcomes),) = await exchange(a, a.plan(events).requests)
    assert resp.status == 200 and [o.verdict for o in outcomes] == [Verdict.DELIVERED] * 2


def _float_iso(ms: int) -> str:
    """The reference: context.time as the mapping wrote it before _iso cached the minute."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_MINUTE_EDGES = st.integers(0, _EXACT_MS // 60_000 - 1).flatmap(
    lambda m: st.integers(-1, 1).map(lambda d: max(0, m * 60_000 + d)))


@given(st.one_of(st.integers(0, _EXACT_MS - 1), st.integers(_EXACT_MS - 10**9, _EXACT_MS + 10**9),
                 _MINUTE_EDGES, st.integers(1_600_000_000_000, 1_900_000_000_000)),
       st.integers(-120_000, 120_000))
@example(0, 0)
@example(_EXACT_MS - 1, 1)  # the last time of the exact range, and the first beyond it
@example(978_307_200_000, -1)  # 2001-01-01, the earliest valid event time, and the millisecond before it
@example(1_767_225_599_999, 1)  # a day, a month and a year change
@example(253_402_300_799_999, 0)  # 9999-12-31T23:59:59.999 (beyond the exact range: the float path)
def test_event_time_is_written_as_the_float_path_writes_it(ms, step):
    # two times in a row, a step apart (the same minute, the next, one far): the cached minute is never stale
    for t in (ms, ms + step):
        if t >= 0:
            assert _iso(t) == _float_iso(t)
