"""Convead adapter against the document's examples and its clients' behaviour, and against its sandbox twin."""

from __future__ import annotations

from urllib.parse import parse_qs, parse_qsl, quote_plus, urlencode, urlsplit

import httpx
import orjson
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from processor.config import load_config
from processor.devstack.samples import as_event, make_order, make_view, with_changes
from processor.events import EventKind
from processor.sandbox import Faults
from processor.sandbox.convead import parse_form, validate
from processor.vendors.base import InvalidField, Response, Verdict
from processor.vendors.convead import DROPPED_NOTE, ConveadAdapter, ConveadSite, form_quote, url_parts
from tests.unit.vendors.conftest import exchange

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
APP_KEY = ConveadAdapter.example_env["CONVEAD_APP_KEY"]  # the twin knows it, with domain shop.example.com


def adapter(base_url: str | None = None, **site):
    return ConveadAdapter(ConveadAdapter.settings_model().model_validate({
        **({"base_url": base_url} if base_url else {}),
        "sites": {"default": {"app_key": APP_KEY, **site}}, "options": {},
    }))


def form(req) -> dict:
    fields = dict(parse_qsl(req.content.decode("ascii"), strict_parsing=True))
    fields["data"] = orjson.loads(fields["data"])
    return fields


def test_view_matches_document_example():
    rec = make_view(1, 1)
    rec["product"].update(product_id="123", name="Product", price=125.15, url="http://site.net/product/123",
                          image_url="http://site/1.jpg")
    rec["page"].update(url="http://site.net/product/123?utm=x", title="Product - Site", referrer=None)
    plan = adapter().plan([as_event(VIEW, rec)])
    assert not plan.rejected
    (req,) = plan.requests
    assert req.url == "https://tracker.convead.io/watch/event"
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert req.headers["User-Agent"] == "event-relay/0.1"
    assert req.content.startswith(f"app_key={APP_KEY}&guest_uid=guest-00000001&data=%7B%22type%22".encode())
    # The document's example less category_id (the canonical event has category names, not ids).
    example = {"product_id": "123", "product_name": "Product", "product_url": "http://site.net/product/123",
               "price": 125.15, "product_image_url": "http://site/1.jpg"}
    assert form(req) == {"app_key": APP_KEY, "guest_uid": "guest-00000001", "data": {
        "type": "view_product", "domain": "site.net", "host": "site.net", "url": "http://site.net/product/123?utm=x",
        "path": "/product/123", "title": "Product - Site", "guest_uid": "guest-00000001", "properties": example}}


def test_purchase_matches_document_example_with_visitor_info_when_enabled():
    rec = make_order(3, items=2)
    rec["order"].update(order_id="12345", total=99.99)
    rec["order"]["items"][0].update(product_id="1", quantity=1, unit_price=125.15, image_url="http://site/2.jpg",
                                    url="http://site.net/product/2")
    rec["order"]["items"][1].update(product_id="2", quantity=15, unit_price=127.02, image_url="http://site/2.jpg",
                                    url="http://site.net/product/2")
    rec["customer"] = {"first_name": "John", "last_name": "Smith", "email": "test@example.net", "phone": "555555"}
    rec["visitor"]["vendor_ids"]["convead_visitor_uid"] = "user-42"
    (req,) = adapter(send_visitor_info=True, domain="Site.net").plan([as_event(ORDER, rec)]).requests
    assert req.content.startswith(f"app_key={APP_KEY}&visitor_uid=user-42&guest_uid=guest-00000003&".encode())
    data = form(req)["data"]
    assert data["type"] == "purchase"
    assert data["domain"] == "site.net"  # the site's setting wins over the page's host
    assert (data["visitor_uid"], data["guest_uid"]) == ("user-42", "guest-00000003")
    assert data["visitor_info"] == {"first_name": "John", "last_name": "Smith", "email": "test@example.net",
                                    "phone": "555555"}
    assert data["properties"] == {"order_id": "12345", "revenue": 99.99, "items": [
        {"product_id": "1", "qnt": 1, "price": 125.15, "product_image_url": "http://site/2.jpg",
         "product_url": "http://site.net/product/2"},
        {"product_id": "2", "qnt": 15, "price": 127.02, "product_image_url": "http://site/2.jpg",
         "product_url": "http://site.net/product/2"}]}


