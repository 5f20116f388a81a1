"""Convert adapter against the document's example and the SDKs' serving API, and against its sandbox twin."""

from __future__ import annotations

import copy
import itertools
import random
from importlib.metadata import version

import httpx
import orjson
import pytest
from pydantic import ValidationError

from processor.config import interpolate
from processor.delivery import VendorPipeline
from processor.devstack.samples import Workload, as_event, make_order, make_view, with_changes
from processor.events import EventKind
from processor.metrics import Metrics
from processor.offsets import OffsetTracker, RelaySettlement
from processor.sandbox import Faults
from processor.sandbox.convert import count_conversions, validate_track, validate_v1
from processor.transport import Sender
from processor.vendors.base import DELIVERED, Response, Verdict, retryable
from processor.vendors.convert import SOURCE, ConvertAdapter
from processor.vendors.recent import RecentKeys
from tests.unit.vendors.conftest import exchange

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
VID = "1588166554499-0.2020703998482254"
VID_1 = "1588166554499-0.000000000001"  # make_view(1)'s convert_visitor_id
DOC_EXAMPLE = {  # the document's POST example, verbatim
    "cid": "12345", "pid": "12345",
    "seg": {"browser": "CH", "devices": ["DESK"], "source": "direct", "campaign": "", "new": 1, "ctry": "RO",
            "cust": ["123", "456"]},
    "vid": VID,
    "ev": [
        {"evt": "viewExp", "vars": ["12345", "6789"], "exps": ["ABCD", "DEF"]},
        {"evt": "hitGoal", "goals": [12345], "vars": ["12345", "6789"], "exps": ["ABCD", "DEF"]},
        {"evt": "tr", "goals": [12345], "vars": ["12345", "6789"], "exps": ["ABCD", "DEF"], "r": 123.23, "prc": 2},
    ],
}
DOC_SITE = {"account_id": "12345", "project_id": "12345", "view_goals": [12345], "order_goals": [12345],
            "customer_segments": ["123", "456"]}


def adapter(base_url=None, sites=None, **settings):
    return ConvertAdapter(ConvertAdapter.settings_model().model_validate({
        "base_url": base_url, "sites": sites or {"default": DOC_SITE}, "options": {}, **settings}))


def doc_visitor(rec, **page):
    """The document example's visitor: its vid, buckets and segment values, as canonical fields."""
    rec["visitor"].update(customer_id="c-1", vendor_ids={"convert_visitor_id": VID})
    rec["experiments"] = [{"experience_id": "ABCD", "variation_id": "12345"},
                          {"experience_id": "DEF", "variation_id": "6789"}]
    rec["page"].update(browser="chrome", device="desktop", traffic_source="direct", campaign="",
                       returning_visitor=True, country="RO", **page)
    return rec


def doc_events():
    order = doc_visitor(make_order(1, items=1))
    order["order"]["items"][0]["quantity"] = 2
    order["order"]["total"] = 123.23
    return [as_event(VIEW, doc_visitor(make_view(1, 1)), 0), as_event(ORDER, order, 1)]


def test_view_and_order_match_the_document_example():
    plan = adapter().plan(doc_events())
    assert not plan.rejected and not plan.filtered
    (req,) = plan.requests
    assert req.url == "https://12345.metrics.convertexperiments.com/track"
    assert orjson.loads(req.content) == DOC_EXAMPLE
    assert validate_track(DOC_EXAMPLE, "12345") == ([(f"ev[{j}]", {"pid": "12345", "vid": VID, **ev})
                                                     for j, ev in enumerate(DOC_EXAMPLE["ev"])], [])


def test_v1_payload_follows_the_serving_api():
    site = {**DOC_SITE, "api": "v1", "secret": "s3cret", "enrich_data": True}
    (req,) = adapter(sites={"default": site}).plan(doc_events()).requests
    assert req.url == "https://12345.metrics.convertexperiments.com/v1/track/12345/12345"
    assert req.headers["Authorization"] == "Bearer s3cret"
    buckets = {"ABCD": "12345", "DEF": "6789"}
    assert orjson.loads(req.content) == {
        "accountId": "12345", "projectId": "12345", "enrichData": True, "source": SOURCE,
        "visitors": [{
            "visitorId": VID,
            "segments": {"browser": "CH", "devices": ["DESK"], "source": "direct", "campaign": "",
                         "visitorType": "returning", "country": "RO", "customSegments": ["123", "456"]},
            "events": [
                {"eventType": "bucketing", "data": {"experienceId": "ABCD", "variationId": "12345"}},
                {"eventType": "bucketing", "data": {"experienceId": "DEF", "variationId": "6789"}},
                {"eventType": "conversion", "data": {"goalId": "12345", "bucketingData": buckets}},
                {"eventType": "conversion", "data": {"goalId": "12345", "bucketingData": buckets, "goalData": [
                    {"key": "amount", "value": 123.23}, {"key": "productsCount", "value": 2},
                    {"key": "transactionId", "value": "O-1-1"}]}},
            ],
        }],
    }
    assert validate_v1(orjson.loads(req.content), "12345", "12345")[1] == []


