"""Redrive: relay records (the dead-letter record format) from a topic to one vendor.

Two users: ``processor dlq replay`` (a bounded run over the dead-letter topic, from the vendor's
replay group position to the topic's end as of its start) and the relay's redrive of parked events (a
continuous consumer of a vendor's retry topic, whose records carry ``relay.next_attempt_ms`` too).
This module holds what both need and no consumer loop: a record read back as an ``Event``, the
filters, one decision per record, settlement in record order through an ``OffsetTracker`` (so a
commit never passes an unsettled record), the write-back of what fails again, and the counts.

A record becomes an Event again one way, for both users: the relay's ``SchemaResolver`` has the
schema registry answer for the ids the records name (off the loop, waiting while the registry cannot
be reached, as for the live consumer), then ``Redrive.decide`` decodes each with the relay's own
Decoder (it needs those ids resolved); a record still undecodable (or of a schema the relay does not
route) is written back with ``undecodable_class``'s error class. The Event's topic, partition and
offset are the record's own (what is settled and committed on the topic being redriven); its
timestamp, key, value and headers are the original message's, the headers with the ``relay.*``
fields, so a record written back keeps the original position and first failure time.

One decision per record, in order:

============  ===========================================================  =======================
decision      when                                                         settles
============  ===========================================================  =======================
other_vendor  ``relay.vendor`` names another vendor (it has its own         at once
              position)
filtered      the record does not match the filters                        at once
at_max        ``relay.replay_count`` >= the maximum: reported, not sent      at once
undecodable   still undecodable, or still of a schema the relay does not   once Kafka acknowledged
              route: written back for this vendor with the new reason      the write-back
not_taken     decodes to a kind this vendor does not take                  at once
deliver       handed to the vendor's ``VendorPipeline``: the live path's   when the pipeline
              adapter, batching, concurrency and retries                   settles it
============  ===========================================================  =======================

Records of no vendor (``relay.vendor: none``: undecodable or unroutable when the relay read them)
are decoded again and go to any vendor that takes their kind. A delivered event (or one the adapter
filters) settles through the pipeline's callbacks; one that fails again (rejected, exhausted) is
written back with ``relay.replay_count`` + 1 and settles when Kafka acknowledged the write-back.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from processor.codec import Decoder
from processor.deadletter import headers_dict, prior_replay_count, relay_int, replayed_headers
from processor.delivery import VendorPipeline
from processor.errors import DecodeError
from processor.events import Event, FromSource, Source
from processor.metrics import Metrics
from processor.offsets import OffsetTracker, Outcomes, SettlesThroughOutcomes, is_revoked
from processor.transport import HttpSender
from processor.validation import validate
from processor.vendors.base import Adapter

logger = logging.getLogger(__name__)

NO_VENDOR = "none"  # relay.vendor of records that were undecodable or unroutable
UNROUTABLE_REASON = "a valid Avro record of a schema the relay does not route"


class WriteBack(Protocol):
    """Where a record that fails again goes: ``DeadLetterWriter`` (the dead-letter topic), or a writer of
    the same shape for a retry topic. ``on_ack`` runs in the event loop once Kafka acknowledged."""

    def write_back(self, source: Source, headers: list[tuple[str, bytes]], vendor: str, error_class: str,
                   on_ack: Callable[[], None]) -> None: ...


class Decision(StrEnum):
    OTHER_VENDOR = "other_vendor"
    FILTERED = "filtered"
    AT_MAX = "at_max"
    UNDECODABLE = "undecodable"
    NOT_TAKEN = "not_taken"
    DELIVER = "deliver"


SKIPS = (Decision.OTHER_VENDOR, Decision.FILTERED, Decision.NOT_TAKEN)


def undecodable_class(reason: str) -> str:
    """The error class a record ``decide`` found undecodable is written back with: ``unroutable`` for a
    valid record of a schema the relay does not route, ``undecodable`` otherwise."""
    return "unroutable" if reason == UNROUTABLE_REASON else "undecodable"


@dataclass(slots=True)
class RelayRecord(FromSource):
    """One record of the relay's format, read back from a topic: ``source`` is the record itself (its
    own topic, partition and offset; key, value and headers as written), the rest its ``relay.*``
    fields (None where a header is missing or does not parse)."""

    source: Source
    vendor: str
    error_class: str
    http_status: int | None
    reason: str
    attempts: int
    first_failure_ms: int | None
    last_failure_ms: int | None
    original_topic: str
    original_partition: int | None
    original_offset: int | None
    original_timestamp_ms: int | None
    replay_count: int
    next_attempt_ms: int | None
    waiting_on: str = ""  # parked because the vendor made it wait (``relay.waiting_on``): never exhausted
    slot: Any = None  # its offset tracker slot when it settles by itself (a record that is not delivered)

    @classmethod
    def from_source(cls, source: Source) -> RelayRecord:
        h = headers_dict(source.headers)
        return cls(
            source, h.get("relay.vendor") or NO_VENDOR, h.get("relay.error_class", ""),
            relay_int(h.get("relay.http_status")), h.get("relay.reason", ""), relay_int(h.get("relay.attempts")) or 0,
            relay_int(h.get("relay.first_failure_ms")), relay_int(h.get("relay.last_failure_ms")),
            h.get("relay.original_topic", ""), relay_int(h.get("relay.original_partition")),
            relay_int(h.get("relay.original_offset")), relay_int(h.get("relay.original_timestamp_ms")),
            prior_replay_count(source.headers) or 0, relay_int(h.get("relay.next_attempt_ms")),
            h.get("relay.waiting_on") or "",
        )

    @classmethod
    def from_message(cls, msg: Any) -> RelayRecord:
        return cls.from_source(Source.from_message(msg))

    @property
    def failed_ms(self) -> int | None:
        """When it failed (last), for time filters and reports: the record's timestamp if it says nothing."""
        return self.last_failure_ms or self.first_failure_ms or self.source.timestamp_ms

    def due(self, now_ms: int) -> bool:
        """Whether a parked record's next attempt is due (a record without ``relay.next_attempt_ms`` is)."""
        return self.next_attempt_ms is None or self.next_attempt_ms <= now_ms

    def original_where(self) -> str:
        return f"{self.original_topic}[{self.original_partition}]@{self.original_offset}"


