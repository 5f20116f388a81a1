"""Qubit adapter against the document's examples, and against its sandbox twin."""

from __future__ import annotations

import httpx
import orjson
import pytest

from processor.devstack.samples import as_event, make_order, make_view, with_changes
from processor.events import EventKind
from processor.sandbox import Faults
from processor.sandbox.qubit import validate_event
from processor.vendors.base import DELIVERED, Outcome, Response, Verdict, rejected
from processor.vendors.qubit import TRANSACTIONS, QubitAdapter
from tests.unit.vendors.conftest import exchange

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
DOC_VISITOR = "hb1ntvmfpug-0iqmaqq7e-glmdos0"
DOC_TS = 1479471022498


def adapter(base_url: str | None = None, source: str = "yourco@1.0.0", **site):
    return QubitAdapter(QubitAdapter.settings_model().model_validate({
        "base_url": base_url, "sites": {"default": {"tracking_id": "TRACKING_ID", **site}},
        "options": {"source": source},
    }))


def doc_order(value: float, currency: str, order_id: str, visitor: str = DOC_VISITOR, ts: int = DOC_TS,
              url: str | None = None):
    """A canonical order equivalent to the document's examples."""
    rec = make_order(1, items=2, event_time=ts)
    rec["visitor"]["vendor_ids"]["qubit_visitor_id"] = visitor
    rec["order"].update(total=value, currency=currency, order_id=order_id)
    rec["page"]["url"] = url
    return as_event(ORDER, rec)


def payload(plan):
    (req,) = plan.requests
    return orjson.loads(req.content)


def test_first_example_matches_the_document():
    event = doc_order(9.99, "USD", "unique-id", "6o2diu81w9o-0irxltk5b-u9t1cv4", 1479377213928,
                      "http://example.com/page")
    plan = adapter(source="company-x@1.0.0").plan([event])
    assert not plan.rejected
    (req,) = plan.requests
    assert req.url == "https://offline-conversions.qubit.com/events/TRACKING_ID"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["User-Agent"] == "event-relay/0.1"
    assert orjson.loads(req.content) == {"events": [{
        "context": {"id": "6o2diu81w9o-0irxltk5b-u9t1cv4"},
        "meta": {"type": "ecBasketTransactionSummary", "ts": 1479377213928, "url": "http://example.com/page",
                 "source": "company-x@1.0.0"},
        "basket": {"total": {"value": 9.99, "currency": "USD"}},
        "transaction": {"id": "unique-id"},
    }]}


@pytest.mark.parametrize(("vertical", "event_type", "box"), [
    ("ecommerce", "ecBasketTransactionSummary", "basket"),  # the document's three required-fields examples
    ("egaming", "egBetslipTransactionSummary", "betslip"),
    ("travel", "trPackageTransactionSummary", "package"),
    ("publisher", "pbBasketTransactionSummary", "basket"),  # the rest of the document's table
    ("logistics", "loBasketTransactionSummary", "basket"),
    ("finance", "fiBasketTransactionSummary", "basket"),
])
def test_required_fields_examples_and_verticals_match_the_document(vertical, event_type, box):
    assert TRANSACTIONS[vertical] == (event_type, box)
    rows = payload(adapter(vertical=vertical).plan([doc_order(80.5, "GBP", "uniqueId-1")]))
    assert rows == {"events": [{
        "context": {"id": DOC_VISITOR},
        "meta": {"type": event_type, "source": "yourco@1.0.0", "ts": DOC_TS},
        box: {"total": {"value": 80.5, "currency": "GBP"}},
        "transaction": {"id": "uniqueId-1"},
    }]}
    assert validate_event(rows["events"][0]) == (None, [])


def test_namespace_prefixes_meta_type_as_the_document_shows():
    a = adapter(vertical="travel", namespace="someco")
    rows = payload(a.plan([doc_order(80.5, "GBP", "x"), as_event(VIEW, make_view(1, 1))]))["events"]
    assert [r["meta"]["type"] for r in rows] == ["someco.trPackageTransactionSummary", "someco.ecView"]
    assert all(validate_event(r) == (None, []) for r in rows)