def test_visitor_info_is_off_by_default():
    (req,) = adapter().plan([as_event(ORDER, make_order(3))]).requests
    assert "visitor_info" not in form(req)["data"]
    assert b"user3" not in req.content and b"%40" not in req.content  # no email anywhere


@pytest.mark.parametrize("text", ["plain", "a b+c&d=e%f~*'()/?#", "Кроссовки — 100%", "\x00\x7f\n", ""])
def test_form_encoding_is_php_urlencode_and_round_trips(text):
    quoted = form_quote(text.encode()).decode("ascii")
    assert parse_qsl("x=" + quoted, keep_blank_values=True, errors="strict") == [("x", text)]
    assert quoted == urlencode({"x": text})[2:]


def test_form_encoding_is_the_stdlibs_quote_plus_for_every_byte():
    every = bytes(range(256))
    assert form_quote(every) == quote_plus(every, safe="-_.").encode()
    for n in range(1, 200):
        raw = bytes((i * 37 + n) % 256 for i in range(n))
        assert form_quote(raw) == quote_plus(raw, safe="-_.").encode()


@st.composite
def _few_distinct_bytes(draw) -> bytes:
    """Inputs of a few distinct bytes (as JSON is): '%', '+', ' ', '~', NUL, 0xff and UTF-8 bytes among them."""
    special = st.sampled_from(b"%+ ~-_.&=\x00\x7f\x80\xbf\xc3\xd0\xe2\xff{}\":,/?")
    alphabet = draw(st.lists(st.one_of(special, st.integers(0, 255)), min_size=1, max_size=30, unique=True))
    n = draw(st.integers(0, 600))
    return bytes(draw(st.lists(st.sampled_from(alphabet + list(b"aZ09")), min_size=n, max_size=n)))


@given(st.one_of(st.binary(max_size=700), _few_distinct_bytes(), st.text(max_size=300).map(str.encode)))
@example(bytes(range(256)))  # every byte: many distinct bytes to escape, the byte table
@example(b'{"q":"%25 a+b %2B ~"}' * 4)  # escapes in the input are escaped again, not read
@example("Кроссовки — 100% + ~".encode() * 8)
def test_form_encoding_is_quote_plus_for_any_bytes(raw):
    assert form_quote(raw) == quote_plus(raw, safe="-_.~").encode()


def _urlsplit_parts(url: str) -> tuple[str | None, str, str] | type[InvalidField]:
    """The reference: hostname, host and path as the mapping read them from urlsplit before url_parts."""
    try:
        parts = urlsplit(url)
        return parts.hostname, parts.netloc.rpartition("@")[2], parts.path
    except ValueError:
        return InvalidField


_URL_PIECES = ["http", "https", "HTTPS", "ftp", "://", ":", "/", "//", "?", "#", "@", "[", "]", "::1", "%", "%25",
               "eth0", "Shop.Example.COM", "x", ".", "443", " ", "\t", "\n", "\r", "\x00", "\x7f", "é", "\u2100",
               "\uff45", "\\", "~", "-"]
_ODD_URLS = st.builds(lambda head, rest: head + "".join(rest), st.sampled_from(["https://", "http://", ""]),
                      st.lists(st.sampled_from(_URL_PIECES), max_size=12))


