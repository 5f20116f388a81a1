"""A schema-registry stub on loopback for the tests, the demo and the benchmark.

It speaks the calls the relay's decoder makes through confluent-kafka's
SchemaRegistryClient, in the Confluent format: ``GET /schemas/ids/{id}`` answers
``200 {"schema": "<the schema as a JSON string>"}`` for a known id (with its
``schemaType`` and ``references`` when it has them: ``Registered``), ``404
{"error_code": 40403, "message": ...}`` for an unknown one; ``GET
/subjects/{subject}/versions/{version}`` answers a reference's schema from
``subjects`` (``404`` with ``40401`` when it has none). ``stop()`` and
``start()`` again take it away and bring it back on the same port (a registry
outage); ``fail_with = 503`` makes it answer that status instead (a registry
that is up but broken), ``fail_ids = {id: 500}`` only for those ids;
``delay_s`` answers each request that late, ``hold()`` accepts requests and
answers none until ``release()`` (a registry that never answers). Confluent Cloud's shape on request: ``tls=(certfile,
keyfile)`` serves HTTPS, ``credentials=(user, password)`` requires HTTP basic
auth and answers ``401 {"error_code": 401, "message": "Unauthorized"}`` to a
request without them (``refused`` counts those). Thread-based (stdlib ``http.server``): usable from
synchronous tests and from a process that runs an event loop.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import re
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from processor.codec import EMBEDDED_IDS, load_canonical_schemas

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
_SCHEMA_PATH = re.compile(r"/schemas/ids/(\d+)\Z")
_VERSION_PATH = re.compile(r"/subjects/([^/]+)/versions/(\d+)\Z")


@dataclass(frozen=True)
class Registered:
    """A schema as the registry stores it: its text, its type (None: Avro) and its references
    (``{"name", "subject", "version"}`` each)."""

    schema: Any
    schema_type: str | None = None
    references: list[dict[str, Any]] = field(default_factory=list)

    def answer(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"schema": self.schema if isinstance(self.schema, str) else json.dumps(self.schema)}
        if self.schema_type is not None:
            doc["schemaType"] = self.schema_type
        if self.references:
            doc["references"] = self.references
        return doc


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
        stub.answering.wait()
        if stub.delay_s:
            time.sleep(stub.delay_s)
        path = self.path.partition("?")[0]
        if stub.credentials is not None and not self._authorized(stub.credentials):
            stub.refused += 1
            self._answer(401, {"error_code": 401, "message": "Unauthorized"})
            return
        m = _SCHEMA_PATH.match(path)
        failing = stub.fail_with if m is None else stub.fail_ids.get(int(m.group(1)), stub.fail_with)
        if failing is not None:
            self._answer(failing, {"error_code": failing * 100, "message": "registry failing"})
            return
        if m is not None:
            schema = stub.schemas.get(int(m.group(1)))
            if schema is None:
                self._answer(404, {"error_code": 40403, "message": f"Schema {m.group(1)} not found"})
                return
            self._answer(200, (schema if isinstance(schema, Registered) else Registered(schema)).answer())
            return
        m = _VERSION_PATH.match(path)
        if m is not None:
            subject, version = unquote(m.group(1)), int(m.group(2))
            found = stub.subjects.get((subject, version))
            if found is None:
                self._answer(404, {"error_code": 40401, "message": f"Subject '{subject}' not found."})
                return
            self._answer(200, {"subject": subject, "version": version, "id": 1000 + version, **found.answer()})
            return
        self._answer(404, {"error_code": 404, "message": f"HTTP 404 Not Found: {path}"})

    def _authorized(self, credentials: tuple[str, str]) -> bool:
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, ":".join(credentials).encode())

    def _answer(self, status: int, doc: Mapping[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (a held request)
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read the counters instead


class RegistryStub:
    """``GET /schemas/ids/{id}`` from ``schemas`` (id -> schema dict, JSON string or ``Registered``) and
    ``GET /subjects/{subject}/versions/{version}`` from ``subjects`` on ``host:port``.

    ``port=0`` picks a free port at the first start; later starts reuse it, so the URL stays valid.
    ``tls``: (certificate file, key file) to serve HTTPS; ``credentials``: (user, password) required."""

    def __init__(self, schemas: Mapping[int, Any] | None = None, host: str = "127.0.0.1", port: int = 0,
                 subjects: Mapping[tuple[str, int], Registered] | None = None,
                 tls: tuple[str, str] | None = None, credentials: tuple[str, str] | None = None) -> None:
        self.schemas: dict[int, Any] = dict(embedded_schemas() if schemas is None else schemas)
        self.subjects: dict[tuple[str, int], Registered] = dict(subjects or {})
        self.host = host
        self.port = port
        self.requests = 0
        self.fail_with: int | None = None
        self.fail_ids: dict[int, int] = {}  # schema id -> the status it answers for that id alone
        self.delay_s = 0.0
        self.answering = threading.Event()  # cleared by ``hold``: requests wait, unanswered
        self.answering.set()
        self.tls = tls
        self.credentials = credentials
        self.refused = 0  # requests answered 401 (no or wrong credentials)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> RegistryStub:
        if self._server is not None:
            return self
        server = _Server((self.host, self.port), _Handler)
        server.stub = self
        if self.tls is not None:  # each accepted connection does its handshake (a client refusing it: no request)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self.tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        # shutdown() waits for the serving loop's next look: every 50 ms, not the default 0.5 s, so a stop is quick
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="registry-stub", daemon=True)
        self._thread.start()
        return self

    def hold(self) -> None:
        """Accept requests and answer none (until ``release``)."""
        self.answering.clear()

    def release(self) -> None:
        self.answering.set()

    def stop(self) -> None:
        self.release()  # a held request must not keep its thread
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
