"""processor.topics: what a config needs from its topics, and how a topic's configs are judged."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from processor.config import parse_config
from processor.topics import (
    DAY_MS,
    RETRY_RETENTION_MARGIN_MS,
    CreateOptions,
    TopicNeed,
    _config_problems,
    needed_topics,
    topic_settings,
)


def config(**vendors):
    return parse_config({"kafka": {"bootstrap_servers": "k:9092", "topics": ["in"]},
                         "deadletter": {"topic": "in.dlq"}, "vendors": vendors})


QL = {"sites": {"default": {"client_key": "k"}}, "options": {}, "retry": {"max_elapsed_s": 100}}


def test_needs_input_deadletter_and_each_parking_vendors_retry_topic():
    needs = needed_topics(config(quicklizard=QL, tracardi={"sites": {"default": {"source_id": "s"}}, "options": {},
                                                           "on_outage": "block"}))
    assert [(n.name, n.role, n.min_retention_ms, n.min_message_bytes) for n in needs] == [
        ("in", "input", None, None), ("in.dlq", "dead-letter", None, 1_000_000),
        ("in.retry.quicklizard", "retry:quicklizard", 100_000 + DAY_MS, 1_000_000)]


def test_created_retry_topic_keeps_max_elapsed_plus_the_margin_check_requires():
    """One rule: `create` gives a retry topic what `check` requires (retry.max_elapsed_s + 24 h), or more."""
    need = TopicNeed("t.retry.x", "retry:x", 100_000, 1_000_000)
    assert RETRY_RETENTION_MARGIN_MS == DAY_MS
    assert topic_settings(need, CreateOptions()) == {
        "retention.ms": str(100_000 + DAY_MS), "retention.bytes": "-1", "cleanup.policy": "delete",
        "max.message.bytes": "1000000"}
    assert _config_problems(need, entries(**{k.replace(".", "_"): v for k, v in topic_settings(
        need, CreateOptions()).items()})) == []
    assert topic_settings(need, CreateOptions(retry_margin_ms=2 * DAY_MS))["retention.ms"] == str(100_000 + 2 * DAY_MS)
    with pytest.raises(ValueError, match="at least 24 h"):
        CreateOptions(retry_margin_ms=DAY_MS - 1)


def test_runbook_states_the_margin_check_requires():
    runbook = (Path(__file__).resolve().parents[2] / "deploy" / "RUNBOOK.md").read_text()
    hours = RETRY_RETENTION_MARGIN_MS // 3_600_000
    assert f"`retry.max_elapsed_s` plus {hours} h" in " ".join(runbook.split())


def entries(**values):
    return {k.replace("_", "."): SimpleNamespace(value=v) for k, v in values.items()}


KEPT = str(100_000 + DAY_MS)  # retry.max_elapsed_s (100 s) plus the margin


@pytest.mark.parametrize(("values", "problem"), [
    ({"retention_ms": KEPT, "max_message_bytes": "1000000"}, None),
    ({"retention_ms": KEPT, "max_message_bytes": "1000000", "cleanup_policy": "delete"}, None),
    ({"retention_ms": "-1", "max_message_bytes": "1048588"}, None),  # kept forever
    ({"retention_ms": "99999", "max_message_bytes": "1000000"}, f"retention.ms 99999 is shorter than {KEPT}"),
    # exactly the retry budget: no margin for a relay that is down or a redrive that is behind
    ({"retention_ms": "100000", "max_message_bytes": "1000000"}, f"retention.ms 100000 is shorter than {KEPT}"),
    ({"retention_ms": KEPT, "max_message_bytes": "999"}, "max.message.bytes 999 is smaller than 1000000"),
    ({"retention_ms": KEPT, "retention_bytes": "1000", "max_message_bytes": "1000000"}, "retention.bytes 1000"),
    ({"max_message_bytes": "1000000"}, "does not report retention.ms"),
    ({"retention_ms": KEPT, "max_message_bytes": "1000000", "cleanup_policy": "compact"},
     "cleanup.policy compact compacts"),
    ({"retention_ms": KEPT, "max_message_bytes": "1000000", "cleanup_policy": "compact,delete"},
     "cleanup.policy compact,delete compacts"),
])
def test_config_problems(values, problem):
    found = _config_problems(TopicNeed("t", "retry:x", 100_000, 1_000_000), entries(**values))
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith("t: ") and problem in found[0]


def test_a_compacting_dead_letter_topic_is_named_and_an_input_topic_is_not_judged():
    dlq = TopicNeed("in.dlq", "dead-letter", None, 1_000_000)
    found = _config_problems(dlq, entries(max_message_bytes="1000000", cleanup_policy="compact"))
    assert found == ["in.dlq: cleanup.policy compact compacts (dead-letter topic): it keeps one record per key "
                     "and loses the rest (a broker refuses keyless records outright); set it to delete"]
    assert _config_problems(TopicNeed("in", "input"), entries(cleanup_policy="compact")) == []


# -- at the relay's start (issue 17, finding 5) -----------------------------------------------------------

class FakeAdmin:
    """What the broker says of each topic: ``max.message.bytes`` (absent: it says nothing) and the
    operations the relay is authorized for (None: it does not say)."""

    def __init__(self, max_bytes: dict[str, int], ops: dict[str, list] | None = None,
                 configs: dict[str, dict[str, str]] | None = None) -> None:
        self.max_bytes, self.ops, self.configs = max_bytes, ops or {}, configs or {}

    def describe_configs(self, resources, **kw):
        from concurrent.futures import Future

        out = {}
        for r in resources:
            f: Future = Future()
            value = self.max_bytes.get(r.name)
            described = {} if value is None else entries(max_message_bytes=str(value))
            f.set_result({**described, **entries(**self.configs.get(r.name, {}))})
            out[r] = f
        return out

    def describe_topics(self, topics, **kw):
        from concurrent.futures import Future

        out = {}
        for t in topics.topic_names:
            f: Future = Future()
            f.set_result(SimpleNamespace(name=t, authorized_operations=self.ops.get(t)))
            out[t] = f
        return out


def test_at_start_a_dead_letter_or_retry_topic_smaller_than_the_producers_records_is_refused():
    from processor.topics import start_problems

    admin = FakeAdmin({"in": 900_000, "in.dlq": 999_999, "in.retry.quicklizard": 8_000_000})
    problems, warnings = start_problems(config(quicklizard=QL), admin)
    assert len(problems) == 1 and problems[0].startswith("in.dlq: max.message.bytes 999999") and not warnings


def test_at_start_an_input_that_takes_records_too_large_to_dead_letter_is_named_with_the_setting():
    from processor.topics import HEADROOM_BYTES, start_problems

    admin = FakeAdmin({"in": 1_048_588, "in.dlq": 1_000_000})  # the defaults: a warning, not a refusal
    problems, warnings = start_problems(config(), admin)
    assert not problems and len(warnings) == 1
    assert warnings[0].startswith("in: ") and "deadletter.producer message.max.bytes" in warnings[0]
    assert str(1_048_588 + HEADROOM_BYTES) in warnings[0]


def test_at_start_a_topic_the_relay_may_not_write_is_refused_and_a_broker_that_says_nothing_passes():
    from confluent_kafka.admin import AclOperation

    from processor.topics import start_problems

    admin = FakeAdmin({}, {"in.dlq": [AclOperation.READ, AclOperation.DESCRIBE],
                           "in.retry.quicklizard": [AclOperation.ALL]})
    problems, _ = start_problems(config(quicklizard=QL), admin)
    assert problems == ["in.dlq: the relay's principal may not WRITE to it"]
    assert start_problems(config(quicklizard=QL), FakeAdmin({})) == ([], [])  # the test broker: nothing to judge


@pytest.mark.parametrize("topic", ["in.dlq", "in.retry.quicklizard"])
def test_at_start_a_compacting_dead_letter_or_retry_topic_is_refused(topic):
    from processor.topics import start_problems

    admin = FakeAdmin({}, configs={topic: {"cleanup_policy": "compact,delete"}, "in": {"cleanup_policy": "compact"}})
    problems, warnings = start_problems(config(quicklizard=QL), admin)
    assert [p.split(":")[0] for p in problems] == [topic] and "cleanup.policy compact,delete" in problems[0]
    assert warnings == []


def test_at_start_a_retry_topic_without_the_margin_is_named_not_refused():
    from processor.topics import start_problems

    admin = FakeAdmin({}, configs={"in.retry.quicklizard": {"retention_ms": "100000"}, "in.dlq": {"retention_ms": "1"}})
    problems, warnings = start_problems(config(quicklizard=QL), admin)
    assert problems == []
    assert warnings == [f"in.retry.quicklizard: retention.ms 100000 is shorter than {KEPT} (retry:quicklizard: "
                        "retry.max_elapsed_s 100000 ms plus the 24 h margin); parked events could be deleted before "
                        "they are redriven or dead-lettered as exhausted"]
