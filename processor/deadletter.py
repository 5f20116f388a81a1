"""Dead-letter records: format and the acknowledged producer.

Value: the original message bytes, untouched. Key: the original key.
Headers: the original headers (earlier ``relay.*`` headers of ours replaced; foreign or
unparsable ``relay.*`` values kept as they were, beside the fresh ones) plus:

====================================  ==============================================
relay.vendor                          the vendor this record is for ("none" when undecodable/unroutable)
relay.error_class                     rejected | exhausted | undecodable | unroutable | internal
                                      (``parked`` on a vendor's retry topic)
relay.http_status                     last HTTP status ("" when there was none)
relay.reason                          short, redacted reason
relay.attempts                        delivery attempts made
relay.first_failure_ms                epoch ms of the first failure
relay.last_failure_ms                 epoch ms of the last failure
relay.original_topic / _partition / _offset / _timestamp_ms   where the message came from
relay.replay_count                    times this record was replayed before (0 for a first failure)
relay.next_attempt_ms                 parked records only: epoch ms after which redrive may try again
relay.waiting_on                      parked records only, when the vendor made them wait (``throttled``, a
                                      429; ``setup_error``, the site's setup): never exhausted at redrive
====================================  ==============================================

Produced with acks=all and idempotence. A record settles its event only when
Kafka acknowledges it; an unacknowledged write is re-produced after a delay
and blocks the commit of that offset until it lands. A write the topic refuses
for good (the record is larger than it takes, no permission to write to it) is
not retried in a tight loop: one ERROR naming the topic and the cause, the
failure counters, readiness false, and a retry every ``REFUSED_RETRY_S`` (the
operator may fix the topic) while the offsets stay held: nothing is lost. A
transient failure (a timeout, the broker away) is retried after
``retry_delay_s`` with one log line per topic a minute, saying how many failed.
A fatal error of the producer (librdkafka's ``fatal()``: the idempotent
producer fenced or out of sequence) is never retried on that producer: one
ERROR naming it, ``on_fatal`` (the relay stops, exit 1, and the restart makes
a new producer), and nothing produced any more; what it did not acknowledge
stays unsettled, so nothing is committed past it. The event loop never waits
on the producer: a full local queue is retried later.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from processor.events import Source
from processor.metrics import Metrics

logger = logging.getLogger(__name__)

HEADER_PREFIX = "relay."
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_LONG_NUMBER = re.compile(r"\+?\d[\d\s-]{6,}\d")
_SECRETISH = re.compile(r"(?i)(bearer|key|secret|token|password)([=: ]+)\S+")
REASON_MAX = 240
# what the broker or librdkafka answers for a write that will not succeed by trying again soon
PERMANENT = {KafkaError.MSG_SIZE_TOO_LARGE: "record larger than the topic's max.message.bytes (or the producer's "
                                            "message.max.bytes)",
             KafkaError.RECORD_LIST_TOO_LARGE: "record batch larger than the topic takes",
             KafkaError.INVALID_RECORD: "the topic refuses the record (invalid record)",
             KafkaError.POLICY_VIOLATION: "the topic's policy refuses the record",
             KafkaError.TOPIC_AUTHORIZATION_FAILED: "not authorized to write to the topic",
             KafkaError.CLUSTER_AUTHORIZATION_FAILED: "not authorized on the cluster (idempotent write)",
             KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "not authorized for idempotent writes"}
REFUSED_RETRY_S = 30.0
TRANSIENT_LOG_EVERY_S = 60.0  # one line per topic a minute for transient write failures
QUEUE_FULL_RETRY_S = 0.05
_NUMERIC = frozenset({"relay.http_status", "relay.attempts", "relay.first_failure_ms", "relay.last_failure_ms",
                      "relay.original_partition", "relay.original_offset", "relay.original_timestamp_ms",
                      "relay.replay_count", "relay.next_attempt_ms"})
_ORIGIN = ("relay.original_topic", "relay.original_partition", "relay.original_offset",
           "relay.original_timestamp_ms")
RELAY_HEADERS = _NUMERIC | {"relay.vendor", "relay.error_class", "relay.reason", "relay.original_topic",
                            "relay.waiting_on"}


def redact(reason: str) -> str:
    """Drop what could be PII or a secret from a reason and keep it short."""
    reason = _EMAIL.sub("<email>", reason)
    reason = _LONG_NUMBER.sub("<number>", reason)
    reason = _SECRETISH.sub(r"\1\2<redacted>", reason)
    return reason[:REASON_MAX]


def relay_int(value: bytes | str | None) -> int | None:
    """A ``relay.*`` number as the relay writes it (ASCII digits, nothing else), or None: anything else
    (a sign, spaces, ``³¹`` or ``١٢`` which ``str.isdigit()`` or ``int()`` would take, bytes that are not
    ASCII) is foreign data. The one parser of every path that reads these headers."""
    if not value or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


def prior_replay_count(headers: list[tuple[str, bytes]] | None) -> int | None:
    """The ``relay.replay_count`` an input message carries (the last one that parses, if several), or None
    when it has none that parses (``relay_int``)."""
    count = None
    for name, value in headers or ():
        if name == "relay.replay_count":
            n = relay_int(value)
            if n is not None:
                count = n
    return count


def _parses(name: str, value: bytes | None) -> bool:
    """Whether an input's ``relay.*`` header is one of ours with a value we could have written.
    A foreign or garbled one (``relay.replay_count: x``, a non-UTF-8 value) is data: it is kept."""
    if name not in RELAY_HEADERS or value is None:
        return False
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return False
    return not text or name not in _NUMERIC or relay_int(text) is not None


def _ours(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """The parsable relay.* headers of ours on an input (the last of each name)."""
    return {name: value.decode() for name, value in headers or ()
            if name.startswith(HEADER_PREFIX) and _parses(name, value)}  # type: ignore[union-attr]


def dlq_headers(source: Source, vendor: str | None, error_class: str, status: int | None, reason: str,
                attempts: int, first_ms: int, last_ms: int, replay_count: int | None = None,
                extra: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]]:
    """The headers of a dead-letter (or parked) record for ``source``. The input's own headers are kept,
    except earlier ``relay.*`` headers of ours, which the fresh ones replace; ``relay.*`` headers that do
    not parse as ours are kept as they were, beside the fresh values. ``replay_count`` defaults to the
    input's own count (0 when it has none).

    When the input is itself a relay record (a parked record being redriven, a dead letter being
    replayed), its history carries on: the original position and timestamp, the first failure time, and
    the attempts made before (added to ``attempts``)."""
    if replay_count is None:
        replay_count = prior_replay_count(source.headers) or 0
    prior = _ours(source.headers)
    if "relay.original_topic" in prior and prior.get("relay.original_offset"):
        origin = [(k, prior.get(k, "").encode()) for k in _ORIGIN]
        prior_first = relay_int(prior.get("relay.first_failure_ms"))
        if prior_first is not None:
            first_ms = min(first_ms, prior_first)
        attempts += relay_int(prior.get("relay.attempts")) or 0
    else:
        origin = [("relay.original_topic", source.topic.encode()),
                  ("relay.original_partition", str(source.partition).encode()),
                  ("relay.original_offset", str(source.offset).encode()),
                  ("relay.original_timestamp_ms", str(source.timestamp_ms or "").encode())]
    headers: list[tuple[str, bytes]] = [
        (name, value) for name, value in source.headers or ()
        if not (name.startswith(HEADER_PREFIX) and _parses(name, value))
    ]
    headers += [
        ("relay.vendor", (vendor or "none").encode()),
        ("relay.error_class", error_class.encode()),
        ("relay.http_status", str(status).encode() if status else b""),
        ("relay.reason", redact(reason).encode()),
        ("relay.attempts", str(attempts).encode()),
        ("relay.first_failure_ms", str(first_ms).encode()),
        ("relay.last_failure_ms", str(last_ms).encode()),
        *origin,
        ("relay.replay_count", str(replay_count).encode()),
        *(extra or ()),
    ]
    return headers


def first_failure_ms(source: Source) -> int | None:
    """When a relay record (parked or dead-lettered) first failed; None for an original message."""
    return relay_int(_ours(source.headers).get("relay.first_failure_ms"))


_REPLACED_ON_REPLAY = frozenset({"relay.vendor", "relay.error_class", "relay.http_status", "relay.reason",
                                 "relay.attempts", "relay.last_failure_ms", "relay.replay_count"})


def replayed_headers(headers: list[tuple[str, bytes]] | None, vendor: str, error_class: str, status: int | None,
                     reason: str, attempts: int, last_ms: int, replay_count: int,
                     extra: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]]:
    """The headers of a relay record written back after it failed again (a replay or a redrive): its
    headers kept (the original ones, ``relay.original_*``, ``relay.first_failure_ms``), the outcome's
    fields (vendor, error class, status, reason, attempts, last failure, ``replay_count``) and the names
    in ``extra`` replaced. A record without a first failure time gets ``last_ms``."""
    fresh: list[tuple[str, bytes]] = [
        ("relay.vendor", vendor.encode()),
        ("relay.error_class", error_class.encode()),
        ("relay.http_status", str(status).encode() if status else b""),
        ("relay.reason", redact(reason).encode()),
        ("relay.attempts", str(attempts).encode()),
        ("relay.last_failure_ms", str(last_ms).encode()),
        ("relay.replay_count", str(replay_count).encode()),
        *(extra or ()),
    ]
    replaced = _REPLACED_ON_REPLAY | {name for name, _ in extra or ()}
    kept = [(name, value) for name, value in headers or ()
            if not (name in replaced and _parses(name, value))]
    if not any(name == "relay.first_failure_ms" and _parses(name, value) for name, value in kept):
        fresh.append(("relay.first_failure_ms", str(last_ms).encode()))
    return kept + fresh


def headers_dict(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Decoded relay.* headers of a dead-letter record (operators, replay, tests); where a name repeats
    (a foreign value kept beside ours) the last, ours, wins; undecodable bytes are shown replaced."""
    return {k: v.decode(errors="replace") for k, v in headers or ()
            if k.startswith(HEADER_PREFIX) and v is not None}


