"""Golden plans of the adapters that send about one request per event or visitor (Convead, Tracardi, Convert
in both its APIs): each request's method, URL, headers, body, events and context, each rejection with its
reason and each filtered event, in order, over workload batches and over mutated events (odd URLs, empty and
missing fields, odd ids, times across a day and beyond what a float second holds to the microsecond, other
sites), compared byte for byte with digests recorded from the mappings as they were before their per-event
cost was cut (commit b9276a2). A change to a single byte of any of them fails here naming the case; a change
meant to alter what is sent re-records the digests with ``python -m tests.unit.vendors.test_golden_plans
--write`` and says why in its commit."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from processor.config import interpolate
from processor.devstack.samples import Workload, make_order, make_view, with_changes
from processor.events import Event, EventKind, Source
from processor.vendors import adapter_class
from processor.vendors.base import Adapter, Plan

GOLDEN = Path(__file__).with_name("golden_plans.json")
VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
NEW_YEAR = 1_767_225_600_000  # 2026-01-01T00:00:00.000Z: workload times cross a day, a month and a year
FAR = 9_999_999_999_999  # 2286: ms / 1000 no longer holds the millisecond exactly as a float second

# vendor -> config name -> settings section (secrets as ${VAR}, from example_env)
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "convead": {
        "example": {},
        "info": {"sites": {"shop-1": {"app_key": "k y+%&=é~", "send_visitor_info": True},
                           "shop-2": {"app_key": "${CONVEAD_APP_KEY}", "domain": "Shop-Two.Example.COM"}}},
    },
    "tracardi": {
        "example": {},
        "options": {"sites": {"shop-1": {"source_id": "${TRACARDI_SOURCE_ID}", "base_url": "https://t.example.com/",
                                         "event_types": {"order": "checkout"}, "event_options": {"saveEvent": True},
                                         "tags": ["relay", "shop-1"]},
                              "default": {"source_id": "src-default", "context": {}}},
                    "options": {"event_types": {"product_view": "view-product"}, "without_profile": "skip"}},
        "legacy": {"options": {"event_schema": "legacy", "bots": "send"}},
    },
    "convert": {
        "example": {},
        "v1": {"sites": {"default": {"account_id": "1", "project_id": "2", "api": "v1", "enrich_data": True,
                                     "secret": "${CONVERT_TRACKING_SECRET}", "order_goals": [7, 8],
                                     "visitor_id_fallback": False},
                         "shop-2": {"account_id": "1", "project_id": "3", "view_goals": [5],
                                    "customer_segments": ["a", "b"]}},
               "user_agent": "shop-relay/2"},
    },
}

_ODD_URLS = [None, "", "https://[::1]:8080/p", "http://[::1/p", "HTTPS://Shop.Example.COM:8443/P;x?q=/a#f",
             "https://u:p@shop.example.com/p", "/relative/path?x", "https://shop.example.com",
             "https://shop.example.com#f/x?y", "https://\uff53hop.example.com/p", "https://\u2100.com/x",
             "https://sh op.example.com/p q", "https://shop.example.com/p\n/q", "ftp://files.example.com/a",
             "https:///p", "https://Host%ETH0/p", "https://shop.example.com/Кроссовки?q=100% + ~&x=é"]
_TEXT = ["", None, "Кроссовки — 100% + ~ & = ?", "a\x00b\x7f\"\\/"]
# (kind, path, values): each value makes a case of its own
MUTATIONS: list[tuple[EventKind, str, list[Any]]] = [
    (VIEW, "page.url", _ODD_URLS),
    (ORDER, "page.url", [None, "https://[::1]/checkout", "https://Shop.Example.com:443/thanks?o=1"]),
    (VIEW, "page.title", _TEXT),
    (VIEW, "page.referrer", _TEXT),
    (VIEW, "page.browser", [None, "", "lynx", "safari", "edge"]),
    (VIEW, "page.device", [None, "", "tablet", "mobile", "tv"]),
    (VIEW, "page.user_agent", [None, "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0)", "Mozilla/5.0 (iPad)"]),
    (VIEW, "page.country", [None, "", "gb", "Germany", "XX", "ROU"]),
    (VIEW, "page.language", [None, ""]),
    (VIEW, "page.traffic_source", [None, "", "email", "search"]),
    (VIEW, "page.campaign", [None, "", "spring % sale"]),
    (VIEW, "page.returning_visitor", [None, True, False]),
    (VIEW, "product.name", ["", None, "Кроссовки \"X\" 100%"]),
    (VIEW, "product.sku", ["", None]),
    (VIEW, "product.url", ["", None]),
    (VIEW, "product.image_url", ["", None]),
    (VIEW, "product.product_id", ["", "P 1+2%"]),
    (VIEW, "product.price", [0.0, math.nan, 1e21, 0.1 + 0.2]),
    (VIEW, "product.categories", [[], ["a"]]),
    (VIEW, "product.currency", ["", "EUR"]),
    (VIEW, "visitor.vendor_ids", [{}, {"convead_visitor_uid": "User_2", "convead_guest_uid": "g 1+%&"},
                                  {"convead_visitor_uid": "abc-123"}, {"convead_visitor_uid": "Bad!"},
                                  {"convead_guest_uid": "guest-1", "tracardi_session_id": "s-1"},
                                  {"tracardi_profile_id": "p-1", "convert_visitor_id": "c-1"},
                                  {"tracardi_profile_id": "", "tracardi_session_id": "", "convert_visitor_id": ""}]),
    (VIEW, "visitor.session_id", ["", "another-session"]),
    (VIEW, "visitor.visitor_id", [""]),
    (VIEW, "visitor.customer_id", [None, "c1"]),
    (VIEW, "experiments", [[], [{"experience_id": "1", "variation_id": "2"}] * 2
                           + [{"experience_id": "3", "variation_id": "4"}],
                           [{"experience_id": "", "variation_id": "2"}], [{"experience_id": "1", "variation_id": ""}]]),
    (VIEW, "event_time", [978_307_200_000, NEW_YEAR - 1, NEW_YEAR, 1_700_000_000, FAR]),
    (VIEW, "event_id", ["", "id with spaces"]),
    (VIEW, "site_id", ["shop-2", "shop-9", ""]),
    (VIEW, "customer", [{"first_name": "Ana", "last_name": "", "email": "a+b@example.com", "phone": None}]),
    (ORDER, "order.items", [[]]),
    (ORDER, "order.items.0.url", [None, ""]),
    (ORDER, "order.items.0.image_url", [None, ""]),
    (ORDER, "order.items.0.name", [None, ""]),
    (ORDER, "order.items.0.sku", [None, ""]),
    (ORDER, "order.items.0.product_id", [""]),
    (ORDER, "order.items.0.quantity", [0, 7]),
    (ORDER, "order.items.0.unit_price", [0.0, math.inf]),
    (ORDER, "order.total", [0.0, math.nan, 12345678.9]),
    (ORDER, "order.order_id", ["", "O 1/2"]),
    (ORDER, "order.currency", [""]),
    (ORDER, "customer", [None, {"first_name": "", "last_name": "", "email": "", "phone": ""},
                         {"first_name": "Ана", "last_name": "O'Neil", "email": "x@y.z", "phone": "+1 (555)"}]),
    (ORDER, "experiments", [[]]),
    (ORDER, "site_id", ["shop-2"]),
    (ORDER, "event_time", [NEW_YEAR, FAR]),
]


def adapter(vendor: str, config: str) -> Adapter[Any, Any]:
    cls = adapter_class(vendor)
    section = {**cls.example_settings("http://sandbox.test:8080"), **CONFIGS[vendor][config]}
    return cls(cls.settings_model().model_validate(interpolate(section, "", cls.example_env)))


def event(kind: EventKind, rec: dict[str, Any], offset: int) -> Event:
    # the Kafka timestamp is the validation's reference: a day after the event, so every time above is valid
    return Event.of(kind, rec, Source("shop.events", 0, offset, rec["event_time"] + 1000, b"k", b"v", None))


def cases() -> Iterator[tuple[str, list[Event]]]:
    """(name, batch): workload batches, then each mutation on two visitors (with and without a customer,
    experiments, a convead_visitor_uid), then all mutated events in one batch."""
    stream = Workload(visitors=40, sites=("shop-1", "shop-2", "shop-9"), seed=11, start_ms=NEW_YEAR - 700)
    records = list(itertools.islice(iter(stream), 1200))
    for i in range(0, len(records), 200):
        yield f"workload-{i}", [event(kind, rec, i + j) for j, (kind, rec, _) in enumerate(records[i:i + 200])]
    everything: list[Event] = []
    for kind, path, values in MUTATIONS:
        for v, value in enumerate(values):
            batch = [event(kind, with_changes(base, path, value), len(everything) + k)
                     for k, base in enumerate((make_view(3, 7), make_view(2, 8)) if kind is VIEW
                                              else (make_order(3, 3), make_order(2, 2)))]
            everything += batch
            yield f"{kind.value}:{path}:{v}", batch
    yield "mutations-together", everything


def plan_digest(events: list[Event], plan: Plan) -> str:
    """A digest of everything the plan holds, in order; events by their place in the batch."""
    index = {id(e): i for i, e in enumerate(events)}
    text = repr(([(r.method, r.url, list(r.headers.items()), r.content, [index[id(e)] for e in r.events], r.context)
                  for r in plan.requests],
                 [(index[id(e)], why) for e, why in plan.rejected],
                 [index[id(e)] for e in plan.filtered]))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def digests() -> dict[str, str]:
    out = {}
    batches = list(cases())
    for vendor, configs in CONFIGS.items():
        for config in configs:
            a = adapter(vendor, config)
            for name, batch in batches:
                out[f"{vendor}/{config}/{name}"] = plan_digest(batch, a.plan(batch))
    return out


def test_plans_are_the_recorded_ones_byte_for_byte():
    recorded = json.loads(GOLDEN.read_text())
    got = digests()
    assert sorted(got) == sorted(recorded), "the cases changed: re-record (see the module's docstring)"
    differ = [case for case in got if got[case] != recorded[case]]
    assert not differ, f"{len(differ)} plans differ from the recorded ones, first: {differ[:10]}"


@pytest.mark.parametrize("vendor", sorted(CONFIGS))
def test_cases_reach_requests_rejections_and_filters(vendor):
    """The cases exercise every outcome of planning for each vendor (a digest of empty plans pins nothing)."""
    plans = [adapter(vendor, config).plan(batch) for config in CONFIGS[vendor] for _, batch in cases()]
    assert sum(len(p.requests) for p in plans) > 500
    # Convert sends a visitor's goal and bucketing once: its repeats within a batch are filtered
    assert sum(len(r.events) for p in plans for r in p.requests) > (700 if vendor == "convert" else 2500)
    assert sum(len(p.rejected) for p in plans) > 50
    if vendor != "convead":  # Convead filters nothing
        assert sum(len(p.filtered) for p in plans) > 5


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.write_text(json.dumps(digests(), indent=0, sort_keys=True) + "\n")
