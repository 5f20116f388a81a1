"""Shared fixtures for adapter tests: the sandbox on a free loopback port, and a way
to send an adapter's planned requests to it and read back the per-event outcomes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from processor.events import Event, Source
from processor.sandbox import SandboxServer
from processor.vendors.base import Adapter, Outcome, Response, VendorRequest


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    server = SandboxServer("127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def exchange(adapter: Adapter, requests: list[VendorRequest]) -> list[tuple[Response, list[Outcome]]]:
    """Send each request as the relay would (no retries) and interpret the answer."""
    out = []
    async with httpx.AsyncClient(timeout=10) as client:
        for req in requests:
            r = await client.request(req.method, req.url, content=req.content, headers=dict(req.headers))
            resp = Response(r.status_code, r.headers, r.content)
            outcomes = adapter.interpret(req, resp)
            assert len(outcomes) == len(req.events)
            out.append((resp, outcomes))
    return out


def varied_events() -> list[Any]:
    """Views and orders of three sites (one no config may name), each in the common shape and with one
    field an adapter reads changed (codes to normalise or default, empty ids and URLs, a missing vendor
    id, an order without lines, an int where a float is sent), interleaved: what an adapter's
    hand-inlined path must treat exactly as its plain one."""
    from processor.devstack.samples import make_order, make_view, with_changes
    from processor.events import EventKind

    view_changes = [
        ("visitor.vendor_ids.qubit_visitor_id", ""), ("visitor.vendor_ids.quicklizard_vid", "qlv"),
        ("visitor.visitor_id", ""), ("page.language", "en_gb"), ("page.language", ""),
        ("page.country", "gb"), ("page.country", "GBR"), ("product.currency", "eur"), ("product.currency", ""),
        ("product.currency", "EURO"), ("page.url", ""), ("product.url", ""), ("product.price", 0.0),
        ("product.price", 10), ("product.product_id", ""), ("product.name", "null"),
    ]
    order_changes = [
        ("order.items", []), ("order.order_id", ""), ("order.total", 0.0), ("order.currency", "usd"),
        ("order.currency", ""), ("order.items.0.quantity", 3), ("order.items.1.product_id", ""),
        ("order.items.0.unit_price", 1e308), ("page.url", ""), ("visitor.vendor_ids.qubit_visitor_id", ""),
    ]
    records = []
    for i in range(60):
        site = f"shop-{1 + i % 3}"
        if i % 5 == 4:
            path, value = order_changes[i // 5 % len(order_changes)]
            records.append((EventKind.ORDER, with_changes(make_order(i, items=1 + i % 3, site_id=site), path, value)))
        elif i % 2:
            path, value = view_changes[i // 2 % len(view_changes)]
            records.append((EventKind.PRODUCT_VIEW, with_changes(make_view(i, i, site_id=site), path, value)))
        else:
            records.append((EventKind.PRODUCT_VIEW, make_view(i, i, site_id=site)))
    records += [(EventKind.PRODUCT_VIEW, with_changes(make_view(100 + i, 1), path, value))
                for i, (path, value) in enumerate(view_changes)]
    return [Event.of(kind, rec, Source("t", 0, off, 1_700_000_000_000, b"k", b"v", None))
            for off, (kind, rec) in enumerate(records)]


def plain_build(adapter: Adapter, events: list[Any], rows_of: Any) -> tuple[dict[str, tuple[list[Any], list[Any],
                                                                                    list[int]]], list[Any], list[Any]]:
    """What ``build`` must make, the plain way: per event its site's route (else rejected), ``rows_of(event,
    route)`` (a MissingField or InvalidField: rejected; no rows: filtered), grouped by URL in order of each
    URL's first row: URL -> (events, rows, rows per event); and the rejected and filtered events."""
    from processor.vendors.base import InvalidField, MissingField

    groups: dict[str, tuple[list[Any], list[Any], list[int]]] = {}
    rejected: list[Any] = []
    filtered: list[Any] = []
    for ev in events:
        route = adapter.routes.get(ev.record["site_id"], adapter.default_route)
        if route is None:
            rejected.append((ev, adapter.no_site_reason(ev)))
            continue
        try:
            rows = rows_of(ev, route)
        except (MissingField, InvalidField) as exc:
            rejected.append((ev, str(exc)))
            continue
        if not rows:
            filtered.append(ev)
            continue
        evs, all_rows, counts = groups.setdefault(route.url, ([], [], []))
        evs.append(ev)
        all_rows.extend(rows)
        counts.append(len(rows))
    return groups, rejected, filtered
