"""Tracardi tracker API: Tracardi's document "API integration" (the ``/track`` endpoint), and what
Tracardi's open-source server adds to it: ``source.id`` is required and ``session`` optional in its
model, events need a non-empty ``type`` and may carry ``id``, ``properties``, ``options``, ``context``,
``tags``; unknown top-level fields are ignored; it answers 200, 401 (unknown or disabled source), 406
(event validation), 422 (payload validation) or 500; a client-supplied event id becomes the stored id.

POST ``{base}/track`` with one *tracker payload* per (profile, session) of a
batch: ``source.id`` (the site's Tracardi event source, a credential: an
unknown one answers 401), ``session.id``, ``profile.id`` when known,
``context``, and ``events`` of ``{id, type, properties, context[, options,
tags]}``. A product view becomes one event (default type ``product-view``), an
order one event (default ``purchase-order``); type names are configurable per
vendor (``options.event_types``) and per site (``sites.<id>.event_types``).

Ids. ``profile.id`` / ``session.id`` come from ``visitor.vendor_ids``
(``tracardi_profile_id``, ``tracardi_session_id``). Without a session id we
send a UUID derived from ``visitor.session_id`` (the document says the client
generates it; deriving keeps one canonical visit one Tracardi session, also
across retries). Without a profile id, by default the payload goes without
``profile`` and Tracardi creates one (noted ``profile_created``);
``options.without_profile: skip`` filters such events instead.

Idempotency: the canonical ``event_id`` is sent as each event's ``id``, which
Tracardi keeps as the stored event id, so a resend overwrites instead of
duplicating: our at-least-once retries are idempotent at Tracardi.

What it needs (``needs``, checked by processor.validation before ``build``): the site id, the event
id, ``event_time`` (``context.time``), product and order ids, and finite, non-negative prices and
totals with order lines of at least 1 unit: all of them are sent, so an event breaking a rule on any
is dead-lettered naming the field. Where the document is silent (properties are free-form): an empty
product or line name is left out, not sent empty; a price or total of 0 is sent as 0.0; an order
without lines is sent with ``items: []`` and ``itemCount: 0``; a site id no config names (and no
``default``) is rejected naming the site id.

Outcomes (one payload = all its events): 200 delivered (``profile_changed``
when Tracardi answers a different profile id than we sent); 401 unknown or
disabled source -> rejected, a configuration error noted ``bad_source``; 406
(event validation) and 422 (payload validation) -> rejected; 408, 429 and 5xx
-> retryable; other statuses by the default classes.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import orjson
from pydantic import Field, SecretStr, StringConstraints, field_validator

from processor.events import Event, EventKind
from processor.validation import (
    EVENT_ID,
    EVENT_TIME,
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
    MissingField,
    Outcome,
    Plan,
    Response,
    VendorRequest,
    VendorSettings,
    Verdict,
    json_body,
    null_path,
    rejected,
    require,
    status_outcome,
)

SESSION_NAMESPACE = uuid.UUID("5b0c3f39-3c39-4f6e-9d43-56a1c1f0a7e2")  # uuid5 namespace of derived session ids
DEFAULT_TYPES = {EventKind.PRODUCT_VIEW: "product-view", EventKind.ORDER: "purchase-order"}
NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]  # Tracardi: a non-empty type


class TracardiSite(Frozen):
    source_id: SecretStr = Field(min_length=1, description="the Tracardi event source id (a UUID) of this site")
    base_url: str | None = Field(None, description="this site's Tracardi API (default: the vendor base_url)")
    context: dict[str, Any] = Field(default_factory=dict, description="static tracker-payload context")
    event_types: dict[EventKind, NonEmpty] = Field(default_factory=dict, description="override options.event_types")
    event_options: dict[str, Any] = Field(default_factory=dict, description="options sent with every event")
    tags: list[str] = Field(default_factory=list, description="tags sent with every event")

    @field_validator("context", "event_options")
    @classmethod
    def _json_values(cls, v: dict[str, Any]) -> dict[str, Any]:
        path = null_path(v, "")
        if path is not None:
            raise ValueError(f"{path} is null or not a finite number: nothing is sent as null, NaN or Infinity")
        return v


class TracardiOptions(Frozen):
    event_types: dict[EventKind, NonEmpty] = Field(
        default_factory=dict, description="Tracardi event type per canonical kind (default: product-view, "
                                          "purchase-order)")
    without_profile: Literal["send", "skip"] = Field(
        "send", description="no tracardi_profile_id: send anyway (Tracardi creates a profile) or filter the event")


@dataclass(slots=True, frozen=True)
class _Site:
    """A site's settings flattened once for the hot path."""

    key: str
    url: str
    source: dict[str, str]
    context: dict[str, Any]
    types: dict[EventKind, str]
    event_options: dict[str, Any]
    tags: list[str]


