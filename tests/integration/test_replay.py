"""Dead-letter inspect and replay through the real CLI, against the real broker and the sandbox.

Every config here has ``deadletter.producer: {batch.num.messages: 1}``: the local broker answers a
high-watermark query with one past the *first* offset of the partition's last record batch, not one
past its last record, so with one record a batch the answer is right. That is local configuration
only; the product asks Kafka for the high watermark as real Kafka reports it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Producer

from processor.deadletter import dlq_headers, headers_dict
from processor.devstack.broker import free_port
from processor.devstack.kafka_io import produce, read_all
from processor.devstack.samples import encode, make_order, make_view, with_changes
from processor.events import EventKind, Source
from processor.vendors import adapter_class
from tests.integration.conftest import quicklizard_vendor, relay_config, wait_for

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
ONE_RECORD_A_BATCH = {"batch.num.messages": 1}
ENV = {"QL_CLIENT_KEY": "ql-secret-key", **adapter_class("qubit").example_env}


def view(i: int, **changes: Any) -> bytes:
    rec = make_view(i, i, event_time=1_700_000_000_000 + i)
    rec["event_id"] = f"e{i}"
    for path, value in changes.items():
        rec = with_changes(rec, path.replace("__", "."), value)
    return encode(VIEW, rec)


def pid(i: int) -> str:
    return f"P-{i:05d}"


def qubit_vendor(sandbox: Any) -> dict[str, Any]:
    return {**adapter_class("qubit").example_settings(sandbox.url), "batch": {"max_events": 50, "max_wait_ms": 200},
            "retry": {"max_attempts": 3, "base_delay_ms": 50, "max_delay_ms": 200, "max_elapsed_s": 10}}


def replay_config(broker: Any, topics: Any, sandbox: Any, **relay: Any) -> dict[str, Any]:
    # on_outage: block and no breaker, so an outage dead-letters every event after its attempts (exhausted)
    # instead of parking: what replay is for
    no_breaker = {"consecutive_failures": 1_000_000, "min_requests": 1_000_000}
    quicklizard = quicklizard_vendor(sandbox, on_outage="block", breaker=no_breaker)
    cfg = relay_config(broker, topics, sandbox, {"quicklizard": quicklizard, "qubit": qubit_vendor(sandbox)}, **relay)
    cfg["deadletter"]["producer"] = dict(ONE_RECORD_A_BATCH)
    return cfg


class Cli:
    """``processor dlq ...`` as a subprocess on one config file."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str = "replay") -> None:
        self.path = workdir / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, **ENV}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "processor.cli", "dlq", *args, "--config", str(self.path)]

    def run(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, env=self.env, timeout=timeout_s)
        print("$ processor dlq", " ".join(args), f"(exit {proc.returncode})\n", proc.stdout[-4000:],
              proc.stderr[-2000:])
        return proc

    def json(self, *args: str) -> dict[str, Any]:
        proc = self.run(*args, "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)  # type: ignore[no-any-return]


def received_ids(sandbox: Any, vendor: str = "quicklizard") -> Counter[str]:
    items = sandbox.received(vendor)
    if vendor == "quicklizard":
        return Counter(i["product_id"] for i in items if i["event"] == "view")
    return Counter(str(i) for i in items)


def by_vendor_class(doc: dict[str, Any]) -> dict[tuple[str, str, int | None], int]:
    return {(c["vendor"], c["error_class"], c["http_status"]): c["records"] for c in doc["counts"]}


def put_records(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]) -> None:
    """Dead-letter records as the relay writes them, each with its own headers."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "log_level": 3, **ONE_RECORD_A_BATCH})
    for key, value, headers in records:
        p.produce(topic, value=value, key=key, headers=headers)
    assert p.flush(30) == 0


def dead_letter(i: int, value: bytes, vendor: str | None = "quicklizard", error_class: str = "exhausted",
                status: int | None = 500, failed_ms: int = 1_790_000_000_000, replay_count: int = 0,
                topic: str = "shop.events", partition: int = 0, offset: int | None = None,
                ) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    src = Source(topic, partition, i if offset is None else offset, 1_700_000_000_000 + i, f"k{i}".encode(), value,
                 [("trace", f"t-{i}".encode())])
    reason = f"HTTP {status} (after 4 attempts)" if error_class == "exhausted" else "missing required field x"
    headers = dlq_headers(src, vendor, error_class, status, reason, 4, failed_ms - 1000, failed_ms, replay_count)
    return src.key, value, headers  # type: ignore[return-value]


def test_outage_dead_letters_then_replay_delivers_to_that_vendor_alone(broker, topics, sandbox, relays, tmp_path):
    n = 200
    good = [(f"v{i}".encode(), view(i)) for i in range(n)]
    no_qubit_id = [(f"v{i}".encode(), view(i, visitor__vendor_ids={})) for i in range(n, n + 5)]
    sandbox.faults("quicklizard", error_rate=1.0, error_status=500)  # QuickLizard refuses everything for a while
    produce(broker.bootstrap, topics.events, good + no_qubit_id)
    cfg = replay_config(broker, topics, sandbox)
    relay = relays(cfg, env=ENV)
    wait_for(lambda: len(read_all(broker.bootstrap, topics.dlq, idle_s=0.3)) >= n + 5 + 5, 90, "dead letters")
    wait_for(lambda: sandbox.stats().get("qubit", {}).get("accepted", 0) >= n, 30, "qubit receives its own")
    assert relay.stop() == 0
    sandbox.faults("quicklizard")  # the outage ends
    assert sum(received_ids(sandbox).values()) == 0
    qubit_before = sandbox.stats()["qubit"]["requests"]
    cli = Cli(cfg, tmp_path)

    doc = cli.json("inspect")
    assert by_vendor_class(doc) == {("quicklizard", "exhausted", 500): n + 5, ("qubit", "rejected", None): 5}
    assert doc["vendors"]["quicklizard"]["pending"] == n + 5 and doc["vendors"]["quicklizard"]["replayed"] == 0
    assert doc["vendors"]["qubit"]["pending"] == 5
    assert doc["top_reasons"][0] == {"reason": "HTTP 500 (after 4 attempts)", "records": n + 5}

    dry = cli.run("replay", "--vendor", "quicklizard", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["replayed"] == n + 5 and plan["skipped_other_vendor"] == 5 and plan["plan"]["requests"] >= 1
    assert plan["plan"]["samples"] and "ql-secret-key" not in dry.stdout and "***" in dry.stdout
    assert sandbox.stats()["quicklizard"].get("accepted", 0) == 0  # sent nothing
    assert cli.json("inspect")["vendors"]["quicklizard"]["pending"] == n + 5  # committed nothing

    done = cli.json("replay", "--vendor", "quicklizard")
    assert (done["replayed"], done["delivered"], done["failed_again"], done["skipped"]) == (n + 5, n + 5, 0, 5)
    assert done["complete"] and done["at_max_replays"] == 0
    assert received_ids(sandbox) == Counter({pid(i): 1 for i in range(n + 5)})  # every one, once
    assert sandbox.stats()["qubit"]["requests"] == qubit_before  # none to the other vendor

    again = cli.json("replay", "--vendor", "quicklizard")
    assert (again["scanned"], again["replayed"], again["delivered"]) == (0, 0, 0)
    assert sum(received_ids(sandbox).values()) == n + 5
    after = cli.json("inspect")
    assert after["vendors"]["quicklizard"] | {"position": None} == {
        "group": f"{topics.group}.replay.quicklizard", "position": None, "records": n + 5, "pending": 0,
        "replayed": n + 5, "unassigned_pending": 0}
    assert after["vendors"]["qubit"]["pending"] == 5  # its own position is untouched


def test_replay_stopped_or_killed_half_way_resumes_and_delivers_everything(broker, topics, sandbox, tmp_path):
    n = 400
    put_records(broker.bootstrap, topics.dlq, [dead_letter(i, view(i)) for i in range(n)])
    cfg = replay_config(broker, topics, sandbox, max_inflight_events=40)
    cfg["vendors"]["quicklizard"]["batch"] = {"max_events": 20, "max_wait_ms": 100}
    cfg["vendors"]["quicklizard"]["concurrency"] = 1
    cli = Cli(cfg, tmp_path)
    sandbox.faults("quicklizard", latency_ms=20)
    rate = 100
    argv = cli.argv("replay", "--vendor", "quicklizard", "--rate", str(rate), "--json")

    # SIGTERM (Ctrl-C, a Job deleted): stop reading, let what is in flight settle, commit it, exit 3
    stopped = subprocess.Popen(argv, env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_for(lambda: sum(received_ids(sandbox).values()) >= n // 5, 60, "a fifth delivered")
    finally:
        stopped.send_signal(signal.SIGTERM)
    out, _ = stopped.communicate(timeout=60)
    assert stopped.returncode == 3, out
    doc = json.loads(out)
    sent = sum(received_ids(sandbox).values())
    assert doc["interrupted"] and not doc["complete"]
    assert doc["committed"]["0"] == doc["delivered"] == sent < n  # everything it sent, settled and committed
    assert doc["pending"] == n - sent

    # SIGKILL (kill -9, an evicted pod): nothing settles on the way out
    killed = subprocess.Popen(argv, env=cli.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sum(received_ids(sandbox).values()) >= sent + n // 5, 60, "another fifth delivered")
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
    first = received_ids(sandbox)
    assert sum(first.values()) < n  # killed half-way

    done = cli.json("replay", "--vendor", "quicklizard")
    assert done["complete"] and done["failed_again"] == 0 and done["scanned"] == done["delivered"]
    got = received_ids(sandbox)
    assert set(got) == {pid(i) for i in range(n)}  # every record delivered
    duplicates = sum(got.values()) - n
    print(f"killed after {sum(first.values()) - sent} deliveries; {duplicates} delivered twice")
    # at most what was in flight (the in-flight bound, one consume chunk, what settled since the last commit)
    assert duplicates <= 40 + rate // 5 + rate // 2, duplicates
    assert cli.json("replay", "--vendor", "quicklizard")["scanned"] == 0


def test_failed_again_written_back_with_count_and_at_max_not_resent(broker, topics, sandbox, tmp_path):
    no_url = view(1000, product__url=None, page__url=None)  # QuickLizard requires a permalink: rejected again
    order = make_order(2001, items=2)  # with a customer: e-mail, phone, names
    order["event_id"] = "e2001"
    records = [dead_letter(i, no_url, error_class="rejected", status=None, offset=i) for i in range(10)]
    records += [dead_letter(100 + i, view(100 + i), replay_count=3) for i in range(3)]  # at the maximum
    # undecodable when the relay read them (say a schema id it did not know); one decodes now, one never will
    records += [dead_letter(200, encode(ORDER, order), vendor=None, error_class="undecodable", status=None),
                dead_letter(201, b"plain text", vendor=None, error_class="undecodable", status=None)]
    put_records(broker.bootstrap, topics.dlq, records)
    cli = Cli(replay_config(broker, topics, sandbox), tmp_path)
    shown = cli.run("inspect", "--vendor", "none", "--show", "5")
    assert shown.returncode == 0 and "none          undecodable         -        2" in shown.stdout
    assert '"customer": {\n      "email": "***",' in shown.stdout and '"order_id": "O-2001-1"' in shown.stdout
    assert "user2001@" not in shown.stdout and "7946" not in shown.stdout  # PII masked
    assert "bad_framing: unknown magic byte 0x70" in shown.stdout

    done = cli.json("replay", "--vendor", "quicklizard")
    assert (done["scanned"], done["replayed"], done["delivered"]) == (15, 11, 1)
    assert (done["failed_again"], done["at_max_replays"], done["still_undecodable"]) == (10, 3, 1)
    assert done["complete"]
    reported = {r["at"]: r for r in done["reports"]}
    assert {r["decision"] for r in reported.values()} == {"at_max", "undecodable"}
    assert sum(r["decision"] == "at_max" for r in reported.values()) == 3
    assert not {pid(100 + i) for i in range(3)} & set(received_ids(sandbox))  # at the maximum: not re-sent
    orders = [i for i in sandbox.received("quicklizard") if i["event"] != "view"]
    assert len(orders) == 2  # the order's two lines, decoded now that its schema is known

    dlq = read_all(broker.bootstrap, topics.dlq, expect=len(records) + 11)
    written = dlq[len(records):]
    assert len(written) == 11
    heads = [headers_dict(m.headers()) for m in written]
    again = [(m, h) for m, h in zip(written, heads, strict=True) if h["relay.error_class"] == "rejected"]
    assert len(again) == 10
    originals = {int(headers_dict(h)["relay.original_offset"]): headers_dict(h) for _, _, h in records[:10]}
    for m, h in again:
        before = originals[int(h["relay.original_offset"])]
        assert h["relay.replay_count"] == "1" and h["relay.vendor"] == "quicklizard"
        assert h["relay.reason"] == "missing required field product.url" and h["relay.attempts"] == "1"
        assert h["relay.first_failure_ms"] == before["relay.first_failure_ms"]
        assert int(h["relay.last_failure_ms"]) > int(before["relay.last_failure_ms"])
        for kept in ("relay.original_topic", "relay.original_partition", "relay.original_timestamp_ms"):
            assert h[kept] == before[kept]
        assert m.value() == no_url and ("trace", f"t-{h['relay.original_offset']}".encode()) in m.headers()
    garbage = [h for h in heads if h["relay.error_class"] == "undecodable"]
    assert len(garbage) == 1 and garbage[0]["relay.replay_count"] == "1"
    assert garbage[0]["relay.vendor"] == "quicklizard" and garbage[0]["relay.reason"].startswith("bad_framing")
    pending = cli.json("inspect")["vendors"]["quicklizard"]
    assert (pending["pending"], pending["replayed"]) == (11, 13)  # what failed again is pending again

    # the written-back ones are at the maximum for a run that allows one replay: reported, nothing sent
    requests = sandbox.stats()["quicklizard"]["requests"]
    capped = cli.json("replay", "--vendor", "quicklizard", "--max-replays", "1")
    assert (capped["scanned"], capped["at_max_replays"], capped["replayed"]) == (11, 11, 0)
    assert sandbox.stats()["quicklizard"]["requests"] == requests


def test_filters_select_exactly_what_they_name(broker, topics, sandbox, tmp_path):
    now = int(time.time() * 1000)
    hour = 3_600_000
    records, want = [], Counter()
    for i in range(60):
        vendor = ("quicklizard", "qubit")[i % 2]
        error_class, status = (("exhausted", 500), ("exhausted", 503), ("rejected", None))[i % 3]
        failed = now - (1 + i % 5) * hour + 60_000  # 1..5 hours ago, a minute inside each hour
        records.append(dead_letter(i, view(i), vendor, error_class, status, failed, topic="shop.events",
                                   partition=i % 4, offset=i))
        want[(vendor, error_class, status, i % 5, i % 4)] += 1
    put_records(broker.bootstrap, topics.dlq, records)
    cli = Cli(replay_config(broker, topics, sandbox), tmp_path)

    def count(**match: Any) -> int:
        keys = ("vendor", "error_class", "status", "hours", "partition")
        return sum(n for k, n in want.items()
                   if all(pred(dict(zip(keys, k, strict=True))[f]) for f, pred in match.items()))

    assert cli.json("inspect")["matched"] == 60
    assert cli.json("inspect", "--vendor", "qubit")["matched"] == count(vendor=lambda v: v == "qubit") == 30
    assert cli.json("inspect", "--error-class", "rejected")["matched"] == count(error_class=lambda c: c == "rejected")
    assert cli.json("inspect", "--error-class", "rejected", "--error-class", "exhausted")["matched"] == 60
    assert cli.json("inspect", "--status", "503")["matched"] == count(status=lambda s: s == 503) == 20
    assert cli.json("inspect", "--since", "150m")["matched"] == count(hours=lambda h: h <= 1) == 24
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((now - 4 * hour) / 1000))
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((now - 2 * hour) / 1000))
    assert cli.json("inspect", "--since", since, "--until", until)["matched"] == count(
        hours=lambda h: h in (2, 3)) == 24  # failed 3h-59m and 2h-59m ago (0-based hours 2 and 3)
    narrow = cli.json("inspect", "--topic", "shop.events", "--partition", "1", "--offsets", "5-20")
    assert narrow["matched"] == len([i for i in range(5, 21) if i % 4 == 1]) == 4
    assert cli.json("inspect", "--topic", "elsewhere")["matched"] == 0

    done = cli.json("replay", "--vendor", "quicklizard", "--error-class", "exhausted", "--since", "150m")
    expected = {pid(i) for i in range(60) if i % 2 == 0 and i % 3 != 2 and i % 5 <= 1}
    assert done["delivered"] == len(expected) and done["skipped_by_filter"] == 30 - len(expected)
    assert done["skipped_other_vendor"] == 30
    assert received_ids(sandbox) == Counter(dict.fromkeys(expected, 1))
    # what that run skipped is behind quicklizard's position now; --from-start reaches it again
    assert cli.json("replay", "--vendor", "quicklizard", "--error-class", "rejected")["scanned"] == 0
    rejected = {pid(i) for i in range(60) if i % 2 == 0 and i % 3 == 2}
    late = cli.json("replay", "--vendor", "quicklizard", "--error-class", "rejected", "--from-start")
    assert (late["scanned"], late["delivered"]) == (60, len(rejected)) == (60, 10)
    assert received_ids(sandbox) == Counter(dict.fromkeys(expected | rejected, 1))


def test_bad_invocations_fail_with_a_clear_message(broker, topics, sandbox, tmp_path):
    cli = Cli(replay_config(broker, topics, sandbox), tmp_path)
    unknown = cli.run("replay", "--vendor", "nosuch")
    assert unknown.returncode == 1 and "unknown vendor 'nosuch'" in unknown.stderr
    not_configured = cli.run("replay", "--vendor", "convead")
    assert not_configured.returncode == 1 and "'convead' is not configured" in not_configured.stderr

    missing = Cli({**replay_config(broker, topics, sandbox), "deadletter": {"topic": "no.such.dlq"}}, tmp_path, "m")
    gone = missing.run("replay", "--vendor", "quicklizard")
    assert gone.returncode == 1 and "dead-letter topic 'no.such.dlq' does not exist" in gone.stderr
    assert missing.run("inspect").returncode == 1

    cfg = replay_config(broker, topics, sandbox)
    cfg["kafka"]["bootstrap_servers"] = f"127.0.0.1:{free_port()}"
    down = Cli(cfg, tmp_path, "down").run("inspect", "--timeout", "2")
    assert down.returncode == 1 and "cannot reach Kafka" in down.stderr

    bad = Cli({**cfg, "vendors": {"quicklizard": {"bogus": 1}}}, tmp_path, "bad").run("inspect")
    assert bad.returncode == 1 and "invalid config" in bad.stderr


def test_replay_stopped_while_its_vendor_hangs_exits_within_the_bound_with_the_watchdog_armed(broker, topics, sandbox,
                                                                                             tmp_path):
    """The replay's stop is the relay's (``processor.consumer.Stop``): SIGTERM arms the watchdog, the
    deliveries get ``shutdown_grace_s``, then the bounded last commit and close; nothing unsettled is
    committed, and the next run delivers it."""
    from processor.consumer import CLOSE_MARGIN_S

    n, grace = 30, 2.0
    put_records(broker.bootstrap, topics.dlq, [dead_letter(i, view(i)) for i in range(n)])
    cli = Cli(replay_config(broker, topics, sandbox, shutdown_grace_s=grace), tmp_path)
    sandbox.faults("quicklizard", timeout_rate=1.0, hang_s=600)  # every request held, never answered
    proc = subprocess.Popen(cli.argv("replay", "--vendor", "quicklizard", "--json"), env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sandbox.stats().get("quicklizard", {}).get("requests", 0) > 0, 60, "a request held")
    finally:
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=grace + CLOSE_MARGIN_S + 10)
    took = time.monotonic() - sent
    print(f"replay: SIGTERM -> exit {proc.returncode} after {took:.1f}s (bound {grace + CLOSE_MARGIN_S:g}s)")
    assert proc.returncode == 3 and took < grace + CLOSE_MARGIN_S, err[-3000:]
    assert "watchdog: exiting with every thread's stack if not stopped within" in err
    doc = json.loads(out)
    assert doc["interrupted"] and doc["pending"] == n and doc["delivered"] == 0
    assert doc["committed"]["0"] == 0  # nothing settled: nothing committed

    sandbox.faults("quicklizard")
    done = cli.json("replay", "--vendor", "quicklizard")
    assert done["complete"] and done["delivered"] == n
    assert set(received_ids(sandbox)) == {pid(i) for i in range(n)}
