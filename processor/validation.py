"""Validation: what the canonical schemas mean, checked once per decoded event before any vendor sees it.

Avro says a price is a double and ``event_time`` a long; the schemas' docs say more, and a producer's
mistakes break that: a NaN or infinite price (JSON has neither: a JSON encoder writes ``null`` or
invalid JSON), an ``event_time`` in seconds (a vendor files it in January 1970), an empty id. The rules:

==============================  ==============================================================
field (key in ``Adapter.needs``)  rule
==============================  ==============================================================
product.price                   a finite number, not negative (0 is a price: free items exist)
order.total                     a finite number, not negative
order.items.unit_price          a finite number, not negative
order.items.quantity            at least 1 (a line sells units)
event_time                      epoch milliseconds after 2001-01-01 and at most a day ahead of
                                the message's Kafka timestamp (the wall clock when it has none)
event_id, site_id,              not empty (nor only white space)
product.product_id,
order.order_id,
order.items.product_id,
experiments.experience_id,
experiments.variation_id
==============================  ==============================================================

``check`` makes one pass over an event and answers None (the common case: no object made) or the
violations, field key -> reason (``"product.price is NaN"``, ``"order.items[2].quantity is 0, not a
count of units sold"``, ``"event_time 1764000000 looks like seconds, not milliseconds"``). The key is
the canonical path without list indexes; the reason names the element. The result is kept on the
event (``Event.invalid``), so validation runs once per event whatever the number of vendors.

Each adapter declares the fields it sends and needs (``Adapter.needs``). ``Adapter.plan`` rejects an
event whose violations meet its needs (one set intersection), with the reasons of those fields: it is
dead-lettered for that vendor as ``rejected`` and delivered to the vendors that do not use the field.
Routing validates a poll's events before the fan-out, the redrive each record it reads back (parked
retries and dead-letter replay); an event planned without either (tests, tools) is validated by
``Adapter.plan`` itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from processor.events import UNCHECKED, Event, EventKind

MIN_EVENT_TIME_MS = 978_307_200_000  # 2001-01-01T00:00:00Z
MAX_AHEAD_MS = 86_400_000  # a day ahead of the Kafka timestamp
_INF = float("inf")
_VIEW = EventKind.PRODUCT_VIEW  # a module global: an enum member looked up on its class costs more

# field keys: what adapters declare in ``Adapter.needs``
EVENT_ID = "event_id"
EVENT_TIME = "event_time"
SITE_ID = "site_id"
PRODUCT_ID = "product.product_id"
PRODUCT_PRICE = "product.price"
ORDER_ID = "order.order_id"
ORDER_TOTAL = "order.total"
ITEM_PRODUCT_ID = "order.items.product_id"
ITEM_UNIT_PRICE = "order.items.unit_price"
ITEM_QUANTITY = "order.items.quantity"
EXPERIENCE_ID = "experiments.experience_id"
VARIATION_ID = "experiments.variation_id"
FIELDS = frozenset({EVENT_ID, EVENT_TIME, SITE_ID, PRODUCT_ID, PRODUCT_PRICE, ORDER_ID, ORDER_TOTAL,
                    ITEM_PRODUCT_ID, ITEM_UNIT_PRICE, ITEM_QUANTITY, EXPERIENCE_ID, VARIATION_ID})

Violations = dict[str, str]


def _amount(value: Any) -> str | None:
    """Why an amount that is not a float in ``[0, inf)`` is wrong (None: an int that is fine)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "is not a number"
    if math.isnan(value):
        return "is NaN"
    if value == _INF:
        return "is Infinity"
    if value == -_INF:
        return "is -Infinity"
    return f"is negative ({value!r})" if value < 0 else None


def _empty(value: Any) -> bool:
    return not value or not isinstance(value, str) or value.isspace()


def _event_time(ms: Any, reference_ms: int) -> str | None:
    """Why ``event_time`` is not a plausible epoch-millisecond time, or None."""
    if not isinstance(ms, int) or isinstance(ms, bool):
        return f"event_time {ms!r} is not an integer"
    latest = reference_ms + MAX_AHEAD_MS
    if ms < MIN_EVENT_TIME_MS:
        if MIN_EVENT_TIME_MS // 1000 <= ms <= latest // 1000:
            return f"event_time {ms} looks like seconds, not milliseconds"
        return f"event_time {ms} is before 2001-01-01 (epoch milliseconds)"
    if ms > latest:
        if MIN_EVENT_TIME_MS * 1000 <= ms <= latest * 1000:
            return f"event_time {ms} looks like microseconds, not milliseconds"
        return f"event_time {ms} is more than a day ahead of the message's timestamp"
    return None


