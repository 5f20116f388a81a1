"""No vendor credential can reach a dead-letter reason or a repr, even when a vendor echoes it."""

from __future__ import annotations

import orjson
import pytest

from processor.config import interpolate
from processor.devstack.samples import as_event, make_order, make_view
from processor.events import EventKind
from processor.vendors import REGISTRY, adapter_class
from processor.vendors.base import Response, Verdict

SECRET = "s3cr3t-Value-42"


def build(name: str):
    cls = adapter_class(name)
    section = interpolate(cls.example_settings("http://127.0.0.1:1"), "", {k: SECRET for k in cls.example_env})
    if name == "convert":  # the v1 site carries the Bearer secret; make it the default
        section["sites"] = {"default": section["sites"]["shop-2"]}
    return cls(cls.settings_model().model_validate(section))


def one_request(adapter):
    events = [as_event(EventKind.PRODUCT_VIEW, make_view(3, 1)), as_event(EventKind.ORDER, make_order(3, 2))]
    plan = adapter.plan(events)
    assert not plan.rejected and plan.requests
    return plan.requests[0]


def echoes(name: str, req) -> list[Response]:
    """Answers in each vendor's error shapes that repeat the credential back."""
    def js(status, doc):
        return Response(status, {}, orjson.dumps(doc))

    n = len(req.events)
    rows = req.context[0] if name == "quicklizard" else []
    return {
        "qubit": [js(200, {"results": [{"status": "failed", "error": f"unknown tracking id {SECRET}"}] * n}),
                  js(400, {"status": 400, "message": f"Cannot POST /events/{SECRET}"}),
                  js(200, {"status": 403, "message": f"property {SECRET} disabled"})],
        "quicklizard": [js(200, {"processed": [], "failed": rows,
                                 "errors": [f"invalid client_key {SECRET}"] * len(rows)})],
        "convert": [js(400, {"code": 400, "message": f"bad token Bearer {SECRET}", "fields": "visitors[0]"})],
        "tracardi": [js(422, {"detail": [{"loc": ["body", "source", "id"], "msg": f"no source {SECRET}"}]}),
                     js(406, {"detail": f"source {SECRET} is disabled"})],
        "convead": [js(400, {"message": f"app_key {SECRET} is wrong"}),
                    Response(403, {}, f"<html>app_key={SECRET}&visitor_uid=x</html>".encode())],
    }[name]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_vendor_echoing_a_credential_never_puts_it_in_a_reason(name):
    adapter = build(name)
    req = one_request(adapter)
    assert SECRET.encode() in req.content + req.url.encode() + repr(dict(req.headers)).encode()  # it is sent
    assert SECRET not in repr(req) and SECRET not in repr(adapter.settings)
    for response in echoes(name, req):
        outcomes = adapter.interpret(req, response)
        assert any(o.verdict is Verdict.REJECTED for o in outcomes), outcomes
        assert [o.reason for o in outcomes if SECRET in o.reason] == []
        assert any("<redacted>" in o.reason for o in outcomes), outcomes  # the vendor's words are kept
