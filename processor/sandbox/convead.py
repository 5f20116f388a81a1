"""Convead's twin: POST /convead/watch/event, one event per request
(Convead's document "JS Event API", and its clients' form body as processor.vendors.convead says).

The body must be ``application/x-www-form-urlencoded`` (else 415) with each of
``app_key``, ``visitor_uid``, ``guest_uid``, ``data`` at most once and nothing
else. Checked as the documents say, answering 400 ``{status, message}`` on the
first problem: ``app_key`` present; at least one uid (empty means absent, as
the clients send them); ``visitor_uid`` only ``[0-9a-z-]``; ``data`` a JSON
object with only the documented keys, a known ``type``, uids that agree with
the form's, and the properties its type needs (``view_product``:
``product_id``, and ``price`` a number when given, as in the document's example;
``purchase``: ``order_id`` string, ``revenue`` number, ``items`` when given of
``{product_id, qnt, price}``, numbers). ``data`` must be strict JSON (RFC 8259:
no ``NaN`` or ``Infinity``), and a price is never ``null``.

A valid event answers ``200 OK`` (empty body). An unknown app_key, or a domain
not listed for the app, also answers 200 but is not recorded (counted as
``ignored`` in the stats), as Convead does. An injected partial failure
(``Faults.partial_failure_rate``) fails that one request with 400, the
documented error.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from processor.sandbox.core import Sandbox, Twin, error_response
from processor.vendors.convead import UID_CHARS, ConveadAdapter

FORM_TYPE = "application/x-www-form-urlencoded"
FIELDS = frozenset({"app_key", "visitor_uid", "guest_uid", "data"})
DATA_KEYS = frozenset({"type", "domain", "host", "url", "path", "title", "referrer", "visitor_uid", "guest_uid",
                       "visitor_info", "properties"})
# event type -> required properties (from the document's examples; purchase's order_id is a string)
TYPES: dict[str, tuple[str, ...]] = {
    "add_to_cart": ("product_id", "qnt", "price"),
    "custom": ("key",),
    "file": ("file_url",),
    "link": (),
    "mailto": ("email",),
    "purchase": ("order_id", "revenue"),
    "update_cart": ("items",),
    "update_info": (),
    "view_product": ("product_id",),
    "remove_from_cart": ("product_id", "qnt"),
}
ITEM_KEYS = ("product_id", "qnt", "price")
# app_key -> domains registered for it (the demo's example settings use this key and domain)
KNOWN_APPS: dict[str, frozenset[str]] = {
    ConveadAdapter.example_env["CONVEAD_APP_KEY"]: frozenset({"shop.example.com"}),
}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse_form(body: bytes) -> tuple[dict[str, str], str | None]:
    """The form's fields, or an error naming what is wrong."""
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True,
                          errors="strict", max_num_fields=16)
    except (UnicodeDecodeError, ValueError) as exc:
        return {}, f"body is not a form: {exc}"
    form = dict(pairs)
    if len(form) != len(pairs):
        return {}, "a form field is repeated"
    unknown = set(form) - FIELDS
    if unknown:
        return {}, f"unknown field {sorted(unknown)[0]}"
    return form, None


def validate_items(items: Any) -> str | None:
    if not isinstance(items, list):
        return "items must be an array"
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return f"items[{i}] is not an object"
        for key in ITEM_KEYS:
            if key not in item:
                return f"missing items[{i}].{key}"
        if not _number(item["qnt"]) or not _number(item["price"]):
            return f"items[{i}].qnt and price must be numbers"
    return None


def validate_data(data: Any, visitor_uid: str, guest_uid: str) -> str | None:
    if not isinstance(data, dict):
        return "data is not a JSON object"
    unknown = set(data) - DATA_KEYS
    if unknown:
        return f"unknown data field {sorted(unknown)[0]}"
    kind = data.get("type")
    if kind not in TYPES:
        return f"unknown event type {kind!r}"
    for key, form_value in (("visitor_uid", visitor_uid), ("guest_uid", guest_uid)):
        if key in data and data[key] != form_value:
            return f"data.{key} differs from the form's {key}"
    for key in ("domain", "host", "url", "path", "title", "referrer"):
        if key in data and not isinstance(data[key], str):
            return f"data.{key} must be a string"
    if "visitor_info" in data and not isinstance(data["visitor_info"], dict):
        return "visitor_info must be an object"
    props = data.get("properties", {})
    if not isinstance(props, dict):
        return "properties must be an object"
    for key in TYPES[kind]:
        if props.get(key) in (None, ""):
            return f"missing properties.{key}"
    if kind in ("view_product", "add_to_cart", "remove_from_cart") and not isinstance(props["product_id"], str):
        return "properties.product_id must be a string"
    if "price" in props and not _number(props["price"]):
        return "properties.price must be a number"
    if kind == "purchase":
        if not isinstance(props["order_id"], str):
            return "properties.order_id must be a string"
        if not _number(props["revenue"]):
            return "properties.revenue must be a number"
    if "items" in props:
        return validate_items(props["items"])
    return None


def validate(form: dict[str, str]) -> tuple[dict[str, Any] | None, str | None]:
    """The event's data if the form is valid, else an error naming the problem."""
    if not form.get("app_key"):
        return None, "missing app_key"
    visitor_uid, guest_uid = form.get("visitor_uid", ""), form.get("guest_uid", "")
    if not (visitor_uid or guest_uid):
        return None, "missing visitor_uid or guest_uid"
    if visitor_uid.strip(UID_CHARS):
        return None, "visitor_uid may only contain 0-9, a-z and -"
    if "data" not in form:
        return None, "missing data"
    try:
        data = orjson.loads(form["data"])
    except orjson.JSONDecodeError as exc:
        return None, f"data is not JSON: {exc}"
    problem = validate_data(data, visitor_uid, guest_uid)
    return (None, problem) if problem else (data, None)


class ConveadTwin(Twin):
    name = "convead"

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(sandbox)
        self.apps = dict(KNOWN_APPS)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/convead/watch/event", self.guarded(self.event))]

    def _reject(self, status: int, message: str) -> web.Response:
        self.sandbox.count_rejected(self.name)
        return error_response(status, message)

    async def event(self, request: web.Request) -> web.Response:
        ctype = request.headers.get("Content-Type", "")
        if not ctype.startswith(FORM_TYPE):
            return self._reject(415, f"Content-Type must be {FORM_TYPE}, got {ctype or 'nothing'}")
        form, problem = parse_form(await request.read())
        data = None
        if problem is None:
            data, problem = validate(form)
        if problem is None and self.sandbox.fail_item(self.name):
            problem = "injected partial failure"
        if problem is not None or data is None:
            return self._reject(400, problem or "invalid data")
        domains = self.apps.get(form["app_key"])
        if domains is None or data.get("domain") not in domains:
            self.sandbox.count(self.name, "ignored")  # silently not processed
            return web.Response(status=200)
        item: dict[str, Any] = {k: form[k] for k in ("visitor_uid", "guest_uid") if form.get(k)}
        item["data"] = data
        self.sandbox.record(self.name, (item,))
        return web.Response(status=200)
