"""The source's pause bookkeeping across rebalances: one flag describes every assigned partition,
whether assignments come whole (eager assignors) or incrementally (cooperative-sticky, KIP-848)."""

from __future__ import annotations

import asyncio

import pytest
from confluent_kafka import TopicPartition

from processor.codec import Decoder
from processor.config import KafkaConfig
from processor.source import KafkaSource


class FakeConsumer:
    """Records what the source asks of librdkafka's assignment and pause state."""

    def __init__(self) -> None:
        self.assigned: set[tuple[str, int]] = set()
        self.paused: set[tuple[str, int]] = set()
        self.group_offsets: dict[tuple[str, int], int] = {}  # what the group committed
        self.lows: dict[tuple[str, int], int] = {}

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = {(tp.topic, tp.partition) for tp in tps}
        self.paused &= self.assigned  # a fresh assignment fetches

    def incremental_assign(self, tps: list[TopicPartition]) -> None:
        self.assigned |= {(tp.topic, tp.partition) for tp in tps}

    def unassign(self) -> None:
        self.assigned = set()
        self.paused = set()

    def incremental_unassign(self, tps: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in tps}
        self.assigned -= gone
        self.paused -= gone

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in tps}

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in tps}

    def consume(self, n: int, timeout: float) -> list[object]:
        return []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        pass

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float, cached: bool) -> tuple[int, int]:
        return self.lows.get((tp.topic, tp.partition), 0), 100

    def committed(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.group_offsets.get((tp.topic, tp.partition), -1001))
                for tp in tps]


def tps(*parts: int) -> list[TopicPartition]:
    return [TopicPartition("t", p) for p in parts]


async def source(strategy: str | None) -> tuple[KafkaSource, FakeConsumer]:
    client = {"partition.assignment.strategy": strategy} if strategy else {}
    cfg = KafkaConfig(bootstrap_servers="127.0.0.1:9", topics=["t"], client=client)

    async def on_assign(parts: list[tuple[str, int]]) -> None:
        pass

    async def on_revoke(parts: list[tuple[str, int]], lost: bool) -> dict[tuple[str, int], int]:
        return {}

    s = KafkaSource(cfg, Decoder(), asyncio.get_running_loop(), on_assign, on_revoke)
    fake = FakeConsumer()
    s.consumer = fake  # type: ignore[assignment]
    return s, fake


async def in_worker(fn, *args):  # the callbacks run on the source's worker thread, as inside consume()
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def test_an_incremental_assign_while_paused_pauses_the_new_partitions_too():
    s, fake = await source("cooperative-sticky")
    assert s.incremental
    await in_worker(s._assign_cb, fake, tps(0, 1))
    await s.poll(10, 0, pause=True)
    assert fake.paused == {("t", 0), ("t", 1)} and s.paused
    await in_worker(s._assign_cb, fake, tps(2))  # one more partition, the others stay assigned and paused
    assert fake.assigned == {("t", 0), ("t", 1), ("t", 2)}
    assert fake.paused == fake.assigned
    await s.poll(10, 0, pause=False)  # the loop's one decision applies to every partition
    assert fake.paused == set() and not s.paused
    s.executor.shutdown()


async def test_an_incremental_assign_while_fetching_leaves_every_partition_fetching():
    s, fake = await source("cooperative-sticky")
    await in_worker(s._assign_cb, fake, tps(0))
    await in_worker(s._assign_cb, fake, tps(1))
    assert fake.assigned == {("t", 0), ("t", 1)} and fake.paused == set()
    await in_worker(s._revoke_cb, fake, tps(0))
    assert s.assigned == [("t", 1)]
    s.executor.shutdown()


@pytest.mark.parametrize("strategy", [None, "range,roundrobin"])
async def test_an_eager_reassignment_while_paused_stays_paused(strategy):
    s, fake = await source(strategy)
    assert not s.incremental
    await in_worker(s._assign_cb, fake, tps(0, 1))
    await s.poll(10, 0, pause=True)
    await in_worker(s._revoke_cb, fake, tps(0, 1))
    await in_worker(s._assign_cb, fake, tps(1, 2))  # the whole new assignment, fresh in librdkafka
    assert fake.assigned == {("t", 1), ("t", 2)} and fake.paused == fake.assigned and s.paused
    s.executor.shutdown()