_EPOCH = datetime(1970, 1, 1)
_EXACT_MS = 2**33 * 1000  # below this, ms / 1000 is a float within half a microsecond of the exact time
_SECONDS = [f"{s:02d}." for s in range(60)]
_MILLIS = [f"{ms:03d}Z" for ms in range(1000)]
_minute = (-1, "")  # the last minute formatted (a batch's events mostly share it): (minutes since 1970, its prefix)


def _iso(ms: int) -> str:
    """``ms`` (epoch milliseconds) as ISO 8601 UTC to the millisecond, ``2023-11-14T22:13:20.001Z``: what
    ``datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")`` writes (with ``Z``), which
    is exact below 2**33 seconds (year 2242), so there the minute's prefix is formatted once and the seconds
    and milliseconds looked up; other times (which validation lets through only with such a Kafka
    timestamp) take that float path itself."""
    global _minute
    if type(ms) is int and 0 <= ms < _EXACT_MS:
        minute, rest = divmod(ms, 60_000)
        cached, prefix = _minute  # one read: the pair stays a pair, whoever else formats a time
        if cached != minute:
            prefix = (_EPOCH + timedelta(minutes=minute)).isoformat()[:17]  # 2023-11-14T22:13:
            _minute = (minute, prefix)
        seconds, millis = divmod(rest, 1000)
        return prefix + _SECONDS[seconds] + _MILLIS[millis]
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# optional fields, (key sent, canonical field): sent when present (neither None nor empty); where all of a
# group are truthy (strings, as Avro decodes them: truthy is present) one dict literal takes them at once
_NAME = (("product", "name"),)
_PRODUCT_OPTIONAL = (("sku", "sku"), ("url", "url"), ("imageUrl", "image_url"))
_ITEM_OPTIONAL = (("sku", "sku"), ("url", "url"))
_PAGE = (("url", "url"), ("title", "title"), ("referrer", "referrer"))
_CLIENT = (("browser", "browser"), ("device", "device"), ("userAgent", "user_agent"), ("language", "language"),
           ("country", "country"))


