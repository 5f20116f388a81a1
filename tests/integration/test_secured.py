"""Every Kafka client of the relay against a secured cluster: SASL_SSL with SCRAM-SHA-512 and a private CA.

The local broker sits behind ``KafkaFront`` (TLS with a certificate signed by a CA this module makes,
SCRAM users this module makes); the relay, ``dlq inspect|replay`` and ``topics create|check`` connect
through it with the settings an operator writes in ``kafka.client``. The tests' own setup (topics,
events, reading what was written) talks to the broker directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from processor.devstack.broker import LocalBroker
from processor.devstack.kafka_io import produce, read_all
from processor.devstack.registry import RegistryStub
from tests.integration.conftest import (
    Topics,
    http_text,
    quicklizard_vendor,
    registry_schemas,
    relay_config,
    wait_for,
)
from tests.integration.kafka_front import KafkaFront, User
from tests.integration.test_replay import ENV, Cli, dead_letter, pid, put_records, received_ids, replay_config, view

pytestmark = pytest.mark.integration

RELAY_PASSWORD = "k9-relay-Secr3t"


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed the front's certificate
    other_ca: Path  # a CA that did not
    broker_pem: Path  # the front's key and certificate chain


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    out = Pki(d / "ca.pem", d / "other-ca.pem", d / "broker.pem")
    ca.cert_pem.write_to_path(str(out.ca))
    other.cert_pem.write_to_path(str(out.other_ca))
    cert.private_key_and_cert_chain_pem.write_to_path(str(out.broker_pem))
    return out


@pytest.fixture(scope="module")
def front(broker: LocalBroker, pki: Pki) -> Iterator[KafkaFront]:
    users = {"svc-relay": User(RELAY_PASSWORD), "no-group": User("k9-other-Secr3t", groups=False),
             "no-topics": User("k9-third-Secr3t", topics=False)}
    with KafkaFront(broker.bootstrap, pki.broker_pem, pki.broker_pem, users) as f:
        yield f


def secured(cfg: dict[str, Any], front: KafkaFront, pki: Pki, user: str = "svc-relay", password: str | None = None,
            ca: Path | None = None) -> dict[str, Any]:
    """``cfg`` connecting through the front: SASL_SSL, SCRAM-SHA-512, the test's CA (or ``ca``)."""
    kafka = dict(cfg["kafka"])
    kafka["bootstrap_servers"] = front.bootstrap
    kafka["client"] = {**kafka.get("client", {}), **front.client_settings(user, password, ca or pki.ca)}
    return {**cfg, "kafka": kafka}


def processor(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "processor.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, check=False, env={**os.environ, **ENV})
    print("$ processor", " ".join(args), f"(exit {proc.returncode})\n", proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def test_relay_delivers_end_to_end_over_sasl_ssl_with_scram(broker, front, pki, topics, sandbox, relays):
    n = 60
    produce(broker.bootstrap, topics.events, [(f"v{i}".encode(), view(i)) for i in range(n)])
    before = len(front.authenticated)
    cfg = secured(relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)}), front, pki)
    relay = relays(cfg)
    relay.wait_ready(60)
    wait_for(lambda: sum(received_ids(sandbox).values()) >= n, 60, "every event delivered")
    assert received_ids(sandbox) == Counter({pid(i): 1 for i in range(n)})
    assert relay.stop() == 0
    # the consumer, the dead-letter and parking producer, the admin client and the parked redrive all came in
    # through the front as the relay's user
    assert set(front.authenticated[before:]) == {"svc-relay"} and len(front.authenticated) - before >= 3