@dataclass(frozen=True, slots=True)
class Filters:
    """What an operator selects; empty fields select everything. Time bounds apply to the (last)
    failure time: ``since_ms`` inclusive, ``until_ms`` exclusive; ``offsets`` is inclusive and, with
    ``topic`` and ``partition``, names the original position."""

    vendors: frozenset[str] = frozenset()
    error_classes: frozenset[str] = frozenset()
    status: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    topic: str | None = None
    partition: int | None = None
    offsets: tuple[int, int] | None = None

    def matches(self, r: RelayRecord) -> bool:
        if self.vendors and r.vendor not in self.vendors:
            return False
        if self.error_classes and r.error_class not in self.error_classes:
            return False
        if self.status is not None and r.http_status != self.status:
            return False
        if self.since_ms is not None or self.until_ms is not None:
            t = r.failed_ms
            if t is None or (self.since_ms is not None and t < self.since_ms) or (
                    self.until_ms is not None and t >= self.until_ms):
                return False
        if self.topic is not None and r.original_topic != self.topic:
            return False
        if self.partition is not None and r.original_partition != self.partition:
            return False
        if self.offsets is not None:
            off = r.original_offset
            if off is None or not self.offsets[0] <= off <= self.offsets[1]:
                return False
        return True

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if value is not None and value != frozenset():
                out[name] = sorted(value) if isinstance(value, frozenset) else value
        return out


