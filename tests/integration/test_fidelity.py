"""Vendor fidelity through ``processor run``: a producer's mistakes (NaN and infinite amounts, an event time in
seconds, a line of 0 units) among normal events reach no vendor as wrong data. Each is dead-lettered, naming
the field, for the vendors that need that field and delivered to the others; every request the twins got
parsed as strict JSON (the twins refuse NaN and Infinity) and holds no null; every count reconciles."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

from processor.deadletter import headers_dict
from processor.devstack.kafka_io import produce
from processor.devstack.samples import encode, make_order, make_view, with_changes
from processor.events import EventKind
from processor.vendors import REGISTRY
from tests.integration.test_all_vendors import settled_and_dead_letters, start_relay, workload_messages
from tests.unit.vendors.test_fidelity import no_null

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
SENDS_PRICE = {"quicklizard", "tracardi", "convead"}  # a view's price, a line's unit price
SENDS_TOTAL = {"qubit", "convert", "tracardi", "convead"}
SENDS_TIME = {"qubit", "tracardi"}
SENDS_UNITS = {"quicklizard", "convert", "tracardi", "convead"}
# key -> (kind, record, the vendors that dead-letter it, the reason in the dead-letter header)
BAD: dict[bytes, tuple[EventKind, dict[str, Any], set[str], str]] = {
    b"nan-price": (VIEW, with_changes(make_view(901, 1), "product.price", math.nan), SENDS_PRICE,
                   "product.price is NaN"),
    b"inf-price": (VIEW, with_changes(make_view(903, 2), "product.price", math.inf), SENDS_PRICE,
                   "product.price is Infinity"),
    b"neg-inf-line": (ORDER, with_changes(make_order(905, 2), "order.items.1.unit_price", -math.inf), SENDS_PRICE,
                      "order.items[1].unit_price is -Infinity"),
    b"nan-total": (ORDER, with_changes(make_order(907, 2), "order.total", math.nan), SENDS_TOTAL,
                   "order.total is NaN"),
    # a long number is redacted in a dead-letter reason (it could be a phone number): the field and the
    # mistake stay
    b"seconds": (VIEW, with_changes(make_view(909, 3), "event_time", 1_764_000_000), SENDS_TIME,
                 "event_time <number> looks like seconds, not milliseconds"),
    b"zero-units": (ORDER, with_changes(make_order(911, 2), "order.items.0.quantity", 0), SENDS_UNITS,
                    "order.items[0].quantity is 0, not a count of units sold (at least 1)"),
    b"gift-card": (ORDER, with_changes(make_order(913, 1), "order.items", []), set(), ""),
}


def test_a_producers_mistakes_are_dead_lettered_naming_the_field_only_where_a_vendor_needs_it(
        broker, topics, sandbox, relays):
    messages, kinds = workload_messages(300)
    for i, (key, (kind, rec, _, _)) in enumerate(BAD.items()):
        rec["event_id"] = key.decode()
        messages.insert(20 + 30 * i, (key, encode(kind, rec)))
        kinds[kind] += 1
    produce(broker.bootstrap, topics.events, messages)
    relay, env = start_relay(broker, topics, sandbox, relays)

    settled, dlq = settled_and_dead_letters(broker, topics, relay, kinds)  # delivered+filtered+dead = produced
    got: dict[bytes, dict[str, tuple[str, str]]] = {key: {} for key in BAD}
    for m in dlq:
        h = headers_dict(m.headers())
        assert m.key() in BAD, (m.key(), h)  # only the mistakes are dead-lettered
        got[m.key()][h["relay.vendor"]] = (h["relay.error_class"], h["relay.reason"])
    for key, (_, _, vendors, reason) in BAD.items():
        assert got[key] == dict.fromkeys(vendors, ("rejected", reason)), key
    assert {v: c["dead_lettered"] for v, c in settled.items()} == {
        v: sum(v in vendors for _, _, vendors, _ in BAD.values()) for v in REGISTRY}
    assert settled["quicklizard"]["filtered"] >= 1  # the gift card: no product sold to report

    # every request parsed as strict JSON and passed the twin's checks (nothing refused), no null received
    stats = sandbox.stats()
    for vendor in REGISTRY:
        assert stats[vendor].get("rejected", 0) == 0, (vendor, stats[vendor])
        received = sandbox.received(vendor)
        assert len(received) >= settled[vendor]["delivered"] > 0, vendor
        for item in received:
            # Tracardi's twin records the event as Tracardi stores it (its session's device may have no brand):
            # what the relay sent is the event's properties and context
            no_null({k: item[k] for k in ("properties", "context")} if vendor == "tracardi" else item)

    # the reasons as an operator sees them: ``processor dlq inspect``
    inspect = subprocess.run([sys.executable, "-m", "processor.cli", "dlq", "inspect", "--config",
                              str(relay.config_path), "--json"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **env})
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    reasons = {r["reason"] for r in json.loads(inspect.stdout)["top_reasons"]}
    # (the test broker reports a partition's end as the first offset of its last batch, so inspect may not
    # reach the last records: it shows some of the reasons, and only these)
    assert reasons and reasons <= {reason for _, _, vendors, reason in BAD.values() if vendors}, reasons
    assert relay.stop() == 0