@pytest.mark.parametrize(("page", "track", "v1"), [
    ({"browser": "edge"}, {"browser": "OTH"}, {"browser": "OTH"}),
    ({"browser": "safari", "device": "mobile", "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0)"},
     {"browser": "SF", "devices": ["IPH", "ALLPH"]}, {"browser": "SF", "devices": ["IPH", "ALLPH"]}),
    ({"device": "tablet"}, {"devices": ["OTHTAB", "ALLTAB"]}, {"devices": ["OTHTAB", "ALLTAB"]}),
    ({"traffic_source": "search", "campaign": "autumn"}, {"source": "Search", "campaign": "autumn"},
     {"source": "search", "campaign": "autumn"}),
    ({"returning_visitor": False, "country": "gb"}, {"new": 0, "ctry": "GB"},
     {"visitorType": "new", "country": "GB"}),
    ({"country": "GBR", "traffic_source": "social"}, {}, {}),  # not what the document allows: left out
])
def test_segments_take_only_values_the_apis_allow(page, track, v1):
    rec = make_view(1, 1)
    rec["visitor"]["customer_id"] = None
    rec["page"] = dict.fromkeys(rec["page"]) | page
    base = {**DOC_SITE, "customer_segments": []}
    for api, want in (("track", track), ("v1", v1)):
        (req,) = adapter(sites={"default": {**base, "api": api}}).plan([as_event(VIEW, copy.deepcopy(rec))]).requests
        body = orjson.loads(req.content)
        assert (body.get("seg") if api == "track" else body["visitors"][0].get("segments")) == (want or None)


def test_one_request_per_visitor_and_one_per_site_in_v1():
    events = [as_event(VIEW, make_view(n, p, site_id=site), i) if p else as_event(ORDER, make_order(n, site_id=site), i)
              for i, (n, p, site) in enumerate([(1, 1, "a"), (2, 1, "a"), (1, 0, "a"), (3, 1, "b"), (2, 0, "a")])]
    sites = {"a": DOC_SITE, "b": {**DOC_SITE, "project_id": "777"}}
    plan = adapter(sites=sites).plan(events)
    assert [[e.source.offset for e in r.events] for r in plan.requests] == [[0, 2], [1, 4], [3]]
    assert plan.requests[2].url == "https://777.metrics.convertexperiments.com/track"
    v1 = {name: {**site, "api": "v1"} for name, site in sites.items()}
    plan = adapter(sites=v1).plan(events)
    assert [[e.source.offset for e in r.events] for r in plan.requests] == [[0, 2, 1, 4], [3]]
    assert [v["visitorId"] for v in orjson.loads(plan.requests[0].content)["visitors"]] == [
        "1588166554499-0.000000000001", "1588166554499-0.000000000002"]


def test_bucketing_and_a_view_goal_are_sent_once_per_visitor_in_a_batch():
    events = [as_event(VIEW, make_view(1, p), p) for p in (1, 2, 3)]
    plan = adapter().plan(events)
    (req,) = plan.requests
    assert [ev["evt"] for ev in orjson.loads(req.content)["ev"]] == ["viewExp", "hitGoal"]
    assert req.context == [(0, 0, 2)]
    assert plan.filtered == events[1:]  # nothing left to send for them: their goal and bucketing went


def test_events_without_buckets_or_goals_are_filtered():
    site = {**DOC_SITE, "view_goals": []}
    no_buckets = as_event(VIEW, make_view(2, 1), 0)  # even visitors are in no experiment
    bucketed = as_event(VIEW, make_view(1, 1), 1)
    order = as_event(ORDER, make_order(2), 2)  # no buckets, but an order goal is configured
    plan = adapter(sites={"default": site}).plan([no_buckets, bucketed, order])
    assert plan.filtered == [no_buckets]
    assert [r.events for r in plan.requests] == [[bucketed], [order]]
    assert orjson.loads(plan.requests[1].content)["ev"] == [{"evt": "tr", "goals": [12345], "r": 40.0, "prc": 3}]


def test_missing_required_fields_are_rejected_naming_the_field():
    good = as_event(VIEW, make_view(1, 1), 0)
    no_items = as_event(ORDER, with_changes(make_order(3), "order.items", []), 1)
    no_qty = as_event(ORDER, with_changes(make_order(5), "order.items.0.quantity", 0), 2)
    no_bucket = as_event(VIEW, with_changes(make_view(7, 1), "experiments.0.variation_id", ""), 3)
    plan = adapter().plan([good, no_items, no_qty, no_bucket])
    assert sorted((e.source.offset, r) for e, r in plan.rejected) == [
        (2, "order.items[0].quantity is 0, not a count of units sold (at least 1)"),
        (3, "experiments[0].variation_id is empty")]
    # an order without lines (a gift card) is a transaction by its revenue: tr with prc 0
    assert [r.events for r in plan.requests] == [[good], [no_items]]
    (tr,) = [row for row in orjson.loads(plan.requests[1].content)["ev"] if row["evt"] == "tr"]
    assert (tr["r"], tr["prc"]) == (make_order(3)["order"]["total"], 0)


