"""Tracardi tracker API: Tracardi's document "API integration" (the ``/track`` endpoint), and what
Tracardi's open-source server does with a payload (Tracardi/tracardi: ``TrackerPayload``, ``EventPayload``,
the tracking services; Tracardi/tracardi-api: ``app/api/track/event_server_endpoint.py``): ``source.id``
is required and ``session`` optional in its model, events need a non-empty ``type`` and may carry ``id``,
``time``, ``properties``, ``options``, ``context``, ``tags``; unknown top-level fields are ignored; it
answers 200, 401 (unknown or disabled source, or bot traffic), 406 (event validation), 422 (payload
validation) or 500; a client-supplied event id becomes the stored id.

POST ``{base}/track`` with one *tracker payload* per (profile, session) of a batch: ``source.id`` (the
site's Tracardi event source, a credential: an unknown one answers 401), ``session.id``, ``profile.id``
when known, ``context``, and ``events`` of ``{id, type, time, properties, context[, options, tags]}``.

Time. The document names ``metadata.time`` ("time of event; if not set it will be generated on server
side"), but ``TrackerPayload.__init__`` replaces the payload's ``metadata`` with the arrival time, so it
never reaches an event. Tracardi takes an event's time from the event's own ``time``
(``EventPayload.time``, a ``Time``): ``EventPayload.to_event`` stores its ``create`` as the event's
``metadata.time.create``, while ``metadata.time.insert`` stays the moment Tracardi stored the event (its
test ``test_event_payload_time_fallback``: "must be now - can not be overridden"). So each event carries
``time: {create: <event_time>}``: the moment it happened, however late it is delivered (parked and
redriven, or a dead letter replayed days later); ``insert`` is Tracardi's own arrival stamp.

The visit. ``EventPayload.to_event`` stores ``context.page.url``, ``title`` and ``referer.host`` as the
event's ``hit``: the page goes as ``context.page: {url, title, referer: {host, url}}``, ``host`` the
referrer's ``scheme://host`` (as Tracardi's own generated contexts write it) and ``url`` the whole
referrer. A new session's browser, OS and device come from a User-Agent
(``session_data_computation.compute_session``): ``context.browser.local.browser.userAgent`` first, the
request's ``User-Agent`` header only without it; ``context.browser.local.browser.language`` is the
visitor's language. We send the visitor's User-Agent and language in that context shape, and keep the
request's header the relay's own: Tracardi reads the context first, and stores each request's headers
with its events, where the header says who sent them. The device type is the one Tracardi derives from
the User-Agent (``mobile``, ``pc``, ``tablet``): we do not send ``context.device``, which
``_compute_data_from_user_agent`` would read over the User-Agent's device, because that branch also reads
``user_agent.device.is_touch_capable``, which the parser's device does not have, and the AttributeError
it swallows leaves the session's device type and touch and its whole ``app`` (browser name, version, the
bot flag) unset (checked by running Tracardi's models on our payloads). ``context.client`` (the
document's example shape: browser, device, userAgent, language, country) is kept as before: the session
context keeps the canonical device there.

Bots. When ``DISALLOW_BOT_TRAFFIC`` is on (Tracardi's default), ``track_data_computation.compute_data``
refuses every payload of a session whose User-Agent is a bot (``user_agents``' ``is_bot``: ua-parser's
device family ``Spider``) with 401 "Traffic from bot is not allowed.", which reads like a wrong event
source. So by default (``options.bots: skip``) an event whose User-Agent ua-parser calls a Spider is
filtered, not sent (the same parser and rules Tracardi uses); ``bots: send`` sends them for installations
that let bot traffic in (Tracardi then stores them with ``app.bot: true``).

Ids. Tracardi lower-cases event ids (``Event`` is a ``NamedEntity``), strips profile and session ids
(``Tracker.track_event``), and indexes ids only up to 64 characters (``ignore_above: 64`` in its index
mappings). An id goes as given when Tracardi would keep it as it is (an event id in lower case, a
profile or session id without surrounding spaces, at most 64 characters); otherwise as a stable id that
Tracardi keeps unchanged: the lower-cased (events) or stripped (profiles, sessions) id cut to 47
characters, ``~`` and 16 hex digits of a BLAKE2b digest of the id. Event ids differing only in case
stay two events (the digest is of the id as produced), a resend sends the same id (Tracardi overwrites:
our at-least-once retries stay idempotent) and every id is indexed. ``profile.id`` / ``session.id``
come from ``visitor.vendor_ids`` (``tracardi_profile_id``, ``tracardi_session_id``). Without a
session id the session is a UUID derived from the canonical ``visitor.session_id`` (else
``visitor.visitor_id``, else the profile id), so every event with a visitor has a session that lasts
across requests and retries: without one Tracardi makes a random session per request
(``session_loading.load_or_create_session``), and without a profile too a new profile each time.
Without a profile id, by default the payload goes without ``profile`` and Tracardi creates one (noted
``profile_created``), which the derived session then keeps; ``options.without_profile: skip`` filters
such events instead.

Event types. By default (``options.event_schema: predefined``) Tracardi's predefined ecommerce types
(``tracardi/service/setup/events/ecommerce.json``), whose schemas drive its automation: a product view is
``product-details-page-view`` with ``properties`` ``{id, name, sku, category, price, url: {page,
image}}`` (copied to ``data.ec.product``, journey state ``awareness``) plus ``currency`` and
``categories``; an order is ``checkout-completed`` with ``{id, value, status: "completed"}`` (copied to
``data.ec.checkout``; ``value`` adds to the profile's lifetime checkout value ``data.metrics.ltcocv``,
journey state ``purchase``) plus ``currency``, ``itemCount`` and ``items`` of ``{id, name, sku, category,
price, quantity, url: {page}}``. ``category`` is the first of the canonical ``categories``.
``event_schema: legacy`` keeps the relay's earlier types and properties (``product-view``: ``product,
price, productId, currency, categories, sku, url, imageUrl``; ``purchase-order``: ``orderId, total,
currency, itemCount, items``) for installations whose rules rely on them. Type names are configurable on top, per vendor
(``options.event_types``) and per site (``sites.<id>.event_types``).

What it needs (``needs``, checked by processor.validation before ``build``): the site id, the event
id, ``event_time``, product and order ids, and finite, non-negative prices and totals with order lines
of at least 1 unit: all of them are sent, so an event breaking a rule on any is dead-lettered naming the
field. Where the document is silent (properties are free-form): an empty product or line name is left
out, not sent empty; a price or total of 0 is sent as 0.0; an order without lines is sent with
``items: []`` and ``itemCount: 0``; a site id no config names (and no ``default``) is rejected naming the
site id.

Outcomes (one payload = all its events): 200 delivered (``profile_changed`` when Tracardi answers a
different profile id than we sent); 401 unknown or disabled source -> rejected, a configuration error
noted ``bad_source``; 406 (event validation) and 422 (payload validation) -> rejected; 408, 429 and 5xx
-> retryable; other statuses by the default classes.
"""