def _add(bad: Violations | None, key: str, why: str) -> Violations:
    """``bad`` with ``key``'s reason (the first found for a key stays), made on the first violation."""
    if bad is None:
        return {key: why}
    bad.setdefault(key, why)
    return bad


def _experiments(bad: Violations | None, buckets: list[dict[str, Any]]) -> Violations | None:
    """``bad`` with the empty ids of the experiment buckets, each named by its index."""
    for i, bucket in enumerate(buckets):
        exp, var = bucket["experience_id"], bucket["variation_id"]
        if _empty(exp):
            bad = _add(bad, EXPERIENCE_ID, f"experiments[{i}].experience_id is empty")
        if _empty(var):
            bad = _add(bad, VARIATION_ID, f"experiments[{i}].variation_id is empty")
    return bad


def check(kind: EventKind, rec: dict[str, Any], reference_ms: int) -> Violations | None:
    """The event's violations (field key -> reason), or None when it keeps every rule. One pass; on a
    valid event it builds nothing. ``reference_ms`` is the message's Kafka timestamp (else now).
    Amounts are tested ``0.0 <= x < inf`` first: NaN fails every comparison, so one test passes a valid one."""
    bad: Violations | None = None
    ms = rec["event_time"]
    if not (type(ms) is int and MIN_EVENT_TIME_MS <= ms <= reference_ms + MAX_AHEAD_MS):
        bad = _add(bad, EVENT_TIME, _event_time(ms, reference_ms) or f"event_time {ms!r} is not valid")
    event_id, site_id = rec["event_id"], rec["site_id"]
    if not event_id or not site_id or event_id.isspace() or site_id.isspace():  # strings (Avro): one test
        for key in (EVENT_ID, SITE_ID):
            if _empty(rec[key]):
                bad = _add(bad, key, f"{key} is empty")
    for bucket in rec["experiments"]:
        exp, var = bucket["experience_id"], bucket["variation_id"]
        if not exp or not var or exp.isspace() or var.isspace():
            bad = _experiments(bad, rec["experiments"])  # the buckets before this one were fine
            break
    if kind is _VIEW:
        product = rec["product"]
        price = product["price"]
        if not (type(price) is float and 0.0 <= price < _INF) and (why := _amount(price)):
            bad = _add(bad, PRODUCT_PRICE, f"product.price {why}")
        product_id = product["product_id"]
        if not product_id or product_id.isspace():
            bad = _add(bad, PRODUCT_ID, "product.product_id is empty")
        return bad
    order = rec["order"]
    total = order["total"]
    if not (type(total) is float and 0.0 <= total < _INF) and (why := _amount(total)):
        bad = _add(bad, ORDER_TOTAL, f"order.total {why}")
    order_id = order["order_id"]
    if not order_id or order_id.isspace():
        bad = _add(bad, ORDER_ID, "order.order_id is empty")
    for i, item in enumerate(order["items"]):
        price, units = item["unit_price"], item["quantity"]
        if not (type(price) is float and 0.0 <= price < _INF) and (why := _amount(price)):
            bad = _add(bad, ITEM_UNIT_PRICE, f"order.items[{i}].unit_price {why}")
        if not (type(units) is int and units >= 1):
            bad = _add(bad, ITEM_QUANTITY, f"order.items[{i}].quantity is {units!r}, not a count of units sold "
                                           "(at least 1)")
        product_id = item["product_id"]
        if not product_id or product_id.isspace():
            bad = _add(bad, ITEM_PRODUCT_ID, f"order.items[{i}].product_id is empty")
    return bad


def validate(event: Event, now_ms: int | None = None) -> Violations | None:
    """Check ``event`` once: its violations are kept on it (``Event.invalid``) and returned."""
    if event.invalid is not UNCHECKED:
        return event.invalid
    ts = event.timestamp_ms
    if ts is None or ts <= 0:
        ts = now_ms if now_ms is not None else int(time.time() * 1000)
    event.invalid = found = check(event.kind, event.record, ts)
    return found


def validate_all(events: Iterable[Event]) -> None:
    """Validate a poll's events (routing, before the fan-out)."""
    now_ms = int(time.time() * 1000)
    for event in events:  # ``validate(event, now_ms)`` of each, without a call an event
        if event.invalid is UNCHECKED:
            ts = event.timestamp_ms
            event.invalid = check(event.kind, event.record, ts if ts is not None and ts > 0 else now_ms)


def reason(invalid: Violations, fields: Iterable[str]) -> str:
    """The reasons of ``fields`` (some of ``invalid``'s keys), in the order they were found."""
    wanted = set(fields)
    return "; ".join(why for key, why in invalid.items() if key in wanted)
