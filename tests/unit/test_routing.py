"""The relay's intake: a poll's messages registered in order, each vendor handed the kinds it takes."""

from processor.app import Relay
from processor.config import interpolate, parse_config
from processor.devstack.samples import as_event, make_order, make_view
from processor.events import EventKind
from processor.source import Decoded
from processor.vendors.qubit import QubitAdapter
from processor.vendors.quicklizard import QuickLizardAdapter


def relay() -> Relay:
    vendors = {}
    for cls, kinds in ((QubitAdapter, None), (QuickLizardAdapter, ["order"])):
        settings = interpolate(cls.example_settings("http://127.0.0.1:9"), "", cls.example_env)
        if kinds:
            settings["kinds"] = kinds
        settings["batch"] = {"max_events": 1000}  # nothing closes: the batches are looked at, not sent
        vendors[cls.name] = settings
    r = Relay(parse_config({"kafka": {"bootstrap_servers": "127.0.0.1:9", "group_id": "g", "topics": ["t"]},
                            "deadletter": {"topic": "t.dlq", "producer": {"log_level": 0}}, "vendors": vendors}))
    r._build_pipelines()
    return r


def test_each_vendor_gets_its_kinds_in_order_and_the_others_count_as_filtered():
    r = relay()
    r.tracker.assign("t", 0)
    events = [as_event(EventKind.ORDER if i % 3 == 0 else EventKind.PRODUCT_VIEW,
                       make_order(i) if i % 3 == 0 else make_view(i, i), i, topic="t") for i in range(9)]
    r.router.route(events)
    assert [e.offset for e in r.pipelines["qubit"].batcher.current.events] == list(range(9))
    assert [e.offset for e in r.pipelines["quicklizard"].batcher.current.events] == [0, 3, 6]
    assert [e.slot[1] for e in events] == [2, 1, 1, 2, 1, 1, 2, 1, 1]  # vendors still to settle each
    assert r.tracker.inflight == 9
    filtered = r.metrics.vendor_events.labels("quicklizard", "product_view", "filtered")._value.get()
    assert filtered == 6
    assert r.metrics.events_consumed.labels("t")._value.get() == 9


def test_an_undecodable_message_is_registered_in_its_place_for_the_dead_letter_topic():
    r = relay()
    r.tracker.assign("t", 0)
    written = []
    r.dlq.write = lambda src, vendor, error_class, *rest: written.append((src.offset, error_class, rest[-1]))
    bad = Decoded(as_event(EventKind.PRODUCT_VIEW, make_view(1, 1), 1, topic="t").source, None, {"x": 1})
    events = [as_event(EventKind.PRODUCT_VIEW, make_view(0, 0), 0, topic="t"), bad,
              as_event(EventKind.PRODUCT_VIEW, make_view(2, 2), 2, topic="t")]
    r.router.route(events)
    assert [(o, c) for o, c, _ in written] == [(1, "unroutable")]
    assert [e.offset for e in r.pipelines["qubit"].batcher.current.events] == [0, 2]
    assert r.tracker.commit_positions() == {("t", 0): 0}
    written[0][2]()  # Kafka acknowledged the dead letter
    r.tracker.settle(events[0].slot)  # and qubit delivered offset 0 (the only vendor for views)
    assert r.tracker.commit_positions() == {("t", 0): 2}


