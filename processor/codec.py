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

import io
import json
import logging
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader
from fastavro.schema import fingerprint, load_schema, to_parsing_canonical_form

from processor.errors import DecodeError
from processor.events import SCHEMA_KINDS, EventKind

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
        out[fullname] = load_schema(str(path), _write_hint=False)  # type: ignore[call-arg]
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
    """Thread-safe, caching decoder. ``decode(value)`` -> (kind or None, record).

    kind is None for a valid Avro record of a schema the relay does not route
    (the caller dead-letters it as unroutable)."""

    def __init__(
        self,
        schemas_dir: Path = DEFAULT_SCHEMAS_DIR,
        local_ids: Mapping[int, str | Path] | None = None,
        registry: Any | None = None,
        history_dir: Path | None = None,
    ) -> None:
        self._readers = {name: parse_schema(s) for name, s in load_canonical_schemas(schemas_dir).items()}
        self._reader_canon = {n: to_parsing_canonical_form(s) for n, s in self._readers.items()}
        self._registry = registry
        self._lock = threading.Lock()
        self._by_id: dict[int, _Writer] = {}
        self._id_sources: dict[int, Callable[[], dict[str, Any]]] = {}
        ids: Mapping[int, str | Path] = EMBEDDED_IDS if local_ids is None and registry is None else (local_ids or {})
        for sid, ref in ids.items():
            self._id_sources[int(sid)] = self._local_loader(ref, schemas_dir)
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
    def _local_loader(self, ref: str | Path, schemas_dir: Path) -> Callable[[], dict[str, Any]]:
        ref_path = Path(ref)
        if ref_path.suffix != ".avsc":  # a full name: the current schema of that name
            ref_path = schemas_dir / f"{ref}.avsc"
        return lambda: load_schema(str(ref_path), _write_hint=False)  # type: ignore[call-arg]

    def _make_writer(self, schema: Any, named: dict[str, Any] | None = None) -> _Writer:
        # with fastavro's parse hint (the default): schemaless_reader re-parses a schema without it on
        # every message, which cost more than the decoding itself (bench/README.md, profile 1)
        parsed = parse_schema(schema, named_schemas=named if named is not None else {})
        name = parsed.get("name") if isinstance(parsed, dict) else None
        kind = SCHEMA_KINDS.get(name) if name else None
        if kind is None:
            return _Writer(parsed, None, None)
        same = to_parsing_canonical_form(parsed) == self._reader_canon[name]
        return _Writer(parsed, None if same else self._readers[name], kind)

    def _writer_for_id(self, sid: int) -> _Writer:
        w = self._by_id.get(sid)
        if w is not None:
            return w
        with self._lock:
            w = self._by_id.get(sid)
            if w is None:
                w = self._make_writer(*self._fetch(sid))
                self._by_id[sid] = w
        return w

    def _fetch(self, sid: int) -> tuple[Any, dict[str, Any]]:
        src = self._id_sources.get(sid)
        if src is not None:
            return src(), {}
        if self._registry is None:
            raise DecodeError("unknown_schema", f"schema id {sid} is not in the local schema map")
        return fetch_registry_schema(self._registry, sid)

    # -- decoding ---------------------------------------------------------
    def decode(self, value: bytes | None) -> tuple[EventKind | None, dict[str, Any]]:
        if not value:
            raise DecodeError("empty", "message has no value")
        first = value[0]
        if first == CONFLUENT_MAGIC:
            if len(value) < 5:
                raise DecodeError("bad_framing", "shorter than the 5-byte Confluent header")
            w = self._writer_for_id(_unpack_id(value, 1)[0])
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
            raise DecodeError("truncated", "body ends before the schema does") from exc
        except Exception as exc:  # fastavro raises many types on malformed data: one boundary here
            raise DecodeError("invalid_data", f"{type(exc).__name__} while reading the body") from exc
        if buf.tell() != len(value):
            raise DecodeError("invalid_data", f"{len(value) - buf.tell()} bytes left after the record")
        if w.kind is not None and not isinstance(record, dict):
            raise DecodeError("invalid_data", "body is not a record")
        return w.kind, record  # type: ignore[return-value]


def fetch_registry_schema(registry: Any, sid: int) -> tuple[Any, dict[str, Any]]:
    """Writer schema ``sid`` from a confluent-kafka SchemaRegistryClient, with its references."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    try:
        schema = registry.get_schema(sid)
        named: dict[str, Any] = {}
        for ref in schema.references or []:
            dep = registry.get_version(ref.subject, ref.version).schema
            parse_schema(json.loads(dep.schema_str), named_schemas=named, _write_hint=False)
    except SchemaRegistryError as exc:
        if exc.http_status_code == 404:
            raise DecodeError("unknown_schema", f"schema id {sid} not found in the registry") from exc
        raise DecodeError("registry_unavailable", f"registry answered {exc.http_status_code}") from exc
    except Exception as exc:  # connection errors from the registry client's HTTP stack
        raise DecodeError("registry_unavailable", f"{type(exc).__name__} fetching schema id {sid}") from exc
    if schema.schema_type not in (None, "AVRO"):
        raise DecodeError("unknown_schema", f"schema id {sid} is {schema.schema_type}, not AVRO")
    return json.loads(schema.schema_str), named


def confluent_frame(schema_id: int, body: bytes) -> bytes:
    """Frame an Avro body the way Confluent serializers do (for producers, tests and the demo)."""
    return b"\x00" + struct.pack(">I", schema_id) + body


def single_object_frame(schema: Mapping[str, Any], body: bytes) -> bytes:
    return SINGLE_OBJECT_MAGIC + schema_fingerprint(schema) + body