from __future__ import annotations

import hashlib
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
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
# a session derived from the visitor id or the profile id (no canonical session id): a namespace of its own
VISITOR_SESSION_NAMESPACE = uuid.UUID("c1f04a3e-6f0b-4f9e-8a52-2d7e9b1c4a6d")
PREDEFINED_TYPES = {EventKind.PRODUCT_VIEW: "product-details-page-view", EventKind.ORDER: "checkout-completed"}
LEGACY_TYPES = {EventKind.PRODUCT_VIEW: "product-view", EventKind.ORDER: "purchase-order"}
DEFAULT_TYPES = PREDEFINED_TYPES
ID_LIMIT = 64  # Tracardi's index mappings: ids are keywords with ignore_above 64
_DIGEST_HEX = 16
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
        default_factory=dict, description="Tracardi event type per canonical kind (default: by event_schema)")
    event_schema: Literal["predefined", "legacy"] = Field(
        "predefined", description="predefined: Tracardi's product-details-page-view / checkout-completed and "
                                  "their properties; legacy: the earlier product-view / purchase-order")
    without_profile: Literal["send", "skip"] = Field(
        "send", description="no tracardi_profile_id: send anyway (Tracardi creates a profile) or filter the event")
    bots: Literal["skip", "send"] = Field(
        "skip", description="an event whose User-Agent is a bot (Tracardi's rule): filter it (Tracardi refuses "
                            "bot traffic by default) or send it (DISALLOW_BOT_TRAFFIC=no)")


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


