"""Secrets: a full run of all five vendors with faults (partial failures, a burst of 503s, a site whose
Tracardi source is unknown: 401 for all its events), then every output the relay gives is searched for
every secret value: its logs (at DEBUG), /metrics, /healthz and /readyz, ``check-config`` and the
dead-letter records. None is found; neither is a payload field in the logs."""

from __future__ import annotations

import os
import subprocess
import sys

from processor.deadletter import headers_dict
from processor.devstack.demo import demo_config
from processor.devstack.kafka_io import produce, read_all
from processor.vendors import REGISTRY, adapter_class
from tests.integration.conftest import http_text
from tests.integration.test_all_vendors import settled_and_dead_letters, workload_messages

UNKNOWN_SOURCE = "tr-secret-unknown-source-4"
SASL_PASSWORD = "sasl-secret-password-6"
OVERRIDES = {"QUBIT_TRACKING_ID": "qb-secret-tracking-1", "QUICKLIZARD_CLIENT_KEY": "ql-secret-client-key-2",
             "CONVERT_TRACKING_SECRET": "cv-secret-bearer-3"}


def test_no_secret_in_any_output(broker, topics, sandbox, relays):
    messages, kinds = workload_messages(300)
    sandbox.faults("qubit", partial_failure_rate=0.05)
    sandbox.faults("convert", partial_failure_rate=0.05)
    sandbox.faults("quicklizard", burst=3, error_status=503)
    produce(broker.bootstrap, topics.events, messages)

    # the demo's configuration of all five vendors against their twins, with fast retries, DEBUG logs,
    # SASL credentials and a second Tracardi site whose (secret) source id the twin does not know
    config, env = demo_config(broker.bootstrap, sandbox.url, 0)
    config.update(deadletter={"topic": topics.dlq}, relay={"shutdown_grace_s": 10, "commit_interval_s": 0.5},
                  logging={"level": "DEBUG", "format": "json"})
    config["kafka"].update(group_id=topics.group, topics=[topics.events])
    config["kafka"]["client"].update({"sasl.username": "relay", "sasl.password": "${SASL_PASSWORD}"})
    for vendor in config["vendors"].values():
        vendor["retry"] = {"max_attempts": 8, "base_delay_ms": 20, "max_delay_ms": 200, "max_elapsed_s": 20}
    tracardi = config["vendors"]["tracardi"]["sites"]
    tracardi["shop-2"] = {**tracardi["default"], "source_id": "${TRACARDI_SHOP2_SOURCE}"}
    env.update(OVERRIDES, SASL_PASSWORD=SASL_PASSWORD, TRACARDI_SHOP2_SOURCE=UNKNOWN_SOURCE)
    relay = relays(config, "secrets", env=env)
    relay.wait_ready()
    secrets = sorted(set(env.values()))  # every ${VAR} of this config is a credential
    assert len(secrets) == 2 + sum(len(adapter_class(v).example_env) for v in REGISTRY)  # + SASL, + shop-2

    # shop-2's source is unknown to Tracardi: a setup error, so its events are parked (and stay so, the
    # site held) and never dead-lettered; the reason names the field, never the value
    settled, dlq = settled_and_dead_letters(broker, topics, relay, kinds, waiting=frozenset({"tracardi"}))
    assert not [m for m in dlq if "401" in headers_dict(m.headers())["relay.reason"]]
    assert relay.metric("processor_vendor_setup_held_sites", vendor="tracardi") == 1
    parked = read_all(broker.bootstrap, topics.retry["tracardi"], expect=int(settled["tracardi"]["parked"]))
    heads = [headers_dict(m.headers()) for m in parked]
    assert heads and {h["relay.waiting_on"] for h in heads} == {"setup_error"}
    assert all(h["relay.reason"].startswith("setup error: HTTP 401: Tracardi does not know or has disabled the "
                                            "event source of site config 'shop-2' (check sites.shop-2.source_id)")
               for h in heads), {h["relay.reason"] for h in heads}
    assert settled["qubit"]["dead_lettered"] > 0 and settled["convert"]["dead_lettered"] > 0
    assert relay.metric("processor_vendor_retries_total", vendor="quicklizard") > 0

    outputs = {"metrics": http_text(f"{relay.metrics_url}/metrics")[1],
               "healthz": http_text(f"{relay.metrics_url}/healthz")[1],
               "readyz": http_text(f"{relay.metrics_url}/readyz")[1]}
    assert "processor_vendor_events_total" in outputs["metrics"]
    check = subprocess.run([sys.executable, "-m", "processor.cli", "check-config", str(relay.config_path)],
                           capture_output=True, text=True, env={**os.environ, **env}, timeout=60, check=True)
    outputs["check-config"] = check.stdout + check.stderr
    assert "sasl.password: '***'" in check.stdout
    assert relay.stop() == 0
    outputs["log"] = relay.log()
    dlq_bytes = b"".join(b"".join([m.key() or b"", m.value() or b"", *(k.encode() + (v or b"")
                                                                       for k, v in m.headers() or ())])
                         for m in dlq)

    found = {(name, s) for name, text in outputs.items() for s in secrets if s in text}
    found |= {("dlq", s) for s in secrets if s.encode() in dlq_bytes}
    parked_bytes = b"".join(b"".join([m.key() or b"", m.value() or b"", *(k.encode() + (v or b"")
                                                                          for k, v in m.headers() or ())])
                            for m in parked)
    found |= {("retry topic", s) for s in secrets if s.encode() in parked_bytes}
    assert found == set()
    # and no payload field in the logs: no customer's e-mail, no product id, no visitor id
    assert "@example.com" not in outputs["log"] and "P-0" not in outputs["log"]
    assert "v000000" not in outputs["log"]
    # wait_settled: every vendor settled (delivered, filtered or dead-lettered) every event it takes: lost 0
    dead = {v: int(c["dead_lettered"]) for v, c in settled.items() if c["dead_lettered"]}
    print(f"secrets: {len(messages)} events to {len(settled)} vendors, "
          f"{sum(c['delivered'] for c in settled.values()):.0f} deliveries, {len(dlq)} dead letters "
          f"({dead}), lost 0, {len(secrets)} secrets searched in "
          f"{', '.join([*outputs, 'dlq'])}: none found")