def test_parked_events_are_written_and_redriven_over_sasl_ssl(broker, front, pki, topics, sandbox, relays):
    """The parking producer writes the retry topic and the redrive consumer reads it back, both through the front."""
    n = 60
    fragile = quicklizard_vendor(
        sandbox, batch={"max_events": 20, "max_wait_ms": 100}, timeout={"connect_s": 1, "total_s": 1.5},
        retry={"max_attempts": 2, "base_delay_ms": 50, "max_delay_ms": 100, "park_after_s": 1, "max_elapsed_s": 600},
        breaker={"consecutive_failures": 3, "cooldown_s": 1, "max_cooldown_s": 2, "probes": 1})
    cfg = secured(relay_config(broker, topics, sandbox, {"quicklizard": fragile}), front, pki)
    sandbox.faults("quicklizard", error_rate=1.0, error_status=503)
    produce(broker.bootstrap, topics.events, [(f"v{i}".encode(), view(i)) for i in range(n)])
    relay = relays(cfg)
    wait_for(lambda: relay.alive_or_fail() and relay.metric("processor_parked_total", vendor="quicklizard") >= n, 60,
             "every event parked")
    assert len(read_all(broker.bootstrap, topics.retry["quicklizard"], expect=n, timeout_s=30)) >= n
    sandbox.faults("quicklizard")  # recovered
    wait_for(lambda: set(received_ids(sandbox)) == {pid(i) for i in range(n)}, 90, "the parked events redriven")
    assert relay.metric("processor_redriven_events_total", vendor="quicklizard", outcome="delivered") >= n
    assert read_all(broker.bootstrap, topics.dlq, idle_s=0.5) == []
    assert relay.stop() == 0


def test_dlq_inspect_and_replay_over_sasl_ssl(broker, front, pki, topics, sandbox, tmp_path):
    n = 20
    put_records(broker.bootstrap, topics.dlq, [dead_letter(i, view(i)) for i in range(n)])
    cli = Cli(secured(replay_config(broker, topics, sandbox), front, pki), tmp_path)
    doc = cli.json("inspect")
    assert doc["vendors"]["quicklizard"]["pending"] == n
    done = cli.json("replay", "--vendor", "quicklizard")
    assert (done["replayed"], done["delivered"], done["failed_again"]) == (n, n, 0) and done["complete"]
    assert received_ids(sandbox) == Counter({pid(i): 1 for i in range(n)})
    assert cli.json("inspect")["vendors"]["quicklizard"]["pending"] == 0


def test_topics_create_and_check_over_sasl_ssl(broker, front, pki, sandbox, tmp_path):
    events = f"shop.events.{uuid.uuid4().hex[:8]}"
    broker.create_topics({events: 2})
    topics = Topics.__new__(Topics)  # names only: `topics create` makes the dead-letter and retry topics
    topics.events, topics.dlq, topics.group = events, f"{events}.dlq", f"relay-{events}"
    cfg = secured(relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)}), front, pki)
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    created = processor("topics", "create", "--config", str(path))
    assert created.returncode == 0, created.stderr
    assert f"{events}.dlq: created" in created.stdout and f"{events}.retry.quicklizard: created" in created.stdout
    checked = processor("topics", "check", "--config", str(path))
    assert checked.returncode == 0, checked.stderr
    assert f"{events}.retry.quicklizard: ok" in checked.stdout


