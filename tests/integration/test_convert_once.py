"""Convert counts each conversion once, through ``processor run`` in the production shape (schema registry,
parking on): the twin counts what it recorded per (visitor, goal), per order and per bucketing, as Convert
does without ``enrichData``.

Each visitor views five products (one view goal) and orders twice, each step a round of its own, so the
relay's memory of what it delivered is what keeps the repeats out (one request per visitor and round, none
in flight together); one order is produced again (a producer's retry). Every count is 1 with the memory large
enough. Then the relay restarts: its memory is empty, and the visitors' next views send their goal and
bucketing again, as the README says a restart does (``enrichData`` is the cure)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from processor.devstack.kafka_io import produce
from processor.devstack.samples import encode, make_order, make_view
from processor.events import EventKind
from tests.integration.conftest import http_json, relay_config, wait_for

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
OUTCOMES = ("delivered", "filtered", "dead_lettered", "parked")
VISITORS = range(1, 9)  # odd visitors are in an experiment, even ones in none; shop-1 /track, shop-2 v1
SITES = {"shop-1": "10023736", "shop-2": "10023737"}


def site(n: int) -> str:
    return "shop-1" if n % 4 in (1, 2) else "shop-2"


def convert_vendor(sandbox: Any) -> dict[str, Any]:
    common = {"account_id": "10022898", "view_goals": [100234], "order_goals": [100235]}
    return {
        "base_url": f"{sandbox.url}/convert",
        "batch": {"max_events": 100, "max_wait_ms": 200},
        "retry": {"max_attempts": 4, "base_delay_ms": 50, "max_delay_ms": 200, "max_elapsed_s": 10},
        "sites": {"shop-1": {**common, "project_id": SITES["shop-1"]},
                  "shop-2": {**common, "project_id": SITES["shop-2"], "api": "v1", "enrich_data": False}},
        "options": {"memory_size": 10_000},
    }


def settled(relay: Any) -> float:
    return sum(relay.metric("processor_vendor_events_total", vendor="convert", outcome=o) for o in OUTCOMES)


class Rounds:
    """Produce a round of events and wait (bounded) until the relay settled every event so far."""

    def __init__(self, broker: Any, topic: str) -> None:
        self.broker, self.topic, self.sent = broker, topic, 0

    def __call__(self, relay: Any, events: list[tuple[EventKind, dict[str, Any]]]) -> None:
        produce(self.broker.bootstrap, self.topic,
                [(rec["visitor"]["visitor_id"].encode(), encode(kind, rec)) for kind, rec in events])
        self.sent += len(events)
        wait_for(lambda: relay.alive_or_fail() and settled(relay) >= self.sent, 60,
                 f"the relay to settle {self.sent} events")


def views(p: int, t: int) -> list[tuple[EventKind, dict[str, Any]]]:
    return [(VIEW, make_view(n, p, site_id=site(n), event_time=t)) for n in VISITORS]


def orders(session: int, t: int) -> list[tuple[EventKind, dict[str, Any]]]:
    return [(ORDER, make_order(n, session=session, site_id=site(n), event_time=t)) for n in VISITORS]


def visitor_key(n: int) -> str:
    return f"{SITES[site(n)]}/1588166554499-0.{n:012d}"


def test_each_conversion_counts_once_and_a_restart_repeats_what_the_readme_says(broker, topics, sandbox, relays):
    config = relay_config(broker, topics, sandbox, {"convert": convert_vendor(sandbox)})
    relay = relays(config, "convert")
    relay.wait_ready()
    rounds = Rounds(broker, topics.events)
    t = 1_700_000_000_000
    for p in range(1, 6):  # five products, one view goal
        rounds(relay, views(p, t + p))
    rounds(relay, orders(1, t + 10))
    rounds(relay, orders(2, t + 11))  # a second order: a second conversion
    rounds(relay, orders(1, t + 10)[:4])  # the first orders of four visitors again (a producer's retry)

    counts = http_json(f"{sandbox.url}/_sandbox/convert/conversions")
    goals, order_ids = Counter(counts["goals"]), Counter(counts["orders"])
    transactions, bucketings = Counter(counts["transactions"]), Counter(counts["bucketings"])
    v1 = [n for n in VISITORS if site(n) == "shop-2"]
    assert goals == {**{f"{visitor_key(n)}/100234": 1 for n in VISITORS},  # the view goal
                     **{f"{visitor_key(n)}/100235": 1 for n in v1}}  # the order goal's first conversion (v1)
    assert order_ids == {f"{visitor_key(n)}/100235/O-{n}-{s}": 1 for n in v1 for s in (1, 2)}
    assert transactions == {f"{visitor_key(n)}/100235": 2 for n in VISITORS}  # two orders each
    assert bucketings == {f"{visitor_key(n)}/100123": 1 for n in VISITORS if n % 2}
    assert relay.metric("processor_vendor_memory_total", vendor="convert", result="hit") > 0
    assert relay.metric("processor_vendor_memory_total", vendor="convert", result="eviction") == 0
    assert relay.metric("processor_vendor_events_total", vendor="convert", outcome="dead_lettered") == 0
    assert relay.metric("processor_vendor_events_total", vendor="convert", outcome="filtered") > 0
    assert sandbox.stats()["convert"].get("rejected", 0) == 0

    assert relay.stop() == 0
    relay = relays(config, "convert-restarted")
    relay.wait_ready()
    rounds.sent = 0  # the new process counts from 0
    rounds(relay, views(6, t + 20))
    counts = http_json(f"{sandbox.url}/_sandbox/convert/conversions")
    # a restart forgets: each visitor's view goal and bucketing are sent again, nothing else
    assert Counter(counts["goals"]) == goals + Counter({f"{visitor_key(n)}/100234": 1 for n in VISITORS})
    assert Counter(counts["bucketings"]) == bucketings + bucketings
    assert Counter(counts["orders"]) == order_ids and Counter(counts["transactions"]) == transactions
    assert relay.stop() == 0