def test_view_is_an_ecview_of_a_product_page():
    rec = make_view(1, 7)
    (row,) = payload(adapter().plan([as_event(VIEW, rec)]))["events"]
    assert row == {
        "context": {"id": rec["visitor"]["vendor_ids"]["qubit_visitor_id"]},
        "meta": {"type": "ecView", "ts": rec["event_time"], "url": rec["page"]["url"], "source": "yourco@1.0.0"},
        "type": "product", "language": rec["page"]["language"], "country": rec["page"]["country"],
        "currency": "GBP",
    }


def test_order_total_is_a_float_and_transaction_id_is_always_set():
    event = doc_order(80, "GBP", "")
    (row,) = payload(adapter().plan([event]))["events"]
    assert row["transaction"] == {"id": event.record["event_id"]}
    assert isinstance(row["basket"]["total"]["value"], float)


def test_missing_required_fields_are_rejected_naming_the_field():
    good = as_event(VIEW, make_view(1, 1), 0)
    no_qubit_id = make_view(2, 1)
    del no_qubit_id["visitor"]["vendor_ids"]["qubit_visitor_id"]
    no_country = as_event(VIEW, with_changes(make_view(3, 1), "page.country", None), 2)
    no_currency = as_event(ORDER, with_changes(make_order(4), "order.currency", ""), 3)
    good_order = as_event(ORDER, make_order(5), 4)
    plan = adapter().plan([good, as_event(VIEW, no_qubit_id, 1), no_country, no_currency, good_order])
    assert [(e.source.offset, r) for e, r in plan.rejected] == [
        (1, "missing required field visitor.vendor_ids.qubit_visitor_id"),
        (2, "missing required field page.country"),
        (3, "missing required field order.currency"),
    ]
    (req,) = plan.requests
    assert req.events == [good, good_order]
    assert len(orjson.loads(req.content)["events"]) == 2


@pytest.mark.parametrize(("field", "given", "sent"), [
    ("product.currency", "eur", "EUR"), ("product.currency", "Usd", "USD"), ("product.currency", " gbp ", "GBP"),
    ("page.country", "gb", "GB"), ("page.country", "De", "DE"),
    ("page.language", "en_gb", "en-GB"), ("page.language", "EN-us", "en-US"), ("page.language", "zh-hant-tw",
                                                                             "zh-Hant-TW"),
    ("page.language", "de", "de"),
])
def test_codes_are_sent_in_the_form_qubit_documents(field, given, sent):
    (row,) = payload(adapter().plan([as_event(VIEW, with_changes(make_view(1, 1), field, given))]))["events"]
    assert row[field.split(".")[1]] == sent
    assert validate_event(row) == (None, [])


def test_an_order_currency_is_normalised_too():
    (row,) = payload(adapter().plan([doc_order(9.99, "usd", "o-1")]))["events"]
    assert row["basket"]["total"] == {"value": 9.99, "currency": "USD"}


@pytest.mark.parametrize(("field", "given", "reason"), [
    ("product.currency", "euro", "invalid field product.currency: not an ISO 4217 currency code (GBP)"),
    ("product.currency", "€", "invalid field product.currency: not an ISO 4217 currency code (GBP)"),
    ("page.country", "GBR", "invalid field page.country: not an ISO 3166-1 alpha-2 country code (GB)"),
    ("page.language", "english (UK)", "invalid field page.language: not an IETF language tag (en-GB)"),
    ("order.currency", "$", "invalid field order.currency: not an ISO 4217 currency code (GBP)"),
])
def test_a_value_that_is_not_a_code_is_rejected_naming_field_and_form_not_value(field, given, reason):
    kind, make = (ORDER, make_order) if field.startswith("order") else (VIEW, make_view)
    plan = adapter(currency="EUR", country="FR", language="fr").plan([as_event(kind, with_changes(make(1), field,
                                                                                                 given))])
    assert [r for _, r in plan.rejected] == [reason]  # a default never replaces a value that is there
    assert given not in reason