def test_visitor_id_falls_back_unless_disabled():
    rec = with_changes(make_view(1, 1), "visitor.vendor_ids", {})
    (req,) = adapter().plan([as_event(VIEW, rec)]).requests
    assert orjson.loads(req.content)["vid"] == "v00000001"
    plan = adapter(sites={"default": {**DOC_SITE, "visitor_id_fallback": False}}).plan([as_event(VIEW, rec)])
    assert plan.rejected[0][1] == "missing required field visitor.vendor_ids.convert_visitor_id"


def test_site_selection_and_missing_site():
    a = adapter(sites={"shop-2": DOC_SITE})
    plan = a.plan([as_event(VIEW, make_view(1, 1, site_id="shop-1"), 0), as_event(VIEW, make_view(1, 1,
                                                                                                   site_id="shop-2"))])
    assert "no convert site config for site_id 'shop-1'" in plan.rejected[0][1]
    assert len(plan.requests) == 1


@pytest.mark.parametrize("api", ["track", "v1"])
@pytest.mark.parametrize("settings", [{}, {"user_agent": "shop-relay/2.0"}, {"user_agent": "ConvertAgent/1.0 (shop)"}])
def test_user_agent_is_exactly_the_sdks(settings, api, caplog):
    """Convert's SDK sends exactly ``ConvertAgent/1.0`` on every server-side request (its http-client: "an SDK
    invariant relied on by the metrics endpoint's isbot bypass and is not customer- or env-configurable");
    the document asks for any value. A configured user_agent is not sent, and the start says so."""
    a = adapter(sites={"default": {**DOC_SITE, "api": api}}, **settings)
    (req,) = a.plan([as_event(VIEW, make_view(1, 1))]).requests
    assert req.headers["User-Agent"] == "ConvertAgent/1.0"
    assert "Authorization" not in req.headers
    assert ("user_agent is not sent to Convert" in caplog.text) == bool(settings)


@pytest.mark.parametrize(("site", "field"), [
    ({**DOC_SITE, "secret": "s"}, "secret and enrich_data are only sent with api: v1"),
    ({**DOC_SITE, "enrich_data": False}, "secret and enrich_data are only sent with api: v1"),
    ({**DOC_SITE, "project_id": "evil.example.com/x"}, "project_id"),
    ({**DOC_SITE, "view_goals": [0]}, "view_goals"),
    ({**DOC_SITE, "api": "v2"}, "api"),
])
def test_bad_site_config_fails_naming_the_field(site, field):
    with pytest.raises(ValidationError, match=field):
        adapter(sites={"default": site})


def test_base_url_override_carries_the_project_id():
    a = adapter("http://127.0.0.1:9/convert/", sites={"t": DOC_SITE, "v": {**DOC_SITE, "api": "v1"}})
    assert [a.plan([as_event(VIEW, make_view(1, 1, site_id=s))]).requests[0].url for s in "tv"] == [
        "http://127.0.0.1:9/convert/12345/track", "http://127.0.0.1:9/convert/12345/v1/track/12345/12345"]
    proxy = adapter("https://{project_id}.convert-proxy.example")
    assert proxy.plan([as_event(VIEW, make_view(1, 1))]).requests[0].url == (
        "https://12345.convert-proxy.example/track")


def error_body(fields, message="bad"):
    return orjson.dumps({"code": 400, "message": message, "fields": fields})


@pytest.mark.parametrize("api", ["track", "v1"])
def test_error_fields_reject_only_the_events_they_name(api):
    a = adapter(sites={"default": {**DOC_SITE, "api": api}})
    events = [as_event(ORDER, make_order(1, session=s), s) for s in range(3)] + [as_event(VIEW, make_view(3, 1), 3)]
    plans = a.plan(events).requests
    req = plans[0]
    named = "ev[3].goals" if api == "track" else "visitors[0].events[4].data.goalId, visitors[1]"
    outcomes = a.interpret(req, Response(400, {}, error_body(named)))
    verdicts = [o.verdict for o in outcomes]
    if api == "track":  # rows: viewExp+tr (order 0), tr (1), tr (2); v1: bucketing+goal+transaction, ...
        assert verdicts == [Verdict.RETRYABLE, Verdict.RETRYABLE, Verdict.REJECTED]
        assert outcomes[2].reason == "convert refused ev[3]: bad"
    else:  # one request: visitor 0's three events, then visitor 1's one
        assert verdicts == [Verdict.RETRYABLE, Verdict.RETRYABLE, Verdict.REJECTED, Verdict.REJECTED]
        assert outcomes[3].reason == "convert refused visitors[1]: bad"


