"""A TLS and SASL front for the local broker: what the tests of a secured cluster connect to.

The local broker (Tansu) cannot terminate TLS or authenticate itself; production Kafka (MSK, Confluent
Cloud, Strimzi) does both. ``KafkaFront`` listens on loopback with TLS (a certificate the test made, signed
by the test's CA), answers the SASL exchange itself and forwards every other request to the broker, so
librdkafka does real TLS and real SASL (PLAIN, SCRAM-SHA-256/512, server side by ``scramp``) against it.

Kafka protocol, kept to what the front must read (https://kafka.apache.org/protocol):

- a frame is a 4-byte big-endian size and that many bytes; a request starts with api_key (int16),
  api_version (int16), correlation_id (int32) and client_id (int16-length nullable string), then, in a
  flexible version, tagged fields (header v2); a response starts with the correlation id and, in a
  flexible version, tagged fields (header v1) -- except ApiVersions, whose response header is always v0;
- ApiVersions (18) is forwarded and its answer edited: SaslHandshake (17) and SaslAuthenticate (36) are
  advertised at versions 0-1 (the front's own), FindCoordinator (10) at most at version 3 (the last with a
  single coordinator), DescribeCluster (60) not at all (its answer would name the broker's address);
- SaslHandshake v1 picks the mechanism, SaslAuthenticate v0-1 carries the exchange (one round for PLAIN,
  two for SCRAM); a failed authentication is answered with SASL_AUTHENTICATION_FAILED (58) and the
  connection closed, as Kafka does; any other request before authentication closes the connection;
- Metadata (3) and FindCoordinator (10) answers name brokers: the front rewrites every host and port to
  its own, so clients come back through it (one broker behind one front);
- a user may be denied the consumer group: its FindCoordinator answers for groups say
  GROUP_AUTHORIZATION_FAILED (30), as a broker does for a principal without READ on the group; or the
  topics: its Metadata answers say TOPIC_AUTHORIZATION_FAILED (29) for every topic but the internal ones.

Responses are matched to their requests by correlation id (a Produce with acks=0 has no response: only the
requests whose answers are edited are remembered). Runs its own event loop in a thread: usable from
synchronous tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scramp import ScramException, ScramMechanism

logger = logging.getLogger(__name__)

API_METADATA, API_FIND_COORDINATOR, API_SASL_HANDSHAKE, API_API_VERSIONS = 3, 10, 17, 18
API_SASL_AUTHENTICATE, API_DESCRIBE_CLUSTER = 36, 60
UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, SASL_AUTHENTICATION_FAILED = 33, 34, 58
TOPIC_AUTHORIZATION_FAILED, GROUP_AUTHORIZATION_FAILED = 29, 30
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
MECHANISMS = ("PLAIN", *SCRAM_MECHANISMS)
MAX_FRAME = 100 * 1024 * 1024


@dataclass(frozen=True)
class User:
    """A SASL user: its password, whether it may use consumer groups and whether it may see topics (the
    internal ones aside)."""

    password: str
    groups: bool = True
    topics: bool = True


# -- primitive encoding -------------------------------------------------------------------------------------

class Reader:
    """Reads Kafka's primitive types from a buffer, in order."""

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"frame ends early: {n} bytes wanted at {self.pos} of {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def int8(self) -> int:
        return int(struct.unpack(">b", self.take(1))[0])

    def int16(self) -> int:
        return int(struct.unpack(">h", self.take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack(">i", self.take(4))[0])

    def uvarint(self) -> int:
        shift = value = 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 28:
                raise ValueError("varint longer than 5 bytes")

    def string(self, compact: bool = False) -> str | None:
        """A (nullable) string: int16 length, or in flexible versions a uvarint of length + 1 (0: null)."""
        n = self.uvarint() - 1 if compact else self.int16()
        return None if n < 0 else self.take(n).decode()

    def bytes_(self, compact: bool = False) -> bytes | None:
        n = self.uvarint() - 1 if compact else self.int32()
        return None if n < 0 else self.take(n)

    def array_len(self, compact: bool = False) -> int:
        return self.uvarint() - 1 if compact else self.int32()

    def skip_tags(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()
            self.take(self.uvarint())

    def rest(self) -> bytes:
        out = self.buf[self.pos:]
        self.pos = len(self.buf)
        return out


def uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def string(s: str | None, compact: bool = False) -> bytes:
    if s is None:
        return uvarint(0) if compact else struct.pack(">h", -1)
    raw = s.encode()
    return (uvarint(len(raw) + 1) if compact else struct.pack(">h", len(raw))) + raw


def bytes_(b: bytes, compact: bool = False) -> bytes:
    return (uvarint(len(b) + 1) if compact else struct.pack(">i", len(b))) + b


def array_len(n: int, compact: bool = False) -> bytes:
    return uvarint(n + 1) if compact else struct.pack(">i", n)


NO_TAGS = b"\x00"


# -- requests and responses the front reads ---------------------------------------------------------------

def flexible_request(api_key: int, version: int) -> bool:
    """Whether a request header has tagged fields (header v2), for the requests the front reads."""
    return {API_API_VERSIONS: 3, API_METADATA: 9, API_FIND_COORDINATOR: 3, API_SASL_AUTHENTICATE: 2,
            API_SASL_HANDSHAKE: 99}[api_key] <= version


def request_body(frame: bytes, api_key: int, version: int) -> Reader:
    """A reader past the request header (api_key, api_version, correlation_id, client_id, tags)."""
    r = Reader(frame, 8)
    r.string()  # client_id: an int16-length string even in header v2
    if flexible_request(api_key, version):
        r.skip_tags()
    return r


def edit_api_versions(body: bytes, version: int) -> bytes:
    """ApiVersions response body (after the correlation id) with the front's SASL versions, FindCoordinator
    at most v3 and no DescribeCluster. An error answer (e.g. UNSUPPORTED_VERSION, a v0 body) is left as is."""
    compact = version >= 3
    r = Reader(body)
    error = r.int16()
    if error != 0:
        return body
    versions: dict[int, tuple[int, int]] = {}
    for _ in range(r.array_len(compact)):
        key, lo, hi = r.int16(), r.int16(), r.int16()
        if compact:
            r.skip_tags()
        versions[key] = (lo, hi)
    versions[API_SASL_HANDSHAKE] = (0, 1)
    versions[API_SASL_AUTHENTICATE] = (0, 1)
    if API_FIND_COORDINATOR in versions:
        lo, hi = versions[API_FIND_COORDINATOR]
        versions[API_FIND_COORDINATOR] = (lo, min(hi, 3))
    versions.pop(API_DESCRIBE_CLUSTER, None)
    out = bytearray(struct.pack(">h", 0) + array_len(len(versions), compact))
    for key in sorted(versions):
        out += struct.pack(">hhh", key, *versions[key])
        if compact:
            out += NO_TAGS
    return bytes(out + r.rest())  # throttle_time_ms and the top-level tags, untouched


def rewrite_metadata(body: bytes, version: int, host: str, port: int, deny_topics: bool = False) -> bytes:
    """Metadata response body with every broker's host and port replaced (the rest copied as it is); with
    ``deny_topics``, every topic but the internal ones answered TOPIC_AUTHORIZATION_FAILED without partitions,
    as a broker does for a principal without DESCRIBE on it."""
    compact = version >= 9
    r = Reader(body)
    out = bytearray(r.take(4) if version >= 3 else b"")  # throttle_time_ms
    n = r.array_len(compact)
    out += array_len(n, compact)
    for _ in range(n):
        node_id = r.int32()
        r.string(compact)
        r.int32()
        out += struct.pack(">i", node_id) + string(host, compact) + struct.pack(">i", port)
        if version >= 1:
            out += string(r.string(compact), compact)  # rack
        if compact:
            start = r.pos
            r.skip_tags()
            out += body[start:r.pos]
    if not deny_topics:
        return bytes(out + r.rest())
    start = r.pos
    if version >= 2:
        r.string(compact)  # cluster_id
    if version >= 1:
        r.int32()  # controller_id
    out += body[start:r.pos]
    n = r.array_len(compact)
    out += array_len(n, compact)
    for _ in range(n):
        out += _deny_topic(r, body, version, compact)
    return bytes(out + r.rest())  # cluster_authorized_operations (v8-10) and the top-level tags


def _deny_topic(r: Reader, body: bytes, version: int, compact: bool) -> bytes:
    """One topic of a Metadata answer, refused (an internal topic is left as it is)."""
    start = r.pos
    r.int16()  # error_code
    name_start = r.pos
    r.string(compact)
    if version >= 10:
        r.take(16)  # topic_id
    internal = r.int8() == 1 if version >= 1 else False
    middle = body[name_start:r.pos]
    for _ in range(r.array_len(compact)):  # partitions
        r.take(2 + 4 + 4 + (4 if version >= 7 else 0))  # error_code, partition_index, leader_id, leader_epoch
        for _ in range(3 if version >= 5 else 2):  # replica_nodes, isr_nodes, offline_replicas
            r.take(4 * r.array_len(compact))
        if compact:
            r.skip_tags()
    tail_start = r.pos
    if version >= 8:
        r.int32()  # topic_authorized_operations
    if compact:
        r.skip_tags()
    if internal:
        return body[start:r.pos]
    return struct.pack(">h", TOPIC_AUTHORIZATION_FAILED) + middle + array_len(0, compact) + body[tail_start:r.pos]


def rewrite_find_coordinator(body: bytes, version: int, host: str, port: int, deny: bool) -> bytes:
    """FindCoordinator (v0-3) response body naming the front as the coordinator, or, ``deny``, refusing
    with GROUP_AUTHORIZATION_FAILED."""
    compact = version >= 3
    r = Reader(body)
    throttle = r.int32() if version >= 1 else 0
    error = r.int16()
    message = r.string(compact) if version >= 1 else None
    node_id = r.int32()
    if deny:
        error, message, node_id, host, port = GROUP_AUTHORIZATION_FAILED, "Group authorization failed.", -1, "", -1
    out = struct.pack(">i", throttle) if version >= 1 else b""
    out += struct.pack(">h", error)
    if version >= 1:
        out += string(message, compact)
    out += struct.pack(">i", node_id) + string(host, compact) + struct.pack(">i", port)
    return out + (NO_TAGS if compact else b"")


def group_key_type(frame: bytes, version: int) -> bool:
    """Whether a FindCoordinator request asks for a consumer group's coordinator (key_type 0)."""
    r = request_body(frame, API_FIND_COORDINATOR, version)
    r.string(version >= 3)
    return version == 0 or r.int8() == 0


# -- the SASL exchange ------------------------------------------------------------------------------------

class SaslExchange:
    """One connection's server side of a SASL exchange: ``step(client bytes)`` -> (server bytes, done);
    raises ``PermissionError`` naming the failure."""

    def __init__(self, mechanism: str, users: Mapping[str, User]) -> None:
        self.mechanism = mechanism
        self.users = users
        self.user: str | None = None
        self._asked: str | None = None  # the SCRAM client-first's user name
        self._scram = None
        if mechanism in SCRAM_MECHANISMS:
            scram = ScramMechanism(mechanism)
            infos = {name: scram.make_auth_info(u.password, iteration_count=4096) for name, u in users.items()}

            def auth_info(username: str) -> tuple[bytes, bytes, bytes, int]:
                self._asked = username
                if username not in infos:
                    raise PermissionError(f"unknown user {username!r}")
                return infos[username]  # type: ignore[no-any-return]

            self._scram = scram.make_server(auth_info)

    def step(self, data: bytes) -> tuple[bytes, bool]:
        if self._scram is None:  # PLAIN: authzid NUL username NUL password
            parts = data.split(b"\x00")
            if len(parts) != 3:
                raise PermissionError("malformed PLAIN message")
            name, password = parts[1].decode(), parts[2].decode()
            user = self.users.get(name)
            if user is None or user.password != password:
                raise PermissionError("Invalid username or password")
            self.user = name
            return b"", True
        try:
            if self._asked is None:
                self._scram.set_client_first(data.decode())
                return self._scram.get_server_first().encode(), False
            self._scram.set_client_final(data.decode())
            final = self._scram.get_server_final().encode()
        except (ScramException, PermissionError) as exc:
            raise PermissionError(f"{self._asked}: {exc}") from exc
        self.user = self._asked
        return final, True


# -- the front --------------------------------------------------------------------------------------------

@dataclass
class _Conn:
    mechanism: str | None = None
    exchange: SaslExchange | None = None
    user: str | None = None  # authenticated
    pending: dict[int, tuple[int, int, bool]] = field(default_factory=dict)  # corr id -> (api, version, deny)


class KafkaFront:
    """TLS (``certfile``/``keyfile``) and SASL (``users``) in front of ``broker`` (host:port) on
    ``127.0.0.1:port`` (0: a free port, kept across restarts)."""

    def __init__(self, broker: str, certfile: Path, keyfile: Path, users: Mapping[str, User],
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.broker_host, _, broker_port = broker.rpartition(":")
        self.broker_port = int(broker_port)
        self.users = dict(users)
        self.host = host
        self.port = port
        self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ssl.load_cert_chain(certfile, keyfile)
        self.authenticated: list[str] = []  # users, in order of successful authentications
        self.refused: list[str] = []  # why each failed authentication failed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def client_settings(self, user: str, password: str | None = None, ca: Path | None = None,
                        mechanism: str = "SCRAM-SHA-512") -> dict[str, str]:
        """librdkafka settings that connect through this front as ``user``."""
        settings = {"security.protocol": "SASL_SSL", "sasl.mechanism": mechanism, "sasl.username": user,
                    "sasl.password": self.users[user].password if password is None else password}
        if ca is not None:
            settings["ssl.ca.location"] = str(ca)
        return settings

    def start(self) -> KafkaFront:
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, self.host, self.port, ssl=self.ssl))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failed.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="kafka-front", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failed:
            raise RuntimeError(f"the Kafka front did not start: {failed[0] if failed else 'timeout'}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 5)
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = self._server = None

    def __enter__(self) -> KafkaFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one client connection ---------------------------------------------------------------------------
    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        conn = _Conn()
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        pump: asyncio.Task[None] | None = None
        try:
            while True:
                frame = await _read_frame(client_r)
                if frame is None:
                    return
                api_key, version, corr = struct.unpack_from(">hhi", frame)
                if api_key == API_SASL_HANDSHAKE:
                    client_w.write(self._handshake(conn, frame, version, corr))
                    continue
                if api_key == API_SASL_AUTHENTICATE:
                    answer, ok = self._authenticate(conn, frame, version, corr)
                    client_w.write(answer)
                    await client_w.drain()
                    if not ok:
                        return  # Kafka closes the connection after a failed authentication
                    continue
                if conn.user is None and api_key != API_API_VERSIONS:
                    return  # a request before authentication: Kafka closes the connection
                if upstream is None:
                    upstream = await asyncio.open_connection(self.broker_host, self.broker_port)
                    pump = asyncio.create_task(self._pump(conn, upstream[0], client_w))
                if api_key in (API_API_VERSIONS, API_METADATA, API_FIND_COORDINATOR):
                    user = self.users[conn.user] if conn.user is not None else None
                    if api_key == API_FIND_COORDINATOR:
                        deny = user is not None and not user.groups and group_key_type(frame, version)
                    else:
                        deny = user is not None and not user.topics
                    conn.pending[corr] = (api_key, version, deny)
                upstream[1].write(struct.pack(">i", len(frame)) + frame)
                await upstream[1].drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, ValueError,
                asyncio.CancelledError) as exc:  # CancelledError: the front stops (the task ends quietly)
            logger.debug("front connection ended: %r", exc)
        finally:
            if pump is not None:
                pump.cancel()
            if upstream is not None:
                upstream[1].close()
            client_w.close()

    async def _pump(self, conn: _Conn, broker_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """Broker -> client, editing the answers that name brokers or versions."""
        try:
            while True:
                frame = await _read_frame(broker_r)
                if frame is None:
                    client_w.close()
                    return
                corr = struct.unpack_from(">i", frame)[0]
                asked = conn.pending.pop(corr, None)
                if asked is not None:
                    frame = self._edit(frame, *asked)
                client_w.write(struct.pack(">i", len(frame)) + frame)
                await client_w.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, ValueError,
                asyncio.CancelledError) as exc:
            logger.debug("front upstream ended: %r", exc)
            client_w.close()

    def _edit(self, frame: bytes, api_key: int, version: int, deny: bool) -> bytes:
        head_len = 4
        if api_key == API_API_VERSIONS:  # header v0 always
            return frame[:head_len] + edit_api_versions(frame[head_len:], version)
        flexible = version >= (9 if api_key == API_METADATA else 3)
        if flexible:
            r = Reader(frame, head_len)
            r.skip_tags()
            head_len = r.pos
        head, body = frame[:head_len], frame[head_len:]
        if api_key == API_METADATA:
            return head + rewrite_metadata(body, version, self.host, self.port, deny)
        return head + rewrite_find_coordinator(body, version, self.host, self.port, deny)

    def _handshake(self, conn: _Conn, frame: bytes, version: int, corr: int) -> bytes:
        mechanism = request_body(frame, API_SASL_HANDSHAKE, version).string() or ""
        error = 0
        if conn.user is not None or conn.mechanism is not None:
            error = ILLEGAL_SASL_STATE
        elif mechanism not in MECHANISMS or version < 1:  # v0 (raw SASL frames) is not spoken here
            error = UNSUPPORTED_SASL_MECHANISM
        else:
            conn.mechanism = mechanism
            conn.exchange = SaslExchange(mechanism, self.users)
        body = struct.pack(">h", error) + array_len(len(MECHANISMS)) + b"".join(string(m) for m in MECHANISMS)
        return _frame(corr, body)

    def _authenticate(self, conn: _Conn, frame: bytes, version: int, corr: int) -> tuple[bytes, bool]:
        def answer(error: int, message: str | None, data: bytes) -> bytes:
            body = struct.pack(">h", error) + string(message) + bytes_(data)
            if version >= 1:
                body += struct.pack(">q", 0)  # session_lifetime_ms: no re-authentication asked
            return _frame(corr, body)

        if conn.exchange is None or conn.user is not None:
            return answer(ILLEGAL_SASL_STATE, "SaslAuthenticate before SaslHandshake", b""), False
        data = request_body(frame, API_SASL_AUTHENTICATE, version).bytes_() or b""
        try:
            reply, done = conn.exchange.step(data)
        except PermissionError as exc:
            self.refused.append(str(exc))
            message = (f"Authentication failed during authentication due to invalid credentials with SASL "
                       f"mechanism {conn.mechanism}")
            return answer(SASL_AUTHENTICATION_FAILED, message, b""), False
        if done:
            conn.user = conn.exchange.user
            assert conn.user is not None
            self.authenticated.append(conn.user)
        return answer(0, None, reply), True


def _frame(corr: int, body: bytes) -> bytes:
    """A response frame with header v0 (the SASL answers the front gives are not flexible)."""
    return struct.pack(">ii", len(body) + 4, corr) + body


async def _read_frame(r: asyncio.StreamReader) -> bytes | None:
    try:
        head = await r.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    size = struct.unpack(">i", head)[0]
    if not 4 <= size <= MAX_FRAME:
        raise ValueError(f"frame size {size} out of bounds")
    return await r.readexactly(size)
