"""Convert adapter against the document's example and the SDKs' serving API, and against its sandbox twin."""

from __future__ import annotations

import copy
import itertools
import random

import httpx
import orjson
import pytest
from pydantic import ValidationError

from processor.config import interpolate
from processor.devstack.samples import Workload, as_event, make_order, make_view, with_changes
from processor.events import EventKind
from processor.sandbox import Faults
from processor.sandbox.convert import validate_track, validate_v1
from processor.vendors.base import Response, Verdict
from processor.vendors.convert import ConvertAdapter
from tests.unit.vendors.conftest import exchange

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
VID = "1588166554499-0.2020703998482254"
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
        "accountId": "12345", "projectId": "12345", "enrichData": True,
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
    ({"browser": "edge"}, {"browser": "OTH"}, {"browser": "EDG"}),
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
    events = [as_event(VIEW, make_view(n, p, site_id=site), i)
              for i, (n, p, site) in enumerate([(1, 1, "a"), (2, 1, "a"), (1, 2, "a"), (3, 1, "b"), (2, 3, "a")])]
    sites = {"a": DOC_SITE, "b": {**DOC_SITE, "project_id": "777"}}
    plan = adapter(sites=sites).plan(events)
    assert [[e.source.offset for e in r.events] for r in plan.requests] == [[0, 2], [1, 4], [3]]
    assert plan.requests[2].url == "https://777.metrics.convertexperiments.com/track"
    v1 = {name: {**site, "api": "v1"} for name, site in sites.items()}
    plan = adapter(sites=v1).plan(events)
    assert [[e.source.offset for e in r.events] for r in plan.requests] == [[0, 2, 1, 4], [3]]
    assert [v["visitorId"] for v in orjson.loads(plan.requests[0].content)["visitors"]] == [
        "1588166554499-0.000000000001", "1588166554499-0.000000000002"]


def test_bucketing_is_sent_once_per_visitor_and_goals_for_every_event():
    events = [as_event(VIEW, make_view(1, p), p) for p in (1, 2, 3)]
    (req,) = adapter().plan(events).requests
    assert [ev["evt"] for ev in orjson.loads(req.content)["ev"]] == ["viewExp", "hitGoal", "hitGoal", "hitGoal"]
    assert req.context == [(0, 0, 2), (0, 2, 3), (0, 3, 4)]


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


@pytest.mark.parametrize(("settings", "agent"), [
    ({}, "ConvertAgent/1.0"),
    ({"user_agent": "shop-relay/2.0"}, "shop-relay/2.0 ConvertAgent/1.0"),
    ({"user_agent": "ConvertAgent/1.0 (shop)"}, "ConvertAgent/1.0 (shop)"),
])
def test_user_agent_always_carries_the_convert_agent_token(settings, agent):
    (req,) = adapter(**settings).plan([as_event(VIEW, make_view(1, 1))]).requests
    assert req.headers["User-Agent"] == agent
    assert "Authorization" not in req.headers


@pytest.mark.parametrize(("site", "field"), [
    ({**DOC_SITE, "secret": "s"}, "secret and enrich_data are only sent with api: v1"),
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
    events = [as_event(VIEW, make_view(1, p), p) for p in range(3)] + [as_event(VIEW, make_view(3, 1), 3)]
    plans = a.plan(events).requests
    req = plans[0]
    named = "ev[3].goals" if api == "track" else "visitors[0].events[3].data.goalId, visitors[1]"
    outcomes = a.interpret(req, Response(400, {}, error_body(named)))
    verdicts = [o.verdict for o in outcomes]
    if api == "track":  # rows: viewExp+hitGoal (event 0), hitGoal (1), hitGoal (2)
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
    (req,) = a.plan([as_event(VIEW, make_view(1, 1), 0), as_event(VIEW, make_view(1, 2), 1)]).requests
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