@pytest.mark.parametrize(("status", "body", "verdict", "note"), [
    (200, b"", Verdict.DELIVERED, None),
    (204, b"", Verdict.RETRYABLE, "not_200"),  # only 200 is success
    (301, b"", Verdict.REJECTED, "firewall_301"),
    (400, error_body("cid"), Verdict.REJECTED, None),  # a field no row owns: the whole request
    (400, b"<html>", Verdict.REJECTED, None),
    (401, error_body(""), Verdict.REJECTED, None),
    (429, b"", Verdict.RETRYABLE, None),
    (500, error_body("ev[0]"), Verdict.RETRYABLE, None),
])
def test_status_classes(status, body, verdict, note):
    a = adapter()
    (req,) = a.plan([as_event(VIEW, make_view(1, 1), 0), as_event(ORDER, make_order(1), 1)]).requests
    outcomes = a.interpret(req, Response(status, {}, body))
    assert [(o.verdict, o.note) for o in outcomes] == [(verdict, note)] * 2


def track_body(**changes):
    return {**copy.deepcopy(DOC_EXAMPLE), **changes}


def ev(j, **changes):
    body = track_body()
    body["ev"][j] = {k: v for k, v in {**body["ev"][j], **changes}.items() if v is not None}
    return body


@pytest.mark.parametrize(("body", "field", "problem"), [
    ([DOC_EXAMPLE], "", "must be an object"),
    (track_body(cid=12345), "cid", "must be a non-empty string"),
    (track_body(pid="999"), "pid", "does not match"),
    (track_body(vid=""), "vid", "non-empty string"),
    (track_body(ev=[]), "ev", "non-empty array"),
    (track_body(extra=1), "extra", "not a known field"),
    (track_body(seg={"browser": "EDG"}), "seg.browser", "one of IE, CH"),
    (track_body(seg={"devices": ["PHONE"]}), "seg.devices", "non-empty array of DESK"),
    (track_body(seg={"source": "search"}), "seg.source", "one of direct, referral, Search, Campaign"),
    (track_body(seg={"new": True}), "seg.new", "one of 0, 1"),
    (track_body(seg={"ctry": "ro"}), "seg.ctry", "two-letter"),
    (track_body(seg={"cust": [123]}), "seg.cust", "array of non-empty strings"),
    (ev(0, evt="view"), "ev[0].evt", "one of viewExp, hitGoal, tr"),
    (ev(0, exps=None), "ev[0].exps", "required for viewExp"),
    (ev(0, vars=["1"]), "ev[0].vars", "pair one variation"),
    (ev(0, goals=[1]), "ev[0].goals", "not allowed on viewExp"),
    (ev(1, goals=["12345"]), "ev[1].goals", "goal ids (numbers)"),
    (ev(1, r=1.0), "ev[1].r", "not allowed on hitGoal"),
    (ev(2, r="123.23"), "ev[2].r", "must be a number"),
    (ev(2, prc=None), "ev[2].prc", "required for tr"),
    (ev(2, prc=2.5), "ev[2].prc", "non-negative integer"),
])
def test_twin_rejects_what_the_document_forbids(body, field, problem):
    _, problems = validate_track(body, "12345")
    assert any(f == field and problem in p for f, p in problems), problems


def v1_body(visitor=None, **changes):
    v = {"visitorId": VID, "events": [{"eventType": "bucketing", "data": {"experienceId": "1", "variationId": "2"}}]}
    return {"accountId": "1", "projectId": "2", "visitors": [{**v, **(visitor or {})}], **changes}


def conversion(**data):
    return {"events": [{"eventType": "conversion", "data": {"goalId": "5", **data}}]}


@pytest.mark.parametrize(("body", "field", "problem"), [
    (v1_body(accountId="9"), "accountId", "does not match the URL"),
    (v1_body(projectId=2), "projectId", "non-empty string"),
    (v1_body(visitors=[]), "visitors", "non-empty array"),
    (v1_body(enrichData="yes"), "enrichData", "boolean"),
    (v1_body({"visitorId": None}), "visitors[0].visitorId", "non-empty string"),
    (v1_body({"segments": {"visitorType": "old"}}), "visitors[0].segments.visitorType", "new, returning"),
    (v1_body({"segments": {"ctry": "RO"}}), "visitors[0].segments.ctry", "not a known field"),
    (v1_body({"events": [{"eventType": "view", "data": {}}]}), "visitors[0].events[0].eventType", "bucketing"),
    (v1_body({"events": [{"eventType": "bucketing", "data": {"experienceId": "1"}}]}),
     "visitors[0].events[0].data.variationId", "required"),
    (v1_body(conversion(goalId=5)), "visitors[0].events[0].data.goalId", "non-empty string"),
    (v1_body(conversion(goalData=[{"key": "revenue", "value": 1}])),
     "visitors[0].events[0].data.goalData[0].key", "one of amount"),
    (v1_body(conversion(goalData=[{"key": "amount", "value": "1"}])),
     "visitors[0].events[0].data.goalData[0].value", "number for amount"),
    (v1_body(conversion(bucketingData={"1": 2})), "visitors[0].events[0].data.bucketingData", "experience id"),
])
def test_v1_twin_rejects_what_the_serving_api_forbids(body, field, problem):
    _, problems = validate_v1(body, "1", "2")
    assert any(f == field and problem in p for f, p in problems), problems


