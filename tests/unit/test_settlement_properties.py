"""Property-based tests (hypothesis) of the retry decision and of settlement.

Settlement: for any interleaving of outcomes (first or repeated), revokes and write acknowledgements,
every (event, vendor) gets exactly one accepted outcome, and no commit position ever passes a message some
vendor has not settled (delivered, or its dead-letter or parked record acknowledged)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from processor.offsets import OffsetTracker, RelaySettlement
from processor.retry import Step, decide, expired
from processor.vendors.base import RetrySettings
from tests.conftest import examples

VENDORS = ("a", "b", "c")


class Msg:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self.topic, self.partition, self.offset, self.slot = topic, partition, offset, None
        self.source = self
        self.kind = None

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


class QueueWriter:
    """Holds every write until the test acknowledges it."""

    def __init__(self) -> None:
        self.unacked: list[tuple[Msg, str, object]] = []

    def write(self, source, vendor, error_class, status, reason, attempts, first_ms, on_ack):
        self.unacked.append((source, vendor, on_ack))

    def park(self, source, vendor, reason, attempts, first_ms, next_attempt_ms, on_ack, waiting_on=""):
        self.unacked.append((source, vendor, on_ack))


messages = st.lists(st.sets(st.sampled_from(VENDORS), min_size=0, max_size=3), min_size=1, max_size=12)
op = st.one_of(
    st.tuples(st.just("outcome"), st.integers(0, 11), st.sampled_from(VENDORS),
              st.sampled_from(("delivered", "dead_letter", "park", "drop"))),
    st.tuples(st.just("ack"), st.integers(0, 30)),
    st.tuples(st.just("revoke"), st.integers(0, 1)),
    st.tuples(st.just("commit")),
)


@settings(max_examples=examples(300), deadline=None)
@given(routes=messages, ops=st.lists(op, max_size=60), partitions=st.lists(st.integers(0, 1), min_size=12,
                                                                            max_size=12))
def test_every_event_vendor_pair_settles_exactly_once_and_no_commit_passes_an_unsettled_message(
        routes, ops, partitions):
    tracker = OffsetTracker()
    writer = QueueWriter()
    s = RelaySettlement(tracker, writer)
    tracker.assign("t", 0)
    tracker.assign("t", 1)
    msgs = [Msg("t", partitions[i], i) for i in range(len(routes))]
    tracker.register_many(msgs, [len(r) for r in routes])
    accepted: dict[tuple[int, str], int] = {}
    done: set[tuple[int, str]] = set()  # settled in truth: delivered, or its record acknowledged
    revoked: set[int] = set()
    reports = 0

    def report(i: int, vendor: str, what: str) -> None:
        nonlocal reports
        reports += 1
        m = msgs[i]
        if what == "delivered":
            n = s.settle_many([m], vendor)
            if n and m.partition not in revoked:
                done.add((i, vendor))
        elif what == "drop":
            n = s.drop([m], vendor)
        elif what == "dead_letter":
            n = int(s.dead_letter(m, vendor, "rejected", 400, "bad", 1, None))
        else:
            n = int(s.park(m, vendor, "retry_budget", "HTTP 503", 1, None, 0))
        accepted[(i, vendor)] = accepted.get((i, vendor), 0) + n

    def ack(k: int) -> None:
        if writer.unacked:
            m, vendor, on_ack = writer.unacked.pop(k % len(writer.unacked))
            on_ack()  # type: ignore[operator]
            done.add((m.offset, vendor))

    def check_commit() -> None:
        for (_t, p), pos in tracker.commit_positions(only_changed=False).items():
            assert p not in revoked  # nothing committed for a partition no longer owned
            for m in msgs:
                if m.partition == p and m.offset < pos:
                    assert all((m.offset, v) in done for v in routes[m.offset]), (m.offset, pos)

    for o in ops:
        if o[0] == "outcome":
            i, vendor, what = o[1], o[2], o[3]
            if i < len(msgs) and vendor in routes[i]:
                report(i, vendor, what)
        elif o[0] == "ack":
            ack(o[1])
        elif o[0] == "revoke":
            tracker.revoke("t", o[1])
            revoked.add(o[1])
        check_commit()
    # the rest of the work: every pair reported (again), every write acknowledged
    for i, r in enumerate(routes):
        for v in r:
            report(i, v, "delivered")
    while writer.unacked:
        ack(0)
        check_commit()
    assert all(n == 1 for n in accepted.values())
    assert set(accepted) == {(i, v) for i, r in enumerate(routes) for v in r}
    assert s.outcomes.refused == reports - sum(accepted.values())  # every other report refused, and logged
    for (_t, p), pos in tracker.commit_positions(only_changed=False).items():  # all settled: all committable
        assert pos == max((m.offset for m in msgs if m.partition == p), default=-1) + 1
    assert tracker.inflight == 0


retry_settings = st.builds(RetrySettings, max_attempts=st.integers(1, 10), park_after_s=st.floats(0.1, 100),
                           max_elapsed_s=st.floats(1, 1000))


@settings(max_examples=examples(500), deadline=None)
@given(r=retry_settings, attempts=st.integers(0, 12), failing_s=st.floats(0, 2000), delay=st.floats(0, 200),
       parking=st.booleans(), breaker_open=st.booleans(), age_s=st.floats(0, 2000))
def test_the_retry_decision(r, attempts, failing_s, delay, parking, breaker_open, age_s):
    now_ms = 1_800_000_000_000.0
    first_ms = int(now_ms - age_s * 1000)
    d = decide(attempts, failing_s, first_ms, now_ms, delay, parking=parking, breaker_open=breaker_open, settings=r)
    assert d.delay_s == delay
    if parking:
        assert d.step is not Step.EXHAUSTED  # a parking vendor parks; expiry is judged per event when parked
        if breaker_open:
            assert d.step is Step.PARK and d.why == "breaker_open"
        elif d.step is Step.RETRY:
            assert attempts < r.max_attempts and failing_s + delay <= r.park_after_s
        else:
            assert d.why == "retry_budget"
    else:
        assert d.step is not Step.PARK
        gives_up = attempts >= r.max_attempts or expired(first_ms, now_ms + delay * 1000, r.max_elapsed_s)
        assert (d.step is Step.EXHAUSTED) == gives_up
    # one more counted attempt never turns giving up into retrying
    more = decide(attempts + 1, failing_s, first_ms, now_ms, delay, parking=parking, breaker_open=breaker_open,
                  settings=r)
    if d.step is not Step.RETRY:
        assert more.step is not Step.RETRY


@given(first=st.none() | st.integers(0, 10**13), at=st.integers(0, 10**13), max_s=st.floats(0.001, 10**6))
def test_expired_is_past_max_elapsed_from_the_first_failure(first, at, max_s):
    assert expired(first, at, max_s) == (first is not None and at - first > max_s * 1000)


@settings(max_examples=examples(200), deadline=None)
@given(pending=st.lists(st.integers(0, 3), min_size=1, max_size=8),
       calls=st.lists(st.tuples(st.sampled_from(VENDORS), st.lists(st.integers(0, 7), max_size=8)), max_size=10))
def test_the_one_pass_claim_and_settle_is_claim_then_settle(pending, calls):
    """The delivered path's fused loop against the plain reference: claim each item, then settle the claimed."""
    from processor.offsets import CLAIMED, vendor_bit

    def run(fused: bool) -> tuple[list, int, list[int]]:
        t = OffsetTracker()
        t.assign("t", 0)
        msgs = [Msg("t", 0, i) for i in range(len(pending))]
        t.register_many(msgs, pending)
        refused_total = []
        for vendor, picks in calls:
            items = [msgs[i] for i in picks if i < len(msgs)]
            bit = vendor_bit(vendor)
            if fused:
                refused = OffsetTracker.claim_and_settle(items, bit) or []
            else:
                refused, fresh = [], []
                for m in items:
                    if m.slot[CLAIMED] & bit:
                        refused.append(m)
                    else:
                        m.slot[CLAIMED] |= bit
                        fresh.append(m)
                t.settle_items(fresh)
            refused_total.append([m.offset for m in refused])
        return [(m.slot[0], m.slot[1], m.slot[CLAIMED]) for m in msgs], t.inflight, refused_total

    assert run(True) == run(False)