@given(st.one_of(_ODD_URLS, st.text(max_size=40), st.text(max_size=40).map("https://".__add__)))
@example("https://u:p@Shop.Example.com:443/p/1;x?q=/a#f?g")
@example("https://shop.example.com")
@example("https://shop.example.com#frag/x?y")
@example("https://shop.example.com?q/x#y")
@example("http://[::1]:8080/p")
@example("http://[::1/p")  # urlsplit: Invalid IPv6 URL
@example("http://a]b/p")
@example("http://[fe80::1%25eth0]/p")
@example("http://Host%ETH0/p")  # urlsplit lowers the host, not a zone id
@example("https://\u2100.com/p")  # NFKC makes a/c: urlsplit refuses it
@example("https://sh op.example.com/p q")
@example("https://shop.example.com/p\n/q")  # urlsplit drops tab, CR and LF anywhere
@example(" https://shop.example.com/p")  # and leading spaces and C0 controls
@example("HTTPS://SHOP.EXAMPLE.COM/P")
@example("https:shop.example.com/p")
@example("https:///p")
@example("https://@:80/p")
@example("https://")
def test_url_parts_are_urlsplits_for_any_url(url):
    try:
        got = url_parts(url)
    except InvalidField as exc:
        assert str(exc) == "invalid field page.url: not a URL"
        got = InvalidField
    assert got == _urlsplit_parts(url)


def test_events_one_request_each_and_only_invalid_ones_rejected():
    bad_uid = with_changes(make_view(2, 2), "visitor.vendor_ids", {"convead_visitor_uid": "User_2"})
    no_uid = with_changes(make_view(3, 3), "visitor.vendor_ids", {"convead_guest_uid": ""})
    no_url = with_changes(make_view(4, 4), "page.url", None)
    zero_qnt = with_changes(make_order(5), "order.items.1.quantity", 0)
    events = [as_event(VIEW, make_view(1, 1), 0), as_event(VIEW, bad_uid, 1), as_event(VIEW, no_uid, 2),
              as_event(VIEW, no_url, 3), as_event(ORDER, with_changes(make_order(6), "order.items", []), 4),
              as_event(ORDER, zero_qnt, 5), as_event(ORDER, make_order(7), 6),
              as_event(VIEW, with_changes(make_view(8, 8), "page.url", "http://[::1/p/8"), 7)]
    plan = adapter().plan(events)
    assert sorted((e.source.offset, r) for e, r in plan.rejected) == [
        (1, "invalid field visitor.vendor_ids.convead_visitor_uid: only 0-9, a-z and - are allowed"),
        (2, "missing required field visitor.vendor_ids.convead_visitor_uid or visitor.vendor_ids.convead_guest_uid"),
        (3, "missing required field page.url"),
        (5, "order.items[1].quantity is 0, not a count of units sold (at least 1)"),
        (7, "invalid field page.url: not a URL"),
    ]
    # an order without lines (a gift card) is a purchase by its revenue, without items
    assert [r.events for r in plan.requests] == [[events[0]], [events[4]], [events[6]]]
    gift = orjson.loads(parse_qs(plan.requests[1].content.decode())["data"][0])["properties"]
    assert gift == {"order_id": "O-6-1", "revenue": make_order(6)["order"]["total"]}
    # with the site's domain configured, an event without a page url is fine
    (req,) = adapter(domain="shop.example.com").plan([events[3]]).requests
    data = form(req)["data"]
    assert data["domain"] == "shop.example.com"
    assert not {"host", "url", "path"} & set(data)


def test_invalid_visitor_uid_is_dropped_when_there_is_a_guest_uid():
    rec = with_changes(make_view(2, 2), "visitor.vendor_ids.convead_visitor_uid", "User 2")
    a = adapter()
    (req,) = a.plan([as_event(VIEW, rec)]).requests
    fields = form(req)
    assert "visitor_uid" not in fields and "visitor_uid" not in fields["data"]
    assert fields["guest_uid"] == "guest-00000002"
    (outcome,) = a.interpret(req, Response(200, {}, b""))
    assert (outcome.verdict, outcome.note) == (Verdict.DELIVERED, DROPPED_NOTE)
    assert DROPPED_NOTE in ConveadAdapter.notes