async def test_twin_answers_301_without_user_agent_and_401_for_a_malformed_bearer(sandbox):
    async with httpx.AsyncClient() as client:
        del client.headers["User-Agent"]
        r = await client.post(f"{sandbox.url}/convert/12345/track", json=DOC_EXAMPLE)
        assert r.status_code == 301
        r = await client.post(f"{sandbox.url}/convert/2/v1/track/1/2", json=v1_body(),
                              headers={"User-Agent": "ConvertAgent/1.0", "Authorization": "Token x"})
        assert r.status_code == 401
        r = await client.post(f"{sandbox.url}/convert/12345/track", json=track_body(pid="1"),
                              headers={"User-Agent": "x"})
        assert (r.status_code, r.json()["fields"]) == (400, "pid")
    assert "convert" not in sandbox.sandbox.received


def workload_events(n=120):
    stream = itertools.islice(iter(Workload(visitors=15, order_rate=0.5, seed=3, sites=("shop-1", "shop-2"))), n)
    return [as_event(kind, rec, i) for i, (kind, rec, _) in enumerate(stream)]


@pytest.mark.parametrize("api", ["track", "v1"])
async def test_adapter_output_is_accepted_by_the_twin(sandbox, api):
    a = adapter(f"{sandbox.url}/convert", sites={"default": {**DOC_SITE, "api": api}})
    plan = a.plan(workload_events())
    results = await exchange(a, plan.requests)
    assert {resp.status for resp, _ in results} == {200}
    assert all(o.verdict is Verdict.DELIVERED for _, outcomes in results for o in outcomes)
    rows = sum(len(r["ev"]) if api == "track" else sum(len(v["events"]) for v in r["visitors"])
               for r in (orjson.loads(q.content) for q in plan.requests))
    assert len(sandbox.sandbox.received["convert"]) == rows
    assert sandbox.sandbox.stats["convert"]["rejected"] == 0


@pytest.mark.parametrize("api", ["track", "v1"])
async def test_injected_partial_failures_reject_only_those_events(sandbox, api):
    sandbox.sandbox.rng = random.Random(5)
    sandbox.sandbox.faults["convert"] = Faults(partial_failure_rate=0.1)
    a = adapter(f"{sandbox.url}/convert", sites={"default": {**DOC_SITE, "api": api}})
    events = workload_events(60)
    plan = a.plan(events)
    results = await exchange(a, plan.requests)
    outcomes = [o for _, os in results for o in os]
    rejected = [o for o in outcomes if o.verdict is Verdict.REJECTED]
    assert 0 < len(rejected) < len(outcomes)
    assert all(o.reason.startswith("convert refused ") and "injected partial failure" in o.reason for o in rejected)
    for resp, os in results:  # a refused request records nothing; its other events are retried
        assert resp.status in (200, 400)
        assert {o.verdict for o in os} <= ({Verdict.DELIVERED} if resp.status == 200
                                           else {Verdict.REJECTED, Verdict.RETRYABLE})
    retry = [e for req, (_, os) in zip(plan.requests, results, strict=True)
             for e, o in zip(req.events, os, strict=True) if o.verdict is Verdict.RETRYABLE]
    del sandbox.sandbox.faults["convert"]
    again = await exchange(a, a.plan(retry).requests)
    assert all(o.verdict is Verdict.DELIVERED for _, os in again for o in os)
    delivered = sum(o.verdict is Verdict.DELIVERED for o in outcomes) + len(retry)
    assert delivered + len(rejected) == len(events) - len(plan.filtered)


async def test_example_settings_validate_and_work_with_the_twin(sandbox):
    raw = interpolate(ConvertAdapter.example_settings(sandbox.url), "", ConvertAdapter.example_env)
    a = ConvertAdapter(ConvertAdapter.settings_model().model_validate(raw))
    plan = a.plan(workload_events())
    assert not plan.rejected
    assert {r.url.rsplit("/convert/", 1)[1] for r in plan.requests} == {
        "10023736/track", "10023737/v1/track/10022898/10023737"}
    results = await exchange(a, plan.requests)
    assert all(o.verdict is Verdict.DELIVERED for _, os in results for o in os)
    assert sandbox.sandbox.stats["convert"]["rejected"] == 0


