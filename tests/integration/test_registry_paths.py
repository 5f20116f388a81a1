"""Every path that turns a record into an event, with a schema registry (the devstack stub) and ids no
process has fetched before: ``dlq inspect --show``, ``dlq replay`` (and the registry going away during
one), a relay restarted with a parked backlog, and schemas of another type in the input."""

from __future__ import annotations

import collections
import subprocess
from pathlib import Path
from typing import Any

from processor.codec import confluent_frame
from processor.deadletter import dlq_headers, headers_dict
from processor.devstack.kafka_io import committed, end_offsets, produce, read_all
from processor.devstack.registry import RegistryStub
from processor.devstack.samples import encode, make_view
from processor.events import EventKind, Source
from tests.integration.conftest import (
    DLQ_ID,
    JSON_ID,
    LIVE_ID,
    PARKED_ID,
    PROTO_ID,
    quicklizard_vendor,
    registry_schemas,
    relay_config,
    wait_for,
)
from tests.integration.test_replay import Cli, put_records, replay_config


def view_value(i: int, schema_id: int) -> bytes:
    rec = make_view(i, i, event_time=1_700_000_000_000 + i)
    rec["event_id"] = f"reg-{i}"
    return confluent_frame(schema_id, encode(EventKind.PRODUCT_VIEW, rec)[5:])


def pid(i: int) -> str:
    return f"P-{i:05d}"


def received(sandbox: Any) -> collections.Counter[str]:
    return collections.Counter(i["product_id"] for i in sandbox.received("quicklizard") if i["event"] == "view")


def own_registry() -> RegistryStub:
    """A stub of this test's own, to take away (the shared one stays up for the other tests)."""
    schemas, subjects = registry_schemas()
    return RegistryStub(schemas, subjects=subjects).start()


def with_registry(cfg: dict[str, Any], stub: RegistryStub) -> dict[str, Any]:
    cfg["schema_registry"] = {"url": stub.url, "client": {"max.retries": 0, "timeout": 2}}
    return cfg


def dead_letters(first: int, n: int, schema_id: int) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    out = []
    for i in range(first, first + n):
        src = Source("shop.events", 0, i, 1_700_000_000_000 + i, f"k{i}".encode(), view_value(i, schema_id), [])
        headers = dlq_headers(src, "quicklizard", "exhausted", 500, "HTTP 500 (after 4 attempts)", 4,
                              1_790_000_000_000, 1_790_000_001_000)
        out.append((src.key, src.value, headers))
    return out


def test_inspect_show_and_replay_resolve_ids_never_fetched_before(broker, topics, sandbox, tmp_path):
    put_records(broker.bootstrap, topics.dlq, dead_letters(0, 40, DLQ_ID))
    cli = Cli(replay_config(broker, topics, sandbox), tmp_path)  # the shared registry
    doc = cli.json("inspect", "--show", "2")  # exited 1: schema id 51 has not been fetched from the registry
    assert doc["matched"] == 40
    assert [s["kind"] for s in doc["samples"]] == ["product_view", "product_view"]
    assert [s["payload"]["product"]["product_id"] for s in doc["samples"]] == [pid(0), pid(1)]
    done = cli.json("replay", "--vendor", "quicklizard")  # exited 1 the same way: 0 of 40 delivered
    assert done["complete"] and done["delivered"] == 40 and done["still_undecodable"] == 0
    assert set(received(sandbox)) == {pid(i) for i in range(40)}


def test_replay_waits_while_the_registry_is_down_and_says_so_then_completes(broker, topics, sandbox, tmp_path):
    stub = own_registry()
    try:
        put_records(broker.bootstrap, topics.dlq, dead_letters(100, 30, DLQ_ID))
        cli = Cli(with_registry(replay_config(broker, topics, sandbox), stub), tmp_path)
        stub.stop()
        log = tmp_path / "replay.err"
        with open(log, "w") as err:
            proc = subprocess.Popen(cli.argv("replay", "--vendor", "quicklizard", "--json"), env=cli.env,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            wait_for(lambda: proc.poll() is None and "waiting for the schema registry" in Path(log).read_text(),
                     60, "the replay to say it waits for the registry")
            assert sum(received(sandbox).values()) == 0
            stub.start()  # back on the same port
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, Path(log).read_text()[-3000:]
        assert set(received(sandbox)) == {pid(i) for i in range(100, 130)}
        assert '"complete": true' in out
    finally:
        stub.stop()


def parked(first: int, n: int, topic: str) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    out = []
    for i in range(first, first + n):
        src = Source(topic, 0, i, 1_700_000_000_000 + i, f"k{i}".encode(), view_value(i, PARKED_ID), [])
        headers = dlq_headers(src, "quicklizard", "parked", None, "HTTP 503", 3, 0, 0,
                              extra=[("relay.next_attempt_ms", b"0")])
        first_ms = [(k, v) for k, v in headers if k != "relay.first_failure_ms"]  # failed just now: not expired
        out.append((src.key, src.value, [*first_ms, ("relay.first_failure_ms", str(2**41).encode())]))
    return out


def test_a_relay_restarted_with_a_parked_backlog_of_never_fetched_ids_redrives_it_all(broker, topics, sandbox,
                                                                                      relays):
    put_records(broker.bootstrap, topics.retry["quicklizard"], parked(0, 60, topics.events))
    relay = relays(relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)}))
    # it exited 1: "redrive of parked events failed: RegistryUnavailable(...)", at every restart
    wait_for(lambda: relay.alive_or_fail() and set(received(sandbox)) >= {pid(i) for i in range(60)}, 90,
             "the parked backlog redriven")
    assert read_all(broker.bootstrap, topics.dlq, idle_s=1) == []
    assert relay.stop() == 0


def test_json_schema_and_protobuf_ids_with_references_are_unknown_schema_and_the_partition_goes_on(
        broker, topics, sandbox, relays):
    msgs = [(b"k0", view_value(0, LIVE_ID)), (b"k1", confluent_frame(JSON_ID, b'{"a": 1}')),
            (b"k1", confluent_frame(PROTO_ID, b"\x0a\x01x")),
            *[(b"k1", view_value(i, LIVE_ID)) for i in range(1, 20)]]
    produce(broker.bootstrap, topics.events, msgs)
    relay = relays(relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)}))
    wait_for(lambda: relay.alive_or_fail() and set(received(sandbox)) >= {pid(i) for i in range(20)}, 60,
             "every view delivered past the foreign schemas")
    dlq = read_all(broker.bootstrap, topics.dlq, expect=2, timeout_s=30)
    reasons = sorted(headers_dict(m.headers())["relay.reason"] for m in dlq)
    assert [r.split(":")[0] for r in reasons] == ["unknown_schema", "unknown_schema"], reasons
    assert any(f"schema id {JSON_ID} is JSON" in r for r in reasons), reasons
    assert any(f"schema id {PROTO_ID} is PROTOBUF" in r for r in reasons), reasons
    ends = end_offsets(broker.bootstrap, topics.events)
    wait_for(lambda: {p: o for p, o in committed(broker.bootstrap, topics.group, topics.events).items()
                      if p in ends} == ends, 30, "every partition committed to its end")
    assert relay.stop() == 0
