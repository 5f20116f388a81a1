"""QuickLizard server-to-server SDK events (vendor-docs/quicklizard-server-to-server.txt).

POST a JSON array of events to the account's endpoint (two hosts are
documented; the account's integration settings name the right one, so it is
configurable per site). A product view is one ``view`` event; an order is one
``conversion`` event per line item with ``price`` = unit price x units.
The response ``{processed, failed, errors}`` is mapped back per event: a
canonical event is rejected when any of its rows is in ``failed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from pydantic import Field, SecretStr

from processor.events import Event, EventKind
from processor.vendors.base import (
    DELIVERED,
    Adapter,
    Frozen,
    MissingField,
    NoOptions,
    Outcome,
    Plan,
    Response,
    VendorRequest,
    rejected,
    require,
    status_outcome,
)


class QuickLizardSite(Frozen):
    client_key: SecretStr
    endpoint: str | None = Field(None, description="per-site endpoint (default: the vendor base_url)")
    tags: list[str] = Field(default_factory=list, description="tags added to every event")
    channel: str | None = Field(None, description="pricing channel (conversions carry at most one)")
    send_vid: bool = Field(True, description="send the anonymous visitor id as vid")


def _row_key(row: dict[str, Any]) -> bytes:
    return orjson.dumps(row, option=orjson.OPT_SORT_KEYS)


class QuickLizardAdapter(Adapter[QuickLizardSite, NoOptions]):
    name = "quicklizard"
    kinds = frozenset({EventKind.PRODUCT_VIEW, EventKind.ORDER})
    Site = QuickLizardSite
    default_base_url = "https://evt.quicklizard.com/events"

    example_env = {"QUICKLIZARD_CLIENT_KEY": "demo-client-key"}

    @classmethod
    def example_settings(cls, sandbox_url: str) -> dict[str, Any]:
        return {"base_url": f"{sandbox_url}/quicklizard/events",
                "sites": {"default": {"client_key": "${QUICKLIZARD_CLIENT_KEY}", "channel": "online"}},
                "options": {}}

    def rows(self, event: Event, site: QuickLizardSite) -> list[dict[str, Any]]:
        rec = event.record
        visitor = rec["visitor"]
        common: dict[str, Any] = {"client_key": site.client_key.get_secret_value()}
        vid = visitor["vendor_ids"].get("quicklizard_vid") or visitor["visitor_id"]
        if event.kind is EventKind.PRODUCT_VIEW:
            product = rec["product"]
            row = {
                **common,
                "price": float(require(product["price"], "product.price")),
                "product_id": require(product["product_id"], "product.product_id"),
                "event": "view",
                "permalink": require(product["url"] or rec["page"]["url"], "product.url"),
            }
            if site.send_vid and vid:
                row["vid"] = vid
            if site.tags:
                row["tags"] = site.tags
            if site.channel:
                row["channels"] = [site.channel]
            return [row]
        items = require(rec["order"]["items"], "order.items")
        out = []
        for i, item in enumerate(items):
            units = item["quantity"]
            if units is None or units < 1:
                raise MissingField(f"order.items[{i}].quantity")
            row = {
                **common,
                "price": round(float(require(item["unit_price"], f"order.items[{i}].unit_price")) * units, 2),
                "product_id": require(item["product_id"], f"order.items[{i}].product_id"),
                "event": "conversion",
            }
            if site.send_vid and vid:
                row["vid"] = vid
            if site.tags:
                row["tags"] = site.tags
            if site.channel:
                row["channels"] = [site.channel]
            row["units"] = units
            out.append(row)
        return out

    def plan(self, events: Sequence[Event]) -> Plan:
        plan = Plan()
        by_url: dict[str, tuple[list[Event], list[dict[str, Any]], list[int]]] = {}
        for event in events:
            site = self.site(event)
            if site is None:
                plan.rejected.append((event, self.no_site_reason(event)))
                continue
            try:
                rows = self.rows(event, site)
            except MissingField as exc:
                plan.rejected.append((event, str(exc)))
                continue
            url = site.endpoint or self.base_url
            evs, all_rows, counts = by_url.setdefault(url, ([], [], []))
            evs.append(event)
            all_rows.extend(rows)
            counts.append(len(rows))
        for url, (evs, all_rows, counts) in by_url.items():
            plan.requests.append(
                VendorRequest(
                    url=url,
                    content=orjson.dumps(all_rows),
                    events=evs,
                    headers={"Content-Type": "application/json", "User-Agent": self.settings.user_agent},
                    context=(all_rows, counts),
                )
            )
        return plan

    def interpret(self, request: VendorRequest, response: Response) -> list[Outcome]:
        if response.status != 200:
            return [status_outcome(response.status)] * len(request.events)
        if b'"failed":[]' in response.body or b'"failed": []' in response.body:
            return [DELIVERED] * len(request.events)  # the common case, without parsing the echoed events
        try:
            body = response.json()
            failed = body.get("failed") or []
            errors = body.get("errors") or []
        except (orjson.JSONDecodeError, AttributeError):
            return [status_outcome(502, "response is not the documented JSON")] * len(request.events)
        if not failed:
            return [DELIVERED] * len(request.events)
        failed_keys: dict[bytes, str] = {}
        for i, row in enumerate(failed):
            if isinstance(row, dict):
                err = errors[i] if i < len(errors) else "failed"
                failed_keys[_row_key(row)] = str(err)[:200]
        rows, counts = request.context
        outcomes: list[Outcome] = []
        pos = 0
        for n in counts:
            reasons = [failed_keys[k] for k in map(_row_key, rows[pos:pos + n]) if k in failed_keys]
            pos += n
            outcomes.append(rejected(f"quicklizard failed: {reasons[0]}") if reasons else DELIVERED)
        return outcomes