def test_site_defaults_fill_only_what_the_event_lacks():
    server_side = make_view(1, 1)
    server_side["page"].update(language=None, country="", url=None)
    server_side["product"]["currency"] = ""
    with_codes = make_view(2, 1)
    order = with_changes(make_order(3), "order.currency", "")
    a = adapter(language="de_de", country="de", currency="eur")  # the site's defaults are normalised at load
    rows = payload(a.plan([as_event(VIEW, server_side), as_event(VIEW, with_codes), as_event(ORDER, order)]))
    first, second, third = rows["events"]
    assert (first["language"], first["country"], first["currency"]) == ("de-DE", "DE", "EUR")
    assert (second["language"], second["country"], second["currency"]) == (
        with_codes["page"]["language"], with_codes["page"]["country"], "GBP")
    assert third["basket"]["total"]["currency"] == "EUR"
    assert all(validate_event(r) == (None, []) for r in rows["events"])


@pytest.mark.parametrize(("site", "field"), [({"currency": "euro"}, "currency"), ({"country": "GBR"}, "country"),
                                             ({"language": "english"}, "language")])
def test_bad_site_defaults_fail_at_load_naming_the_field(site, field):
    from processor.config import parse_config
    from processor.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^vendors\.qubit\.sites\.default\.{field}: .*must be"):
        parse_config({"kafka": {"bootstrap_servers": "k", "topics": ["t"]}, "deadletter": {"topic": "d"},
                      "vendors": {"qubit": {"sites": {"default": {"tracking_id": "t", **site}}, "options": {}}}})


def test_code_memories_agree_with_the_plain_normalisers():
    """The hot path sends a value as it is when it is in codes.CURRENCIES / COUNTRIES / LANGUAGES: those
    hold only canonical codes (what the plain normaliser gives back unchanged), and each remembered
    spelling maps to what the plain normaliser makes of it."""
    from processor.vendors import codes

    for value in ("eur", "EUR", " usd", "gb", "GB", "en_gb", "en-GB", "zh-hant-tw", "x", None, "", "12"):
        codes.currency(value), codes.country(value), codes.language(value)
    kinds = ((codes.CURRENCIES, codes._CURRENCY_SPELLINGS, lambda v: codes._letters(v, 3)),
             (codes.COUNTRIES, codes._COUNTRY_SPELLINGS, lambda v: codes._letters(v, 2)),
             (codes.LANGUAGES, codes._LANGUAGE_SPELLINGS, codes._language))
    for canonical, spellings, plain in kinds:
        assert canonical and all(plain(code) == code for code in canonical)
        assert all(plain(value) == code for value, code in spellings.items())
        assert set(spellings.values()) == canonical
    assert "eur" not in codes.CURRENCIES and "en_gb" not in codes.LANGUAGES and "gb" not in codes.COUNTRIES
    assert None not in codes._CURRENCY_SPELLINGS and "x" not in codes._LANGUAGE_SPELLINGS


def test_requests_are_grouped_by_tracking_id_and_unknown_sites_rejected():
    a = QubitAdapter(QubitAdapter.settings_model().model_validate({
        "sites": {"shop-2": {"tracking_id": "shop_two"},
                  "shop-3": {"tracking_id": "shop_three", "endpoint": "https://eu.example.com/"}},
        "options": {},
    }))
    events = [as_event(VIEW, make_view(i, 1, site_id=f"shop-{1 + i % 3}"), i) for i in range(6)]
    plan = a.plan(events)
    assert {e.source.offset for e, _ in plan.rejected} == {0, 3}
    assert "no qubit site config for site_id 'shop-1'" in plan.rejected[0][1]
    assert {r.url: [e.source.offset for e in r.events] for r in plan.requests} == {
        "https://offline-conversions.qubit.com/events/shop_two": [1, 4],
        "https://eu.example.com/events/shop_three": [2, 5],
    }
    assert orjson.loads(plan.requests[0].content)["events"][0]["meta"]["source"] == "event-relay@0.1.0"


@pytest.mark.parametrize("site", [
    {"tracking_id": ""}, {"tracking_id": "a/b"}, {"tracking_id": ".."}, {"tracking_id": "t", "x": 1},
    {"tracking_id": "t", "vertical": "retail"}, {"tracking_id": "t", "namespace": "a.b"},
])
def test_bad_site_config_fails_validation(site):
    with pytest.raises(ValueError, match=r"sites\.default"):
        QubitAdapter.settings_model().model_validate({"sites": {"default": site}, "options": {}})