async def test_single_partitions_can_be_held_paused():
    s, fake = await source(None)
    await in_worker(s._assign_cb, fake, tps(0, 1, 2))
    await s.poll(10, 0, hold={("t", 1)})
    assert fake.paused == {("t", 1)}
    await s.poll(10, 0, hold={("t", 2)})
    assert fake.paused == {("t", 2)}
    await s.poll(10, 0, hold=set())
    assert fake.paused == set()
    s.executor.shutdown()


async def test_assigned_partitions_take_the_group_positions_so_lag_shows_before_the_first_commit():
    s, fake = await source(None)
    fake.group_offsets = {("t", 0): 40}
    fake.lows = {("t", 1): 7}  # nothing committed by the group: the start of what the partition holds
    await in_worker(s._assign_cb, fake, tps(0, 1))
    assert s.positions == {("t", 0): 40, ("t", 1): 7}
    poll = await s.poll(10, 0)
    assert poll.lag == {("t", 0): 60, ("t", 1): 93} and not poll.committed


def test_decode_all_makes_an_event_of_each_routable_record_and_a_decoded_of_the_rest(caplog, tmp_path):
    """Each message as the relay holds it, in consume order: an Event carrying the message's place, key,
    value, headers and timestamp (None when the message has none), a Decoded for what is undecodable or
    of a schema the relay does not route; a consumer error is logged and skipped, a fatal one raises."""
    import io
    import json

    import confluent_kafka as ck
    from fastavro import parse_schema, schemaless_writer

    from processor.codec import confluent_frame
    from processor.devstack.samples import encode, make_order, make_view
    from processor.events import Event, EventKind
    from processor.source import Decoded

    schema = {"type": "record", "name": "Other", "namespace": "shop.other", "fields": [{"name": "a", "type": "string"}]}
    (tmp_path / "other.avsc").write_text(json.dumps(schema))
    record = {"a": "b"}
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(schema), record)
    source = KafkaSource.__new__(KafkaSource)  # decode_all needs only the decoder
    source.decoder = Decoder(local_ids={1: "shop.events.ProductView", 2: "shop.events.OrderCompleted",
                                        9: tmp_path / "other.avsc"})
    view, order = make_view(1, 2), make_order(3)
    eof = ck.KafkaError(ck.KafkaError._PARTITION_EOF, "end of partition", fatal=False)
    msgs = [
        ck.Message(topic="t", partition=1, offset=7, key=b"k1", value=encode(EventKind.PRODUCT_VIEW, view),
                   headers=[("h", b"v")], timestamp=(ck.TIMESTAMP_CREATE_TIME, 1_700_000_000_123)),
        ck.Message(topic="t", partition=1, offset=8, error=eof),
        ck.Message(topic="t", partition=1, offset=9, key=None, value=encode(EventKind.ORDER, order),
                   timestamp=(ck.TIMESTAMP_NOT_AVAILABLE, 0)),
        ck.Message(topic="t", partition=1, offset=10, value=b"\x00\x00"),
        ck.Message(topic="t", partition=1, offset=11, value=confluent_frame(9, buf.getvalue())),
    ]
    with caplog.at_level("WARNING", "processor.source"):
        out = KafkaSource.decode_all(source, msgs)
    assert "end of partition" in caplog.text
    first, second, bad, other = out
    assert type(first) is Event and type(second) is Event
    assert [(e.kind, e.topic, e.partition, e.offset, e.key, e.headers, e.timestamp_ms, e.size, e.invalid)
            for e in (first, second)] == [
        (EventKind.PRODUCT_VIEW, "t", 1, 7, b"k1", [("h", b"v")], 1_700_000_000_123, len(msgs[0].value()),
         first.invalid),
        (EventKind.ORDER, "t", 1, 9, None, None, None, len(msgs[2].value()), second.invalid)]
    assert first.value == msgs[0].value() and first.record == view and second.record == order
    assert first.source is first and first.slot is None and first.where() == "t[1]@7"
    assert isinstance(bad, Decoded) and bad.error is not None and bad.error.reason == "bad_framing"
    assert bad.source.offset == 10 and bad.kind is None
    assert isinstance(other, Decoded) and other.error is None and other.kind is None and other.record == record
    fatal = ck.Message(topic="t", partition=1, offset=12,
                       error=ck.KafkaError(ck.KafkaError._FATAL, "fenced", fatal=True))
    with pytest.raises(ck.KafkaException):
        KafkaSource.decode_all(source, [fatal])


