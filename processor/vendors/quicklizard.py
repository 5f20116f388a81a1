"""QuickLizard server-to-server SDK events: QuickLizard's document "QL SDK - Server to Server".

POST a JSON array of events to the account's endpoint (``evt.quicklizard.com``
and ``sdk-events.quicklizard.com`` are both documented; the account's
integration settings name the right one, so it is configurable per site). A
product view is one ``view`` event; an order is one ``conversion`` event per
line item with ``price`` = unit price x units (a float with a decimal point,
as QuickLizard's clients send it). An order without lines (a gift card, a
voucher) has no product sold to report: it is filtered, not dead-lettered.

What it needs (``needs``, checked by processor.validation before ``build``):
the site id, the product id and a finite, non-negative price of a view, and of
each order line its product id, unit price and a quantity of at least 1; an
event breaking one of those rules is dead-lettered naming the field. It sends
no timestamp, so an ``event_time`` in seconds does not stop a QuickLizard
event. Where the document is silent: a price of 0 is sent as ``0.0`` (free
items and samples are sold; "a valid float" includes 0); the product name is
not sent; a line whose unit price x units overflows a float is rejected naming
its unit price; a site id no config names (and no ``default``) is rejected
naming the site id.

The response ``{processed, failed, errors}`` is mapped back per event: a
canonical event is rejected when any of its rows is in ``failed`` (rows are
compared as data: key order and ``10`` vs ``10.0`` do not matter). It fails
closed: when a failed row matches none sent, we cannot tell whose it was, so
only events whose rows are all in ``processed`` are delivered and the others
are rejected saying so. Any other 2xx (a page, an empty body, JSON without the
three arrays) is an unrecognised answer: retried, never delivered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field, SecretStr

from processor.events import Event, EventKind
from processor.validation import ITEM_PRODUCT_ID, ITEM_QUANTITY, ITEM_UNIT_PRICE, PRODUCT_ID, PRODUCT_PRICE, SITE_ID
from processor.vendors.base import (
    DELIVERED,
    Adapter,
    Frozen,
    InvalidField,
    MissingField,
    NoOptions,
    Outcome,
    Plan,
    Response,
    VendorRequest,
    VendorSettings,
    json_body,
    rejected,
    require,
    status_outcome,
    url_group,
)

_INF = float("inf")
_VIEW = EventKind.PRODUCT_VIEW


class QuickLizardSite(Frozen):
    client_key: SecretStr
    endpoint: str | None = Field(None, description="per-site endpoint (default: the vendor base_url)")
    tags: list[str] = Field(default_factory=list, description="tags added to every event")
    channel: str | None = Field(None, description="pricing channel (conversions carry at most one)")
    send_vid: bool = Field(True, description="send the anonymous visitor id as vid")


@dataclass(slots=True, frozen=True)
class _Route:
    """A site's per-row constants, computed once."""

    url: str
    client_key: str
    send_vid: bool
    extras: dict[str, list[str]]  # tags and channels: the same for every row, after the row's vid


def _row_key(row: Any) -> Any:
    """A row's identity as QuickLizard may echo it: keys in any order, a number as a float (30 and 30.0
    are one price), lists as tuples. None for what is not an object (it matches nothing)."""
    if not isinstance(row, dict):
        return None
    try:
        return frozenset((k, float(v) if isinstance(v, int | float) and not isinstance(v, bool)
                          else tuple(v) if isinstance(v, list) else v) for k, v in row.items())
    except TypeError:  # an unhashable value nested deeper: not a row we sent
        return None