@dataclass(slots=True)
class Triage:
    """One poll's records decided, in record order: ``items`` are what the tracker registers (the Event
    for a record to deliver, the record otherwise), ``events`` the ones to deliver."""

    records: list[RelayRecord] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    items: list[Event | RelayRecord] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Report:
    """A record an operator should look at (at the maximum of replays, or still undecodable)."""

    decision: Decision
    where: str
    original: str
    reason: str


class Redrive(SettlesThroughOutcomes):
    """Relay records to one vendor: decide, register with the tracker in order, deliver through the
    vendor's pipeline, write back what fails again. Event loop only (as the tracker and the pipeline)."""

    MAX_REPORTS = 50

    def __init__(self, adapter: Adapter[Any, Any], decoder: Decoder, tracker: OffsetTracker,
                 filters: Filters | None = None, max_replays: int | None = 3,
                 writer: WriteBack | None = None, clock: Callable[[], float] = time.time) -> None:
        self.adapter = adapter
        self.vendor = adapter.name
        self.decoder = decoder
        self.tracker = tracker
        self.filters = filters or Filters()
        self.max_replays = max_replays
        self.writer = writer
        self.clock = clock
        self.pipeline: VendorPipeline | None = None
        self.metrics: Metrics | None = None
        self.outcomes = Outcomes(None)  # exactly one outcome per event, and their counts (once attached)
        self.counts: Counter[str] = Counter()  # scanned, each Decision, failed_again
        self.reports: list[Report] = []

    def attach(self, sender: HttpSender, metrics: Metrics, budget: int = 20_000) -> VendorPipeline:
        """The vendor's live-path pipeline (adapter, batching, concurrency, breaker, retries in place: a
        replay does not park), reporting its outcomes here: settled into this redrive's tracker, what
        fails again written back."""
        self.metrics = metrics
        self.outcomes = Outcomes(metrics)
        self.pipeline = VendorPipeline(self.adapter, sender, metrics, self, budget, parking=False)
        return self.pipeline

    # -- deciding ---------------------------------------------------------------
    def decide(self, r: RelayRecord) -> tuple[Decision, Event | None, str]:
        if r.vendor != self.vendor and r.vendor != NO_VENDOR:
            return Decision.OTHER_VENDOR, None, ""
        if not self.filters.matches(r):
            return Decision.FILTERED, None, ""
        if self.max_replays is not None and r.replay_count >= self.max_replays:
            return Decision.AT_MAX, None, f"replayed {r.replay_count} times (maximum {self.max_replays}): {r.reason}"
        src = r.source
        try:
            kind, record = self.decoder.decode(src.value)
        except DecodeError as exc:
            return Decision.UNDECODABLE, None, str(exc)
        if kind is None:
            return Decision.UNDECODABLE, None, UNROUTABLE_REASON
        if not self.adapter.takes(kind):
            return Decision.NOT_TAKEN, None, ""
        ts = r.original_timestamp_ms if r.original_timestamp_ms is not None else src.timestamp_ms
        event = Event(kind, record, src.topic, src.partition, src.offset, ts, src.key, src.value, src.headers)
        validate(event)  # as routing does: the adapter rejects what breaks a rule on a field it needs
        return Decision.DELIVER, event, ""

    def triage(self, records: Sequence[RelayRecord]) -> Triage:
        """Decide each record (pure but for the counts)."""
        t = Triage()
        counts = self.counts
        counts["scanned"] += len(records)
        for r in records:
            decision, event, reason = self.decide(r)
            counts[decision] += 1
            t.records.append(r)
            t.decisions.append(decision)
            t.reasons.append(reason)
            if event is not None:
                t.items.append(event)
                t.events.append(event)
            else:
                t.items.append(r)
                if decision in (Decision.AT_MAX, Decision.UNDECODABLE) and len(self.reports) < self.MAX_REPORTS:
                    self.reports.append(Report(decision, r.source.where(), r.original_where(), reason))
        return t

    # -- acting -------------------------------------------------------------------
    def dispatch(self, t: Triage) -> None:
        """Register the poll with the tracker in record order (a record to deliver or to write back stays
        pending until it settles), write back the still undecodable, hand the events to the pipeline."""
        self.tracker.register_many(t.items, (1 if d in (Decision.DELIVER, Decision.UNDECODABLE) else 0
                                             for d in t.decisions))
        for r, decision, reason in zip(t.records, t.decisions, t.reasons, strict=True):
            if decision is Decision.UNDECODABLE:
                error_class = undecodable_class(reason)
                logger.warning("%s (from %s) still %s for %s: %s; written back", r.source.where(),
                               r.original_where(), error_class, self.vendor, reason)
                self._write_back(r, r.source, error_class, None, reason, 0, r.replay_count + 1)
        if t.events:
            assert self.pipeline is not None, "attach() a pipeline before dispatching events"
            self.pipeline.submit_many(t.events)

    # -- the pipeline's settlement (processor.offsets.Settlement; settle_many, drop, has_outcome inherited) ---
    def park(self, event: Event, vendor: str, why: str, reason: str, attempts: int, first_ms: int | None,
             next_attempt_ms: int) -> bool:
        raise AssertionError("a replay's pipeline does not park")  # attach() builds it with parking off

    def dead_letter(self, event: Event, vendor: str | None, error_class: str, status: int | None, reason: str,
                    attempts: int = 0, first_ms: int | None = None) -> bool:
        """The pipeline gave up on a replayed event: it failed again."""
        o = self.outcomes
        vendor = vendor or self.vendor
        if not o.vacant(event, vendor):
            return False
        if not is_revoked(event):
            self._failed_again(event, vendor, error_class, status, reason, attempts)
            o.count(vendor, (event,), "dead_lettered")
        o.mark(event, vendor)
        return True

    def _failed_again(self, event: Event, vendor: str, error_class: str, status: int | None, reason: str,
                      attempts: int) -> None:
        self.counts["failed_again"] += 1
        logger.info("%s failed again for %s: %s (%s); written back", event.where(), vendor, error_class, reason)
        self._write_back(event, event, error_class, status, reason, attempts,
                         (prior_replay_count(event.headers) or 0) + 1)

    def _write_back(self, item: Event | RelayRecord, source: Source, error_class: str, status: int | None,
                    reason: str, attempts: int, replay_count: int) -> None:
        assert self.writer is not None, "a redrive that writes back needs a writer"
        headers = replayed_headers(source.headers, self.vendor, error_class, status, reason, attempts,
                                   int(self.clock() * 1000), replay_count)
        tracker = self.tracker
        self.writer.write_back(source, headers, self.vendor, error_class, lambda: tracker.settle(item.slot))

    # -- counts ---------------------------------------------------------------------
    def vendor_outcome(self, outcome: str) -> int:
        """Events the pipeline settled with ``outcome`` (delivered, filtered, dead_lettered) so far."""
        if self.metrics is None:
            return 0
        registry = self.metrics.registry
        total = 0.0
        for kind in self.adapter.enabled_kinds:
            total += registry.get_sample_value("processor_vendor_events_total", {
                "vendor": self.vendor, "event_kind": kind.value, "outcome": outcome}) or 0.0
        return int(total)

    def summary(self) -> dict[str, int]:
        c = self.counts
        return {
            "scanned": c["scanned"],
            "replayed": c[Decision.DELIVER],
            "delivered": self.vendor_outcome("delivered"),
            "filtered_by_vendor": self.vendor_outcome("filtered"),
            "failed_again": c["failed_again"],
            "skipped": sum(c[d] for d in SKIPS),
            "skipped_other_vendor": c[Decision.OTHER_VENDOR],
            "skipped_by_filter": c[Decision.FILTERED],
            "skipped_kind_not_taken": c[Decision.NOT_TAKEN],
            "at_max_replays": c[Decision.AT_MAX],
            "still_undecodable": c[Decision.UNDECODABLE],
        }