def test_document_results_map_per_event_and_warnings_are_notes():
    a = adapter()
    (req,) = a.plan([as_event(ORDER, make_order(1), 0), as_event(ORDER, make_order(2), 1)]).requests
    body = orjson.dumps({"results": [
        {"eventId": "g2w06o5z9nc-0ivwki51j-km2859c", "eventType": "ecBasketTransactionSummary",
         "status": "success", "warnings": ["Missing meta.source"]},
        {"status": "failed", "error": "Missing context.id"},
    ]})
    ok, failed = a.interpret(req, Response(200, {}, body))
    assert ok.verdict is Verdict.DELIVERED and ok.note == "warning" and ok.note in a.notes
    assert failed.verdict is Verdict.REJECTED and failed.reason == "qubit failed: Missing context.id"


def test_partial_failure_rejects_only_the_failed_events():
    a = adapter()
    (req,) = a.plan([as_event(VIEW, make_view(i, i), i) for i in range(4)]).requests
    results = [{"eventId": f"e{i}", "eventType": "ecView", "status": "success"} for i in range(4)]
    results[2] = {"status": "error", "error": "Invalid meta.ts"}
    outcomes = a.interpret(req, Response(200, {}, orjson.dumps({"results": results})))
    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED, Verdict.DELIVERED, Verdict.REJECTED,
                                             Verdict.DELIVERED]
    assert outcomes[0].note is None
    assert outcomes[2].reason == "qubit failed: Invalid meta.ts"


@pytest.mark.parametrize(("results", "want"), [
    ([{"status": "success"}] * 3, [DELIVERED] * 3),  # every one a success: the bulk path
    ([{"status": "success"}, {"status": "success", "warnings": []}, {"status": "success"}], [DELIVERED] * 3),
    ([{"status": "success"}, ["success"], {"status": "success"}],
     [DELIVERED, rejected("qubit failed: malformed result"), DELIVERED]),
    ([{"status": "success"}, "success", {"status": "success", "warnings": ["w"]}],
     [DELIVERED, rejected("qubit failed: malformed result"), Outcome(Verdict.DELIVERED, note="warning")]),
    ([{"status": "success"}, {"status": "Success"}, {}],
     [DELIVERED, rejected("qubit failed: Success"), rejected("qubit failed: no reason")]),
])
def test_every_result_is_classified_on_the_bulk_path_and_off_it(results, want):
    a = adapter()
    (req,) = a.plan([as_event(VIEW, make_view(i, i), i) for i in range(3)]).requests
    assert a.interpret(req, Response(200, {}, orjson.dumps({"results": results}))) == want


@pytest.mark.parametrize(("status", "body", "verdict"), [
    (502, {"status": 502, "message": "Bad Gateway"}, Verdict.RETRYABLE),
    (200, {"status": 502, "message": "Bad Gateway"}, Verdict.RETRYABLE),
    (503, b"<html>down</html>", Verdict.RETRYABLE),
    (429, {"status": 429, "message": "Too Many Requests"}, Verdict.RETRYABLE),
    (500, {"results": [{"status": "failed", "error": "x"}]}, Verdict.RETRYABLE),
    (400, {"status": 400, "message": "bad"}, Verdict.REJECTED),
    (404, {"status": 404, "message": "Not Found"}, Verdict.REJECTED),
    (501, {}, Verdict.REJECTED),
    (200, b"not json", Verdict.RETRYABLE),
    (200, {"results": []}, Verdict.RETRYABLE),  # a result count that does not match cannot be mapped
])
def test_status_classes_and_error_shapes(status, body, verdict):
    a = adapter()
    (req,) = a.plan([as_event(VIEW, make_view(1, 1))]).requests
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    (outcome,) = a.interpret(req, Response(status, {}, raw))
    assert outcome.verdict is verdict
    if isinstance(body, dict) and body.get("message"):
        assert outcome.reason == f"HTTP {body['status']}: {body['message']}"