def test_site_selection_base_url_and_missing_site():
    a = ConveadAdapter(ConveadAdapter.settings_model().model_validate({
        "base_url": "http://127.0.0.1:1/convead/watch/event/",
        "sites": {"shop-2": {"app_key": "K 2"}}, "options": {}}))
    e1 = as_event(VIEW, make_view(1, 1, site_id="shop-1"), 0)
    e2 = as_event(VIEW, make_view(1, 1, site_id="shop-2"), 1)
    plan = a.plan([e1, e2])
    assert "no convead site config for site_id 'shop-1'" in plan.rejected[0][1]
    (req,) = plan.requests
    assert req.url == "http://127.0.0.1:1/convead/watch/event"
    assert form(req)["app_key"] == "K 2"


def test_a_failed_request_fails_only_its_event():
    a = adapter()
    plan = a.plan([as_event(VIEW, make_view(i, i), i) for i in range(3)])
    answers = [Response(200, {}, b""), Response(400, {}, b'{"status":400,"message":"missing properties.x"}'),
               Response(503, {}, b"")]
    outcomes = [a.interpret(req, resp)[0] for req, resp in zip(plan.requests, answers, strict=True)]
    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED, Verdict.REJECTED, Verdict.RETRYABLE]
    assert outcomes[1].reason == "HTTP 400: missing properties.x"


@pytest.mark.parametrize(("status", "body", "verdict"), [
    (200, b"", Verdict.DELIVERED), (500, b"", Verdict.RETRYABLE), (503, b"x", Verdict.RETRYABLE),
    (429, b"", Verdict.RETRYABLE), (400, b"bad request", Verdict.REJECTED), (404, b"[]", Verdict.REJECTED),
    (501, b"", Verdict.REJECTED), (301, b"", Verdict.REJECTED),
])
def test_status_classes(status, body, verdict):
    a = adapter()
    (req,) = a.plan([as_event(VIEW, make_view(1, 1))]).requests
    assert a.interpret(req, Response(status, {}, body))[0].verdict is verdict


def fields(**over):
    data = {"type": "view_product", "domain": "shop.example.com", "guest_uid": "g1",
            "properties": {"product_id": "1"}}
    out = {"app_key": APP_KEY, "guest_uid": "g1", "data": orjson.dumps(data).decode()}
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value if isinstance(value, str) else orjson.dumps(value).decode()
    return out


def purchase(**props):
    return {"type": "purchase", "properties": {"order_id": "1", "revenue": 1.5, **props}}


@pytest.mark.parametrize(("form_fields", "problem"), [
    (fields(app_key=None), "missing app_key"),
    (fields(guest_uid=None, data={"type": "link"}), "missing visitor_uid or guest_uid"),
    (fields(guest_uid="", data={"type": "link"}), "missing visitor_uid or guest_uid"),
    (fields(visitor_uid="User_1"), "visitor_uid may only contain"),
    (fields(data=None), "missing data"),
    (fields(data="{not json"), "data is not JSON"),
    (fields(data=[1]), "data is not a JSON object"),
    (fields(data={"type": "pageview"}), "unknown event type"),
    (fields(data={"type": "link", "app_key": "k"}), "unknown data field app_key"),
    (fields(data={"type": "link", "guest_uid": "other"}), "data.guest_uid differs"),
    (fields(data={"type": "view_product", "properties": {}}), "missing properties.product_id"),
    (fields(data={"type": "view_product", "properties": {"product_id": 1}}), "product_id must be a string"),
    (fields(data=purchase(order_id=12345)), "order_id must be a string"),
    (fields(data=purchase(revenue="9.99")), "revenue must be a number"),
    (fields(data={"type": "purchase", "properties": {"order_id": "1"}}), "missing properties.revenue"),
    (fields(data=purchase(items=[{"product_id": "1", "price": 1.0}])), "missing items[0].qnt"),
    (fields(data=purchase(items=[{"product_id": "1", "qnt": "2", "price": 1.0}])), "must be numbers"),
    (fields(data={"type": "link", "visitor_info": "x"}), "visitor_info must be an object"),
])
def test_twin_rejects_what_the_documents_forbid(form_fields, problem):
    data, err = validate(form_fields)
    assert data is None
    assert problem in err