def _stable(kept: str, original: str) -> str:
    """``kept`` (the id as Tracardi would keep it) cut to fit, ``~`` and a digest of ``original``."""
    digest = hashlib.blake2b(original.encode("utf-8", "surrogatepass"), digest_size=_DIGEST_HEX // 2).hexdigest()
    return f"{kept[:ID_LIMIT - _DIGEST_HEX - 1]}~{digest}"


def event_id(value: str) -> str:
    """The event id Tracardi stores as sent: ``value`` when it is lower case and at most 64 characters,
    else its stable form (see the module docstring)."""
    if len(value) <= ID_LIMIT:
        low = value.lower()
        if low == value:
            return value
        return _stable(low, value)
    return _stable(value.lower(), value)


def entity_id(value: str | None) -> str | None:
    """A profile or session id as Tracardi uses it (stripped; None when nothing is left), its stable form
    beyond 64 characters."""
    if not value:
        return None
    kept = value.strip()
    if len(kept) <= ID_LIMIT:
        return kept or None
    return _stable(kept, kept)


_ORIGIN = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(?:[^/?#@]*@)?([^/?#]*)")


_referers: dict[str, dict[str, str]] = {}  # referrers repeat (search engines, the shop itself): made once
_REFERERS_KEPT = 4096


def _referer(referrer: str) -> dict[str, str]:
    """Tracardi's ``context.page.referer``: ``host`` the referrer's ``scheme://host`` (no user info; the
    referrer itself when it is not an absolute URL), ``url`` the referrer. (Shared: never changed.)"""
    got = _referers.get(referrer)
    if got is None:
        m = _ORIGIN.match(referrer)
        got = {"host": m.group(1) + m.group(2) if m else referrer, "url": referrer}
        if len(_referers) < _REFERERS_KEPT:
            _referers[referrer] = got
    return got


class _BotRule:
    """Tracardi's bot rule (``TrackerPayload.is_bot``, the session's ``app.bot``: ``user_agents``'
    ``is_bot``): the first of ua-parser's device rules that matches, with Python's ``re`` as user-agents
    runs them, is one whose family is ``Spider``. Python's ``re`` takes up to a few ms a User-Agent on
    these rules, so the native matcher (ua-parser-rs) finds candidates first: it matches every string
    Python does and some more (it reads bounded repeats such as ``.{0,100}`` wider), so when no Spider
    rule matches natively the answer is no, and otherwise the native first match is checked with Python
    and, where the two read a rule differently, Python's own first match decides."""

    def __init__(self) -> None:
        import ua_parser
        import ua_parser_rs

        self.rules: list[Any] = list(ua_parser.load_lazy_builtins()[2])  # compiled for Python when first used

        def native(indices: list[int]) -> Any:  # the first matching rule's index, as its family
            return ua_parser_rs.DeviceExtractor((self.rules[i].regex, self.rules[i].regex_flag, str(i), None, None)
                                                for i in indices)

        everything = list(range(len(self.rules)))
        self.first = native(everything)
        self.first_spider = native([i for i in everything if self.rules[i].family == "Spider"])

    def __call__(self, user_agent: str) -> bool:
        spider = self.first_spider.extract(user_agent)
        if spider is None:
            return False
        first = int(self.first.extract(user_agent).family)  # a rule matches: at most this Spider one
        if self.rules[first](user_agent) is None:  # the native matcher read this rule wider: ask Python
            device = next(filter(None, (rule(user_agent) for rule in self.rules[first + 1:])), None)
            return device is not None and device.family == "Spider"
        return first == int(spider.family)


_rule: _BotRule | None = None
_rule_lock = threading.Lock()


def bot_rule() -> _BotRule:
    """The bot rule, loaded once a process (about a second)."""
    global _rule
    if _rule is None:
        with _rule_lock:
            if _rule is None:
                _rule = _BotRule()
    return _rule


_cached_bot = lru_cache(maxsize=4096)(lambda user_agent: bot_rule()(user_agent))
_CACHED_LENGTH = 1024  # longer User-Agents are checked each time: the cache holds at most 4096 x 1 KiB


def is_bot(user_agent: str) -> bool:
    """Whether Tracardi calls ``user_agent`` a bot (``_BotRule``)."""
    return bool(_cached_bot(user_agent)) if len(user_agent) <= _CACHED_LENGTH else bot_rule()(user_agent)


# optional fields, (key sent, canonical field): sent when present (neither None nor empty); where all of a
# group are truthy (strings, as Avro decodes them: truthy is present) one dict literal takes them at once
_NAME = (("product", "name"),)
_TNAME = (("name", "name"),)
_PRODUCT_OPTIONAL = (("sku", "sku"), ("url", "url"), ("imageUrl", "image_url"))
_ITEM_OPTIONAL = (("sku", "sku"), ("url", "url"))
_TITEM_OPTIONAL = (("sku", "sku"),)
_PAGE = (("url", "url"), ("title", "title"))
_CLIENT = (("browser", "browser"), ("device", "device"), ("userAgent", "user_agent"), ("language", "language"),
           ("country", "country"))
_BROWSER = (("userAgent", "user_agent"), ("language", "language"))
_URLS = (("page", "url"), ("image", "image_url"))


def _present(out: dict[str, Any], src: dict[str, Any], fields: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """``out`` with those of ``src``'s ``fields`` that are present (neither None nor empty), in order."""
    for key, name in fields:
        value = src[name]
        if value is not None and value != "":
            out[key] = value
    return out


def _view(p: dict[str, Any]) -> dict[str, Any]:
    """A product view's properties as ``product-details-page-view``'s schema names them."""
    categories = p["categories"]
    name, sku, url, image_url = p["name"], p["sku"], p["url"], p["image_url"]
    if name and sku and url and image_url and categories and categories[0]:  # all present: the common case
        return {"id": require(p["product_id"], "product.product_id"), "name": name, "sku": sku,
                "category": categories[0], "price": p["price"], "currency": p["currency"], "categories": categories,
                "url": {"page": url, "image": image_url}}
    props = _present({"id": require(p["product_id"], "product.product_id")}, p, _TNAME)
    _present(props, p, _TITEM_OPTIONAL)
    if categories and categories[0]:
        props["category"] = categories[0]
    props["price"], props["currency"], props["categories"] = p["price"], p["currency"], categories
    urls = _present({}, p, _URLS)
    if urls:
        props["url"] = urls
    return props


def _checkout(o: dict[str, Any]) -> dict[str, Any]:
    """An order's properties as ``checkout-completed``'s schema names them, its lines as ``data.ec``'s
    products."""
    items = []
    units = 0
    for i, it in enumerate(o["items"]):
        product_id, name, sku, url, categories = it["product_id"], it["name"], it["sku"], it["url"], it["categories"]
        if product_id and name and sku and url and categories and categories[0]:  # all present: the common case
            items.append({"id": product_id, "name": name, "sku": sku, "category": categories[0],
                          "price": it["unit_price"], "quantity": it["quantity"], "categories": categories,
                          "url": {"page": url}})
            units += it["quantity"]
            continue
        item = _present({"id": require(product_id, f"order.items[{i}].product_id")}, it, _TNAME)
        _present(item, it, _TITEM_OPTIONAL)
        if categories and categories[0]:
            item["category"] = categories[0]
        item["price"], item["quantity"], item["categories"] = it["unit_price"], it["quantity"], categories
        if it["url"]:
            item["url"] = {"page": it["url"]}
        items.append(item)
        units += it["quantity"]
    return {"id": require(o["order_id"], "order.order_id"), "value": o["total"], "status": "completed",
            "currency": o["currency"], "itemCount": units, "items": items}


def _legacy_view(p: dict[str, Any]) -> dict[str, Any]:
    name, sku, url, image_url = p["name"], p["sku"], p["url"], p["image_url"]
    product_id = require(p["product_id"], "product.product_id")
    if name and sku and url and image_url:  # all present: the common case
        return {"product": name, "price": p["price"], "productId": product_id, "currency": p["currency"],
                "categories": p["categories"], "sku": sku, "url": url, "imageUrl": image_url}
    props = _present({}, p, _NAME)
    props["price"] = p["price"]
    props["productId"] = product_id
    props["currency"], props["categories"] = p["currency"], p["categories"]
    return _present(props, p, _PRODUCT_OPTIONAL)


def _legacy_order(o: dict[str, Any]) -> dict[str, Any]:
    items = []
    units = 0
    for i, it in enumerate(o["items"]):
        item = _present({"productId": require(it["product_id"], f"order.items[{i}].product_id")}, it, _NAME)
        item["quantity"], item["price"] = it["quantity"], it["unit_price"]
        item["categories"] = it["categories"]
        items.append(_present(item, it, _ITEM_OPTIONAL))
        units += it["quantity"]
    return {"orderId": require(o["order_id"], "order.order_id"), "total": o["total"], "currency": o["currency"],
            "itemCount": units, "items": items}


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
        self._skip_bots = self.options.bots == "skip"
        if self._skip_bots:
            bot_rule()  # the rules load at start, not on the first event
        legacy = self.options.event_schema == "legacy"
        self._view, self._order = (_legacy_view, _legacy_order) if legacy else (_view, _checkout)
        self._headers = {"Content-Type": "application/json", "User-Agent": self.settings.user_agent}

    def prepare_site(self, site_id: str, site: TracardiSite) -> _Site:
        base = LEGACY_TYPES if self.options.event_schema == "legacy" else PREDEFINED_TYPES
        types = {**base, **self.options.event_types, **site.event_types}
        return _Site(site_id, f"{(site.base_url or self.base_url).rstrip('/')}/track",
                     {"id": site.source_id.get_secret_value()}, site.context, types, site.event_options, site.tags)

    def event(self, event: Event, site: _Site) -> dict[str, Any]:
        """The tracker-payload event for one canonical event (MissingField if it lacks what we need)."""
        rec = event.record
        kind = event.kind
        eid = require(rec["event_id"], "event_id")
        if len(eid) > ID_LIMIT or eid.lower() != eid:
            eid = event_id(eid)
        out: dict[str, Any] = {"id": eid, "type": site.types[kind],
                               "time": {"create": _iso(rec["event_time"])}}
        out["properties"] = self._view(rec["product"]) if kind is EventKind.PRODUCT_VIEW else self._order(rec["order"])
        page = rec["page"]
        url, title, referrer = page["url"], page["title"], page["referrer"]
        if url and title and referrer:
            out["context"] = {"page": {"url": url, "title": title, "referer": _referer(referrer)}}
        else:
            where = _present({}, page, _PAGE)
            if referrer:
                where["referer"] = _referer(referrer)
            if where:
                out["context"] = {"page": where}
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
        if browser and device and agent and language and country:
            client = {"browser": browser, "device": device, "userAgent": agent, "language": language,
                      "country": country}
            visit: dict[str, Any] = {"client": client,
                                     "browser": {"local": {"browser": {"userAgent": agent, "language": language}}}}
        else:
            client = _present({}, page, _CLIENT)
            visit = {"client": client} if client else {}
            local = _present({}, page, _BROWSER)
            if local:
                visit["browser"] = {"local": {"browser": local}}
        context = {**site.context, **visit} if visit else site.context
        if context:
            payload["context"] = context
        payload["events"] = []
        return payload

    def build(self, events: Sequence[Event]) -> Plan:
        plan = Plan()
        groups: dict[tuple[str, str | None, str | None], tuple[_Site, list[Event], dict[str, Any]]] = {}
        sites, default = self.routes, self.default_route
        skip_bots = self._skip_bots
        for event in events:
            rec = event.record
            site = sites.get(rec["site_id"], default)
            if site is None:
                plan.rejected.append((event, self.no_site_reason(event)))
                continue
            visitor = rec["visitor"]
            ids = visitor["vendor_ids"]
            profile_id = ids.get("tracardi_profile_id")  # as entity_id, inlined
            if profile_id:
                profile_id = profile_id.strip()
                if len(profile_id) > ID_LIMIT:
                    profile_id = _stable(profile_id, profile_id)
            profile_id = profile_id or None
            if profile_id is None and self._skip_anonymous:
                plan.filtered.append(event)
                continue
            if skip_bots:
                agent = rec["page"]["user_agent"]
                if agent and (_cached_bot(agent) if len(agent) <= _CACHED_LENGTH else bot_rule()(agent)):  # is_bot
                    plan.filtered.append(event)
                    continue
            session_id = ids.get("tracardi_session_id")  # as entity_id, inlined
            if session_id:
                session_id = session_id.strip()
                if len(session_id) > ID_LIMIT:
                    session_id = _stable(session_id, session_id)
            if not session_id:
                session_id = None
                if visitor["session_id"]:
                    session_id = str(uuid.uuid5(SESSION_NAMESPACE, f"{rec['site_id']}/{visitor['session_id']}"))
                elif visitor["visitor_id"] or profile_id:
                    who = f"v/{visitor['visitor_id']}" if visitor["visitor_id"] else f"p/{profile_id}"
                    session_id = str(uuid.uuid5(VISITOR_SESSION_NAMESPACE, f"{rec['site_id']}/{who}"))
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
