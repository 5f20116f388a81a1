"""processor.topics: what a config needs from its topics, and how a topic's configs are judged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from processor.config import parse_config
from processor.topics import CreateOptions, TopicNeed, _config_problems, needed_topics, topic_settings


def config(**vendors):
    return parse_config({"kafka": {"bootstrap_servers": "k:9092", "topics": ["in"]},
                         "deadletter": {"topic": "in.dlq"}, "vendors": vendors})


QL = {"sites": {"default": {"client_key": "k"}}, "options": {}, "retry": {"max_elapsed_s": 100}}


def test_needs_input_deadletter_and_each_parking_vendors_retry_topic():
    needs = needed_topics(config(quicklizard=QL, tracardi={"sites": {"default": {"source_id": "s"}}, "options": {},
                                                           "on_outage": "block"}))
    assert [(n.name, n.role, n.min_retention_ms, n.min_message_bytes) for n in needs] == [
        ("in", "input", None, None), ("in.dlq", "dead-letter", None, 1_000_000),
        ("in.retry.quicklizard", "retry:quicklizard", 100_000, 1_000_000)]


def test_created_retry_topic_keeps_max_elapsed_plus_the_margin():
    need = TopicNeed("t.retry.x", "retry:x", 100_000, 1_000_000)
    assert topic_settings(need, CreateOptions(retry_margin_ms=5)) == {
        "retention.ms": "100005", "retention.bytes": "-1", "cleanup.policy": "delete", "max.message.bytes": "1000000"}


def entries(**values):
    return {k.replace("_", "."): SimpleNamespace(value=v) for k, v in values.items()}


@pytest.mark.parametrize(("values", "problem"), [
    ({"retention_ms": "100000", "max_message_bytes": "1000000"}, None),
    ({"retention_ms": "-1", "max_message_bytes": "1048588"}, None),  # kept forever
    ({"retention_ms": "99999", "max_message_bytes": "1000000"}, "retention.ms 99999 is shorter than 100000"),
    ({"retention_ms": "100000", "max_message_bytes": "999"}, "max.message.bytes 999 is smaller than 1000000"),
    ({"retention_ms": "100000", "retention_bytes": "1000", "max_message_bytes": "1000000"}, "retention.bytes 1000"),
    ({"max_message_bytes": "1000000"}, "does not report retention.ms"),
])
def test_config_problems(values, problem):
    found = _config_problems(TopicNeed("t", "retry:x", 100_000, 1_000_000), entries(**values))
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith("t: ") and problem in found[0]
