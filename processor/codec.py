"""Avro framing and decoding: bytes on the topic -> (event kind, record dict).

Two framings are accepted:

* Confluent Schema Registry: ``0x00`` + 4-byte big-endian schema id + Avro
  body. The writer schema comes from a registry (confluent-kafka's
  SchemaRegistryClient) or from a local id -> schema map.
* Avro single-object encoding: ``0xC3 0x01`` + 8-byte little-endian
  CRC-64-AVRO fingerprint of the writer schema's canonical form + body,
  resolved against the schemas in schemas/ (every version kept there).

Each writer schema is parsed once and cached. The reader schema is the
current canonical schema of the same full name, so old writers decode with
today's field set (backward-compatible evolution only). When writer and
reader are identical the resolution step is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastavro import parse_schema, schemaless_reader
from fastavro.repository.base import SchemaRepositoryError
from fastavro.schema import fingerprint, load_schema, to_parsing_canonical_form

from processor.errors import ConfigError, DecodeError, RegistryUnavailable
from processor.events import SCHEMA_KINDS, EventKind

if TYPE_CHECKING:
    from processor.config import SchemaRegistryConfig

logger = logging.getLogger(__name__)

CONFLUENT_MAGIC = 0
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
DEFAULT_SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
# The embedded default id map (used when no registry is configured): the ids
# the demo, the tests and the benchmark producers frame their messages with.
EMBEDDED_IDS: dict[int, str] = {1: "shop.events.ProductView", 2: "shop.events.OrderCompleted"}

_unpack_id = struct.Struct(">I").unpack_from


def load_canonical_schemas(schemas_dir: Path = DEFAULT_SCHEMAS_DIR) -> dict[str, dict[str, Any]]:
    """The current reader schema of every event kind, fully expanded (self-contained)."""
    out: dict[str, dict[str, Any]] = {}
    for fullname in SCHEMA_KINDS:
        path = schemas_dir / f"{fullname}.avsc"
        schema = load_schema(str(path), _write_hint=False)
        if not isinstance(schema, dict):
            raise ConfigError(f"{path}: not an Avro record schema")
        out[fullname] = schema
    return out


def schema_fingerprint(schema: Mapping[str, Any]) -> bytes:
    """CRC-64-AVRO fingerprint, little-endian, as single-object encoding frames it."""
    canonical = to_parsing_canonical_form(parse_schema(dict(schema)))
    return bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))


class _Writer:
    """A parsed writer schema with the reader it resolves against."""

    __slots__ = ("kind", "reader", "writer")

    def __init__(self, writer: Any, reader: Any, kind: EventKind | None) -> None:
        self.writer = writer
        self.reader = reader  # None when identical to the writer
        self.kind = kind


class Decoder:
    """Caching decoder. ``decode(value)`` -> (kind or None, record).

    kind is None for a valid Avro record of a schema the relay does not route
    (the caller dead-letters it as unroutable).

    Registry ids are resolved off the event loop: ``unknown_ids(values)`` names the ids a poll needs
    that are neither cached nor known to be missing, ``fetch(ids)`` (blocking, for an executor thread)
    resolves them. ``decode`` never calls the registry: an id ``fetch`` has not resolved raises
    ``RegistryUnavailable``. ``fetch`` may run in one thread while ``decode`` runs in another: the
    caches are only added to, under a lock, and read without one (a dict lookup is atomic)."""

    def __init__(
        self,
        schemas_dir: Path = DEFAULT_SCHEMAS_DIR,
        local_ids: Mapping[int, str | Path] | None = None,
        registry: Any | None = None,
        history_dir: Path | None = None,
    ) -> None:
        # fastavro's parsed form (a dict for a record), handed back to fastavro only, as ``_Writer`` keeps it
        self._readers: dict[str, Any] = {n: parse_schema(s) for n, s in load_canonical_schemas(schemas_dir).items()}
        self._reader_canon = {n: to_parsing_canonical_form(s) for n, s in self._readers.items()}
        self._registry = registry
        self._lock = threading.Lock()
        self._by_id: dict[int, _Writer] = {}
        self._missing: dict[int, str] = {}  # id -> why the registry says it cannot be used (dead letter)
        self.failing: dict[int, str] = {}  # id -> why its last fetch got no usable answer (retried)
        ids: Mapping[int, str | Path] = EMBEDDED_IDS if local_ids is None and registry is None else (local_ids or {})
        for sid, ref in ids.items():  # the local map wins over the registry; loaded now, so a bad path fails at start
            self._store(int(sid), self._make_writer(_load_local(ref, schemas_dir)))
        # single-object encoding: every schema in schemas/ (current) and history_dir (older versions)
        self._by_fp: dict[bytes, _Writer] = {}
        for name, reader in self._readers.items():
            self._by_fp[schema_fingerprint(reader)] = _Writer(reader, None, SCHEMA_KINDS[name])
        hist = history_dir if history_dir is not None else schemas_dir / "history"
        if hist.is_dir():
            for path in sorted(hist.glob("*.avsc")):
                w = self._make_writer(json.loads(path.read_text()))  # self-contained (expanded) schemas
                self._by_fp[schema_fingerprint(w.writer)] = w

    # -- schema sources -------------------------------------------------
    def _make_writer(self, schema: Any, named: dict[str, Any] | None = None) -> _Writer:
        # with fastavro's parse hint (the default): schemaless_reader re-parses a schema without it on
        # every message, which cost more than the decoding itself (bench/README.md, profile 1)
        parsed = parse_schema(schema, named_schemas=named if named is not None else {})
        name = parsed.get("name") if isinstance(parsed, dict) else None
        if not isinstance(name, str) or name not in SCHEMA_KINDS:
            return _Writer(parsed, None, None)
        kind = SCHEMA_KINDS[name]
        same = to_parsing_canonical_form(parsed) == self._reader_canon[name]
        return _Writer(parsed, None if same else self._readers[name], kind)

    def _store(self, sid: int, w: _Writer) -> None:
        with self._lock:
            self._by_id[sid] = w

    def unknown_ids(self, values: Iterable[bytes | None]) -> set[int]:
        """The registry schema ids among these values' Confluent headers that are neither cached nor
        known to be missing (a header peek, no parsing; empty without a registry)."""
        if self._registry is None:
            return set()
        by_id, missing = self._by_id, self._missing
        out: set[int] = set()
        for value in values:
            if value and value[0] == CONFLUENT_MAGIC and len(value) >= 5:
                sid = _unpack_id(value, 1)[0]
                if sid not in by_id and sid not in missing:
                    out.add(sid)
        return out

    def fetch(self, ids: Iterable[int]) -> None:
        """Fetch, parse and cache these ids from the registry (blocking: run it in a thread).

        An id the registry answers does not exist (404 with a registry error code such as 40403), is
        not Avro, or does not parse is remembered as missing: ``decode`` then dead-letters its messages
        as ``unknown_schema``. A transport error, timeout, 5xx, auth failure or any answer that is not
        the registry's raises ``RegistryUnavailable`` and remembers nothing of that id (ids resolved
        before it in the same call stay resolved). An id the registry answers an error for (a 5xx for that
        id alone) does not hold the others of the call: they are fetched, then the error is raised; an id
        it does not answer at all (a timeout, a refused connection) ends the call at once (the next would
        only wait as long). ``failing`` keeps, per id, why its last fetch failed (until it resolves)."""
        if self._registry is None:
            return
        answered: list[RegistryUnavailable] = []
        for sid in sorted(ids):
            if sid in self._by_id or sid in self._missing:
                continue
            try:
                schema, named = fetch_registry_schema(self._registry, sid)
                w = self._make_writer(schema, named)
            except DecodeError as exc:
                with self._lock:
                    self._missing[sid] = exc.detail
                    self.failing.pop(sid, None)
                logger.warning("schema id %d cannot be used: %s", sid, exc.detail)
                continue
            except RegistryUnavailable as exc:
                self.failing[sid] = str(exc)
                if not exc.answered:
                    raise
                answered.append(exc)
                continue
            except Exception as exc:  # fastavro's many schema errors: one boundary, the id is unusable
                detail = f"schema id {sid} does not parse: {type(exc).__name__}"
                with self._lock:
                    self._missing[sid] = detail
                logger.warning("%s", detail)
                continue
            self._store(sid, w)
            self.failing.pop(sid, None)
        if answered:
            raise RegistryUnavailable("; ".join(str(exc) for exc in answered), answered=True)

    def known(self, sid: int) -> bool:
        """Whether the registry has answered for ``sid`` (found or missing)."""
        return sid in self._by_id or sid in self._missing

    def waits(self, value: bytes | None) -> bool:
        """Whether decoding ``value`` waits for the registry: a Confluent header naming an id neither
        cached nor known to be missing (a header peek)."""
        if self._registry is None or not value or value[0] != CONFLUENT_MAGIC or len(value) < 5:
            return False
        sid = _unpack_id(value, 1)[0]
        return sid not in self._by_id and sid not in self._missing

    def _unresolved(self, sid: int) -> _Writer:
        detail = self._missing.get(sid)
        if detail is not None:
            raise DecodeError("unknown_schema", detail)
        if self._registry is None:
            raise DecodeError("unknown_schema", f"schema id {sid} is not in the local schema map")
        raise RegistryUnavailable(f"schema id {sid} has not been fetched from the registry")

    # -- decoding ---------------------------------------------------------
    def decode(self, value: bytes | None) -> tuple[EventKind | None, dict[str, Any]]:
        """Raises DecodeError (dead letter) or RegistryUnavailable (an id not fetched yet: retry)."""
        if not value:
            raise DecodeError("empty", "message has no value")
        first = value[0]
        sid: int | None = None
        if first == CONFLUENT_MAGIC:
            if len(value) < 5:
                raise DecodeError("bad_framing", "shorter than the 5-byte Confluent header")
            sid = _unpack_id(value, 1)[0]
            w = self._by_id.get(sid) or self._unresolved(sid)
            start = 5
        elif value[:2] == SINGLE_OBJECT_MAGIC:
            if len(value) < 10:
                raise DecodeError("bad_framing", "shorter than the 10-byte single-object header")
            w = self._by_fp.get(value[2:10])  # type: ignore[assignment]
            if w is None:
                raise DecodeError("unknown_schema", f"fingerprint {value[2:10].hex()} matches no known schema")
            start = 10
        else:
            raise DecodeError("bad_framing", f"unknown magic byte 0x{first:02x}")
        buf = io.BytesIO(value)
        buf.seek(start)
        try:
            record = schemaless_reader(buf, w.writer, w.reader)
        except EOFError as exc:
            raise self._misfit(value, start, w, sid, "truncated", "body ends before the schema does") from exc
        except UnicodeDecodeError as exc:
            raise DecodeError("invalid_data", "a string in the body is not valid UTF-8") from exc
        except Exception as exc:  # fastavro raises many types on malformed data: one boundary here
            raise self._misfit(value, start, w, sid, "invalid_data",
                               f"{type(exc).__name__} while reading the body") from exc
        if buf.tell() != len(value):
            raise self._misfit(value, start, w, sid, "invalid_data", f"{len(value) - buf.tell()} bytes left after "
                               "the record")
        if w.kind is not None and not isinstance(record, dict):
            raise DecodeError("invalid_data", "body is not a record")
        return w.kind, record  # type: ignore[return-value]

    def _misfit(self, value: bytes, start: int, w: _Writer, sid: int | None, reason: str, detail: str) -> DecodeError:
        """The error for a body that does not decode as its writer schema, saying what it is when it decodes
        exactly as another canonical event (a producer framing one record type with another's schema id).
        On the failure path only."""
        name = w.writer.get("name", "?") if isinstance(w.writer, dict) else "?"
        framed = f"{name} (schema id {sid})" if sid is not None else str(name)
        for other, reader in self._readers.items():
            if other == name:
                continue
            buf = io.BytesIO(value)
            buf.seek(start)
            try:
                schemaless_reader(buf, reader, None)
            except Exception:  # not that record either: try the next one
                continue
            if buf.tell() == len(value):
                return DecodeError("invalid_data", f"does not decode as {framed} but as {other}: "
                                   "framed with the wrong schema id")
        return DecodeError(reason, f"{detail} ({framed})")


class SchemaResolver:
    """The one way every decode path gets its registry schema ids: the live consumer, the parked
    redrive, ``dlq replay`` and ``dlq inspect``. The ids a batch of values names are fetched off the
    event loop (a thread of its own, one fetch at a time); while the registry cannot be reached nothing
    is decoded, the caller holds the values (nothing dead-lettered for it), the attempt is retried with
    backoff (1 s doubling to 30 s) and every failed attempt is logged as waiting. Only the registry's
    answer that an id does not exist (or is not usable Avro) makes a record undecodable:
    ``Decoder.decode`` then raises DecodeError.

    No caller waits on a fetch longer than ``ready_ids``'s ``wait_s`` or past its stop: a fetch that
    takes longer goes on in its thread (each registry request is bounded by
    ``schema_registry.timeout_s``) and is picked up by a later call. A fetch outstanding for more than
    ``SLOW_FETCH_S`` counts as the registry being away: ``waiting()`` names the registry and the ids.

    ``down`` is why the registry cannot be reached (None: it can, or none is configured); ``on_change``
    is told True/False when that changes (the relay's ``processor_schema_registry_up``)."""

    MAX_DELAY_S = 30.0
    SLOW_FETCH_S = 3.0

    def __init__(self, decoder: Decoder, what: str, on_change: Callable[[bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, registry: str = "") -> None:
        self.decoder = decoder
        self.what = what  # who waits, for the log: "the relay", "replay to qubit", "dlq inspect"
        self.on_change = on_change
        self.clock = clock
        self.registry = registry  # how readiness names the registry (its URL without credentials)
        self.down: str | None = None
        self._retry_at = 0.0
        self._delay = 1.0
        self._fetch: asyncio.Future[BaseException | None] | None = None
        self._fetching: list[int] = []
        self._fetch_since = 0.0

    def waiting(self) -> str | None:
        """Why decoding waits for the registry now, naming it and the schema ids (None: it does not)."""
        where = f"schema registry {self.registry}".rstrip()
        if self._fetch is not None:
            age = self.clock() - self._fetch_since
            if age > self.SLOW_FETCH_S:
                return f"{where} has not answered for {age:.0f}s ({_ids(self._fetching)})"
        if self.down is not None:
            failing = sorted(self.decoder.failing)
            return f"{where} unreachable: {self.down}" + (f" (waiting: {_ids(failing)})" if failing else "")
        return None

    async def ready(self, values: Iterable[bytes | None], stopping: asyncio.Event | None = None) -> bool:
        """Whether every id these values name is resolved, after one fetch attempt if one is due (never
        blocks the loop, never raises for the registry)."""
        return await self.ready_ids(self.decoder.unknown_ids(values), stopping)

    async def ready_ids(self, ids: set[int], stopping: asyncio.Event | None = None, wait_s: float = 1.0) -> bool:
        """Whether every id of ``ids`` is resolved. Starts a fetch if none is outstanding and no backoff
        holds it, and waits for the outstanding one at most ``wait_s`` and never past ``stopping``."""
        ids = {sid for sid in ids if not self.decoder.known(sid)}
        if not ids:
            return True
        fut = self._fetch
        if fut is None:
            if self.clock() < self._retry_at:
                return False
            fut = self._start(ids)
        await _first_of(fut, stopping, wait_s)
        if not fut.done():
            self._slow()
            return False
        self._fetch = None
        exc = fut.result()
        if exc is not None:
            self._failed(str(exc), self.clock())
            return False
        self._delay = 1.0
        if self.down is not None:
            logger.info("schema registry reachable again: %s goes on", self.what)
            self.down = None
            if self.on_change is not None:
                self.on_change(True)
        return all(self.decoder.known(sid) for sid in ids)

    async def wait(self, values: Iterable[bytes | None], stopping: asyncio.Event | None = None) -> bool:
        """Until every id these values name is resolved (True) or ``stopping`` is set (False)."""
        ids = self.decoder.unknown_ids(values)
        while not await self.ready_ids(ids, stopping):
            if stopping is not None and stopping.is_set():
                return False
            if self._fetch is not None:
                continue  # still outstanding: ``ready_ids`` waited for it (bounded)
            pause = max(0.0, self._retry_at - self.clock())
            if stopping is None:
                await asyncio.sleep(pause)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), pause)
        return True

    def _start(self, ids: set[int]) -> asyncio.Future[BaseException | None]:
        """``Decoder.fetch`` in a daemon thread: a registry that never answers cannot hold the process's
        exit; the future gets the error (or None), never raises."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[BaseException | None] = loop.create_future()
        decoder = self.decoder

        def settle(result: BaseException | None) -> None:
            if not fut.done():
                fut.set_result(result)

        def work() -> None:
            result: BaseException | None = None
            try:
                decoder.fetch(ids)
            except RegistryUnavailable as exc:
                result = exc
            except Exception as exc:  # a bug must not leave the future unsettled: the ids stay unresolved
                result = RegistryUnavailable(f"{type(exc).__name__} fetching {_ids(sorted(ids))}")
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                loop.call_soon_threadsafe(settle, result)

        self._fetch, self._fetching, self._fetch_since = fut, sorted(ids), self.clock()
        threading.Thread(target=work, name="schema-registry-fetch", daemon=True).start()
        return fut

    def _slow(self) -> None:
        """The outstanding fetch has taken past ``SLOW_FETCH_S``: the registry counts as away (once)."""
        if self.down is not None or self.clock() - self._fetch_since <= self.SLOW_FETCH_S:
            return
        self.down = f"no answer for {_ids(self._fetching)} within {self.SLOW_FETCH_S:.0f}s"
        logger.error("%s waiting for the schema registry (%s): nothing decoded or dead-lettered meanwhile",
                     self.what, self.down)
        if self.on_change is not None:
            self.on_change(False)

    def _failed(self, why: str, now: float) -> None:
        (logger.error if self.down is None else logger.warning)(
            "%s waiting for the schema registry (%s): nothing decoded or dead-lettered meanwhile; retrying in %.0fs",
            self.what, why, self._delay)
        if self.down is None and self.on_change is not None:
            self.on_change(False)
        self.down = why
        self._retry_at = now + self._delay
        self._delay = min(self._delay * 2, self.MAX_DELAY_S)


def _ids(ids: list[int]) -> str:
    shown = ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    return f"schema id{'s' if len(ids) > 1 else ''} {shown}"


async def _first_of(fut: asyncio.Future[Any], stopping: asyncio.Event | None, wait_s: float) -> None:
    """Until ``fut`` is done, ``stopping`` is set or ``wait_s`` passed (``fut`` is never cancelled)."""
    if stopping is None:
        await asyncio.wait([fut], timeout=wait_s)
        return
    if stopping.is_set():
        return
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([fut, stop], timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()


def build_decoder(sr: SchemaRegistryConfig) -> Decoder:
    """The decoder of a ``schema_registry`` config: the registry client (when a URL is set) bounded by
    ``timeout_s`` per request and without retries of its own (``SchemaResolver`` retries, hearing the
    stop); ``schema_registry.client`` may still set either."""
    registry = None
    if sr.url:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        registry = SchemaRegistryClient({"url": sr.url, "timeout": sr.timeout_s, "max.retries": 0, **sr.client})
    return Decoder(sr.schemas_dir, sr.local_ids, registry)


def registry_name(url: str | None) -> str:
    """A registry URL as logs and readiness may show it: scheme, host and port (no credentials, no path)."""
    if not url:
        return ""
    parts = urlsplit(url.split(",")[0].strip())
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}"


def _load_local(ref: str | Path, schemas_dir: Path) -> Any:
    path = Path(ref)
    if path.suffix != ".avsc":  # a full name: the current schema of that name
        path = schemas_dir / f"{ref}.avsc"
    try:
        return load_schema(str(path), _write_hint=False)
    except (OSError, SchemaRepositoryError) as exc:
        raise ConfigError(f"schema_registry.local_ids: cannot read {path}") from exc


def fetch_registry_schema(registry: Any, sid: int) -> tuple[Any, dict[str, Any]]:
    """Writer schema ``sid`` from a confluent-kafka SchemaRegistryClient, with its references.

    DecodeError("unknown_schema") when the registry answers that the id (or a reference) does not exist,
    or the schema is not Avro (checked before its references are looked at: a JSON Schema's or a
    Protobuf's references are not Avro either). RegistryUnavailable only when the registry gives no
    answer (transport error, timeout, an HTTP error that is not the registry's "not found"). A schema or
    reference that does not parse is not the registry's fault: the caller treats the id as unusable."""
    schema = _ask_registry(registry.get_schema, sid, sid)
    if schema.schema_type not in (None, "AVRO"):
        raise DecodeError("unknown_schema", f"schema id {sid} is {schema.schema_type}, not AVRO")
    named: dict[str, Any] = {}
    for ref in schema.references or []:
        dep = _ask_registry(registry.get_version, sid, ref.subject, ref.version).schema
        if dep.schema_type not in (None, "AVRO"):
            raise DecodeError("unknown_schema", f"schema id {sid} references {ref.subject} version {ref.version}, "
                              f"which is {dep.schema_type}, not AVRO")
        parse_schema(json.loads(dep.schema_str), named_schemas=named, _write_hint=False)
    return json.loads(schema.schema_str), named


def _ask_registry(call: Any, sid: int, *args: Any) -> Any:
    """One registry call for schema id ``sid``, its errors translated (see ``fetch_registry_schema``)."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    try:
        return call(*args)
    except SchemaRegistryError as exc:
        # the registry's own 404s carry a 404xx error code (40403 schema, 40401 subject, 40402 version);
        # a 404 without one is a wrong URL or a proxy, not an answer about the id
        if exc.http_status_code == 404 and 40400 <= (exc.error_code or 0) < 40500:
            raise DecodeError("unknown_schema", f"schema id {sid} not found in the registry "
                              f"(error code {exc.error_code})") from exc
        raise RegistryUnavailable(f"registry answered HTTP {exc.http_status_code}{_refusal(exc.http_status_code)} "
                                  f"for schema id {sid}", answered=True) from exc
    except Exception as exc:  # connection errors and timeouts from the registry client's HTTP stack
        raise RegistryUnavailable(f"{_transport_failure(exc)} fetching schema id {sid}") from exc


def _refusal(status: int | None) -> str:
    """What a 401 or 403 from the registry means: the credentials (Confluent Cloud's API key and secret)."""
    if status == 401:
        return " (the registry refused the credentials: schema_registry.client basic.auth.user.info)"
    if status == 403:
        return " (the registry's credentials may not read schemas: schema_registry.client basic.auth.user.info)"
    return ""


def _transport_failure(exc: BaseException) -> str:
    """The registry client's transport error by what happened: a certificate the client does not trust or
    another TLS failure, named from the ssl error it carries; otherwise its type (ConnectError, ReadTimeout)."""
    seen: BaseException | None = exc
    for _ in range(10):  # the HTTP stack wraps the ssl error a few levels down
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (f"TLS: the registry's certificate is not signed by a CA the client trusts ({seen.verify_message}; "
                    "schema_registry.client ssl.ca.location names the CA bundle)")
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake with the registry failed ({getattr(seen, 'reason', None) or seen})"
        seen = seen.__cause__ or seen.__context__
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return ("TLS: the registry's certificate is not signed by a CA the client trusts (schema_registry.client "
                "ssl.ca.location names the CA bundle)")
    return type(exc).__name__


def confluent_frame(schema_id: int, body: bytes) -> bytes:
    """Frame an Avro body the way Confluent serializers do (for producers, tests and the demo)."""
    return b"\x00" + struct.pack(">I", schema_id) + body


def single_object_frame(schema: Mapping[str, Any], body: bytes) -> bytes:
    return SINGLE_OBJECT_MAGIC + schema_fingerprint(schema) + body
