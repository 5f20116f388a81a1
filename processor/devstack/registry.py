"""A schema-registry stub on loopback for the tests, the demo and the benchmark.

It speaks the one call the relay's decoder makes through confluent-kafka's
SchemaRegistryClient, ``GET /schemas/ids/{id}``, in the Confluent format:
``200 {"schema": "<the schema as a JSON string>"}`` for a known id, ``404
{"error_code": 40403, "message": ...}`` for an unknown one. ``stop()`` and
``start()`` again take it away and bring it back on the same port (a registry
outage); ``fail_with = 503`` makes it answer that status instead (a registry
that is up but broken). Thread-based (stdlib ``http.server``): usable from
synchronous tests and from a process that runs an event loop.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from processor.codec import EMBEDDED_IDS, load_canonical_schemas

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
_SCHEMA_PATH = re.compile(r"/schemas/ids/(\d+)\Z")


def embedded_schemas() -> dict[int, Any]:
    """The embedded id map's schemas (what the demo, tests and benchmark producers frame with)."""
    canonical = load_canonical_schemas()
    return {sid: canonical[name] for sid, name in EMBEDDED_IDS.items()}


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    stub: RegistryStub


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        stub = self.server.stub
        stub.requests += 1
        path = self.path.partition("?")[0]
        if stub.fail_with is not None:
            self._answer(stub.fail_with, {"error_code": stub.fail_with * 100, "message": "registry failing"})
            return
        m = _SCHEMA_PATH.match(path)
        if m is None:
            self._answer(404, {"error_code": 404, "message": f"HTTP 404 Not Found: {path}"})
            return
        schema = stub.schemas.get(int(m.group(1)))
        if schema is None:
            self._answer(404, {"error_code": 40403, "message": f"Schema {m.group(1)} not found"})
            return
        self._answer(200, {"schema": schema if isinstance(schema, str) else json.dumps(schema)})

    def _answer(self, status: int, doc: Mapping[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read the counters instead


class RegistryStub:
    """``GET /schemas/ids/{id}`` from ``schemas`` (id -> schema dict or JSON string) on ``host:port``.

    ``port=0`` picks a free port at the first start; later starts reuse it, so the URL stays valid."""

    def __init__(self, schemas: Mapping[int, Any] | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.schemas: dict[int, Any] = dict(embedded_schemas() if schemas is None else schemas)
        self.host = host
        self.port = port
        self.requests = 0
        self.fail_with: int | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> RegistryStub:
        if self._server is not None:
            return self
        server = _Server((self.host, self.port), _Handler)
        server.stub = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="registry-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(10)

    def __enter__(self) -> RegistryStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