# -- a conversion counts once ---------------------------------------------------------------------------------
V1_SITE = {**DOC_SITE, "api": "v1"}


def v1_rows(req):
    return [(e["eventType"], e["data"].get("goalId"), e["data"].get("experienceId"),
             next((kv["value"] for kv in e["data"].get("goalData", ()) if kv["key"] == "transactionId"), None))
            for v in orjson.loads(req.content)["visitors"] for e in v["events"]]


def deliver(a, plan):
    """The relay's delivered answer to each request: its events delivered, the adapter told."""
    for req in plan.requests:
        a.delivered(req, a.interpret(req, Response(200, {}, b"{}")))


def views(n, products, offset=0, site_id="shop-1"):
    return [as_event(VIEW, make_view(n, p, site_id=site_id), offset + i) for i, p in enumerate(products)]


@pytest.mark.parametrize("api", ["track", "v1"])
async def test_five_views_firing_one_view_goal_give_one_conversion(sandbox, api):
    a = adapter(f"{sandbox.url}/convert", sites={"default": {**DOC_SITE, "api": api}})
    batches = [views(1, [1, 2, 3]), views(1, [4, 5], offset=3)]  # one visitor, five products, two batches
    for batch in batches:
        plan = a.plan(batch)
        for (_, outcomes), req in zip(await exchange(a, plan.requests), plan.requests, strict=True):
            a.delivered(req, outcomes)
    counts = count_conversions(sandbox.sandbox.received["convert"])
    assert counts["goals"] == {f"12345/{VID_1}/12345": 1}
    assert counts["bucketings"] == {f"12345/{VID_1}/100123": 1}
    assert a.memory.hits == 4  # the second batch's two views: each its goal and bucketing, left out as delivered
    assert len(a.memory) == 2


@pytest.mark.parametrize("api", ["track", "v1"])
async def test_two_orders_give_two_revenue_conversions_and_a_redelivered_order_one(sandbox, api):
    a = adapter(f"{sandbox.url}/convert", sites={"default": {**DOC_SITE, "api": api}})
    first, second = (as_event(ORDER, make_order(1, session=s), s) for s in (1, 2))
    again = as_event(ORDER, make_order(1, session=1), 3)  # order O-1-1 redelivered (a replay, a rebalance)
    for batch in ([first, second, again], [again]):  # in the same batch, then after it was delivered
        plan = a.plan(batch)
        for (_, outcomes), req in zip(await exchange(a, plan.requests), plan.requests, strict=True):
            a.delivered(req, outcomes)
        assert again in plan.filtered
    counts = count_conversions(sandbox.sandbox.received["convert"])
    assert counts["transactions"] == {f"12345/{VID_1}/12345": 2}
    if api == "v1":
        assert counts["orders"] == {f"12345/{VID_1}/12345/O-1-1": 1, f"12345/{VID_1}/12345/O-1-2": 1}
        assert counts["goals"] == {f"12345/{VID_1}/12345": 1}


def test_an_order_without_an_order_id_is_a_transaction_each_time():
    a = adapter(sites={"default": V1_SITE})
    events = [as_event(ORDER, with_changes(make_order(2, session=s), "order.order_id", ""), s) for s in (1, 2)]
    (req,) = a.plan(events).requests
    assert v1_rows(req) == [("conversion", "12345", None, None)] * 3  # the goal, then two transactions
    assert [len(v["events"]) for v in orjson.loads(req.content)["visitors"]] == [3]


def test_the_revenue_goal_is_sent_as_the_sdk_sends_it():
    """Convert's SDK (``DataManager.convert``): a goal's first conversion for a visitor ``{goalId}``, then the
    transaction ``{goalId, goalData}``; a later order (``forceMultipleTransactions``) the transaction alone.
    Each configured order goal in turn."""
    a = adapter(sites={"default": {**V1_SITE, "order_goals": [7, 8]}})
    first, second = (as_event(ORDER, make_order(1, session=s), s) for s in (1, 2))
    (req,) = a.plan([first, second]).requests
    assert v1_rows(req) == [
        ("bucketing", None, "100123", None),
        ("conversion", "7", None, None), ("conversion", "7", None, "O-1-1"),
        ("conversion", "8", None, None), ("conversion", "8", None, "O-1-1"),
        ("conversion", "7", None, "O-1-2"), ("conversion", "8", None, "O-1-2")]
    goal_data = orjson.loads(req.content)["visitors"][0]["events"][2]["data"]["goalData"]
    assert goal_data == [{"key": "amount", "value": make_order(1)["order"]["total"]},
                         {"key": "productsCount", "value": 3}, {"key": "transactionId", "value": "O-1-1"}]
    assert req.context == [(0, 0, 5), (0, 5, 7)]
    assert validate_v1(orjson.loads(req.content), "12345", "12345")[1] == []


