"""Qubit offline conversions: Qubit's document "Set up call center tracking" (docs.qubit.com, the
offline-conversions endpoint), and what Qubit's public QProtocol schemas add to it (below).

``POST {base}/events/{trackingId}`` with ``{"events": [...]}``: many QProtocol
events a request, grouped by the site's tracking id. Every event carries
``context.id`` (the Qubit visitor id, ``visitor.vendor_ids.qubit_visitor_id``;
there is no fallback: another id would attribute the event to a visitor
Qubit never saw), ``meta.type``, ``meta.ts`` (epoch ms), ``meta.url`` when
known and ``meta.source`` (``options.source``). A product view is an
``ecView`` of type ``product``; an order is the site's vertical's transaction
summary (the document's table) with the amount field's ``total`` and
``transaction.id``. Qubit rejects unknown (custom) fields and loses the whole
event, so nothing else is sent.

An ``ecView`` carries ``type`` (``product`` here), ``language`` (an IETF tag),
``country`` (ISO 3166-1 alpha-2) and ``currency`` (ISO 4217). Codes are sent
in that form (``eur`` -> ``EUR``, ``gb`` -> ``GB``, ``en_gb`` -> ``en-GB``,
processor.vendors.codes); a value that is not such a code is rejected naming
the field. A view whose page has no language or country, or whose product has
no currency (common for events produced server-side), takes the site's
``language`` / ``country`` / ``currency`` default, used only when the event
has none; without one it is rejected naming the field. The order's currency
follows the same rule.

What it needs (``needs``, checked by processor.validation before ``build``): the site id,
``event_time`` (``meta.ts``: epoch milliseconds after 2001 and at most a day ahead of the message's
Kafka timestamp; one in seconds would be filed in January 1970) and a finite, non-negative
``order.total``. A view's price and an order's lines are not sent, so a NaN there does not stop a
Qubit event. Where the document is silent: the product name is not sent (an ``ecView`` has no
such field), so an empty one does not matter; an order without lines is a transaction by its total
(a gift card, a voucher) and is sent; a total of 0 is sent as 0.0 (a free order is a transaction);
an order with no ``order_id`` takes the event id as transaction id, and one with neither is rejected
naming ``event_id``; a site id no config names (and no ``default``) is rejected naming the site id.

The answer ``{results: [...]}`` has one result per event, in order: ``success``
(warnings are counted as the ``warning`` note, not failures) or a failure with
an ``error`` (rejected). The ``{status, message}`` shape of an unexpected error
is classified by its status (502 retries). Any other 2xx (a page, an empty body,
JSON of another shape) is an unrecognised answer: retried, never delivered.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from operator import methodcaller
from typing import Any, Literal, NamedTuple

import orjson
from pydantic import Field, SecretStr, ValidationInfo, field_validator

from processor.events import Event, EventKind
from processor.validation import EVENT_TIME, ORDER_TOTAL, SITE_ID
from processor.vendors import codes
from processor.vendors.base import (
    DELIVERED,
    Adapter,
    BatchSettings,
    Frozen,
    InvalidField,
    MissingField,
    Outcome,
    Plan,
    Response,
    VendorRequest,
    VendorSettings,
    Verdict,
    classify_status,
    json_body,
    rejected,
    require,
    retryable,
    status_outcome,
    url_group,
)
from processor.vendors.codes import COUNTRIES, CURRENCIES, LANGUAGES

Vertical = Literal["ecommerce", "egaming", "publisher", "logistics", "travel", "finance"]

# The document's table: vertical -> (transaction event, the object holding the amount's ``total``).
TRANSACTIONS: dict[str, tuple[str, str]] = {
    "ecommerce": ("ecBasketTransactionSummary", "basket"),
    "egaming": ("egBetslipTransactionSummary", "betslip"),
    "publisher": ("pbBasketTransactionSummary", "basket"),
    "logistics": ("loBasketTransactionSummary", "basket"),
    "travel": ("trPackageTransactionSummary", "package"),
    "finance": ("fiBasketTransactionSummary", "basket"),
}
_NAME = re.compile(r"(?=.*[A-Za-z0-9])[A-Za-z0-9_.-]+\Z")  # one URL path segment, never "." or ".."
_WARNED = Outcome(Verdict.DELIVERED, note="warning")
# field -> (normaliser, what the document asks for)
_CODES = {"language": (codes.language, "an IETF language tag (en-GB)"),
          "country": (codes.country, "an ISO 3166-1 alpha-2 country code (GB)"),
          "currency": (codes.currency, "an ISO 4217 currency code (GBP)")}
_FIELD_CODES = {"page.language": _CODES["language"], "page.country": _CODES["country"],
                "product.currency": _CODES["currency"], "order.currency": _CODES["currency"]}
_VIEW = EventKind.PRODUCT_VIEW
_status = methodcaller("get", "status")
_warnings = methodcaller("get", "warnings")


class QubitSite(Frozen):
    tracking_id: SecretStr = Field(description="the property's Qubit tracking id (from the CSM); the URL path")
    endpoint: str | None = Field(None, description="per-site base URL (default: the vendor base_url)")
    vertical: Vertical = Field("ecommerce", description="selects the order's transaction summary event")
    namespace: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$",
                                  description="meta.type prefix, e.g. someco -> someco.ecView")
    language: str | None = Field(None, description="IETF language tag for views whose page has none")
    country: str | None = Field(None, description="ISO 3166-1 alpha-2 country for views whose page has none")
    currency: str | None = Field(None, description="ISO 4217 currency for events that carry none")

    @field_validator("language", "country", "currency")
    @classmethod
    def _codes(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        norm, what = _CODES[info.field_name]  # type: ignore[index]
        code = norm(v)
        if code is None:
            raise ValueError(f"must be {what}")
        return code

    @field_validator("tracking_id")
    @classmethod
    def _tracking_id_is_a_path_segment(cls, v: SecretStr) -> SecretStr:
        if not _NAME.match(v.get_secret_value()):
            raise ValueError("tracking_id must be non-empty letters, digits, '_', '.' or '-'")
        return v


class QubitOptions(Frozen):
    source: str = Field("event-relay@0.1.0", min_length=1, max_length=200, pattern=r"^\S+$",
                        description="meta.source: flags the event producer, e.g. yourco@1.0.0")


class _Route(NamedTuple):
    """What a site's events need, computed once per site."""

    url: str
    view_type: str
    order_type: str
    amount_key: str
    source: str
    language: str | None  # the site's defaults, for events that carry none
    country: str | None
    currency: str | None


