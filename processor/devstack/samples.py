"""Realistic canonical events for the demo, the tests and the benchmark.

``make_view`` / ``make_order`` build one record (every field filled the way a
shop's producer would); ``Workload`` yields a stream with realistic visitor
cardinality: many distinct visitors, sessions of several product views, a few
percent of sessions ending in an order of 1-5 items. ``encode`` frames a
record as Confluent Schema Registry Avro with the embedded schema ids.
"""

from __future__ import annotations

import copy
import io
import random
import uuid
from collections.abc import Iterator
from typing import Any

from fastavro import parse_schema, schemaless_writer

from processor.codec import EMBEDDED_IDS, confluent_frame, load_canonical_schemas
from processor.events import EventKind

_SCHEMA_IDS = {name: sid for sid, name in EMBEDDED_IDS.items()}
_KIND_SCHEMA = {EventKind.PRODUCT_VIEW: "shop.events.ProductView", EventKind.ORDER: "shop.events.OrderCompleted"}
_PARSED: dict[str, Any] = {}

CATEGORIES = ["shoes", "trainers", "boots", "jackets", "shirts", "bags", "hats", "socks"]
BROWSERS = ["chrome", "firefox", "safari", "edge", "other"]
DEVICES = ["desktop", "mobile", "tablet"]
SOURCES = ["direct", "referral", "search", "campaign"]
UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
      "Chrome/126.0.0.0 Safari/537.36")


def _parsed(kind: EventKind) -> Any:
    name = _KIND_SCHEMA[kind]
    if name not in _PARSED:
        _PARSED[name] = parse_schema(load_canonical_schemas()[name])
    return _PARSED[name]


def encode(kind: EventKind, record: dict[str, Any]) -> bytes:
    """Confluent-framed Avro with the embedded schema id for the kind."""
    buf = io.BytesIO()
    schemaless_writer(buf, _parsed(kind), record)
    return confluent_frame(_SCHEMA_IDS[_KIND_SCHEMA[kind]], buf.getvalue())


def visitor(n: int = 1, session: int = 1) -> dict[str, Any]:
    vid = f"v{n:08d}"
    return {
        "visitor_id": vid,
        "session_id": f"{vid}-s{session}",
        "customer_id": f"c{n:08d}" if n % 3 == 0 else None,
        "vendor_ids": {
            "qubit_visitor_id": f"q{n:08d}-0abc-{n % 97:04d}",
            "convert_visitor_id": f"1588166554499-0.{n:012d}",
            "tracardi_profile_id": str(uuid.UUID(int=n)),
            "tracardi_session_id": str(uuid.UUID(int=(n << 32) + session)),
            "convead_guest_uid": f"guest-{n:08d}",
            **({"convead_visitor_uid": f"c{n:08d}"} if n % 3 == 0 else {}),
        },
    }


def page(n: int = 1, product_url: str | None = None) -> dict[str, Any]:
    return {
        "url": product_url or "https://shop.example.com/p/1",
        "referrer": "https://www.example.org/search?q=shoes",
        "title": "Trail runner X - Example Shop",
        "user_agent": UA,
        "country": ["GB", "DE", "RO", "US"][n % 4],
        "language": ["en-GB", "de-DE", "ro-RO", "en-US"][n % 4],
        "device": DEVICES[n % 3],
        "browser": BROWSERS[n % 5],
        "traffic_source": SOURCES[n % 4],
        "campaign": "autumn-sale" if n % 4 == 3 else None,
        "returning_visitor": n % 2 == 0,
    }


def product(p: int = 1) -> dict[str, Any]:
    return {
        "product_id": f"P-{p:05d}",
        "sku": f"SKU-{p:05d}-42",
        "name": f"Trail runner model {p}",
        "categories": [CATEGORIES[p % 8], CATEGORIES[(p + 3) % 8]],
        "price": round(10 + (p % 190) * 1.25, 2),
        "currency": "GBP",
        "url": f"https://shop.example.com/p/{p}",
        "image_url": f"https://cdn.example.com/img/{p}.jpg",
    }


