"""Integration fixtures: a real Kafka-protocol broker, the vendor sandbox, a schema registry (the
devstack stub) and the real ``processor run`` CLI as subprocesses, all on loopback.

The shared relay configuration (``relay_config``) is the production shape: a schema registry (every
relay, replay and inspect process fetches the ids it meets from the stub, including ids it meets first
on a retry topic or the dead-letter topic) and parking on. ``relay_config(..., registry=False)``
is the embedded id map, for the small suite that covers it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from processor.devstack.broker import LOCAL_CONSUMER_SETTINGS, LocalBroker, free_port
from processor.devstack.registry import Registered, RegistryStub, embedded_schemas
from processor.devstack.waiting import wait_for
from processor.vendors import REGISTRY

# the ``integration`` marker is put on every test here by tests/conftest.py (a pytestmark in a conftest is ignored)


def http_json(url: str, method: str = "GET", body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def http_text(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    b = LocalBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log")
    with b:
        yield b


# The tests' consumers: the local broker completes a group join in about half of session.timeout.ms, and a killed
# member blocks its group until that timeout: 3 s here (the local configs' 6 s halved), heartbeats every 0.5 s so
# that members hear of a rebalance sooner. Test setup only; the demo and the benchmark keep the local configs'.
TEST_CONSUMER_SETTINGS: dict[str, Any] = {**LOCAL_CONSUMER_SETTINGS, "session.timeout.ms": 3000,
                                          "heartbeat.interval.ms": 500}


# the ProductView schema under ids tests put first on the dead-letter topic, a retry topic or the input
DLQ_ID, PARKED_ID, LIVE_ID = 51, 52, 53
JSON_ID, PROTO_ID = 61, 62  # a JSON Schema and a Protobuf schema, each with a reference


def registry_schemas() -> tuple[dict[int, Any], dict[tuple[str, int], Registered]]:
    """What the shared registry stub serves: the embedded ids, aliases of ProductView, and schemas of
    other types with references (by id, and the referenced subjects' versions)."""
    schemas: dict[int, Any] = embedded_schemas()
    schemas.update(dict.fromkeys((DLQ_ID, PARKED_ID, LIVE_ID), schemas[1]))
    schemas[JSON_ID] = Registered({"type": "object", "properties": {"a": {"$ref": "common.json"}}}, "JSON",
                                  [{"name": "common.json", "subject": "common-json", "version": 1}])
    schemas[PROTO_ID] = Registered('syntax = "proto3";\nimport "common.proto";\nmessage V { common.Id id = 1; }\n',
                                   "PROTOBUF", [{"name": "common.proto", "subject": "common-proto", "version": 1}])
    subjects = {("common-json", 1): Registered({"type": "object", "properties": {}}, "JSON"),
                ("common-proto", 1): Registered('syntax = "proto3";\npackage common;\nmessage Id { string v = 1; }\n',
                                                "PROTOBUF")}
    return schemas, subjects


_REGISTRY: list[RegistryStub] = []  # the session's shared stub (``registry``)


@pytest.fixture(scope="session", autouse=True)
def registry() -> Iterator[RegistryStub]:
    """The shared schema registry stub every ``relay_config`` points at (never stopped mid-session: a
    test that takes its registry away starts a stub of its own)."""
    schemas, subjects = registry_schemas()
    stub = RegistryStub(schemas, subjects=subjects).start()
    _REGISTRY.append(stub)
    yield stub
    _REGISTRY.remove(stub)
    stub.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker of this test's own, to freeze (SIGSTOP) and thaw (SIGCONT): the shared one keeps data in
    memory only and must not be touched."""
    with LocalBroker(log_path=tmp_path / "own-broker.log") as b:
        yield b


def freeze(b: LocalBroker, frozen: bool) -> None:
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)


class SandboxProcess:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "processor.cli", "sandbox", "--port", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: http_text(f"{self.url}/_sandbox/stats")[0] == 200, 30, "sandbox to listen")

    def stats(self) -> dict[str, dict[str, int]]:
        return http_json(f"{self.url}/_sandbox/stats")  # type: ignore[no-any-return]

    def received(self, vendor: str) -> list[Any]:
        return http_json(f"{self.url}/_sandbox/received/{vendor}")["items"]  # type: ignore[no-any-return]

    def faults(self, vendor: str, **faults: Any) -> None:
        http_json(f"{self.url}/_sandbox/faults/{vendor}", "PUT", faults)

    def reset(self) -> None:
        http_json(f"{self.url}/_sandbox/reset", "POST", {})

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="session")
def sandbox_proc() -> Iterator[SandboxProcess]:
    s = SandboxProcess(free_port())
    yield s
    s.stop()


@pytest.fixture
def sandbox(sandbox_proc: SandboxProcess) -> SandboxProcess:
    sandbox_proc.reset()
    return sandbox_proc


class Topics:
    def __init__(self, broker: LocalBroker, partitions: int = 3) -> None:
        tag = uuid.uuid4().hex[:8]
        self.events = f"shop.events.{tag}"
        self.dlq = f"shop.events.{tag}.dlq"
        self.group = f"relay-{tag}"
        # the default retry topics (parking): <first input topic>.retry.<vendor>
        self.retry = {v: f"{self.events}.retry.{v}" for v in REGISTRY}
        broker.create_topics({self.events: partitions, self.dlq: 1, **dict.fromkeys(self.retry.values(), 1)})


@pytest.fixture
def topics(broker: LocalBroker) -> Topics:
    return Topics(broker)


def relay_config(broker: LocalBroker, topics: Topics, sandbox: SandboxProcess, vendors: dict[str, Any],
                 registry: bool = True, **relay: Any) -> dict[str, Any]:
    """The production shape: the shared schema registry and parking on (the default); ``registry=False``:
    the embedded id map."""
    return {
        **({"schema_registry": {"url": _REGISTRY[0].url}} if registry else {}),
        "kafka": {"bootstrap_servers": broker.bootstrap, "group_id": topics.group, "topics": [topics.events],
                  "client": dict(TEST_CONSUMER_SETTINGS)},
        "deadletter": {"topic": topics.dlq},
        "relay": {"shutdown_grace_s": 10, "commit_interval_s": 0.5, **relay},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "INFO", "format": "json"},
        "vendors": vendors,
    }


def quicklizard_vendor(sandbox: SandboxProcess, **over: Any) -> dict[str, Any]:
    return {
        "base_url": f"{sandbox.url}/quicklizard/events",
        "batch": {"max_events": 50, "max_wait_ms": 200},
        "retry": {"max_attempts": 4, "base_delay_ms": 50, "max_delay_ms": 200, "max_elapsed_s": 10},
        "sites": {"default": {"client_key": "${QL_CLIENT_KEY}"}},
        "options": {},
        **over,
    }


def tracardi_vendor(sandbox: SandboxProcess, **over: Any) -> dict[str, Any]:
    return {
        "base_url": f"{sandbox.url}/tracardi",
        "batch": {"max_events": 50, "max_wait_ms": 200},
        "retry": {"max_attempts": 4, "base_delay_ms": 50, "max_delay_ms": 200, "max_elapsed_s": 10},
        "sites": {"default": {"source_id": "3ee63fc6-490a-4fd8-bfb3-bf0c8c8d3387"}},  # a source the twin knows
        "options": {},
        **over,
    }


class RelayProcess:
    """``processor run`` as a subprocess; metrics on its own port."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str = "relay",
                 env: dict[str, str] | None = None) -> None:
        self.metrics_port = free_port()
        config = {**config, "metrics": {"host": "127.0.0.1", "port": self.metrics_port}}
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        env = {**os.environ, "QL_CLIENT_KEY": "ql-secret-key", **(env or {})}
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "processor.cli", "run", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none yet)."""
        status, text = http_text(f"{self.metrics_url}/metrics")
        if status != 200:
            return 0.0
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, lbl = head.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in lbl for k, v in labels.items()):
                total += float(value)
        return total

    def wait_ready(self, timeout_s: float = 60) -> None:
        wait_for(lambda: self.alive_or_fail() and http_text(f"{self.metrics_url}/readyz")[0] == 200,
                 timeout_s, "relay to be ready")

    def alive_or_fail(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"relay exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def relay_starter(workdir: Path) -> tuple[Callable[..., RelayProcess], Callable[[], None]]:
    """``start(config, name, env)`` starting relays in ``workdir``, and ``kill_all`` for the teardown."""
    started: list[RelayProcess] = []

    def start(config: dict[str, Any], name: str = "relay", env: dict[str, str] | None = None) -> RelayProcess:
        r = RelayProcess(config, workdir, f"{name}-{len(started)}", env)
        started.append(r)
        return r

    def kill_all() -> None:
        for r in started:
            if r.proc.poll() is None:
                r.kill()

    return start, kill_all


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    start, kill_all = relay_starter(tmp_path)
    yield start
    kill_all()
