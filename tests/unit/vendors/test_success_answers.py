"""Each adapter delivers only on its vendor's documented success answer (the documents' example answers),
and calls anything else in a 2xx an unrecognised answer: retryable, its reason naming the status, the
content type and the first bytes (without credentials)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from processor.devstack.samples import as_event, make_order, make_view
from processor.events import EventKind
from processor.vendors.base import UNRECOGNISED, Adapter, Response, VendorRequest, Verdict
from tests.unit.test_transport import _example_adapter

VENDORS = ["qubit", "quicklizard", "convert", "convead", "tracardi"]
JSON = {"content-type": "application/json"}
PAGE = b"<!DOCTYPE html><html><head><title>Sign in to the network</title></head><body>...</body></html>"


def planned(vendor: str, tmp_path: Path) -> tuple[Adapter[Any, Any], VendorRequest]:
    a = _example_adapter(vendor, "http://127.0.0.1:9", tmp_path)
    events = [as_event(EventKind.PRODUCT_VIEW, make_view(i, i), i) for i in range(3)] + [
        as_event(EventKind.ORDER, make_order(7, 2), 3)]
    return a, a.plan([e for e in events if a.takes(e.kind)]).requests[0]


def documented_success(vendor: str, req: VendorRequest) -> list[Response]:
    """The success answers of the vendor documents (their examples, shaped to the request)."""
    n = len(req.events)
    if vendor == "qubit":  # "Set up call center tracking": a result object for each event sent
        return [Response(200, JSON, orjson.dumps({"results": [
            {"eventId": "g2w06o5z9nc-0ivwki51j-km2859c", "eventType": "ecView", "status": "success"}] * n}))]
    if vendor == "quicklizard":  # "QL SDK - Server to Server": API Response Format
        answer = {"processed": orjson.loads(req.content), "failed": [], "errors": []}
        return [Response(200, JSON, orjson.dumps(answer)),
                Response(200, {}, orjson.dumps(answer, option=orjson.OPT_INDENT_2))]
    if vendor == "convert":  # "New Tracking Structure - Advanced Integrations": no body documented, 200 only
        return [Response(200, {}, b""), Response(200, JSON, b"{}")]
    if vendor == "convead":  # "JS Event API": "the server will respond with 200 OK"
        return [Response(200, {}, b""), Response(200, {"content-type": "text/plain"}, b"")]
    sent = orjson.loads(req.content).get("profile", {}).get("id") or "0d2d9dc5-0d60-471e-956f-8766dcb8aba2"
    return [Response(200, JSON, orjson.dumps({  # "API integration": Tracker response
        "debugging": {"session": {"saved": 1, "errors": [], "ids": ["string"], "types": []},
                      "events": {"saved": 0, "errors": [], "ids": [], "types": []},
                      "profile": {"saved": 1, "errors": [], "ids": [sent], "types": []},
                      "execution": {}, "segmentation": {"errors": [], "ids": []}, "logs": []},
        "profile": {"id": sent}, "source": {"consent": False}}))]


@pytest.mark.parametrize("vendor", VENDORS)
def test_the_documented_success_is_delivered(vendor: str, tmp_path: Path) -> None:
    a, req = planned(vendor, tmp_path)
    for resp in documented_success(vendor, req):
        assert {o.verdict for o in a.interpret(req, resp)} == {Verdict.DELIVERED}, resp


def bad_answers(vendor: str) -> list[tuple[str, Response, str]]:
    """(name, answer, what its reason starts with after 'unrecognised answer: ')."""
    out = [("page", Response(200, {"content-type": "text/html; charset=utf-8"}, PAGE),
            f"HTTP 200 text/html, {len(PAGE)} bytes: '<!DOCTYPE html><html><head><title>Sign in to the'"),
           ("another shape", Response(200, JSON, b'{"status":"ok","data":[1,2]}'),
            "HTTP 200 application/json, 28 bytes: '{\"status\":\"ok\",\"data\":[1,2]}'"),
           ("a JSON array", Response(200, JSON, b"[]"), "HTTP 200 application/json, 2 bytes: '[]'"),
           ("plain text", Response(200, {"content-type": "text/plain"}, b"OK\n"),
            "HTTP 200 text/plain, 3 bytes: 'OK '")]
    if vendor not in ("convert", "convead"):  # these two document no body: an empty 200 is their success
        out.append(("empty", Response(200, JSON, b""), "HTTP 200 application/json, empty body"))
    if vendor != "convert":  # Convert names its own non-200 2xx (note not_200)
        out.append(("accepted", Response(202, {}, b""), "HTTP 202 no content type, empty body"))
    return out


@pytest.mark.parametrize("vendor", VENDORS)
def test_any_other_2xx_is_an_unrecognised_answer(vendor: str, tmp_path: Path) -> None:
    a, req = planned(vendor, tmp_path)
    for name, resp, reason in bad_answers(vendor):
        outcomes = a.interpret(req, resp)
        assert len(outcomes) == len(req.events)
        assert {o.verdict for o in outcomes} == {Verdict.RETRYABLE}, name
        assert {o.reason for o in outcomes} == {f"{UNRECOGNISED}: {reason}"}, name


@pytest.mark.parametrize("vendor", ["qubit", "quicklizard", "tracardi"])
def test_a_documented_shape_labelled_as_a_page_is_not_it(vendor: str, tmp_path: Path) -> None:
    a, req = planned(vendor, tmp_path)
    (good,) = documented_success(vendor, req)[:1]
    outcomes = a.interpret(req, Response(200, {"content-type": "text/html"}, good.body))
    assert outcomes[0].reason.startswith(f"{UNRECOGNISED}: HTTP 200 text/html")


@pytest.mark.parametrize("vendor", ["qubit", "tracardi", "convead"])
def test_the_first_bytes_carry_no_credential(vendor: str, tmp_path: Path) -> None:
    a, req = planned(vendor, tmp_path)
    assert a._secrets
    secret = a._secrets[0]
    (out, *_) = a.interpret(req, Response(200, {"content-type": "text/html"}, f"<p>{secret}</p>\x00\n".encode()))
    assert secret not in out.reason and "<redacted>" in out.reason and "\x00" not in out.reason