class QuickLizardAdapter(Adapter[QuickLizardSite, NoOptions]):
    name = "quicklizard"
    kinds = frozenset({EventKind.PRODUCT_VIEW, EventKind.ORDER})
    Site = QuickLizardSite
    default_base_url = "https://evt.quicklizard.com/events"
    secret_fields = ("client_key",)
    site_url_fields = ("endpoint",)
    needs = frozenset({SITE_ID, PRODUCT_ID, PRODUCT_PRICE, ITEM_PRODUCT_ID, ITEM_UNIT_PRICE,
                       ITEM_QUANTITY})

    example_env = {"QUICKLIZARD_CLIENT_KEY": "demo-client-key"}

    @classmethod
    def example_settings(cls, sandbox_url: str) -> dict[str, Any]:
        return {"base_url": f"{sandbox_url}/quicklizard/events",
                "sites": {"default": {"client_key": "${QUICKLIZARD_CLIENT_KEY}", "channel": "online"}},
                "options": {}}

    def __init__(self, settings: VendorSettings[QuickLizardSite, NoOptions]) -> None:
        super().__init__(settings)
        self._headers = {"Content-Type": "application/json", "User-Agent": settings.user_agent}

    def prepare_site(self, site_id: str, site: QuickLizardSite) -> _Route:
        extras: dict[str, list[str]] = {}
        if site.tags:
            extras["tags"] = site.tags
        if site.channel:
            extras["channels"] = [site.channel]
        return _Route(site.endpoint or self.base_url, site.client_key.get_secret_value(), site.send_vid, extras)

    def rows(self, event: Event, route: _Route) -> list[dict[str, Any]]:
        rec = event.record
        vid: str | None = None
        if route.send_vid:
            visitor = rec["visitor"]
            vid = visitor["vendor_ids"].get("quicklizard_vid") or visitor["visitor_id"]
        if event.kind is EventKind.PRODUCT_VIEW:  # nearly every event: checked and built inline
            product = rec["product"]
            price, product_id = product["price"], product["product_id"]
            permalink = product["url"] or rec["page"]["url"]
            if price is None or not product_id or not permalink:
                require(price, "product.price")
                require(product_id, "product.product_id")
                require(permalink, "product.url")
            row = {"client_key": route.client_key, "price": float(price), "product_id": product_id,
                   "event": "view", "permalink": permalink}
            if vid:
                row["vid"] = vid
            if route.extras:
                row.update(route.extras)
            return [row]
        items = rec["order"]["items"]
        if not items:
            return []  # nothing sold: nothing to send (the event is filtered)
        out = []
        for i, item in enumerate(items):
            units = item["quantity"]  # at least 1 (processor.validation)
            price = round(float(require(item["unit_price"], f"order.items[{i}].unit_price")) * units, 2)
            if price == _INF:
                raise InvalidField(f"order.items[{i}].unit_price", "unit price x quantity is not a finite number")
            row = {
                "client_key": route.client_key,
                "price": price,
                "product_id": require(item["product_id"], f"order.items[{i}].product_id"),
                "event": "conversion",
            }
            if vid:
                row["vid"] = vid
            if route.extras:
                row.update(route.extras)
            row["units"] = units
            out.append(row)
        return out

    def build(self, events: Sequence[Event]) -> Plan:
        """``rows`` of each event, grouped by URL. A view with its price, product id and permalink (nearly
        every event) is built here, as ``rows`` builds it, without a call; everything else goes through
        ``rows``. The site's route and group are looked up again only when the site id changes."""
        plan = Plan()
        by_url: dict[str, tuple[list[Any], ...]] = {}  # URL -> its events, its rows, rows per event
        site: str | None = None
        route: _Route | None = None
        group: tuple[list[Any], ...] | None = None
        extras: dict[str, list[str]]
        client_key, send_vid, extras = "", False, {}
        for event in events:
            rec = event.record
            if rec["site_id"] != site or route is None:  # a new run of one site's events
                site = rec["site_id"]
                route = self.route_or_reject(event, plan)
                if route is None:
                    continue
                group = None  # the URL's group is made with its first event, as before
                client_key, send_vid, extras = route.client_key, route.send_vid, route.extras
            if event.kind is _VIEW:
                product = rec["product"]
                price, product_id = product["price"], product["product_id"]
                permalink = product["url"] or rec["page"]["url"]
                if price is not None and product_id and permalink:
                    if send_vid:
                        visitor = rec["visitor"]
                        vid = visitor["vendor_ids"].get("quicklizard_vid") or visitor["visitor_id"]
                    else:
                        vid = None
                    row = ({"client_key": client_key, "price": float(price), "product_id": product_id,
                            "event": "view", "permalink": permalink, "vid": vid, **extras} if vid else
                           {"client_key": client_key, "price": float(price), "product_id": product_id,
                            "event": "view", "permalink": permalink, **extras})
                    if group is None:
                        group = url_group(by_url, route.url, 3)
                    group[0].append(event)
                    group[1].append(row)
                    group[2].append(1)
                    continue
            try:
                rows = self.rows(event, route)
            except (MissingField, InvalidField) as exc:
                plan.rejected.append((event, str(exc)))
                continue
            if not rows:
                plan.filtered.append(event)
                continue
            if group is None:
                group = url_group(by_url, route.url, 3)
            evs, all_rows, counts = group
            evs.append(event)
            all_rows.extend(rows)
            counts.append(len(rows))
        for url, (evs, all_rows, counts) in by_url.items():
            plan.requests.append(VendorRequest(url=url, content=json_body(all_rows), events=evs,
                                               headers=self._headers, context=(all_rows, counts)))
        return plan

    def interpret(self, request: VendorRequest, response: Response) -> list[Outcome]:
        """Success, as "QL SDK - Server to Server" (API Response Format) shows it: a 200, JSON (or
        unlabelled), an object with the three arrays ``processed``, ``failed`` and ``errors``. Any other
        2xx (a page, an empty body, JSON of another shape) is an unrecognised answer: retried."""
        status, raw = response.status, response.body
        if status != 200:
            if 200 <= status < 300:
                return [self.unrecognised(response)] * len(request.events)
            return [status_outcome(status)] * len(request.events)
        if (raw[:1] == b"{" and (raw[-1:] == b"}" or raw.rstrip()[-1:] == b"}") and response.says_json()
                and (b'"failed":[]' in raw or b'"failed": []' in raw)):
            # the common case, without parsing the echoed events: a JSON object with no failed row
            return [DELIVERED] * len(request.events)
        body = response.json_object()
        if body is None or not all(isinstance(body.get(k), list) for k in ("processed", "failed", "errors")):
            return [self.unrecognised(response)] * len(request.events)
        failed, errors = body["failed"], body["errors"]
        if not failed:
            return [DELIVERED] * len(request.events)
        rows, counts = request.context
        sent = {_row_key(row) for row in rows}
        failed_keys: dict[Any, str] = {}
        unmatched = 0
        for i, row in enumerate(failed):
            key = _row_key(row)
            if key is None or key not in sent:
                unmatched += 1
                continue
            err = errors[i] if isinstance(errors, list) and i < len(errors) else "failed"
            failed_keys.setdefault(key, self.vendor_text(err))
        # Fail closed: with a failed row that matches none sent, an event is delivered only when all its
        # rows are among the processed ones; we cannot tell which event the stray row was.
        processed = body.get("processed") if unmatched else None
        done = {_row_key(row) for row in processed} if isinstance(processed, list) else set()
        outcomes: list[Outcome] = []
        pos = 0
        for n in counts:
            keys = [_row_key(row) for row in rows[pos:pos + n]]
            pos += n
            reasons = [failed_keys[k] for k in keys if k in failed_keys]
            if reasons:
                outcomes.append(rejected(f"quicklizard failed: {reasons[0]}"))
            elif unmatched and not all(k in done for k in keys):
                outcomes.append(rejected(f"quicklizard failed {unmatched} row(s) that match none sent, and this "
                                         "event's rows are not among the processed ones"))
            else:
                outcomes.append(DELIVERED)
        return outcomes