def test_front_refuses_a_wrong_password_and_an_unknown_ca(front, pki):
    """The front itself: what the failure tests below rely on (a wrong password is refused by SCRAM, a client
    that trusts another CA does not finish the TLS handshake)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    refused = len(front.refused)
    for settings in (front.client_settings("svc-relay", "wrong-password", pki.ca),
                     front.client_settings("svc-relay", ca=pki.other_ca)):
        admin = AdminClient({"bootstrap.servers": front.bootstrap, **settings, "log_level": 0})
        t0 = time.monotonic()
        with pytest.raises(KafkaException):  # librdkafka says only "transport failure" here
            admin.list_topics(timeout=3)
        assert time.monotonic() - t0 < 10
    assert len(front.refused) > refused and "invalid-proof" in front.refused[-1]


REFUSALS = {  # case -> (user, password, which CA, what the one ERROR and /readyz name)
    "wrong password": ("svc-relay", "not-the-password", "ca", "authentication failed"),
    "untrusted CA": ("svc-relay", None, "other_ca", "certificate"),
    "no permission on the group": ("no-group", None, "ca", "not authorized: the broker refuses the principal "
                                                          "access to the consumer group"),
    "no permission on the topics": ("no-topics", None, "ca", "not authorized: the broker refuses the principal "
                                                             "access to a topic"),
}


def error_lines(log: str) -> list[dict[str, Any]]:
    import json

    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [doc for doc in lines if doc.get("level") in ("error", "critical")]


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_connection_is_one_named_error_and_no_readiness(case, broker, front, pki, topics, sandbox, relays):
    user, password, ca, named = REFUSALS[case]
    cfg = secured(relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)}), front, pki,
                  user, password, getattr(pki, ca))
    relay = relays(cfg)
    t0 = time.monotonic()
    wait_for(lambda: relay.alive_or_fail() and any(named in e["msg"] for e in error_lines(relay.log())), 20,
             f"an ERROR naming {named!r}")
    took = time.monotonic() - t0
    print(f"MEASURE relay {case}: the named ERROR {took:.1f}s after the start")
    status, why = http_text(f"{relay.metrics_url}/readyz")
    # a few seconds more: the cause is named once, not once a reconnect
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert http_text(f"{relay.metrics_url}/readyz")[0] == 503
        time.sleep(0.5)
    errors = error_lines(relay.log())
    print(relay.log()[-4000:])
    assert status == 503 and named in why, why
    assert len(errors) == 1, errors
    assert RELAY_PASSWORD not in relay.log() and "not-the-password" not in relay.log()
    assert took < 15
    assert relay.stop() == 0


@pytest.mark.parametrize("case", ["wrong password", "untrusted CA"])
@pytest.mark.parametrize("command", [("topics", "check"), ("topics", "create"), ("dlq", "inspect"),
                                     ("dlq", "replay", "--vendor", "quicklizard")], ids=" ".join)
def test_the_cli_tools_name_a_refused_connection_at_once(case, command, broker, front, pki, topics, sandbox,
                                                         tmp_path):
    user, password, ca, named = REFUSALS[case]
    cfg = secured(relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)}), front, pki,
                  user, password, getattr(pki, ca))
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.monotonic()
    done = processor(*command, "--config", str(path))
    took = time.monotonic() - t0
    print(f"MEASURE {' '.join(command)} {case}: exit {done.returncode} after {took:.1f}s")
    assert done.returncode != 0
    assert named in done.stderr and "not-the-password" not in done.stderr + done.stdout
    assert took < 10  # not the 15-30 s timeouts of a broker that does not answer


# -- the schema registry over TLS with basic auth (Confluent Cloud's shape) -----------------------------------

REGISTRY_KEY, REGISTRY_SECRET = "SR-API-KEY", "sr-Secr3t-value"


@pytest.fixture(scope="module")
def tls_registry(pki: Pki) -> Iterator[RegistryStub]:
    schemas, subjects = registry_schemas()
    stub = RegistryStub(schemas, subjects=subjects, tls=(str(pki.broker_pem), str(pki.broker_pem)),
                        credentials=(REGISTRY_KEY, REGISTRY_SECRET))
    with stub:
        yield stub


def with_registry(cfg: dict[str, Any], stub: RegistryStub, secret: str = REGISTRY_SECRET,
                  ca: Path | None = None) -> dict[str, Any]:
    return {**cfg, "schema_registry": {"url": stub.url, "client": {
        "basic.auth.user.info": f"{REGISTRY_KEY}:{secret}", "ssl.ca.location": str(ca)}}}


def test_the_relay_reads_schemas_from_a_registry_over_tls_with_basic_auth(broker, front, pki, tls_registry, topics,
                                                                          sandbox, relays):
    n = 20
    assert tls_registry.url.startswith("https://")
    produce(broker.bootstrap, topics.events, [(f"v{i}".encode(), view(i)) for i in range(n)])
    asked, refused = tls_registry.requests, tls_registry.refused
    cfg = secured(relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)}), front, pki)
    relay = relays(with_registry(cfg, tls_registry, ca=pki.ca))
    wait_for(lambda: relay.alive_or_fail() and sum(received_ids(sandbox).values()) >= n, 60, "every event delivered")
    assert received_ids(sandbox) == Counter({pid(i): 1 for i in range(n)})
    assert tls_registry.requests > asked and tls_registry.refused == refused
    assert relay.stop() == 0


REGISTRY_REFUSALS = {  # case -> (secret, which CA, what the one ERROR and /readyz name)
    "wrong credential": ("not-the-secret", "ca", "401 (the registry refused the credentials: schema_registry.client "
                                                 "basic.auth.user.info)"),
    "untrusted CA": (REGISTRY_SECRET, "other_ca", "certificate is not signed by a CA the client trusts"),
}


@pytest.mark.parametrize("case", list(REGISTRY_REFUSALS))
def test_a_refusing_registry_is_one_error_naming_it_and_nothing_dead_lettered(case, broker, front, pki, tls_registry,
                                                                              topics, sandbox, relays):
    secret, ca, named = REGISTRY_REFUSALS[case]
    n = 10
    produce(broker.bootstrap, topics.events, [(f"v{i}".encode(), view(i)) for i in range(n)])
    cfg = secured(relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)}), front, pki)
    relay = relays(with_registry(cfg, tls_registry, secret, getattr(pki, ca)))

    def named_error() -> bool:
        return any("registry" in e["msg"] and named in e["msg"] for e in error_lines(relay.log()))

    wait_for(lambda: relay.alive_or_fail() and named_error(), 30, f"an ERROR naming the registry and {named!r}")
    status, why = http_text(f"{relay.metrics_url}/readyz")
    assert status == 503 and "registry" in why and named in why, why
    errors = error_lines(relay.log())
    assert len(errors) == 1, errors
    assert "does not exist" not in relay.log() and "not found" not in relay.log()
    assert sum(received_ids(sandbox).values()) == 0
    assert read_all(broker.bootstrap, topics.dlq, idle_s=0.5) == []  # nothing dead-lettered as undecodable
    assert "not-the-secret" not in relay.log() and REGISTRY_SECRET not in relay.log()
    assert relay.stop() == 0


CHECK_CONFIG_CASES = {  # case -> (kafka password, kafka CA, registry secret, what it names; None: it passes)
    "as configured": (None, "ca", REGISTRY_SECRET, None),
    "wrong password": ("not-the-password", "ca", REGISTRY_SECRET, "SASL authentication failed"),
    "untrusted CA": (None, "other_ca", REGISTRY_SECRET, "certificate is not signed"),
    "wrong registry credential": (None, "ca", "not-the-secret", "HTTP 401 (the registry refused the credentials"),
}


@pytest.mark.parametrize("case", list(CHECK_CONFIG_CASES))
def test_check_config_connect_names_what_refuses_the_config(case, broker, front, pki, tls_registry, topics, sandbox,
                                                            tmp_path):
    password, ca, secret, named = CHECK_CONFIG_CASES[case]
    cfg = secured(relay_config(broker, topics, sandbox, {"quicklizard": quicklizard_vendor(sandbox)}), front, pki,
                  password=password, ca=getattr(pki, ca))
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(with_registry(cfg, tls_registry, secret, pki.ca)))
    t0 = time.monotonic()
    done = processor("check-config", str(path), "--connect")
    assert time.monotonic() - t0 < 10
    assert "not-the-password" not in done.stdout + done.stderr and "not-the-secret" not in done.stdout + done.stderr
    if named is None:
        assert done.returncode == 0, done.stderr
        assert "# kafka: " in done.stderr and "answered" in done.stderr and "# schema registry: answered" in done.stderr
    else:
        assert done.returncode == 1 and named in done.stderr