class DeadLetterWriter:
    """Produces dead-letter records and parked records (each vendor's retry topic) on one idempotent
    producer; ``on_ack`` runs (in the event loop) once Kafka acknowledged the record.

    A parked record has the dead-letter format with ``relay.error_class`` ``parked`` and one more header,
    ``relay.next_attempt_ms`` (when redrive may try it again). ``failing`` tells whether writes keep
    failing (the last result was not acknowledged): readiness reports it."""

    def __init__(self, topic: str, producer_config: dict[str, Any], metrics: Metrics,
                 retry_delay_s: float = 1.0, retry_topic_prefix: str | None = None,
                 producer: Callable[..., Any] = Producer, on_fatal: Callable[[str], None] | None = None) -> None:
        self.topic = topic
        self.retry_topic_prefix = retry_topic_prefix
        self.metrics = metrics
        self.retry_delay_s = retry_delay_s
        conf = {"acks": "all", "enable.idempotence": True, "linger.ms": 20, "compression.type": "lz4",
                **producer_config}
        self.producer = producer(conf, logger=logging.getLogger("librdkafka"))  # its lines as ours: JSON
        self.pending = 0
        self.failing = False
        self.failing_why = ""  # the last failure: topic and cause (readiness says it)
        self.refused: dict[str, str] = {}  # topic -> why it refuses our writes for good (until one lands)
        self.fatal: str | None = None  # the producer's fatal error: it produces nothing any more
        self.on_fatal = on_fatal
        self._transient: dict[str, tuple[float, int]] = {}  # topic -> (last logged, failures since)
        self._loop: asyncio.AbstractEventLoop | None = None

    def retry_topic(self, vendor: str) -> str:
        if self.retry_topic_prefix is None:
            raise ValueError("parking is off: no retry topic prefix")
        return f"{self.retry_topic_prefix}.{vendor}"

    def write(self, source: Source, vendor: str | None, error_class: str, status: int | None, reason: str,
              attempts: int, first_ms: int | None, on_ack: Callable[[], None]) -> None:
        now_ms = int(time.time() * 1000)
        headers = dlq_headers(source, vendor, error_class, status, reason, attempts, first_ms or now_ms, now_ms)
        self._produce(self.topic, source, headers, vendor or "none", error_class, on_ack)

    def park(self, source: Source, vendor: str, reason: str, attempts: int, first_ms: int | None,
             next_attempt_ms: int, on_ack: Callable[[], None], waiting_on: str = "") -> None:
        """Onto ``vendor``'s retry topic; ``waiting_on`` (``throttled``, ``setup_error``): the vendor made these
        events wait, so their redrive never exhausts them (``relay.waiting_on``)."""
        now_ms = int(time.time() * 1000)
        extra = [("relay.next_attempt_ms", str(next_attempt_ms).encode())]
        if waiting_on:
            extra.append(("relay.waiting_on", waiting_on.encode()))
        headers = dlq_headers(source, vendor, "parked", None, reason, attempts, first_ms or now_ms, now_ms,
                              extra=extra)
        self._produce(self.retry_topic(vendor), source, headers, vendor, None, on_ack)

    def write_back(self, source: Source, headers: list[tuple[str, bytes]], vendor: str, error_class: str,
                   on_ack: Callable[[], None]) -> None:
        """Produce ``source``'s key and value to the dead-letter topic with ``headers`` as they are (a relay
        record that failed again: see ``replayed_headers``); ``on_ack`` as for ``write``."""
        self._produce(self.topic, source, headers, vendor, error_class, on_ack)

    def _produce(self, topic: str, source: Source, headers: list[tuple[str, bytes]], vendor: str,
                 error_class: str | None, on_ack: Callable[[], None]) -> None:
        """``error_class`` None: a parked record (counted as such)."""
        m = self.metrics

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            self.pending -= 1
            if err is not None and self._is_fatal(err):
                return  # never settled: held, redelivered after the restart
            if err is None:
                self._landed(topic)
                if error_class is not None:  # parked records are counted when parked (processor_parked_total)
                    m.dlq_events.labels(vendor, error_class).inc()
                on_ack()
                return
            delay = self._failed(topic, source, vendor, err)
            self._retry_later(topic, source, headers, vendor, error_class, on_ack, delay)

        if self.fatal is not None:
            return  # the producer failed for good: held, redelivered after the restart
        try:
            self.producer.produce(topic, value=source.value, key=source.key, headers=headers,
                                  on_delivery=delivered)
        except BufferError:  # librdkafka's local queue is full: its run loop drains it; never wait here
            self._retry_later(topic, source, headers, vendor, error_class, on_ack, QUEUE_FULL_RETRY_S)
            return
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else KafkaError(KafkaError._FAIL)
            if self._is_fatal(err):
                return
            delay = self._failed(topic, source, vendor, err)
            self._retry_later(topic, source, headers, vendor, error_class, on_ack, delay)
            return
        self.pending += 1

    def _is_fatal(self, err: KafkaError) -> bool:
        """Whether ``err`` is the producer's fatal error; the first one is logged and reported, once."""
        if not (err.fatal() or err.code() == KafkaError._FATAL):
            return False
        self.failing = True
        if self.fatal is None:
            self.fatal = f"{err.name()}: {err.str()}"
            self.failing_why = f"the dead-letter and retry-topic producer failed for good ({self.fatal})"
            logger.error("the dead-letter and retry-topic producer failed for good (%s): nothing more is written "
                         "with it; stopping, the restart makes a new one (what it did not acknowledge is held "
                         "uncommitted and redelivered)", self.fatal)
            if self.on_fatal is not None:
                self.on_fatal(self.fatal)
        return True

    def _landed(self, topic: str) -> None:
        self.failing = False
        self.failing_why = ""
        if self.refused.pop(topic, None) is not None:
            logger.warning("writes to %s are acknowledged again", topic)

    def _failed(self, topic: str, source: Source, vendor: str, err: KafkaError) -> float:
        """Count and log a write Kafka did not take; the delay before it is tried again."""
        self.failing = True
        (self.metrics.dlq_failures if topic == self.topic else self.metrics.park_failures).inc()
        what = "dead-letter" if topic == self.topic else "retry-topic"
        cause = PERMANENT.get(err.code()) if isinstance(err, KafkaError) else None
        why = err.str() if isinstance(err, KafkaError) else str(err)
        if cause is None:
            self.failing_why = f"{what} writes to {topic} not acknowledged: {why}"
            now = time.monotonic()
            last, since = self._transient.get(topic, (-TRANSIENT_LOG_EVERY_S, 0))
            if now - last >= TRANSIENT_LOG_EVERY_S:
                self._transient[topic] = (now, 0)
                logger.error("%s write to %s for %s (%s) not acknowledged: %s; retrying every %.1fs (%d more "
                             "failed since the last line; one line a minute)", what, topic, source.where(), vendor,
                             why, self.retry_delay_s, since)
            else:
                self._transient[topic] = (last, since + 1)
            return self.retry_delay_s
        self.failing_why = f"{topic} refuses the relay's writes: {cause} ({why})"
        if self.refused.get(topic) != cause:  # once per topic and cause, not once a record
            self.refused[topic] = cause
            logger.error("%s topic %s refuses the relay's writes: %s (%s; first: %s for %s). Its records are held "
                         "and their offsets not committed (nothing lost); retrying every %.0fs: fix the topic",
                         what, topic, cause, why, source.where(), vendor, REFUSED_RETRY_S)
        return REFUSED_RETRY_S

    def _retry_later(self, topic: str, source: Source, headers: list[tuple[str, bytes]], vendor: str,
                     error_class: str | None, on_ack: Callable[[], None], delay_s: float) -> None:
        loop = self._loop or asyncio.get_running_loop()
        self.pending += 1  # counts as pending until re-produced

        def again() -> None:
            self.pending -= 1
            self._produce(topic, source, headers, vendor, error_class, on_ack)
        loop.call_later(delay_s, again)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve delivery callbacks in the loop thread until stopped."""
        self._loop = asyncio.get_running_loop()
        while not stop.is_set():
            self.producer.poll(0)
            await asyncio.sleep(0.01 if self.pending else 0.05)

    async def drain(self, timeout_s: float) -> bool:
        """Wait for every pending record to be acknowledged (or the timeout)."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            self.producer.poll(0)
            await asyncio.sleep(0.01)
        self.producer.poll(0)
        return self.pending == 0