def test_bucketing_for_an_experience_once_per_visitor_within_the_memory():
    a = adapter(sites={"default": {**DOC_SITE, "view_goals": []}}, options={"memory_size": 2})
    deliver(a, a.plan(views(1, [1])))
    assert a.plan(views(1, [2])).filtered  # the visitor's bucketing was delivered: nothing to send
    deliver(a, a.plan(views(3, [1]) + views(5, [1])))  # two more visitors: the first is forgotten
    assert a.memory.evictions == 1
    (req,) = a.plan(views(1, [3])).requests
    assert orjson.loads(req.content)["ev"] == [{"evt": "viewExp", "vars": ["100456"], "exps": ["100123"]}]
    other = with_changes(make_view(5, 1), "experiments", [{"experience_id": "100123", "variation_id": "999"}])
    (req,) = a.plan([as_event(VIEW, other)]).requests  # another variation of the experience is news
    assert orjson.loads(req.content)["ev"][0]["vars"] == ["999"]


def test_without_a_memory_only_the_batch_keeps_repeats_out():
    a = adapter(sites={"default": V1_SITE}, options={"memory_size": 0})
    assert a.memory is None
    for _ in range(2):
        plan = a.plan(views(1, [1, 2]))
        deliver(a, plan)
        (req,) = plan.requests
        assert v1_rows(req) == [("bucketing", None, "100123", None), ("conversion", "12345", None, None)]


def test_recent_keys_is_bounded_and_counts_hits_and_evictions():
    memory = RecentKeys(2)
    memory.add(["a", "b"])
    assert memory.seen("a") and not memory.seen("c")  # a hit refreshes "a": "b" is now the oldest
    memory.add(["c"])
    assert "b" not in memory and "a" in memory and "c" in memory and len(memory) == 2
    memory.add(["a", "d"])  # "a" added again keeps its place (only a hit refreshes): it goes first
    assert list(memory.keys) == ["c", "d"]
    assert (memory.hits, memory.evictions) == (1, 2)
    assert memory.counts_since_last() == (1, 2) and memory.counts_since_last() == (0, 0)
    memory.seen("d")
    assert memory.counts_since_last() == (1, 0)
    with pytest.raises(ValueError):
        RecentKeys(-1)


@pytest.mark.parametrize(("status", "body"), [(500, b""), (400, error_body("visitors[0].events[1]")),
                                              (204, b"")])
def test_a_request_not_delivered_carries_its_rows_again(status, body):
    a = adapter(sites={"default": V1_SITE})
    batch = [*views(1, [1]), as_event(ORDER, make_order(1), 1)]
    (req,) = a.plan(batch).requests
    outcomes = a.interpret(req, Response(status, {}, body))
    assert Verdict.DELIVERED not in {o.verdict for o in outcomes}
    a.delivered(req, outcomes)
    assert len(a.memory) == 0
    retry = [e for e, o in zip(batch, outcomes, strict=True) if o.verdict is Verdict.RETRYABLE]
    (again,) = a.plan(retry).requests
    assert v1_rows(again) == v1_rows(req)[:len(v1_rows(again))]
    a.delivered(again, a.interpret(again, Response(200, {}, b"{}")))
    assert a.plan(retry).filtered == retry  # delivered now: remembered


def test_only_the_delivered_events_of_a_request_are_remembered():
    a = adapter(sites={"default": V1_SITE})
    batch = views(1, [1]) + views(3, [1], offset=1)
    (req,) = a.plan(batch).requests
    a.delivered(req, [retryable("busy"), DELIVERED])
    assert len(a.plan(batch).requests[0].events) == 1  # visitor 1's rows again, visitor 3's remembered


def test_source_names_the_relay_and_its_version_and_enrich_data_is_on_by_default():
    assert f"event-relay/{version('event-relay')}" == SOURCE
    for site, enrich in ((V1_SITE, True), ({**V1_SITE, "enrich_data": False}, None)):
        body = orjson.loads(adapter(sites={"default": site}).plan(views(1, [1])).requests[0].content)
        assert (body["source"], body.get("enrichData")) == (SOURCE, enrich)
    assert "source" not in orjson.loads(adapter().plan(views(1, [1])).requests[0].content)  # the document's