class QubitAdapter(Adapter[QubitSite, QubitOptions]):
    name = "qubit"
    kinds = frozenset({EventKind.PRODUCT_VIEW, EventKind.ORDER})
    Site = QubitSite
    Options = QubitOptions
    default_base_url = "https://offline-conversions.qubit.com"
    default_batch = BatchSettings(max_events=500, max_bytes=1_000_000, max_wait_ms=1000)
    notes = ("warning",)
    secret_fields = ("tracking_id",)
    site_url_fields = ("endpoint",)
    needs = frozenset({SITE_ID, EVENT_TIME, ORDER_TOTAL})

    example_env = {"QUBIT_TRACKING_ID": "demo_tracking_id"}

    @classmethod
    def example_settings(cls, sandbox_url: str) -> dict[str, Any]:
        return {"base_url": f"{sandbox_url}/qubit",
                "sites": {"default": {"tracking_id": "${QUBIT_TRACKING_ID}", "vertical": "ecommerce"}},
                "options": {"source": "event-relay@0.1.0"}}

    def __init__(self, settings: VendorSettings[QubitSite, QubitOptions]) -> None:
        super().__init__(settings)
        self._headers = {"Content-Type": "application/json", "User-Agent": self.settings.user_agent}

    def prepare_site(self, site_id: str, site: QubitSite) -> _Route:
        base = (site.endpoint or self.base_url).rstrip("/")
        prefix = f"{site.namespace}." if site.namespace else ""
        order_type, amount_key = TRANSACTIONS[site.vertical]
        return _Route(f"{base}/events/{site.tracking_id.get_secret_value()}",
                      f"{prefix}ecView", prefix + order_type, amount_key, self.options.source,
                      site.language, site.country, site.currency)

    @staticmethod
    def _meta(event_type: str, ts: int, url: str | None, source: str) -> dict[str, Any]:
        if url:
            return {"type": event_type, "ts": ts, "url": url, "source": source}
        return {"type": event_type, "ts": ts, "source": source}

    def row(self, event: Event, route: _Route) -> dict[str, Any]:
        """The QProtocol event for one canonical event (MissingField names what it lacks)."""
        rec = event.record
        qid = rec["visitor"]["vendor_ids"].get("qubit_visitor_id")
        if not qid:
            raise MissingField("visitor.vendor_ids.qubit_visitor_id")
        page = rec["page"]
        if event.kind is EventKind.PRODUCT_VIEW:  # nearly every event: checked and built inline
            product = rec["product"]
            # codes already in Qubit's form (nearly all) cost one set test each; the rest go the slow way
            language, country, currency = page["language"], page["country"], product["currency"]
            if not (language in LANGUAGES and country in COUNTRIES and currency in CURRENCIES):
                language = _code(page["language"], route.language, "page.language")
                country = _code(page["country"], route.country, "page.country")
                currency = _code(product["currency"], route.currency, "product.currency")
            url = page["url"] or product["url"]
            meta = ({"type": route.view_type, "ts": rec["event_time"], "url": url, "source": route.source} if url
                    else {"type": route.view_type, "ts": rec["event_time"], "source": route.source})
            return {"context": {"id": qid}, "meta": meta, "type": "product", "language": language,
                    "country": country, "currency": currency}
        order = rec["order"]
        meta = self._meta(route.order_type, rec["event_time"], page["url"], route.source)
        total = {"value": float(require(order["total"], "order.total")),
                 "currency": _code(order["currency"], route.currency, "order.currency")}
        # The document: a transaction id is required and may be generated by the producer;
        # the event id is stable across retries, so a resend carries the same id.
        return {"context": {"id": qid}, "meta": meta, route.amount_key: {"total": total},
                "transaction": {"id": order["order_id"] or require(rec["event_id"], "event_id")}}

    def build(self, events: Sequence[Event]) -> Plan:
        """``row`` of each event, grouped by URL. A view whose codes are already in Qubit's form (nearly
        every event) is built here, as ``row`` builds it, without a call; everything else goes through
        ``row``. The site's route and group are looked up again only when the site id changes."""
        plan = Plan()
        groups: dict[str, tuple[list[Any], ...]] = {}  # URL -> its events, its rows
        site: str | None = None
        route: _Route | None = None
        add_event: Callable[[Event], None] | None = None  # the appenders of the route's URL's group
        add_row: Callable[[dict[str, Any]], None] | None = None
        view_type = source = ""
        for event in events:
            rec = event.record
            if rec["site_id"] != site or route is None:  # a new run of one site's events
                site = rec["site_id"]
                route = self.route_or_reject(event, plan)
                if route is None:
                    continue
                add_event = add_row = None  # the URL's group is made with its first event, as ``row`` made it
                view_type, source = route.view_type, route.source
            if event.kind is _VIEW:
                qid = rec["visitor"]["vendor_ids"].get("qubit_visitor_id")
                page, product = rec["page"], rec["product"]
                language, country, currency = page["language"], page["country"], product["currency"]
                if qid and language in LANGUAGES and country in COUNTRIES and currency in CURRENCIES:
                    url = page["url"] or product["url"]
                    if add_event is None or add_row is None:
                        add_event, add_row = (g.append for g in url_group(groups, route.url, 2))
                    add_event(event)
                    add_row({"context": {"id": qid},
                             "meta": ({"type": view_type, "ts": rec["event_time"], "url": url, "source": source}
                                      if url else {"type": view_type, "ts": rec["event_time"], "source": source}),
                             "type": "product", "language": language, "country": country, "currency": currency})
                    continue
            try:
                row = self.row(event, route)
            except (MissingField, InvalidField) as exc:
                plan.rejected.append((event, str(exc)))
                continue
            if add_event is None or add_row is None:
                add_event, add_row = (g.append for g in url_group(groups, route.url, 2))
            add_event(event)
            add_row(row)
        for url, (evs, rows) in groups.items():
            plan.requests.append(VendorRequest(url=url, content=json_body({"events": rows}), events=evs,
                                               headers=self._headers))
        return plan

    def interpret(self, request: VendorRequest, response: Response) -> list[Outcome]:
        """Success, as "Set up call center tracking" shows it: a 2xx answer, JSON (or unlabelled), an object
        whose ``results`` is a list of one result per event sent. The document's ``{status, message}`` (an
        unexpected error, in a 2xx too) is classified by its status; any other 2xx is an unrecognised answer
        (retried), never a delivery."""
        n = len(request.events)
        status = response.status
        ok = 200 <= status < 300
        body: dict[str, Any]
        if ok:
            body = response.json_object() or {}
        else:
            try:
                answer = response.json()
            except orjson.JSONDecodeError:
                answer = None
            body = answer if isinstance(answer, dict) else {}
        results = body.get("results")
        if isinstance(results, list) and (ok or classify_status(status) is Verdict.REJECTED):
            if len(results) == n:
                try:  # the common case without Python work per result: every one a success, no warnings
                    if list(map(_status, results)).count("success") == n and not any(map(_warnings, results)):
                        return [DELIVERED] * n
                except AttributeError:  # a result that is not an object: classified one by one below
                    pass
                return [self._result_outcome(r) for r in results]
            if ok:
                return [self.unrecognised(response, f"{len(results)} results for {n} events")] * n
            return [retryable(f"qubit answered {len(results)} results for {n} events")] * n
        message = self.vendor_text(body.get("message") or "")
        if not ok:
            return [status_outcome(status, message)] * n
        upstream = body.get("status")
        if isinstance(upstream, int) and not isinstance(upstream, bool) and upstream >= 400:
            return [status_outcome(upstream, message)] * n  # the error shape inside a 2xx answer
        return [self.unrecognised(response)] * n

    def _result_outcome(self, result: Any) -> Outcome:
        if not isinstance(result, dict):
            return rejected("qubit failed: malformed result")
        if result.get("status") == "success":
            return _WARNED if result.get("warnings") else DELIVERED
        # The document names the failed status both "failed" and "error"; anything but success failed.
        return rejected(f"qubit failed: {self.vendor_text(result.get('error') or result.get('status') or 'no reason')}")


def _code(value: Any, default: str | None, field_path: str) -> str:
    """The event's code in the form Qubit takes, else the site's default when the event has none;
    MissingField or InvalidField (naming the field and the form, never the value) otherwise."""
    if value is None or value == "":
        if default is None:
            raise MissingField(field_path)
        return default
    norm, what = _FIELD_CODES[field_path]
    code = norm(value)
    if code is None:
        raise InvalidField(field_path, f"not {what}")
    return code