def make_view(n: int = 1, p: int = 1, site_id: str = "shop-1", event_time: int = 1_700_000_000_000,
              session: int = 1, **overrides: Any) -> dict[str, Any]:
    prod = product(p)
    rec = {
        "event_id": f"pv-{n}-{session}-{p}-{event_time}",
        "event_time": event_time,
        "site_id": site_id,
        "visitor": visitor(n, session),
        "page": page(n, prod["url"]),
        "experiments": [{"experience_id": "100123", "variation_id": "100456"}] if n % 2 else [],
        "product": prod,
        "customer": None,
    }
    rec.update(overrides)
    return rec


def make_order(n: int = 1, items: int = 2, site_id: str = "shop-1", event_time: int = 1_700_000_000_000,
               session: int = 1, **overrides: Any) -> dict[str, Any]:
    lines = []
    for i in range(items):
        prod = product(n + i)
        lines.append({
            "product_id": prod["product_id"], "sku": prod["sku"], "name": prod["name"],
            "quantity": 1 + (i % 3), "unit_price": prod["price"], "url": prod["url"],
            "image_url": prod["image_url"], "categories": prod["categories"],
        })
    rec = {
        "event_id": f"ord-{n}-{session}-{event_time}",
        "event_time": event_time,
        "site_id": site_id,
        "visitor": visitor(n, session),
        "page": page(n, "https://shop.example.com/checkout/thank-you"),
        "experiments": [{"experience_id": "100123", "variation_id": "100456"}] if n % 2 else [],
        "order": {
            "order_id": f"O-{n}-{session}",
            "currency": "GBP",
            "total": round(sum(line["unit_price"] * line["quantity"] for line in lines), 2),
            "items": lines,
        },
        "customer": {"email": f"user{n}@example.com", "phone": "+44 20 7946 0000",
                     "first_name": "Sam", "last_name": "Example"} if n % 3 == 0 else None,
    }
    rec.update(overrides)
    return rec


def with_changes(record: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of record with one dotted path set (tests: make a field invalid)."""
    out = copy.deepcopy(record)
    node = out
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[keys[-1]] = value
    return out


class Workload:
    """A deterministic stream of (kind, record, key) with realistic visitor cardinality.

    visitors: distinct visitors; each visit is a session of 1..max_views product
    views; order_rate of sessions end with an order of 1-5 items."""

    def __init__(self, visitors: int = 50_000, max_views: int = 6, order_rate: float = 0.04,
                 sites: tuple[str, ...] = ("shop-1",), seed: int = 7, start_ms: int | None = None) -> None:
        self.visitors = visitors
        self.max_views = max_views
        self.order_rate = order_rate
        self.sites = sites
        self.rng = random.Random(seed)
        self.start_ms = start_ms

    def __iter__(self) -> Iterator[tuple[EventKind, dict[str, Any], bytes]]:
        rng = self.rng
        sessions: dict[int, int] = {}
        seq = 0
        while True:
            n = rng.randrange(1, self.visitors + 1)
            session = sessions[n] = sessions.get(n, 0) + 1
            site = self.sites[n % len(self.sites)]
            key = f"v{n:08d}".encode()
            for _ in range(rng.randint(1, self.max_views)):
                seq += 1
                t = (self.start_ms or 1_700_000_000_000) + seq
                rec = make_view(n, rng.randrange(1, 5000), site, t, session)
                rec["event_id"] = f"pv-{seq}"
                yield EventKind.PRODUCT_VIEW, rec, key
            if rng.random() < self.order_rate:
                seq += 1
                t = (self.start_ms or 1_700_000_000_000) + seq
                rec = make_order(n, rng.randint(1, 5), site, t, session)
                rec["event_id"] = f"ord-{seq}"
                yield EventKind.ORDER, rec, key


def as_event(kind: EventKind, record: dict[str, Any], offset: int = 0, topic: str = "shop.events",
             partition: int = 0) -> Any:
    """A canonical Event as the relay would hold it after decoding (unit tests)."""
    from processor.events import Event, Source

    value = encode(kind, record)
    return Event.of(kind, record, Source(topic, partition, offset, record["event_time"], b"k", value, None))