def _event(**changes):
    ev = {"context": {"id": DOC_VISITOR}, "meta": {"type": "ecBasketTransactionSummary", "ts": DOC_TS,
                                                     "source": "yourco@1.0.0"},
          "basket": {"total": {"value": 80.5, "currency": "GBP"}}, "transaction": {"id": "uniqueId-1"}}
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = ev
        for p in parents:
            node = node[p]
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    return ev


@pytest.mark.parametrize(("event", "problem"), [
    (_event(context__id=...), "Missing context.id"),
    (_event(context__id=""), "Missing context.id"),
    (_event(meta__type=...), "Missing meta.type"),
    (_event(meta__ts=...), "Missing meta.ts"),
    (_event(meta__ts="1479471022498"), "Invalid meta.ts"),
    (_event(meta__ts=1479471022), "Invalid meta.ts"),
    (_event(meta__url=5), "Invalid meta.url"),
    (_event(transaction=...), "Missing transaction"),
    (_event(transaction__id=...), "Missing transaction.id"),
    (_event(basket__total=...), "Missing basket.total"),
    (_event(basket__total__currency=...), "Missing basket.total.currency"),
    (_event(basket__total__value="80.5"), "Invalid basket.total.value"),
    (_event(basket__total__value=True), "Invalid basket.total.value"),
    (_event(custom=1), "Unknown field custom"),
    (_event(basket__subtotal=1), "Unknown field basket.subtotal"),
    (_event(meta__extra="x"), "Unknown field meta.extra"),
    (_event(context__viewNumber=1), "Unknown field context.viewNumber"),
    (_event(meta__type="ecProduct"), "Unsupported meta.type ecProduct"),
    (_event(meta__type="egBetslipTransactionSummary"), "Unknown field basket"),
    (_event(meta__type="egBetslipTransactionSummary", basket=...), "Missing betslip"),
    ({"context": {"id": "v"}, "meta": {"type": "ecView", "ts": DOC_TS}, "type": "product", "language": "en-GB",
      "currency": "GBP"}, "Missing country"),
    ({"context": {"id": "v"}, "meta": {"type": "ecView", "ts": DOC_TS}, "type": "product", "language": "en-GB",
      "country": "gb", "currency": "GBP"}, "Invalid country"),
    ("event", "Invalid event: must be an object"),
])
def test_twin_rejects_what_the_document_forbids(event, problem):
    assert validate_event(event) == (problem, [])


def test_twin_warns_on_missing_source_as_documented():
    assert validate_event(_event(meta__source=...)) == (None, ["Missing meta.source"])
    assert validate_event(_event()) == (None, [])


async def test_adapter_output_is_accepted_by_the_twin(sandbox):
    a = adapter(f"{sandbox.url}/qubit")
    events = [as_event(VIEW, make_view(i, i), i) for i in range(5)] + [as_event(ORDER, make_order(7, 3), 5)]
    ((resp, outcomes),) = await exchange(a, a.plan(events).requests)
    assert resp.status == 200
    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED] * 6
    assert all(o.note is None for o in outcomes)
    received = list(sandbox.sandbox.received["qubit"])
    assert received == orjson.loads(a.plan(events).requests[0].content)["events"]
    results = resp.json()["results"]
    assert [r["eventType"] for r in results] == ["ecView"] * 5 + ["ecBasketTransactionSummary"]


async def test_twin_answers_envelope_errors_in_the_documented_shape(sandbox):
    url = f"{sandbox.url}/qubit/events/t"
    async with httpx.AsyncClient() as client:
        cases = [
            await client.post(url, content=b'{"events": []}', headers={"Content-Type": "text/plain"}),
            await client.post(url, json=[_event()]),
            await client.post(url, json={"events": [_event()], "extra": 1}),
        ]
        empty = await client.post(url, json={"events": []})
    assert [r.status_code for r in cases] == [400, 400, 400]
    assert all(set(r.json()) == {"status", "message"} and r.json()["status"] == 400 for r in cases)
    assert empty.json() == {"results": []}
    assert sandbox.sandbox.stats["qubit"]["rejected"] == 3


