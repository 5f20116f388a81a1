"""``processor topics create|check`` against the real broker: the dead-letter and retry topics created with
the right names and settings, idempotently; ``check`` names a missing topic, a retry topic whose retention
is shorter than retry.max_elapsed_s plus the 24 h margin, a dead-letter or retry topic that compacts and a
topic whose max.message.bytes is smaller than the producer's message.max.bytes; the relay refuses to start
on a compacting retry topic and names a retention without the margin (the local broker stores topic
configs, though it enforces none)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from processor.devstack.broker import LocalBroker
from tests.integration.conftest import Topics, quicklizard_vendor, relay_config, tracardi_vendor


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "processor.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def vendor(max_elapsed_s: float, **credentials: str) -> dict[str, Any]:
    return {"base_url": "https://vendor.example", "retry": {"max_elapsed_s": max_elapsed_s},
            "sites": {"default": credentials}, "options": {}}


def write_config(tmp_path: Path, broker: LocalBroker, events: str, vendors: dict[str, Any],
                 name: str = "relay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": broker.bootstrap, "topics": [events]},
        "deadletter": {"topic": f"{events}.dlq", "producer": {"message.max.bytes": 2_000_000}},
        "vendors": vendors,
    }))
    return path


def topic_configs(broker: LocalBroker, topic: str) -> dict[str, str]:
    admin = broker.admin()
    [future] = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)], request_timeout=30).values()
    return {k: v.value for k, v in future.result(timeout=30).items()}


def alter(broker: LocalBroker, topic: str, key: str, value: str) -> None:
    admin = broker.admin()
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)])
    for future in admin.incremental_alter_configs([resource], request_timeout=30).values():
        future.result(timeout=30)


def test_create_then_check(broker: LocalBroker, tmp_path: Path):
    events = f"shop.events.{uuid.uuid4().hex[:8]}"
    broker.create_topics({events: 3})
    config = write_config(tmp_path, broker, events, {
        "quicklizard": vendor(7200, client_key="k"),
        "tracardi": vendor(600, source_id="s"),
        "convead": vendor(600, app_key="a") | {"on_outage": "block"},
    })
    short = cli("topics", "create", "--config", str(config), "--retry-retention-margin-hours", "1")
    assert short.returncode == 2 and "--retry-retention-margin-hours" in short.stderr  # check would refuse it
    made = cli("topics", "create", "--config", str(config), "--retry-retention-margin-hours", "48")
    assert made.returncode == 0, made.stderr
    dlq, ql, tr = f"{events}.dlq", f"{events}.retry.quicklizard", f"{events}.retry.tracardi"
    assert sorted(made.stdout.split("\n")) == sorted(["", f"{dlq}: created", f"{ql}: created", f"{tr}: created"])
    assert f"{events}.retry.convead" not in broker.admin().list_topics(timeout=30).topics  # blocks: no retry topic
    partitions = {t: len(md.partitions) for t, md in broker.admin().list_topics(timeout=30).topics.items()}
    assert partitions[dlq] == partitions[ql] == partitions[tr] == 3  # as many as the input topic
    assert topic_configs(broker, ql)["retention.ms"] == str((7200 + 48 * 3600) * 1000)
    assert topic_configs(broker, tr)["retention.ms"] == str((600 + 48 * 3600) * 1000)
    assert topic_configs(broker, ql)["cleanup.policy"] == "delete"
    assert topic_configs(broker, dlq)["retention.ms"] == str(14 * 86_400_000)
    for topic in (dlq, ql, tr):
        assert topic_configs(broker, topic)["max.message.bytes"] == "2000000"  # the producer's message.max.bytes

    again = cli("topics", "create", "--config", str(config), "--partitions", "1")
    assert again.returncode == 0, again.stderr
    assert sorted(again.stdout.split("\n")) == sorted(["", f"{dlq}: exists", f"{ql}: exists", f"{tr}: exists"])

    checked = cli("topics", "check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert f"{ql}: ok (retry:quicklizard)" in checked.stdout and f"{events}: ok (input)" in checked.stdout

    listed = cli("check-config", str(config))
    assert listed.returncode == 0, listed.stderr
    for topic in (events, dlq, ql, tr):
        assert f"#   {topic}  (" in listed.stderr


def test_check_names_what_does_not_fit(broker: LocalBroker, tmp_path: Path):
    events = f"shop.events.{uuid.uuid4().hex[:8]}"
    broker.create_topics({events: 1})
    vendors = {"quicklizard": vendor(7200, client_key="k")}
    made = cli("topics", "create", "--config", str(write_config(tmp_path, broker, events, vendors)))
    assert made.returncode == 0, made.stderr
    dlq, ql = f"{events}.dlq", f"{events}.retry.quicklizard"
    alter(broker, ql, "retention.ms", str(7200 * 1000))  # exactly the retry budget: no margin
    alter(broker, dlq, "max.message.bytes", "1000")
    alter(broker, dlq, "cleanup.policy", "compact,delete")
    # the same config plus a parking vendor whose retry topic nobody created
    wider = write_config(tmp_path, broker, events, {**vendors, "tracardi": vendor(600, source_id="s")}, "wider.yaml")

    checked = cli("topics", "check", "--config", str(wider))
    assert checked.returncode == 1, checked.stdout
    lines = checked.stderr.splitlines()
    assert f"{events}.retry.tracardi: missing (retry:tracardi topic)" in lines
    assert f"{ql}: retention.ms 7200000 is shorter than {(7200 + 24 * 3600) * 1000} (retry:quicklizard: " \
           "retry.max_elapsed_s 7200000 ms plus the 24 h margin); parked events could be deleted before they are " \
           "redriven or dead-lettered as exhausted" in lines, lines
    assert any(line.startswith(f"{dlq}: max.message.bytes 1000 is smaller than 2000000") for line in lines), lines
    assert any(line.startswith(f"{dlq}: cleanup.policy compact,delete compacts (dead-letter topic)")
               for line in lines), lines
    assert "Error: 4 problem(s)" in checked.stderr


def test_relay_refuses_a_compacting_retry_topic_and_names_a_retention_without_margin(broker, sandbox, relays):
    topics = Topics(broker)
    ql, tr = topics.retry["quicklizard"], topics.retry["tracardi"]
    alter(broker, ql, "cleanup.policy", "compact")
    alter(broker, tr, "retention.ms", "10000")  # exactly tracardi's retry.max_elapsed_s (10 s): no margin
    cfg = relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox),
                                                 "tracardi": tracardi_vendor(sandbox)})
    refused = relays(cfg, "compacting-retry")
    assert refused.proc.wait(60) == 2
    errors = [json.loads(line) for line in refused.log().splitlines() if '"level":"error"' in line]
    assert any(f"{ql}: cleanup.policy compact compacts (retry:quicklizard topic)" in e["msg"] for e in errors)
    assert any(e["msg"].startswith(f"{tr}: retention.ms 10000 is shorter than") for e in errors), errors

    alter(broker, ql, "cleanup.policy", "delete")  # fixed: it starts, and still names the short retention
    relay = relays(cfg, "short-retention")
    relay.wait_ready(60)
    errors = [json.loads(line) for line in relay.log().splitlines() if '"level":"error"' in line]
    assert [e["msg"].split(":")[0] for e in errors] == [tr], errors
