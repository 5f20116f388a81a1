"""The fault suite's one reconciliation: every produced event is received by each vendor it routes to, or
is in the dead-letter topic for that vendor with a reason.

Events are made identifiable at both twins used here: the canonical ``event_id`` is also the visitor id,
which QuickLizard receives as each row's ``vid`` (an order has one line item, so one row), and Tracardi
receives the ``event_id`` as each event's ``id``. ``Stream`` produces such events from a thread at a steady
rate and records what the broker acknowledged: only an acknowledged message counts as produced.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer

from processor.codec import Decoder
from processor.deadletter import headers_dict
from processor.devstack.samples import encode, make_order, make_view, with_changes
from processor.errors import DecodeError
from processor.events import EventKind

VENDORS = ("quicklizard", "tracardi")
# the event id each twin's received item carries
EVENT_ID: dict[str, Callable[[Any], str]] = {"quicklizard": lambda row: row["vid"], "tracardi": lambda ev: ev["id"]}
QUICKLIZARD_REJECTS = "missing required field product.url"


@dataclass(frozen=True)
class Produced:
    event_id: str
    key: bytes
    value: bytes
    vendors: frozenset[str]


def fault_event(i: int, prefix: str = "f", reject_every: int = 0) -> Produced:
    """Event ``i``: a view, every 10th a one-item order; every ``reject_every``-th view has no URL at all,
    which QuickLizard requires (a ``rejected`` dead letter for QuickLizard alone; Tracardi takes it)."""
    event_id = f"{prefix}{i}"
    if i % 10 == 9:
        kind, rec = EventKind.ORDER, make_order(i, items=1, event_time=1_700_000_000_000 + i)
    else:
        kind, rec = EventKind.PRODUCT_VIEW, make_view(i, i, event_time=1_700_000_000_000 + i)
        if reject_every and i % reject_every == 0:
            rec = with_changes(with_changes(rec, "product.url", None), "page.url", None)
    rec["event_id"] = event_id
    rec["visitor"]["visitor_id"] = event_id  # QuickLizard's vid
    return Produced(event_id, f"k{i % 23}".encode(), encode(kind, rec), frozenset(VENDORS))


def fault_events(n: int, start: int = 0, prefix: str = "f", reject_every: int = 0) -> list[Produced]:
    return [fault_event(i, prefix, reject_every) for i in range(start, start + n)]


class Stream:
    """Produces events from a thread, ``per_tick`` every ``tick_s``, until all are produced or ``stop``.
    ``produced`` holds those the broker acknowledged."""

    def __init__(self, bootstrap: str, topic: str, events: Sequence[Produced], per_tick: int = 20,
                 tick_s: float = 0.05) -> None:
        self.topic = topic
        self.events = events
        self.per_tick = per_tick
        self.tick_s = tick_s
        self.produced: list[Produced] = []
        self.failed: list[str] = []
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True,
                                   "log_level": 3})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-stream", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> Stream:
        self._thread.start()
        return self

    @property
    def acked(self) -> int:
        with self._lock:
            return len(self.produced)

    def _ack(self, ev: Produced) -> Callable[[Any, Any], None]:
        def done(err: Any, _msg: Any) -> None:
            with self._lock:
                (self.failed.append(ev.event_id) if err is not None else self.produced.append(ev))
        return done

    def _run(self) -> None:
        p = self._producer
        for start in range(0, len(self.events), self.per_tick):
            if self._stop.is_set():
                break
            for ev in self.events[start:start + self.per_tick]:
                p.produce(self.topic, key=ev.key, value=ev.value, on_delivery=self._ack(ev))
            p.poll(0)
            time.sleep(self.tick_s)  # the stream's pace, not a wait on a condition
        p.flush(120)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float = 150) -> list[Produced]:
        """Wait until the stream is produced and acknowledged; what was produced."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("the stream did not finish producing")
        assert not self.failed, f"{len(self.failed)} events not acknowledged by the broker"
        return self.produced


