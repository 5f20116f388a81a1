"""Routing: each consumed message to every enabled vendor that takes its kind.

A poll's messages are registered with the offset tracker in consume order (each
with the number of vendors that must settle it), then each vendor's pipeline gets
the poll's events of its kinds as one list, validated first (processor.validation:
each vendor's adapter rejects an event that breaks a rule on a field it needs). A
vendor that does not take a kind counts those events as filtered. What is not an event to route (undecodable, or
a valid record of a schema the relay does not route) goes to the dead-letter
topic, settled once Kafka acknowledged it.
"""

from __future__ import annotations

from collections import Counter
from operator import attrgetter
from typing import TYPE_CHECKING

from processor.events import Event, EventKind
from processor.metrics import Metrics
from processor.offsets import OffsetTracker, Settlement
from processor.validation import validate_all

if TYPE_CHECKING:
    from processor.delivery import VendorPipeline
    from processor.source import Decoded

_topic = attrgetter("topic")
_kind = attrgetter("kind")


class Router:
    def __init__(self, tracker: OffsetTracker, settlement: Settlement, metrics: Metrics) -> None:
        self.tracker = tracker
        self.settlement = settlement
        self.metrics = metrics
        self.routes: list[tuple[VendorPipeline, frozenset[EventKind] | None]] = []  # None: every kind
        # how many must settle a message of each kind: its vendors; the dead-letter topic for no kind
        self.targets: dict[EventKind | None, int] = {None: 1, **dict.fromkeys(EventKind, 0)}
        self.filtered_by: dict[EventKind, list[VendorPipeline]] = {k: [] for k in EventKind}

    def add(self, pipe: VendorPipeline) -> None:
        kinds = frozenset(k for k in EventKind if pipe.adapter.takes(k))
        self.routes.append((pipe, None if len(kinds) == len(EventKind) else kinds))
        for kind in EventKind:
            if kind in kinds:
                self.targets[kind] += 1
            else:
                self.filtered_by[kind].append(pipe)

    def route(self, batch: list[Event | Decoded]) -> None:
        """Register a poll's messages with the tracker in consume order, then hand each vendor its
        events as one list (per poll, not per event)."""
        kinds = list(map(_kind, batch))  # None: undecodable or unroutable
        self.tracker.register_many(batch, map(self.targets.__getitem__, kinds))
        for topic, n in Counter(map(_topic, batch)).items():
            self.metrics.events_consumed.labels(topic).inc(n)
        events: list[Event] = batch  # type: ignore[assignment]
        if None in kinds:
            for d in batch:
                if d.kind is None:
                    self._undeliverable(d)  # type: ignore[arg-type]
            events = [d for d in batch if d.kind is not None]  # type: ignore[misc]
        validate_all(events)  # once, before the fan-out: each adapter rejects what breaks a rule it needs
        for pipe, only in self.routes:
            pipe.submit_many(events if only is None else [ev for ev in events if ev.kind in only])
        if any(self.filtered_by.values()):
            for kind, n in Counter(kinds).items():
                for pipe in self.filtered_by.get(kind, ()):  # type: ignore[call-overload]
                    self.metrics.vendor_events.labels(pipe.name, kind.value, "filtered").inc(n)

    def _undeliverable(self, d: Decoded) -> None:
        """Undecodable or unroutable: straight to the dead-letter topic."""
        src = d.source
        if d.error is not None:
            self.metrics.decode_failures.labels(src.topic, d.error.reason).inc()
            error_class, reason = "undecodable", str(d.error)
        else:
            error_class, reason = "unroutable", "a valid Avro record of a schema the relay does not route"
        self.settlement.dead_letter(d, None, error_class, None, reason)
