"""Convead events: Convead's document "JS Event API" (its help center), and what Convead's own
clients do: they send the fields as a form body, ``visitor_uid`` allows only ``[0-9a-z-]``, and a wrong
app_key or an unlisted domain is silently not processed (200 all the same).

One event per request: ``POST https://tracker.convead.io/watch/event`` (the
base URL is configurable) with an ``application/x-www-form-urlencoded`` body
of ``app_key``, ``visitor_uid`` and/or ``guest_uid`` (at least one; empty ones
omitted) and ``data``, the event as a JSON string, as Convead's own clients
send it (the document calls the fields "query variables").

``data`` is ``{type, domain, host, url, path, title, referrer, visitor_uid,
guest_uid, visitor_info?, properties}`` with the page fields when known:

* a product view is ``view_product`` with ``product_id``, ``product_name``,
  ``product_url`` and, as in the document's example, ``price`` and
  ``product_image_url`` (``category_id`` is not sent: the canonical event has
  category names, not the shop's category ids);
* an order is ``purchase`` with ``order_id``, ``revenue`` (the order total)
  and ``items`` of ``{product_id, qnt, price}`` (unit price) plus the item's
  ``product_url`` / ``product_image_url`` when known, as in the example;
* ``visitor_info`` (first_name, last_name, email, phone from ``customer``)
  only where the site enables ``send_visitor_info`` (default off: PII).

What it needs (``needs``, checked by processor.validation before ``build``): the site id, product
and order ids, finite, non-negative prices and revenue, order lines of at least 1 unit; it sends no
timestamp, so an ``event_time`` in seconds does not stop a Convead event. Where the document is
silent: an empty product name is left out (``product_name`` is optional); a price or revenue of 0 is
sent as 0.0; an order without lines (a gift card, a voucher) is a ``purchase`` by its ``revenue``
without ``items`` (the document's purchase is an order id and a revenue; items describe the lines
when there are some); a site id no config names (and no ``default``) is rejected naming the site id.

``domain`` is the site's ``domain`` setting (the domain registered in
Convead: an unlisted one is silently dropped by Convead), else the page's
host; an event with neither is rejected naming ``page.url``.

``visitor_uid`` allows only ``[0-9a-z-]``. An invalid one is dropped when the
event also has a ``guest_uid`` (it is still attributed to the guest; the
outcome carries the note ``visitor_uid_dropped``), otherwise the event is
rejected naming ``visitor.vendor_ids.convead_visitor_uid``.

Responses: 200 (any 2xx) delivered; 408/429/5xx (but 501) retryable; other
statuses rejected. A wrong app_key or domain also answers 200 (Convead does
not say otherwise), so it cannot be detected here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from pydantic import Field, SecretStr

from processor.events import Event, EventKind
from processor.validation import (
    ITEM_PRODUCT_ID,
    ITEM_QUANTITY,
    ITEM_UNIT_PRICE,
    ORDER_ID,
    ORDER_TOTAL,
    PRODUCT_ID,
    PRODUCT_PRICE,
    SITE_ID,
)
from processor.vendors.base import (
    DELIVERED,
    Adapter,
    BatchSettings,
    Frozen,
    InvalidField,
    MissingField,
    NoOptions,
    Outcome,
    Plan,
    Response,
    VendorRequest,
    VendorSettings,
    Verdict,
    json_body,
    require,
    status_outcome,
)

VISITOR_UID = "visitor.vendor_ids.convead_visitor_uid"
UID_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz-"
DROPPED_NOTE = "visitor_uid_dropped"
DELIVERED_DROPPED = Outcome(Verdict.DELIVERED, note=DROPPED_NOTE)

_FORM_SAFE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~"
_FORM_BYTE = [bytes((b,)) if b in _FORM_SAFE else b"+" if b == 0x20 else b"%%%02X" % b for b in range(256)]
_ONE_BYTE = [bytes((b,)) for b in range(256)]
_PERCENT, _SPACE = 0x25, 0x20
_HTTP_URL = re.compile(r"https?://([^/?#]*)([^?#]*)")  # netloc, path


def form_quote(raw: bytes) -> bytes:
    """Form encoding as Convead's clients send it (PHP urlencode; ~ is kept, which every form decoder reads alike):
    ``quote_plus(raw, safe="-_.~")``. One ``bytes.replace`` per distinct byte to escape (a JSON body has about
    ten: ``"{}:,/`` and a few more), ``%`` first as the other escapes write it and the space last as ``+`` is
    escaped before; with many distinct ones (non-Latin text) or a short input, a table lookup a byte."""
    unsafe = set(raw.translate(None, _FORM_SAFE))
    if not unsafe:
        return raw
    if len(unsafe) > min(24, len(raw) >> 2):  # here the byte table costs less than the replaces
        return b"".join(map(_FORM_BYTE.__getitem__, raw))
    if _PERCENT in unsafe:
        unsafe.remove(_PERCENT)
        raw = raw.replace(b"%", b"%25")
    space = _SPACE in unsafe
    if space:
        unsafe.remove(_SPACE)
    for b in unsafe:
        raw = raw.replace(_ONE_BYTE[b], _FORM_BYTE[b])
    return raw.replace(b" ", b"+") if space else raw


class ConveadSite(Frozen):
    app_key: SecretStr
    domain: str | None = Field(None, description="the site's domain as registered in Convead "
                                                 "(default: the host of the event's page.url)")
    send_visitor_info: bool = Field(False, description="send customer name, email and phone as visitor_info")


@dataclass(slots=True, frozen=True)
class _Site:
    """What each request of a site needs, computed once per adapter."""

    form_prefix: bytes  # b"app_key=..."
    domain: str | None
    visitor_info: bool


def url_parts(url: str) -> tuple[str | None, str, str]:
    """``url``'s hostname (lower case; None if empty), host (the netloc less any userinfo) and path, as
    ``urlsplit`` reads them; InvalidField naming ``page.url`` where urlsplit refuses the URL. A printable
    ASCII ``http(s)://`` URL without brackets (IPv6) or ``%`` (zone ids) in its netloc is split by one
    regex, urlsplit's rules for such a URL: the netloc ends at the first ``/?#``, the path at ``?#``."""
    m = _HTTP_URL.match(url)
    if m is not None and url.isascii() and url.isprintable():
        netloc, path = m.groups()
        if not ("[" in netloc or "]" in netloc or "%" in netloc):
            host = netloc.rpartition("@")[2]
            return host.partition(":")[0].lower() or None, host, path
    try:
        parts = urlsplit(url)
        return parts.hostname, parts.netloc.rpartition("@")[2], parts.path
    except ValueError:
        raise InvalidField("page.url", "not a URL") from None


def _page_data(kind: str, url: str | None, site: _Site) -> dict[str, Any]:
    """``data`` up to the page fields: domain (the site's, else the page's host), host, url, path."""
    if not url:
        if not site.domain:
            raise MissingField("page.url")
        return {"type": kind, "domain": site.domain}
    hostname, host, path = url_parts(url)
    domain = site.domain or hostname
    if not domain:
        raise MissingField("page.url")
    return {"type": kind, "domain": domain, "host": host, "url": url, "path": path or "/"}


def _view_properties(product: dict[str, Any], page_url: str | None) -> dict[str, Any]:
    props: dict[str, Any] = {"product_id": require(product["product_id"], "product.product_id")}
    if product["name"]:
        props["product_name"] = product["name"]
    if product["url"] or page_url:
        props["product_url"] = product["url"] or page_url
    props["price"] = product["price"]
    if product["image_url"]:
        props["product_image_url"] = product["image_url"]
    return props


def _purchase_properties(order: dict[str, Any]) -> dict[str, Any]:
    props = {"order_id": require(order["order_id"], "order.order_id"), "revenue": order["total"]}
    if not order["items"]:
        return props  # a gift card, a voucher: a purchase by its revenue
    items = []
    for i, item in enumerate(order["items"]):  # quantities are at least 1 (processor.validation)
        line = {"product_id": require(item["product_id"], f"order.items[{i}].product_id"),
                "qnt": item["quantity"], "price": item["unit_price"]}
        if item["image_url"]:
            line["product_image_url"] = item["image_url"]
        if item["url"]:
            line["product_url"] = item["url"]
        items.append(line)
    props["items"] = items
    return props


class ConveadAdapter(Adapter[ConveadSite, NoOptions]):
    name = "convead"
    kinds = frozenset({EventKind.PRODUCT_VIEW, EventKind.ORDER})
    Site = ConveadSite
    default_base_url = "https://tracker.convead.io/watch/event"
    # One request per event: a batch only groups what is planned and sent concurrently, so keep it short.
    default_batch = BatchSettings(max_events=100, max_wait_ms=200)
    default_concurrency = 32  # one request per visitor/session/event: parallelism carries the throughput
    notes = (DROPPED_NOTE,)
    secret_fields = ("app_key",)
    needs = frozenset({SITE_ID, PRODUCT_ID, PRODUCT_PRICE, ORDER_ID, ORDER_TOTAL, ITEM_PRODUCT_ID,
                       ITEM_UNIT_PRICE, ITEM_QUANTITY})

    example_env = {"CONVEAD_APP_KEY": "demo-convead-app-key"}

    @classmethod
    def example_settings(cls, sandbox_url: str) -> dict[str, Any]:
        return {"base_url": f"{sandbox_url}/convead/watch/event",
                "sites": {"default": {"app_key": "${CONVEAD_APP_KEY}", "domain": "shop.example.com"}},
                "options": {}}

    def __init__(self, settings: VendorSettings[ConveadSite, NoOptions]) -> None:
        super().__init__(settings)
        self._headers = {"Content-Type": "application/x-www-form-urlencoded",
                         "User-Agent": self.settings.user_agent}

    def prepare_site(self, site_id: str, site: ConveadSite) -> _Site:
        return _Site(b"app_key=" + form_quote(site.app_key.get_secret_value().encode()),
                     site.domain.lower() if site.domain else None, site.send_visitor_info)

    def body(self, event: Event, site: _Site) -> tuple[bytes, bool]:
        """The form body of one event, and whether an invalid visitor_uid was dropped."""
        rec = event.record
        ids = rec["visitor"]["vendor_ids"]
        visitor_uid = ids.get("convead_visitor_uid")
        guest_uid = ids.get("convead_guest_uid")
        dropped = False
        if visitor_uid and visitor_uid.strip(UID_CHARS):
            if not guest_uid:
                raise InvalidField(VISITOR_UID, "only 0-9, a-z and - are allowed")
            visitor_uid, dropped = None, True
        if not (visitor_uid or guest_uid):
            raise MissingField(f"{VISITOR_UID} or visitor.vendor_ids.convead_guest_uid")
        page = rec["page"]
        url = page["url"]
        if event.kind is EventKind.PRODUCT_VIEW:
            data = _page_data("view_product", url, site)
            props = _view_properties(rec["product"], url)
        else:
            data = _page_data("purchase", url, site)
            props = _purchase_properties(rec["order"])
        if page["title"]:
            data["title"] = page["title"]
        if page["referrer"]:
            data["referrer"] = page["referrer"]
        if visitor_uid:
            data["visitor_uid"] = visitor_uid
        if guest_uid:
            data["guest_uid"] = guest_uid
        customer = rec["customer"]
        if site.visitor_info and customer:
            info = {k: customer[k] for k in ("first_name", "last_name", "email", "phone") if customer[k]}
            if info:
                data["visitor_info"] = info
        data["properties"] = props
        body = site.form_prefix
        if visitor_uid:
            body += b"&visitor_uid=" + visitor_uid.encode()  # [0-9a-z-] needs no quoting
        if guest_uid:
            body += b"&guest_uid=" + form_quote(guest_uid.encode())
        return body + b"&data=" + form_quote(json_body(data)), dropped

    def build(self, events: Sequence[Event]) -> Plan:
        plan = Plan()
        for event in events:
            site = self.routes.get(event.record["site_id"], self.default_route)
            if site is None:
                plan.rejected.append((event, self.no_site_reason(event)))
                continue
            try:
                content, dropped = self.body(event, site)
            except (MissingField, InvalidField) as exc:
                plan.rejected.append((event, str(exc)))
                continue
            plan.requests.append(VendorRequest(url=self.base_url, content=content, events=[event],
                                               headers=self._headers, context=dropped))
        return plan

    def interpret(self, request: VendorRequest, response: Response) -> list[Outcome]:
        status = response.status
        if status == 200 and not response.body.strip():
            # Success, as "JS Event API" says it: "the server will respond with 200 OK", nothing more. A
            # page, a body with content or another 2xx is an answer we do not know: retried.
            return [DELIVERED_DROPPED if request.context else DELIVERED]
        if 200 <= status < 300:
            return [self.unrecognised(response)]
        detail = ""
        if 400 <= status < 500:
            try:
                body = response.json()
                detail = self.vendor_text(body.get("message") or body.get("error") or "")
            except (orjson.JSONDecodeError, AttributeError):
                detail = self.vendor_text(response.body[:2000].decode("utf-8", "replace").strip())
        return [status_outcome(status, detail)]