@dataclass
class Reconciliation:
    events: int
    expected: int  # (event, vendor) pairs
    lost: list[tuple[str, str]] = field(default_factory=list)
    delivered: Counter[str] = field(default_factory=Counter)  # distinct events per vendor
    duplicates: Counter[str] = field(default_factory=Counter)  # extra deliveries or dead letters per vendor
    delivered_and_dead: Counter[str] = field(default_factory=Counter)  # both received and dead-lettered
    dead_twice: Counter[str] = field(default_factory=Counter)  # dead-lettered more than once for one vendor
    dead_lettered: Counter[tuple[str, str]] = field(default_factory=Counter)  # distinct (vendor, error class)
    unreasoned: int = 0  # dead letters without a reason: they account for nothing
    unknown: Counter[str] = field(default_factory=Counter)  # received ids nobody produced

    @property
    def total_duplicates(self) -> int:
        return sum(self.duplicates.values())

    def summary(self, scenario: str) -> str:
        dead = ", ".join(f"{v}/{c}={n}" for (v, c), n in sorted(self.dead_lettered.items())) or "none"
        return (f"[{scenario}] events={self.events} pairs={self.expected} lost={len(self.lost)} "
                f"delivered={dict(self.delivered)} dead_lettered={dead} duplicates={dict(self.duplicates)} "
                f"delivered_and_dead={dict(self.delivered_and_dead)} dead_twice={dict(self.dead_twice)} "
                f"unknown={dict(self.unknown)}")

    def assert_accounted(self) -> None:
        """Every produced (event, vendor) pair received or dead-lettered with a reason."""
        assert not self.lost, f"{len(self.lost)} lost, e.g. {self.lost[:5]}"
        assert not self.unreasoned, f"{self.unreasoned} dead letters without a reason"

    def assert_complete(self) -> None:
        """Accounted for, and the twins received nothing else."""
        self.assert_accounted()
        assert not self.unknown, f"received events nobody produced: {dict(self.unknown)}"


def dead_letter_ids(dlq: Iterable[Any], decoder: Decoder | None = None) -> list[tuple[str, str, str, str]]:
    """(event id, vendor, error class, reason) of each dead-letter record; undecodable values are named by
    their original topic/partition/offset."""
    decoder = decoder or Decoder()
    out = []
    for m in dlq:
        h = headers_dict(m.headers())
        try:
            event_id = decoder.decode(m.value())[1]["event_id"]
        except (DecodeError, KeyError, TypeError):  # not one of our events: named by where it came from
            event_id = f"{h.get('relay.original_partition')}@{h.get('relay.original_offset')}"
        out.append((event_id, h.get("relay.vendor", ""), h.get("relay.error_class", ""), h.get("relay.reason", "")))
    return out


def below_commit(produced: Sequence[Produced], messages: Iterable[Any], committed: dict[int, int]) -> list[Produced]:
    """The produced events whose offset (found in ``messages``, the topic read back) is below its partition's
    committed offset: what a commit claims is settled."""
    decoder = Decoder()
    ids = {decoder.decode(m.value())[1]["event_id"] for m in messages
           if m.offset() < committed.get(m.partition(), -1)}
    return [p for p in produced if p.event_id in ids]


def reconcile(produced: Sequence[Produced], received: dict[str, list[Any]], dlq: Iterable[Any]) -> Reconciliation:
    """Each produced (event, vendor) pair against what the vendor's twin received and the dead letters."""
    got = {v: Counter(EVENT_ID[v](item) for item in items) for v, items in received.items()}
    dead: dict[str, Counter[str]] = {}
    r = Reconciliation(len(produced), sum(len(p.vendors) for p in produced))
    seen_classes: set[tuple[str, str, str]] = set()
    for event_id, vendor, error_class, reason in dead_letter_ids(dlq):
        if not reason:
            r.unreasoned += 1
            continue
        dead.setdefault(vendor, Counter())[event_id] += 1
        if (event_id, vendor, error_class) not in seen_classes:
            seen_classes.add((event_id, vendor, error_class))
            r.dead_lettered[(vendor, error_class)] += 1
    wanted: dict[str, set[str]] = {}
    for p in produced:
        for vendor in p.vendors:
            wanted.setdefault(vendor, set()).add(p.event_id)
            n_got = got.get(vendor, Counter())[p.event_id]
            n_dead = dead.get(vendor, Counter())[p.event_id]
            if n_got + n_dead == 0:
                r.lost.append((p.event_id, vendor))
                continue
            if n_got:
                r.delivered[vendor] += 1
            if n_got and n_dead:
                r.delivered_and_dead[vendor] += 1
            if n_dead > 1:
                r.dead_twice[vendor] += 1
            r.duplicates[vendor] += n_got + n_dead - 1
    for vendor, counts in got.items():
        r.unknown[vendor] = sum(n for eid, n in counts.items() if eid not in wanted.get(vendor, ()))
    r.unknown = +r.unknown
    r.duplicates = +r.duplicates
    return r