class Msg:
    """A raw message as confluent-kafka hands it over (what the relay holds while the registry is away)."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._where = (topic, partition, offset)

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]


def test_messages_held_for_the_registry_are_dropped_on_revoke_like_any_revoked_work():
    import asyncio

    r = relay()
    for p in (0, 1):
        r.tracker.assign("t", p)
    r._drained = True  # no drain: nothing is in flight
    r._held = {("t", 0): [Msg("t", 0, 5), Msg("t", 0, 6)], ("t", 1): [Msg("t", 1, 7), Msg("t", 1, 8)]}
    asyncio.run(r._on_revoke([("t", 0)], lost=False))
    assert [(m.partition(), m.offset()) for q in r._held.values() for m in q] == [(1, 7), (1, 8)]  # t[0] redelivered
    asyncio.run(r._on_revoke([("t", 1)], lost=True))
    assert r._held == {}


def test_liveness_fails_only_for_a_message_nothing_works_on_readiness_for_one_a_vendor_holds():
    r = relay()
    r.tracker.assign("t", 0)
    events = [as_event(EventKind.ORDER, make_order(0), 0, topic="t")]
    r.router.route(events)  # qubit and quicklizard hold it (batched)
    slot = r.tracker.tracks[("t", 0)].slots[0]
    slot[3] -= r.config.relay.stall_after_s + 5  # consumed long ago
    assert r.rules.stalled() is None  # a vendor still works on it: not a restart's to cure
    why = r.rules.waiting_past_stall()
    assert why is not None and "qubit holds 1 events" in why and "past relay.stall_after_s" in why
    for p in r.pipelines.values():  # the events leave the pipelines without settling: nothing owns the message
        p.admission.unsettled = 0
    assert r.rules.stalled() is not None and "nothing works on it" in r.rules.stalled()
    assert r.rules.waiting_past_stall() is None


class Framed(Msg):
    """A raw message whose value names a registry schema id."""

    def __init__(self, topic: str, partition: int, offset: int, schema_id: int) -> None:
        super().__init__(topic, partition, offset)
        self.schema_id = schema_id

    def value(self) -> bytes:
        return b"\x00" + self.schema_id.to_bytes(4, "big") + b"body"

    def error(self) -> None:
        return None


def test_a_schema_id_the_registry_has_not_answered_for_holds_its_partition_from_there_only():
    from types import SimpleNamespace

    r = relay()
    answered = {1, 2}
    waits = lambda v: int.from_bytes(v[1:5], "big") not in answered  # noqa: E731
    r.resolver = SimpleNamespace(decoder=SimpleNamespace(waits=waits))
    poll = [Framed("t", 0, 0, 1), Framed("t", 1, 0, 1), Framed("t", 0, 1, 11), Framed("t", 1, 1, 2),
            Framed("t", 0, 2, 1), Framed("t", 2, 0, 2)]
    ready = r._release_held(poll)
    # t[0] waits from offset 1 (its order kept: offset 2 waits behind it); t[1] and t[2] go on
    assert [(m.partition(), m.offset()) for m in ready] == [(0, 0), (1, 0), (1, 1), (2, 0)]
    assert {k: [m.offset() for m in q] for k, q in r._held.items()} == {("t", 0): [1, 2]}
    later = r._release_held([Framed("t", 1, 2, 2), Framed("t", 0, 3, 2)])
    assert [(m.partition(), m.offset()) for m in later] == [(1, 2)]  # t[0]'s new message queues behind the held
    answered.add(11)  # the registry answered: t[0] goes on, in order
    assert [(m.partition(), m.offset()) for m in r._release_held([])] == [(0, 1), (0, 2), (0, 3)]
    assert r._held == {}


def test_a_fatal_kafka_error_stops_the_relay_with_exit_1_one_error_and_nothing_committed_past_it(caplog):
    import faulthandler
    import logging
    from types import SimpleNamespace

    from confluent_kafka import KafkaError, KafkaException

    caplog.set_level(logging.ERROR)
    fenced = KafkaError(KafkaError.FENCED_INSTANCE_ID, "Broker: Static consumer fenced by other consumer with same "
                        "group.instance.id", fatal=True)

    def decode_all(raw):
        raise KafkaException(fenced)

    for who in ("consumer", "producer"):
        caplog.clear()
        r = relay()
        r.tracker.assign("t", 0)
        try:
            if who == "consumer":
                r.source = SimpleNamespace(decode_all=decode_all)
                r._route([Msg("t", 0, 0)])
                assert r.consumer_failed  # the shutdown commits nothing with it
            else:  # the dead-letter producer's fatal error, as its delivery report carries it
                assert r.dlq._is_fatal(KafkaError(KafkaError._FENCED, "Local: producer fenced", fatal=True))
            assert r.exit_code == 1 and r.stopping.is_set()
            assert r.tracker.commit_positions() == {}  # nothing of that poll registered, nothing to commit
            lines = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
            assert len(lines) == 1 and "failed for good" in lines[0] and "FENCED" in lines[0], lines
        finally:
            faulthandler.cancel_dump_traceback_later()  # the stop armed the watchdog: not in the test process