@pytest.mark.parametrize(("body", "problem"), [
    (b"app_key=k&app_key=k", "repeated"), (b"app_key=k&extra=1", "unknown field extra"),
    (b"app_key", "not a form"), ("data=\u043a".encode(), "not a form"), (b"data=%FF", "not a form"),
])
def test_twin_rejects_malformed_forms(body, problem):
    assert problem in parse_form(body)[1]


def test_twin_accepts_the_document_types():
    assert validate(fields())[1] is None
    assert validate(fields(data=purchase(items=[{"product_id": "1", "qnt": 2, "price": 1.0}])))[1] is None
    assert validate(fields(visitor_uid="0a-z9", guest_uid=None, data={"type": "update_info"}))[1] is None


async def test_twin_http_answers(sandbox):
    url = f"{sandbox.url}/convead/watch/event"
    stats = sandbox.sandbox.stats
    async with httpx.AsyncClient() as client:
        r = await client.post(url, json=fields())
        assert (r.status_code, r.json()["status"]) == (415, 415)
        r = await client.post(url, data=fields(guest_uid=None))
        assert r.status_code == 400 and "missing visitor_uid" in r.json()["message"]
        for ignored in (fields(app_key="not-a-key"), fields(data={"type": "link", "domain": "elsewhere.org"})):
            r = await client.post(url, data=ignored)
            assert r.status_code == 200  # silently not processed
        assert (await client.post(url, data=fields())).status_code == 200
    assert dict(stats["convead"]) == {"requests": 5, "rejected": 2, "ignored": 2, "accepted": 1}
    assert list(sandbox.sandbox.received["convead"]) == [{"guest_uid": "g1", "data": orjson.loads(fields()["data"])}]


def example_adapter(tmp_path, sandbox_url: str) -> ConveadAdapter:
    config = {"kafka": {"bootstrap_servers": "127.0.0.1:9", "group_id": "g", "topics": ["t"]},
              "deadletter": {"topic": "t.dlq"},
              "vendors": {"convead": ConveadAdapter.example_settings(sandbox_url)}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_config(path, env=ConveadAdapter.example_env).vendors["convead"]
    assert isinstance(settings.sites["default"], ConveadSite)
    assert settings.sites["default"].app_key.get_secret_value() == APP_KEY
    return ConveadAdapter(settings)


async def test_example_settings_output_is_accepted_by_the_twin(sandbox, tmp_path):
    a = example_adapter(tmp_path, sandbox.url)
    dropped = with_changes(make_view(9, 9), "visitor.vendor_ids.convead_visitor_uid", "Not Valid")
    events = [as_event(VIEW, make_view(i, i), i) for i in range(5)] + [
        as_event(ORDER, make_order(6, 3), 5), as_event(ORDER, make_order(3, 1), 6), as_event(VIEW, dropped, 7)]
    plan = a.plan(events)
    assert not plan.rejected
    results = await exchange(a, plan.requests)
    assert [resp.status for resp, _ in results] == [200] * 8
    assert all(o.verdict is Verdict.DELIVERED for _, (o,) in results)
    assert results[-1][1][0].note == DROPPED_NOTE
    received = list(sandbox.sandbox.received["convead"])
    assert len(received) == 8
    assert [r["data"]["type"] for r in received] == ["view_product"] * 5 + ["purchase"] * 2 + ["view_product"]
    assert received[5]["data"]["properties"]["items"][2]["qnt"] == 3


async def test_injected_partial_failures_reject_only_those_events(sandbox):
    sandbox.sandbox.faults["convead"] = Faults(partial_failure_rate=0.5)
    a = adapter(f"{sandbox.url}/convead/watch/event")
    events = [as_event(VIEW, make_view(i, i), i) for i in range(40)]
    results = await exchange(a, a.plan(events).requests)
    rejected = [o for _, (o,) in results if o.verdict is Verdict.REJECTED]
    assert 0 < len(rejected) < 40
    assert all(o.reason == "HTTP 400: injected partial failure" for o in rejected)
    assert len(sandbox.sandbox.received["convead"]) == 40 - len(rejected)
