import pytest

from processor.deadletter import (
    dlq_headers,
    first_failure_ms,
    headers_dict,
    prior_replay_count,
    redact,
    relay_int,
    replayed_headers,
)
from processor.events import Source


def test_headers_keep_the_originals_and_say_everything():
    src = Source("shop.events", 2, 41, 1_700_000_000_000, b"k", b"v", [("trace", b"t"), ("relay.replay_count", b"2"),
                                                                      ("relay.vendor", b"old")])
    h = dlq_headers(src, "qubit", "exhausted", 503, "HTTP 503 (after 6 attempts)", 6, 1000, 2000)
    assert ("trace", b"t") in h
    d = headers_dict(h)
    assert d == {
        "relay.vendor": "qubit", "relay.error_class": "exhausted", "relay.http_status": "503",
        "relay.reason": "HTTP 503 (after 6 attempts)", "relay.attempts": "6", "relay.first_failure_ms": "1000",
        "relay.last_failure_ms": "2000", "relay.original_topic": "shop.events", "relay.original_partition": "2",
        "relay.original_offset": "41", "relay.original_timestamp_ms": "1700000000000", "relay.replay_count": "2",
    }
    assert [k for k, _ in h].count("relay.vendor") == 1


def test_reasons_are_redacted_and_short():
    r = redact("invalid email jane.doe@example.com phone +44 20 7946 0000 api_key=abc123 " + "x" * 500)
    assert "jane" not in r and "7946" not in r and "abc123" not in r
    assert len(r) <= 240


def test_foreign_or_garbled_relay_headers_are_data_never_a_crash():
    # a poison message: a replay count that is not a number, a non-UTF-8 value, a header we never write
    src = Source("shop.events", 0, 7, None, None, b"\x00junk", [
        ("relay.replay_count", b"x"), ("relay.reason", b"\xff\xfe"), ("relay.custom", b"mine"),
        ("relay.attempts", b"3"), ("trace", b"t")])
    h = dlq_headers(src, None, "undecodable", None, "bad_framing: ...", 0, 1, 2)
    assert ("relay.replay_count", b"x") in h  # kept as it was
    assert ("relay.reason", b"\xff\xfe") in h
    assert ("relay.custom", b"mine") in h
    assert [v for k, v in h if k == "relay.attempts"] == [b"0"]  # ours: replaced, not repeated
    d = headers_dict(h)
    assert d["relay.replay_count"] == "0" and d["relay.reason"] == "bad_framing: ..."  # the fresh values win
    assert dlq_headers(src, None, "undecodable", None, "r", 0, 1, 2, replay_count=4)[-1] == (
        "relay.replay_count", b"4")


def test_prior_replay_count_takes_the_last_that_parses():
    assert prior_replay_count(None) is None
    assert prior_replay_count([("relay.replay_count", b"x")]) is None
    assert prior_replay_count([("relay.replay_count", b"2"), ("relay.replay_count", b"x")]) == 2
    assert prior_replay_count([("relay.replay_count", b"-1")]) is None


# -- a write that can never succeed (issue 17, finding 5) -------------------------------------------

class RefusingProducer:
    """A producer whose topic refuses every record for its size: at produce time (librdkafka knows the
    limit) or in the delivery report (the broker's answer); ``BufferError`` while its queue is full."""

    def __init__(self, where: str, conf=None, logger=None) -> None:
        self.where = where
        self.polls: list[float] = []
        self.reports: list = []
        self.buffer_full = 0

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None):
        from confluent_kafka import KafkaError, KafkaException

        if self.buffer_full:
            self.buffer_full -= 1
            raise BufferError("Local: Queue full")
        err = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
        if self.where == "produce":
            raise KafkaException(err)
        self.reports.append(lambda: on_delivery(err, None))

    def poll(self, timeout=0):
        self.polls.append(timeout)
        reports, self.reports = self.reports, []
        for r in reports:
            r()
        return len(reports)


def refusing_writer(where: str, refused_retry_s: float = 0.01):
    import processor.deadletter as deadletter
    from processor.metrics import Metrics

    deadletter.REFUSED_RETRY_S = refused_retry_s  # the test's own pace (restored by the fixture below)
    w = deadletter.DeadLetterWriter("shop.events.dlq", {}, Metrics(), 0.01, "shop.events.retry",
                                    producer=lambda conf, logger: RefusingProducer(where))
    return w


async def _refused(where: str, caplog) -> None:
    import asyncio
    import logging

    w = refusing_writer(where)
    acked = []
    src = Source("shop.events", 0, 7, None, b"k", b"v" * 10, [])
    with caplog.at_level(logging.ERROR, logger="processor.deadletter"):
        w.write(src, "qubit", "rejected", 400, "bad", 1, None, lambda: acked.append(1))
        for _ in range(20):  # the writer's own retries, driven as its run loop would
            w.producer.poll(0)
            await asyncio.sleep(0.005)
    assert not acked  # never settled: the offset is held, nothing lost
    assert w.failing and "shop.events.dlq" in w.failing_why  # readiness names it
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and "shop.events.dlq" in errors[0].getMessage() and "size" in errors[0].getMessage().lower()
    assert len(errors) < 5  # one line for a permanent refusal, not one a retry
    assert w.metrics.registry.get_sample_value("processor_dlq_produce_failures_total") >= 1
    assert all(t == 0 for t in w.producer.polls)  # the event loop is never blocked in poll


@pytest.fixture(autouse=True)
def _refused_retry_pace():
    import processor.deadletter as deadletter

    before = deadletter.REFUSED_RETRY_S
    yield
    deadletter.REFUSED_RETRY_S = before