async def test_twin_failed_results_map_back_through_the_adapter(sandbox):
    a = adapter(f"{sandbox.url}/qubit")
    (req,) = a.plan([as_event(VIEW, make_view(i, i), i) for i in range(3)]).requests
    body = orjson.loads(req.content)
    body["events"][1]["meta"]["ts"] = 1479471022  # seconds: the twin fails just this event
    req.content = orjson.dumps(body)
    ((_, outcomes),) = await exchange(a, [req])
    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED, Verdict.REJECTED, Verdict.DELIVERED]
    assert outcomes[1].reason == "qubit failed: Invalid meta.ts"
    assert len(sandbox.sandbox.received["qubit"]) == 2


async def test_injected_partial_failures_reject_only_those_events(sandbox):
    sandbox.sandbox.faults["qubit"] = Faults(partial_failure_rate=0.5)
    a = adapter(f"{sandbox.url}/qubit")
    events = [as_event(VIEW, make_view(i, i), i) for i in range(40)]
    ((_, outcomes),) = await exchange(a, a.plan(events).requests)
    rejected = [o for o in outcomes if o.verdict is Verdict.REJECTED]
    assert 0 < len(rejected) < 40
    assert {o.reason for o in rejected} == {"qubit failed: injected partial failure"}
    assert len(sandbox.sandbox.received["qubit"]) == 40 - len(rejected)


async def test_injected_upstream_errors_are_retryable(sandbox):
    sandbox.sandbox.faults["qubit"] = Faults(burst=1, error_status=502)
    a = adapter(f"{sandbox.url}/qubit")
    ((resp, outcomes),) = await exchange(a, a.plan([as_event(ORDER, make_order(1), 0)]).requests)
    assert resp.status == 502 and set(resp.json()) == {"status", "message"}
    assert outcomes[0].verdict is Verdict.RETRYABLE


async def test_example_settings_validate_and_work_with_the_twin(sandbox):
    raw = orjson.dumps(QubitAdapter.example_settings(sandbox.url))
    for var, value in QubitAdapter.example_env.items():
        raw = raw.replace(f"${{{var}}}".encode(), value.encode())
    settings = QubitAdapter.settings_model().model_validate(orjson.loads(raw))
    assert settings.sites["default"].tracking_id.get_secret_value() == QubitAdapter.example_env["QUBIT_TRACKING_ID"]
    assert "demo_tracking_id" not in repr(settings)
    a = QubitAdapter(settings)
    events = [as_event(VIEW, make_view(1, 1), 0), as_event(ORDER, make_order(2), 1)]
    ((resp, outcomes),) = await exchange(a, a.plan(events).requests)
    assert resp.status == 200 and all(o.verdict is Verdict.DELIVERED for o in outcomes)


@pytest.mark.parametrize("sites", [
    {"default": {"tracking_id": "t1"}},
    {"shop-1": {"tracking_id": "t1", "namespace": "someco", "language": "en", "country": "gb", "currency": "eur"},
     "shop-2": {"tracking_id": "t2", "endpoint": "https://eu.example.com", "vertical": "travel"}},
    {"shop-2": {"tracking_id": "t2"}, "shop-3": {"tracking_id": "t2"}},  # two sites, one URL
])
def test_build_makes_what_the_plain_row_of_each_event_makes(sites):
    """``build`` builds most views inline: its requests, rejections and their order are those of
    ``row`` called on each event in turn, grouped by URL in order of each URL's first row."""
    from tests.unit.vendors.conftest import plain_build, varied_events

    a = QubitAdapter(QubitAdapter.settings_model().model_validate({"sites": sites, "options": {}}))
    events = varied_events()
    groups, rejected, filtered = plain_build(a, events, lambda ev, route: [a.row(ev, route)])
    assert not filtered
    plan = a.build(events)
    assert [(r.url, r.content, r.events) for r in plan.requests] == [
        (url, orjson.dumps({"events": rows}), evs) for url, (evs, rows, _) in groups.items()]
    assert plan.rejected == rejected and len(rejected) > 3 and plan.filtered == []