def _present(out: dict[str, Any], src: dict[str, Any], fields: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """``out`` with those of ``src``'s ``fields`` that are present (neither None nor empty), in order."""
    for key, name in fields:
        value = src[name]
        if value is not None and value != "":
            out[key] = value
    return out


class TracardiAdapter(Adapter[TracardiSite, TracardiOptions]):
    name = "tracardi"
    kinds = frozenset({EventKind.PRODUCT_VIEW, EventKind.ORDER})
    Site = TracardiSite
    Options = TracardiOptions
    default_base_url = "http://localhost:8686"  # self-hosted: set base_url (or sites.<id>.base_url)
    # One payload per visitor session: a bigger batch costs nothing in request size and groups more.
    default_batch = BatchSettings(max_events=1000, max_bytes=2_000_000, max_wait_ms=1000)
    default_concurrency = 32  # one request per visitor/session/event: parallelism carries the throughput
    notes = ("bad_source", "profile_changed", "profile_created")
    secret_fields = ("source_id",)
    site_url_fields = ("base_url",)
    needs = frozenset({SITE_ID, EVENT_ID, EVENT_TIME, PRODUCT_ID, PRODUCT_PRICE, ORDER_ID, ORDER_TOTAL,
                       ITEM_PRODUCT_ID, ITEM_UNIT_PRICE, ITEM_QUANTITY})

    example_env = {"TRACARDI_SOURCE_ID": "3ee63fc6-490a-4fd8-bfb3-bf0c8c8d3387"}  # the document's source id

    @classmethod
    def example_settings(cls, sandbox_url: str) -> dict[str, Any]:
        return {"base_url": f"{sandbox_url}/tracardi",
                "sites": {"default": {"source_id": "${TRACARDI_SOURCE_ID}",
                                      "context": {"system": "event-relay"}}},
                "options": {}}

    def __init__(self, settings: VendorSettings[TracardiSite, TracardiOptions]) -> None:
        super().__init__(settings)
        self._skip_anonymous = self.options.without_profile == "skip"
        self._headers = {"Content-Type": "application/json", "User-Agent": self.settings.user_agent}

    def prepare_site(self, site_id: str, site: TracardiSite) -> _Site:
        types = {**DEFAULT_TYPES, **self.options.event_types, **site.event_types}
        return _Site(site_id, f"{(site.base_url or self.base_url).rstrip('/')}/track",
                     {"id": site.source_id.get_secret_value()}, site.context, types, site.event_options, site.tags)

    def event(self, event: Event, site: _Site) -> dict[str, Any]:
        """The tracker-payload event for one canonical event (MissingField if it lacks what we need)."""
        rec = event.record
        kind = event.kind
        out: dict[str, Any] = {"id": require(rec["event_id"], "event_id"), "type": site.types[kind]}
        if kind is EventKind.PRODUCT_VIEW:
            p = rec["product"]
            name, sku, url, image_url = p["name"], p["sku"], p["url"], p["image_url"]
            product_id = require(p["product_id"], "product.product_id")
            if name and sku and url and image_url:  # all present: the common case
                props = {"product": name, "price": p["price"], "productId": product_id, "currency": p["currency"],
                         "categories": p["categories"], "sku": sku, "url": url, "imageUrl": image_url}
            else:
                props = _present({}, p, _NAME)
                props["price"] = p["price"]
                props["productId"] = product_id
                props["currency"], props["categories"] = p["currency"], p["categories"]
                _present(props, p, _PRODUCT_OPTIONAL)
        else:
            o = rec["order"]
            items = []
            units = 0
            for i, it in enumerate(o["items"]):
                item = _present({"productId": require(it["product_id"], f"order.items[{i}].product_id")}, it, _NAME)
                item["quantity"], item["price"] = it["quantity"], it["unit_price"]
                item["categories"] = it["categories"]
                items.append(_present(item, it, _ITEM_OPTIONAL))
                units += it["quantity"]
            props = {"orderId": require(o["order_id"], "order.order_id"), "total": o["total"],
                     "currency": o["currency"], "itemCount": units, "items": items}
        out["properties"] = props
        ctx: dict[str, Any] = {"time": _iso(rec["event_time"])}
        page = rec["page"]
        url, title, referrer = page["url"], page["title"], page["referrer"]
        where = ({"url": url, "title": title, "referrer": referrer} if url and title and referrer
                 else _present({}, page, _PAGE))
        if where:
            ctx["page"] = where
        out["context"] = ctx
        if site.event_options:
            out["options"] = site.event_options
        if site.tags:
            out["tags"] = site.tags
        return out

    @staticmethod
    def envelope(event: Event, site: _Site, profile_id: str | None, session_id: str | None) -> dict[str, Any]:
        """source / session / profile / context of a new payload, from its first event."""
        payload: dict[str, Any] = {"source": site.source}
        if session_id:
            payload["session"] = {"id": session_id}
        if profile_id:
            payload["profile"] = {"id": profile_id}
        page = event.record["page"]
        browser, device, agent, language, country = (page["browser"], page["device"], page["user_agent"],
                                                     page["language"], page["country"])
        client = ({"browser": browser, "device": device, "userAgent": agent, "language": language, "country": country}
                  if browser and device and agent and language and country else _present({}, page, _CLIENT))
        context = {**site.context, "client": client} if client else site.context
        if context:
            payload["context"] = context
        payload["events"] = []
        return payload

    def build(self, events: Sequence[Event]) -> Plan:
        plan = Plan()
        groups: dict[tuple[str, str | None, str | None], tuple[_Site, list[Event], dict[str, Any]]] = {}
        sites, default = self.routes, self.default_route
        for event in events:
            rec = event.record
            site = sites.get(rec["site_id"], default)
            if site is None:
                plan.rejected.append((event, self.no_site_reason(event)))
                continue
            visitor = rec["visitor"]
            ids = visitor["vendor_ids"]
            profile_id = ids.get("tracardi_profile_id") or None
            if profile_id is None and self._skip_anonymous:
                plan.filtered.append(event)
                continue
            session_id = ids.get("tracardi_session_id") or None
            if session_id is None and visitor["session_id"]:
                session_id = str(uuid.uuid5(SESSION_NAMESPACE, f"{rec['site_id']}/{visitor['session_id']}"))
            try:
                body = self.event(event, site)
            except MissingField as exc:
                plan.rejected.append((event, str(exc)))
                continue
            key = (site.key, profile_id, session_id)
            group = groups.get(key)
            if group is None:
                group = groups[key] = (site, [], self.envelope(event, site, profile_id, session_id))
            group[1].append(event)
            group[2]["events"].append(body)
        for (site_key, profile_id, _), (site, evs, payload) in groups.items():
            plan.requests.append(VendorRequest(url=site.url, content=json_body(payload), events=evs,
                                               headers=self._headers, context=(site_key, profile_id)))
        return plan

    def interpret(self, request: VendorRequest, response: Response) -> list[Outcome]:
        n = len(request.events)
        status = response.status
        site_key, sent_profile = request.context
        if status == 200:
            # Success, as "API integration" shows the tracker response: a 200, JSON (or unlabelled), an object
            # whose ``profile.id`` is the profile to keep. Anything else (a page, an empty body, JSON of
            # another shape, another 2xx) is an answer we do not know: retried, never delivered.
            body = response.json_object()
            profile = body.get("profile") if body is not None else None
            got = profile.get("id") if isinstance(profile, dict) else None
            if not isinstance(got, str) or not got:
                return [self.unrecognised(response)] * n
            if got == sent_profile:
                return [DELIVERED] * n
            return [Outcome(Verdict.DELIVERED, note="profile_changed" if sent_profile else "profile_created")] * n
        if status == 401:
            return [rejected(f"HTTP 401: Tracardi does not know or has disabled the event source of site "
                             f"config {site_key!r} (check sites.{site_key}.source_id)", note="bad_source")] * n
        if status == 406:
            return [rejected(f"HTTP 406: Tracardi event validation failed: {self.vendor_text(_detail(response))}")] * n
        if status == 422:
            return [rejected(f"HTTP 422: Tracardi rejected the tracker payload: "
                             f"{self.vendor_text(_detail(response))}")] * n
        if 200 <= status < 300:
            return [self.unrecognised(response)] * n
        return [status_outcome(status)] * n


def _detail(response: Response) -> str:
    """FastAPI's ``{"detail": ...}``: a message, or validation errors as ``loc: msg`` (never the input)."""
    try:
        detail = response.json().get("detail")
    except (orjson.JSONDecodeError, AttributeError):
        return "no detail"
    if isinstance(detail, list):
        parts = [f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg', '')}" for d in detail[:3]
                 if isinstance(d, dict)]
        detail = "; ".join(parts)
    return str(detail or "no detail")