class Recording(FakeConsumer):
    """Records the order of commits and unassigns; ``refuse`` makes commits fail with that error."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.refuse: int | None = None
        self.block = None  # a threading.Event a commit waits on (a broker that does not answer)

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        from confluent_kafka import KafkaError, KafkaException

        self.calls.append("commit " + ",".join(f"{tp.partition}@{tp.offset}" for tp in offsets))
        if self.block is not None:
            self.block.wait(10)
        if self.refuse is not None:
            raise KafkaException(KafkaError(self.refuse))

    def unassign(self) -> None:
        self.calls.append("unassign")
        self.assigned = set()

    def incremental_unassign(self, tps: list[TopicPartition]) -> None:
        self.calls.append("incremental_unassign")
        super().incremental_unassign(tps)


async def recording_source(strategy: str | None, positions: dict[tuple[str, int], int]) -> tuple[KafkaSource,
                                                                                                  Recording]:
    s, _ = await source(strategy)
    fake = Recording()
    s.consumer = fake  # type: ignore[assignment]

    async def on_revoke(parts: list[tuple[str, int]], lost: bool) -> dict[tuple[str, int], int]:
        return {k: v for k, v in positions.items() if k in set(parts)}

    s._on_revoke = on_revoke
    return s, fake


@pytest.mark.parametrize("strategy", [None, "cooperative-sticky"])
async def test_the_revoke_callback_commits_what_settled_then_unassigns_itself(strategy):
    """Left to confluent-kafka, the unassign after a revoke callback happens in its fallback; the relay
    does it itself, after its commit, so the close path is its own."""
    s, fake = await recording_source(strategy, {("t", 0): 5, ("t", 1): 9})
    await in_worker(s._assign_cb, fake, tps(0, 1))
    await in_worker(s._revoke_cb, fake, tps(0, 1))
    assert fake.calls == ["commit 0@5,1@9", "incremental_unassign" if s.incremental else "unassign"]
    assert fake.assigned == set() and s.assigned == []
    s.executor.shutdown()


@pytest.mark.parametrize("code", ["UNKNOWN_MEMBER_ID", "ILLEGAL_GENERATION", "FENCED_INSTANCE_ID"])
async def test_a_fenced_member_never_commits_again_until_it_is_assigned_anew(code, caplog):
    from confluent_kafka import KafkaError

    s, fake = await recording_source(None, {("t", 0): 7})
    await in_worker(s._assign_cb, fake, tps(0))
    fake.refuse = getattr(KafkaError, code)
    poll = await s.poll(10, 0, commit={("t", 0): 3})
    assert poll.commit_failed and s.fenced
    assert not await s.commit({("t", 0): 4})  # not asked: the broker would refuse it, or never answer
    await in_worker(s._revoke_cb, fake, tps(0))  # the revoke of a fenced member: no commit, the unassign only
    assert fake.calls == ["commit 0@3", "unassign"]
    assert sum("fenced" in m for m in caplog.messages) == 1
    fake.refuse = None
    await in_worker(s._assign_cb, fake, tps(0))  # a new generation: commits again
    assert not s.fenced and await s.commit({("t", 0): 8})
    assert fake.calls[-1] == "commit 0@8"
    s.executor.shutdown()


async def test_a_commit_has_a_bound_of_its_own(caplog):
    import threading
    import time

    s, fake = await recording_source(None, {})
    await in_worker(s._assign_cb, fake, tps(0))
    fake.block = threading.Event()  # the broker takes the request and never answers
    started = time.monotonic()
    assert not await s.commit({("t", 0): 4}, timeout_s=0.2)
    assert time.monotonic() - started < 1
    assert any("commit of t[0]@4 not confirmed within 0.2s" in m for m in caplog.messages)
    fake.block.set()
    s.executor.shutdown()


async def test_the_revoke_during_close_does_not_commit_again_what_was_just_committed():
    s, fake = await recording_source(None, {("t", 0): 5})
    await in_worker(s._assign_cb, fake, tps(0))
    assert await s.commit({("t", 0): 5})
    await in_worker(s._revoke_cb, fake, tps(0))
    assert fake.calls == ["commit 0@5", "unassign"]
    s.executor.shutdown()