async def test_a_dead_letter_topic_that_refuses_a_record_at_produce_time(caplog):
    await _refused("produce", caplog)


async def test_a_dead_letter_topic_that_refuses_a_record_in_the_delivery_report(caplog):
    await _refused("report", caplog)


async def test_a_full_producer_queue_never_blocks_the_event_loop():
    import asyncio

    w = refusing_writer("report")
    w.producer.buffer_full = 3
    src = Source("shop.events", 0, 7, None, b"k", b"v", [])
    w.write(src, "qubit", "rejected", 400, "bad", 1, None, lambda: None)
    for _ in range(10):
        await asyncio.sleep(0.005)
    assert all(t == 0 for t in w.producer.polls)

# -- relay.* numbers: exactly the ASCII digits the relay writes --------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (b"0", 0), (b"12", 12), ("1700000000000", 1_700_000_000_000), (b"007", 7),
    (b"\xc2\xb3\xc2\xb9", None), ("³¹", None),  # superscripts: str.isdigit() says yes, int() says no
    ("١٢", None), ("\uff11\uff12", None),  # int() takes these; the relay never writes them
    (b"-1", None), (b"+1", None), (b"", None), (b" 12", None), (b"12 ", None), (b"1_000", None), (b"1.5", None),
    (b"\xff", None), (None, None),
])
def test_relay_int_accepts_exactly_ascii_digits(value, expected):
    assert relay_int(value) == expected


FOREIGN_DIGITS = [b"\xc2\xb3\xc2\xb9", "١٢".encode(), b"-5", b" 12"]


@pytest.mark.parametrize("value", FOREIGN_DIGITS)
def test_foreign_digits_in_relay_headers_are_data_on_every_reader(value):
    src = Source("shop.events", 0, 7, 100, None, b"\x00junk", [
        (name, value) for name in ("relay.first_failure_ms", "relay.attempts", "relay.replay_count",
                                   "relay.original_topic", "relay.original_offset")])
    h = dlq_headers(src, None, "undecodable", None, "bad_framing", 0, 1, 2)  # raised ValueError for ³¹
    d = headers_dict(h)
    assert (d["relay.first_failure_ms"], d["relay.attempts"], d["relay.replay_count"]) == ("1", "0", "0")
    assert d["relay.original_topic"] == "shop.events" and d["relay.original_offset"] == "7"  # not a history of ours
    assert ("relay.first_failure_ms", value) in h  # the foreign value kept beside the fresh one
    assert first_failure_ms(src) is None
    assert prior_replay_count(src.headers) is None
    replayed = replayed_headers(src.headers, "qubit", "exhausted", 503, "r", 1, 50, 1)
    assert headers_dict(replayed)["relay.first_failure_ms"] == "50"


class FailingProducer(RefusingProducer):
    """A producer whose every delivery report carries ``err`` (the client's own KafkaError)."""

    def __init__(self, err) -> None:
        super().__init__("report")
        self.err = err
        self.produced = 0

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None):
        self.produced += 1
        self.reports.append(lambda: on_delivery(self.err, None))


def failing_writer(err, on_fatal=None):
    from processor.deadletter import DeadLetterWriter
    from processor.metrics import Metrics

    extra = {"on_fatal": on_fatal} if on_fatal is not None else {}
    return DeadLetterWriter("shop.events.dlq", {}, Metrics(), 0.01, "shop.events.retry",
                            producer=lambda conf, logger: FailingProducer(err), **extra)


async def test_a_fatal_producer_error_stops_the_relay_once_and_is_never_retried(caplog):
    import asyncio
    import logging

    from confluent_kafka import KafkaError

    fatal = KafkaError(KafkaError._FENCED, "Local: this producer was fenced", fatal=True)
    told: list[str] = []
    w = failing_writer(fatal, told.append)
    acked: list[int] = []
    with caplog.at_level(logging.ERROR, logger="processor.deadletter"):
        for offset in (7, 8):
            w.write(Source("shop.events", 0, offset, None, b"k", b"v", []), "qubit", "rejected", 400, "bad", 1, None,
                    lambda: acked.append(1))
        for _ in range(10):
            w.producer.poll(0)
            await asyncio.sleep(0.005)
        w.write(Source("shop.events", 0, 9, None, b"k", b"v", []), "qubit", "rejected", 400, "bad", 1, None,
                lambda: acked.append(1))
    assert not acked  # never settled: nothing committed past them
    assert w.producer.produced == 2  # never produced again, on this producer or for later records
    assert len(told) == 1 and "fenced" in told[0].lower()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "failed for good" in errors[0] and "_FENCED" in errors[0], errors
    assert w.pending == 0 and w.failing


async def test_transient_write_failures_are_retried_with_one_log_line_per_topic_a_minute(caplog):
    import asyncio
    import logging

    from confluent_kafka import KafkaError

    w = failing_writer(KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out"))
    with caplog.at_level(logging.WARNING, logger="processor.deadletter"):
        for offset in range(5):
            w.write(Source("shop.events", 0, offset, None, b"k", b"v", []), "qubit", "rejected", 400, "bad", 1, None,
                    lambda: None)
        for _ in range(20):
            w.producer.poll(0)
            await asyncio.sleep(0.005)
    assert w.producer.produced > 10  # retried
    lines = [r.getMessage() for r in caplog.records if "shop.events.dlq" in r.getMessage()]
    assert len(lines) == 1 and "timed out" in lines[0], lines
