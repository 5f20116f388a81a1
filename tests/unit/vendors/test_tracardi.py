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
from processor.vendors.tracardi import (
    _EXACT_MS,
    ID_LIMIT,
    SESSION_NAMESPACE,
    VISITOR_SESSION_NAMESPACE,
    TracardiAdapter,
    _iso,
    entity_id,
    event_id,
    is_bot,
)
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
    # carries beyond the document's example (event id and time; the product as Tracardi's product schema names
    # it: id, category, currency, categories).
    assert body(req) == {
        "source": {"id": SOURCE},
        "session": {"id": DOC_SESSION},
        "profile": {"id": DOC_PROFILE},
        "context": DOC_CONTEXT,
        "events": [{
            "id": rec["event_id"],
            "type": "product-in-basket",
            "time": {"create": "2023-11-14T22:13:20.000Z"},
            "properties": {"id": "P-00001", "name": "Adidas sneakers", "category": "trainers", "price": 34.43,
                           "currency": "GBP", "categories": ["trainers", "shirts"]},
            "options": {"profile": False, "logs": False},
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
        "id": rec["event_id"], "type": "product-details-page-view", "time": {"create": "2023-11-14T22:13:20.000Z"},
        "properties": {"id": "P-00001", "name": "Trail runner model 1", "sku": "SKU-00001-42", "category": "trainers",
                       "price": 11.25, "currency": "GBP", "categories": ["trainers", "shirts"],
                       "url": {"page": "https://shop.example.com/p/1", "image": "https://cdn.example.com/img/1.jpg"}},
        "context": {"page": {"url": "https://shop.example.com/p/1", "title": "My Page"}},
    }]


def test_order_is_one_checkout_event_with_its_items():
    rec = make_order(4, items=2)
    (req,) = adapter(tags=["relay"]).plan([as_event(ORDER, rec)]).requests
    got = body(req)
    agent = rec["page"]["user_agent"]
    assert got["context"] == {
        "client": {"browser": "other", "device": "mobile", "userAgent": agent, "language": "en-GB", "country": "GB"},
        "browser": {"local": {"browser": {"userAgent": agent, "language": "en-GB"}}}}
    (ev,) = got["events"]
    assert ev["type"] == "checkout-completed" and ev["tags"] == ["relay"]
    lines = rec["order"]["items"]
    assert ev["properties"] == {
        "id": "O-4-1", "value": rec["order"]["total"], "status": "completed", "currency": "GBP", "itemCount": 1 + 2,
        "items": [{"id": li["product_id"], "name": li["name"], "sku": li["sku"], "category": li["categories"][0],
                   "price": li["unit_price"], "quantity": li["quantity"], "categories": li["categories"],
                   "url": {"page": li["url"]}} for li in lines],
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
    assert [e["type"] for e in body(r3)["events"]] == ["order-completed", "product-details-page-view"]  # defaults


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
    ({"events": {}}, ["body", "events"]),
    ({"events": "page-view"}, ["body", "events"]),
    ({"events": [{"type": "t", "time": {"create": "yesterday"}}]}, ["body", "events", 0, "time", "create"]),
    ({"events": [{"type": "t", "time": "2023-11-14"}]}, ["body", "events", 0, "time"]),
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
    req.content = req.content.replace(b'"type":"product-details-page-view"', b'"type":""')
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


# -- what Tracardi stores: each test names the Tracardi source (Tracardi/tracardi unless said) it follows ----

IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
          "Version/17.0 Mobile/15E148 Safari/604.1")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


def one_body(a, kind, rec):
    (req,) = a.plan([as_event(kind, rec)]).requests
    return body(req)


def test_event_time_is_the_events_own_time_create():
    """tracardi/domain/payload/tracker_payload.py ``TrackerPayload.__init__`` replaces the payload's
    ``metadata`` with the arrival time; tracardi/domain/payload/event_payload.py ``EventPayload.to_event``
    stores the event's own ``time.create`` as ``metadata.time.create`` (and ``insert`` stays the arrival:
    test/unit/test_event_payload.py ``test_event_payload_time_fallback``)."""
    for kind, rec in ((VIEW, make_view(1, 1, event_time=T0)), (ORDER, make_order(1, event_time=T0 + 1))):
        got = one_body(adapter(), kind, rec)
        (ev,) = got["events"]
        assert ev["time"] == {"create": _iso(rec["event_time"])}
        assert "metadata" not in got and "time" not in ev.get("context", {})


def test_referrer_goes_where_tracardi_reads_it():
    """tracardi/domain/payload/event_payload.py ``EventPayload.to_event``: ``hit.referer`` is
    ``context.page.referer.host``; tracardi/service/fake_data_maker/generate_context.py writes ``host`` as
    the referrer's ``scheme://host``."""
    rec = make_view(1, 1)
    rec["page"]["referrer"] = "https://user:pw@Search.Example.org:8443/s?q=shoes#top"
    page = one_body(adapter(), VIEW, rec)["events"][0]["context"]["page"]
    assert page["referer"] == {"host": "https://Search.Example.org:8443", "url": rec["page"]["referrer"]}
    assert "referrer" not in page
    for odd in ("android-app://com.example", "not a url", "/relative?x"):
        page = one_body(adapter(), VIEW, with_changes(rec, "page.referrer", odd))["events"][0]["context"]["page"]
        assert page["referer"]["url"] == odd and page["referer"]["host"] in (odd, "android-app://com.example")
    assert "referer" not in one_body(adapter(), VIEW, with_changes(rec, "page.referrer", ""))["events"][0][
        "context"]["page"]


@pytest.mark.parametrize("device", ["desktop", "mobile", "tablet", "other", None, "tv"])
def test_visitor_agent_and_language_in_the_context_tracardi_reads(device):
    """tracardi/service/tracking/session_data_computation.py ``_get_user_agent_string`` (the context's
    ``browser.local.browser.userAgent`` before the request header) and ``compute_session``
    (``context.browser.local.browser.language``); no ``context.device``: with one,
    ``_compute_data_from_user_agent`` fails on the parser device's missing ``is_touch_capable`` and keeps no
    device type and no app (the twin test below shows what Tracardi then stores)."""
    rec = with_changes(make_view(1, 1), "page.device", device)
    rec["page"]["user_agent"] = IPHONE
    a = adapter()
    (req,) = a.plan([as_event(VIEW, rec)]).requests
    ctx = body(req)["context"]
    assert ctx["browser"] == {"local": {"browser": {"userAgent": IPHONE, "language": "de-DE"}}}
    assert "device" not in ctx and ctx["client"].get("device") == device  # the canonical device: in client
    assert req.headers["User-Agent"] == "event-relay/0.1"  # the request says who sent it
    bare = bare_page(make_view(1, 1))
    assert "context" not in one_body(a, VIEW, bare)
    assert one_body(a, VIEW, bare_page(make_view(1, 1), language="en"))["context"]["browser"] == {
        "local": {"browser": {"language": "en"}}}


def test_a_bots_events_are_filtered_unless_bots_are_sent():
    """tracardi/service/tracking/track_data_computation.py ``compute_data`` refuses a bot's session
    (``session.app.bot``, from tracardi/domain/payload/tracker_payload.py's ``user_agents`` parse:
    ``is_bot``) with a PermissionError, which app/api/track/event_server_endpoint.py (Tracardi/tracardi-api)
    ``_track`` answers 401, when tracardi/config.py ``DISALLOW_BOT_TRAFFIC`` is on (its default)."""
    bot = as_event(VIEW, with_changes(make_view(1, 1), "page.user_agent", GOOGLEBOT), 0)
    person = as_event(VIEW, with_changes(make_view(2, 1), "page.user_agent", IPHONE), 1)
    other = as_event(VIEW, with_changes(make_view(3, 1), "page.user_agent", "event-relay/0.1"), 2)
    plan = adapter().plan([bot, person, other])
    assert plan.filtered == [bot] and [r.events for r in plan.requests] == [[person], [other]]
    plan = adapter(options={"bots": "send"}).plan([bot, person])
    assert not plan.filtered and len(plan.requests) == 2
    assert is_bot(GOOGLEBOT) and is_bot("bingbot/2.0") and not is_bot(IPHONE) and not is_bot("curl/8.0")


def test_event_ids_are_sent_as_tracardi_keeps_them_without_colliding():
    """tracardi/domain/named_entity.py ``NamedEntity.__init__`` lower-cases an ``Event``'s id
    (tracardi/domain/event.py ``Event(NamedEntity)``); tracardi/service/setup/mappings/event-index.json
    indexes ``id`` with ``ignore_above: 64``."""
    ids = ["ord-77/ä", "ORD-77/Ä", "Ord-77/ä", "x" * 64, "x" * 65, "x" * 64 + "y", "İd-1"]
    sent = []
    for i, eid in enumerate(ids):
        rec = make_view(i + 1, 1)
        rec["event_id"] = eid
        sent.append(one_body(adapter(), VIEW, rec)["events"][0]["id"])
    assert sent[0] == "ord-77/ä" and sent[3] == "x" * 64  # kept as Tracardi keeps them: unchanged
    assert len(set(sent)) == len(ids)  # case and length never make two events one
    for got, eid in zip(sent, ids, strict=True):
        assert got == got.lower() and len(got) <= ID_LIMIT  # Tracardi keeps it as sent
        assert event_id(eid) == got  # stable: a resend overwrites the same event
    assert sent[1].startswith("ord-77/ä~") and sent[4].startswith("x" * 47 + "~")


def test_profile_and_session_ids_are_sent_stripped_and_indexable():
    """tracardi/service/tracker.py ``Tracker.track_event`` strips the profile and session ids;
    tracardi/service/setup/mappings/profile-index.json and session-index.json index ``id`` up to 64."""
    a = adapter()
    recs = [make_view(1, p) for p in (1, 2)]
    recs[0]["visitor"]["vendor_ids"].update(tracardi_profile_id=" p-1 ", tracardi_session_id="\ts-1\n")
    recs[1]["visitor"]["vendor_ids"].update(tracardi_profile_id="p-1", tracardi_session_id="s-1")
    (req,) = a.plan([as_event(VIEW, r, i) for i, r in enumerate(recs)]).requests  # one profile, one session
    assert (body(req)["profile"], body(req)["session"]) == ({"id": "p-1"}, {"id": "s-1"})
    assert req.context == ("default", "p-1")
    long = make_view(3, 1)
    long["visitor"]["vendor_ids"].update(tracardi_profile_id="P" * 80, tracardi_session_id="S" * 80)
    got = one_body(a, VIEW, long)
    assert got["profile"]["id"] == entity_id("P" * 80) and len(got["profile"]["id"]) == ID_LIMIT
    assert got["session"]["id"].startswith("S" * 47 + "~") and len(got["session"]["id"]) == ID_LIMIT
    blank = make_view(4, 1)
    blank["visitor"]["vendor_ids"].update(tracardi_profile_id="  ")
    assert "profile" not in one_body(a, VIEW, blank)


def test_every_event_with_a_visitor_has_a_lasting_session():
    """tracardi/service/tracking/session_loading.py ``load_or_create_session``: without a session id
    Tracardi makes a random session per request (and tracardi/domain/payload/tracker_payload.py
    ``get_profile_and_session`` a new profile each time there is no profile either)."""
    rec = make_view(1, 1)
    for key in ("tracardi_session_id", "tracardi_profile_id"):
        del rec["visitor"]["vendor_ids"][key]
    rec["visitor"]["session_id"] = ""
    first = one_body(adapter(), VIEW, rec)["session"]["id"]
    assert first == one_body(adapter(), VIEW, rec)["session"]["id"]  # the same across requests and retries
    assert first == str(uuid.uuid5(VISITOR_SESSION_NAMESPACE, f"shop-1/v/{rec['visitor']['visitor_id']}"))
    rec["visitor"]["visitor_id"] = ""
    rec["visitor"]["vendor_ids"]["tracardi_profile_id"] = "p-9"
    assert one_body(adapter(), VIEW, rec)["session"]["id"] == str(
        uuid.uuid5(VISITOR_SESSION_NAMESPACE, "shop-1/p/p-9"))
    del rec["visitor"]["vendor_ids"]["tracardi_profile_id"]
    assert "session" not in one_body(adapter(), VIEW, rec)  # no visitor at all: nothing to keep


def test_views_and_orders_are_tracardis_predefined_types_with_their_properties():
    """tracardi/service/setup/events/ecommerce.json: ``product-details-page-view`` (properties id, name,
    sku, category, brand, variant, price, url {image, page}; copied to data.ec.product) and
    ``checkout-completed`` (properties id, value; const status "completed"; copied to data.ec.checkout,
    value added to the profile's data.metrics.ltcocv), run by tracardi/service/tracking/
    event_data_computation.py ``_auto_index_default_event_type``."""
    view = one_body(adapter(), VIEW, make_view(1, 1))["events"][0]
    assert view["type"] == "product-details-page-view"
    assert view["properties"] == {"id": "P-00001", "name": "Trail runner model 1", "sku": "SKU-00001-42",
                                  "category": "trainers", "price": 11.25, "currency": "GBP",
                                  "categories": ["trainers", "shirts"],
                                  "url": {"page": "https://shop.example.com/p/1",
                                          "image": "https://cdn.example.com/img/1.jpg"}}
    rec = make_order(4, items=2)
    order = one_body(adapter(), ORDER, rec)["events"][0]
    assert order["type"] == "checkout-completed"
    lines = rec["order"]["items"]
    assert order["properties"] == {
        "id": "O-4-1", "value": rec["order"]["total"], "status": "completed", "currency": "GBP", "itemCount": 3,
        "items": [{"id": li["product_id"], "name": li["name"], "sku": li["sku"], "category": li["categories"][0],
                   "price": li["unit_price"], "quantity": li["quantity"], "categories": li["categories"],
                   "url": {"page": li["url"]}} for li in lines]}
    bare = with_changes(with_changes(make_view(1, 1), "product.categories", []), "product.url", None)
    props = one_body(adapter(), VIEW, bare)["events"][0]["properties"]
    assert "category" not in props and props["url"] == {"image": "https://cdn.example.com/img/1.jpg"}


def test_the_legacy_schema_keeps_the_earlier_names_and_properties():
    """For installations whose rules use the relay's earlier ``product-view`` / ``purchase-order``."""
    a = adapter(options={"event_schema": "legacy"})
    view = one_body(a, VIEW, make_view(1, 1))["events"][0]
    assert view["type"] == "product-view" and view["properties"]["productId"] == "P-00001"
    assert view["time"] == {"create": _iso(1_700_000_000_000)}  # the time and the visit as Tracardi reads them
    order = one_body(a, ORDER, make_order(1))["events"][0]
    assert order["type"] == "purchase-order" and set(order["properties"]) == {
        "orderId", "total", "currency", "itemCount", "items"}
    named = adapter(options={"event_schema": "legacy", "event_types": {"order": "order-completed"}})
    assert one_body(named, ORDER, make_order(1))["events"][0]["type"] == "order-completed"


# -- the twin keeps what Tracardi keeps ------------------------------------------------------------------


def test_twin_accepts_a_payload_without_events():
    """tracardi/domain/payload/tracker_payload.py ``TrackerPayload.events`` defaults to ``[]`` and
    tracardi/service/tracking/tracker.py ``os_tracker`` returns nothing for no events."""
    assert validate_payload({"source": {"id": SOURCE}, "events": []}) == []
    assert validate_payload({"source": {"id": SOURCE}}) == []


async def test_twin_stores_time_referrer_device_and_ids_as_tracardi_does(sandbox):
    """tracardi/domain/payload/event_payload.py ``EventPayload.to_event`` (time.create, hit),
    tracardi/domain/named_entity.py (lower-cased id), tracardi/service/tracker.py ``track_event``
    (stripped ids), tracardi/service/tracking/session_data_computation.py ``compute_session`` (os, app,
    device from the context's User-Agent and ``context.device``)."""
    a = twin_adapter(sandbox)
    rec = make_view(1, 1, event_time=T0)
    rec["event_id"] = "PV-Ä-1"
    rec["page"]["user_agent"] = IPHONE
    rec["visitor"]["vendor_ids"]["tracardi_session_id"] = " s-1 "
    (req,) = a.plan([as_event(VIEW, rec)]).requests
    ((resp, (out,)),) = await exchange(a, [req])
    assert resp.status == 200 and out.verdict is Verdict.DELIVERED
    (row,) = sandbox.sandbox.received["tracardi"]
    assert row["id"] == event_id("PV-Ä-1") and row["session"] == {"id": "s-1"}
    assert row["metadata"]["time"]["create"] == "2023-11-14T22:13:20.000Z"
    assert row["metadata"]["time"]["insert"] > "2026"  # when Tracardi stored it
    assert row["hit"] == {"name": rec["page"]["title"], "url": rec["page"]["url"], "referer": "https://www.example.org"}
    assert row["os"]["name"] == "iOS" and row["app"]["name"] == "Mobile Safari" and row["app"]["bot"] is False
    assert row["device"]["type"] == "mobile" and row["device"]["brand"] == "Apple"
    assert row["app"]["language"] == "de-DE"
    assert row["data"]["ec"]["product"] == {"id": "P-00001", "name": "Trail runner model 1", "sku": "SKU-00001-42",
                                            "category": "trainers", "price": 11.25}
    assert row["journey"] == {"state": "awareness"}


async def test_twin_refuses_a_bots_session_and_a_property_tracardi_cannot_hold(sandbox):
    """tracardi/service/tracking/track_data_computation.py ``compute_data`` (bot traffic: 401), and
    tracardi/domain/event.py ``EventProduct.category`` (a string: a list fails building the event)."""
    a = twin_adapter(sandbox)
    sent = adapter(f"{sandbox.url}/tracardi", options={"bots": "send"})
    (bot,) = sent.plan([as_event(VIEW, with_changes(make_view(1, 1), "page.user_agent", GOOGLEBOT))]).requests
    ((resp, _),) = await exchange(sent, [bot])
    assert resp.status == 401 and resp.json() == {"detail": "Traffic from bot is not allowed."}
    req = plan_one(a)
    doc = body(req)
    doc["events"][0]["properties"]["category"] = ["trainers"]
    req.content = orjson.dumps(doc)
    ((resp, (out,)),) = await exchange(a, [req])
    assert resp.status == 500 and out.verdict is Verdict.RETRYABLE
    assert "tracardi" not in sandbox.sandbox.received


async def test_twin_keeps_no_device_type_or_app_for_a_context_device(sandbox):
    """tracardi/service/tracking/session_data_computation.py ``_compute_data_from_user_agent``: with a
    ``context.device`` it takes name, brand and model from it, then reads ``user_agent.device.is_touch_capable``
    (user_agents' device has no such field) and swallows the error: no touch, type or app is kept (which is
    why the relay sends no ``context.device``)."""
    a = twin_adapter(sandbox, context={"device": {"type": "pc"}})  # e.g. a site's static context
    rec = with_changes(make_view(1, 1), "page.user_agent", IPHONE)
    ((resp, _),) = await exchange(a, a.plan([as_event(VIEW, rec)]).requests)
    assert resp.status == 200
    (row,) = sandbox.sandbox.received["tracardi"]
    assert row["device"] == {"name": "iPhone", "brand": "Apple", "model": "iPhone"}
    assert row["app"] == {"language": "de-DE"} and row["os"]["name"] == "iOS"


@pytest.mark.parametrize("agent", [
    GOOGLEBOT, IPHONE, "bingbot/2.0", "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
    "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "facebookexternalhit/1.1", "curl/8.0", "python-httpx/0.27", "event-relay/0.1", "Mozilla/5.0 (iPad)",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (compatible; PetalBot;+https://webmaster.petalsearch.com/site/petalbot)", "", "Java/17",
    # the native matcher reads bounded repeats wider than Python's re: a keyword past them is no bot for Tracardi
    "x" * 150 + " crawler", "x" * 5000 + " Googlebot/2.1", "Mozilla " + "y" * 250 + " PetalBot", "x" * 120 + " spider",
    "Mozilla/5.0 (Linux; Android 10; SM-G973F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 "
    "Mobile Safari/537.36", "Mozilla/5.0 (Linux; Android 10; SM-G973F) " + "z" * 400 + " Googlebot/2.1",
    "Mozilla/5.0 " + "a" * 3000,
])
def test_the_bot_rule_is_tracardis(agent):
    """tracardi/domain/payload/tracker_payload.py ``TrackerPayload.is_bot`` and the session's ``app.bot``
    (tracardi/service/tracking/session_data_computation.py) are user_agents' ``is_bot`` (Tracardi pins
    user-agents 2.2.0), which runs ua-parser's device rules with Python's re."""
    from user_agents import parse as parse_user_agent  # type: ignore[import-untyped]

    assert (bool(agent) and is_bot(agent)) == parse_user_agent(agent).is_bot