def test_edge_is_oth_in_both_apis():
    """Convert contradicts itself on Edge. The serving API's request type, generated from Convert's API spec
    and bundled in ``@convertcom/js-sdk-types`` (``SendTrackingEventsRequestData`` → ``VisitorSegments``),
    allows browser ``'IE' | 'CH' | 'FF' | 'OP' | 'SF' | 'OTH'``; the SDK's own ``BrowserType`` enum
    (``@convertcom/js-sdk-enums``) adds ``EDG``, ``MO`` and ``NS`` but no code of the SDK uses it. The
    endpoint's type is its contract, and the document ("New Tracking Structure - Advanced Integrations")
    lists the same six: Edge is ``OTH``, and the twin refuses ``EDG``."""
    rec = with_changes(make_view(1, 1), "page.browser", "edge")
    for api in ("track", "v1"):
        body = orjson.loads(adapter(sites={"default": {**DOC_SITE, "api": api}}).plan(
            [as_event(VIEW, rec)]).requests[0].content)
        assert (body["seg"] if api == "track" else body["visitors"][0]["segments"])["browser"] == "OTH"
    _, problems = validate_v1(v1_body({"segments": {"browser": "EDG"}}), "1", "2")
    assert problems == [("visitors[0].segments.browser", "must be one of IE, CH, FF, OP, SF, OTH")]


class _Writer:
    """The settlement's dead-letter and parking writes, acknowledged at once."""

    def __init__(self):
        self.dead, self.parked = [], []

    def write(self, source, vendor, error_class, status, reason, attempts, first_ms, on_ack):
        self.dead.append(source.offset)
        on_ack()

    def park(self, source, vendor, reason, attempts, first_ms, next_attempt_ms, on_ack, waiting_on=""):
        self.parked.append(source.offset)
        on_ack()


async def test_the_pipeline_remembers_only_what_was_delivered_and_counts_the_memory(sandbox):
    """Through the delivery pipeline: a first answer of 500 is retried with its rows; once delivered, the
    visitor's next views are filtered, counted as memory hits; the memory's bound evicts and counts."""
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(orjson.loads(request.content))
        return httpx.Response(500 if len(calls) == 1 else 200, json={})

    a = adapter(sites={"default": V1_SITE}, options={"memory_size": 3},
                retry={"max_attempts": 4, "base_delay_ms": 1, "max_delay_ms": 2, "max_elapsed_s": 60})
    metrics, tracker, writer = Metrics(), OffsetTracker(), _Writer()
    pipe = VendorPipeline(a, Sender(httpx.MockTransport(handler)), metrics,
                          RelaySettlement(tracker, writer, metrics), 1000, parking=False)

    async def no_sleep(_: float) -> None:
        return None

    pipe.sleep = no_sleep
    tracker.assign("shop.events", 0)

    async def run(events):
        tracker.register_many(events, [1] * len(events))
        pipe.submit_many(events)
        pipe.flush()
        assert await pipe.drain(5)

    def sample(name, **labels):
        return metrics.registry.get_sample_value(name, {"vendor": "convert", **labels})

    assert sample("processor_vendor_memory_total", result="hit") == 0  # the series exist from the start
    await run(views(1, [1, 2]))
    assert len(calls) == 2 and calls[0]["visitors"] == calls[1]["visitors"]  # the retry carries its rows
    await run(views(1, [3], offset=2))
    assert len(calls) == 2  # filtered: its goal and bucketing were delivered
    assert sample("processor_vendor_memory_total", result="hit") == 2
    assert sample("processor_vendor_events_total", event_kind="product_view", outcome="filtered") == 2
    await run(views(3, [1], offset=3))  # two more keys: one of visitor 1's is forgotten
    assert sample("processor_vendor_memory_total", result="eviction") == 1
    assert sample("processor_vendor_memory_keys") == 3
    assert writer.dead == writer.parked == []
    await pipe.close()


async def test_a_parked_event_is_not_remembered_and_its_redrive_sends_its_conversion():
    """Parked after a failed attempt: nothing remembered; redriven (read back from the retry topic as a new
    event), its goal and bucketing are sent, and then remembered."""
    bodies, answers = [], iter([503, 200])

    async def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(orjson.loads(request.content))
        return httpx.Response(next(answers), json={})

    a = adapter(sites={"default": V1_SITE}, retry={"max_attempts": 1, "base_delay_ms": 1, "max_delay_ms": 2})
    metrics, tracker, writer = Metrics(), OffsetTracker(), _Writer()
    pipe = VendorPipeline(a, Sender(httpx.MockTransport(handler)), metrics,
                          RelaySettlement(tracker, writer, metrics), 1000, parking=True)
    tracker.assign("shop.events", 0)
    live = views(1, [1])
    tracker.register_many(live, [1])
    pipe.submit_many(live)
    pipe.flush()
    assert await pipe.drain(5)
    assert writer.parked == [0] and len(a.memory) == 0
    redriven = views(1, [1], offset=1)
    tracker.register_many(redriven, [1])
    pipe.submit_redriven(redriven)
    assert await pipe.drain(5)
    assert bodies[1]["visitors"] == bodies[0]["visitors"]  # the conversion goes with the redrive
    assert len(a.memory) == 2
    await pipe.close()
