from __future__ import annotations

import io
import json

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from fastavro import parse_schema, schemaless_writer

from processor.codec import Decoder, confluent_frame, load_canonical_schemas, single_object_frame
from processor.devstack.registry import Registered, RegistryStub
from processor.devstack.samples import encode, make_order, make_view
from processor.errors import ConfigError, DecodeError, RegistryUnavailable
from processor.events import EventKind

VIEW = load_canonical_schemas()["shop.events.ProductView"]


def body(schema, record) -> bytes:
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(schema), record)
    return buf.getvalue()


def test_confluent_framing_with_the_embedded_ids():
    d = Decoder()
    kind, rec = d.decode(encode(EventKind.ORDER, make_order(3, 2)))
    assert kind is EventKind.ORDER and rec["order"]["items"][1]["quantity"] == 2
    kind, rec = d.decode(encode(EventKind.PRODUCT_VIEW, make_view(1, 2)))
    assert kind is EventKind.PRODUCT_VIEW and rec["product"]["product_id"] == "P-00002"


def test_single_object_encoding():
    value = single_object_frame(VIEW, body(VIEW, make_view(1, 1)))
    assert value[:2] == b"\xc3\x01"
    assert Decoder().decode(value)[0] is EventKind.PRODUCT_VIEW


def old_view_schema():
    """An older writer: before experiments and customer were added (both have defaults)."""
    old = json.loads(json.dumps(VIEW))
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("experiments", "customer")]
    return old


def test_old_writers_decode_with_the_current_reader(tmp_path):
    old = old_view_schema()
    path = tmp_path / "view-v0.avsc"
    path.write_text(json.dumps(old))
    rec = make_view(1, 1)
    del rec["experiments"], rec["customer"]
    d = Decoder(local_ids={7: path})
    kind, out = d.decode(confluent_frame(7, body(old, rec)))
    assert kind is EventKind.PRODUCT_VIEW
    assert out["experiments"] == [] and out["customer"] is None


def test_single_object_finds_old_versions_in_history(tmp_path):
    hist = tmp_path / "history"
    hist.mkdir()
    old = old_view_schema()
    (hist / "shop.events.ProductView.v0.avsc").write_text(json.dumps(old))
    rec = make_view(1, 1)
    del rec["experiments"], rec["customer"]
    d = Decoder(history_dir=hist)
    assert d.decode(single_object_frame(old, body(old, rec)))[1]["experiments"] == []


class FakeRegistry:
    def __init__(self, schemas):
        self.schemas = schemas
        self.calls = 0

    def get_schema(self, sid):
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        self.calls += 1
        if sid not in self.schemas:
            raise SchemaRegistryError(404, 40403, "Schema not found")
        return Schema(json.dumps(self.schemas[sid]), "AVRO")


OTHER = {"type": "record", "name": "Other", "namespace": "x", "fields": [{"name": "a", "type": "int"}]}


def test_registry_schemas_are_fetched_once_and_cached():
    reg = FakeRegistry({42: VIEW, 43: OTHER})
    d = Decoder(registry=reg)
    value = confluent_frame(42, body(VIEW, make_view(1, 1)))
    values = [value, value, confluent_frame(43, b"\x02"), confluent_frame(44, b"\x02"), b"\x07x", b"\x00\x00"]
    assert d.unknown_ids(values) == {42, 43, 44}
    d.fetch({42, 43, 44})
    assert reg.calls == 3 and d.unknown_ids(values) == set()
    for _ in range(5):
        assert d.decode(value)[0] is EventKind.PRODUCT_VIEW
    assert d.decode(confluent_frame(43, b"\x02")) == (None, {"a": 1})  # valid but unroutable
    with pytest.raises(DecodeError) as info:
        d.decode(confluent_frame(44, b"\x02"))
    assert info.value.reason == "unknown_schema" and "40403" in info.value.detail
    d.fetch({42, 43, 44})
    assert reg.calls == 3  # found and missing ids alike are not asked again


def test_decode_never_calls_the_registry_for_an_id_not_fetched():
    reg = FakeRegistry({42: VIEW})
    d = Decoder(registry=reg)
    with pytest.raises(RegistryUnavailable):
        d.decode(confluent_frame(42, body(VIEW, make_view(1, 1))))
    assert reg.calls == 0


def test_without_a_registry_nothing_is_unknown_and_unmapped_ids_are_dead_letters():
    d = Decoder()
    assert d.unknown_ids([confluent_frame(99, b"x"), encode(EventKind.ORDER, make_order(1))]) == set()
    with pytest.raises(DecodeError) as info:
        d.decode(confluent_frame(99, b"x"))
    assert info.value.reason == "unknown_schema"


def test_a_local_id_that_cannot_be_read_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match=r"schema_registry\.local_ids"):
        Decoder(local_ids={7: tmp_path / "missing.avsc"})


@pytest.fixture
def stub():
    with RegistryStub({1: VIEW, 2: load_canonical_schemas()["shop.events.OrderCompleted"],
                       5: json.dumps({"type": "record", "name": "Broken", "fields": [{"name": "a"}]})}) as s:
        yield s


@pytest.fixture
def client(stub):
    with SchemaRegistryClient({"url": stub.url, "max.retries": 0, "timeout": 5}) as c:
        yield c


def test_against_the_registry_stub_found_and_not_found(stub, client):
    d = Decoder(registry=client)
    order = encode(EventKind.ORDER, make_order(2, 2))
    view = encode(EventKind.PRODUCT_VIEW, make_view(1, 1))
    values = [order, view, confluent_frame(9, b"\x02"), confluent_frame(5, b"\x02")]
    d.fetch(d.unknown_ids(values))
    assert d.decode(order)[0] is EventKind.ORDER
    assert d.decode(view)[0] is EventKind.PRODUCT_VIEW
    for value, detail in ((values[2], "not found in the registry"), (values[3], "does not parse")):
        with pytest.raises(DecodeError) as info:
            d.decode(value)
        assert info.value.reason == "unknown_schema" and detail in info.value.detail
    asked = stub.requests
    assert d.unknown_ids(values) == set()
    d.fetch({1, 2, 5, 9})
    assert stub.requests == asked


@pytest.mark.parametrize("outage", ["stopped", "503", "404 without a registry code"])
def test_an_unavailable_registry_is_never_a_dead_letter_and_nothing_is_remembered(stub, client, outage):
    d = Decoder(registry=client)
    value = encode(EventKind.ORDER, make_order(1, 1))
    if outage == "stopped":
        stub.stop()
    elif outage == "503":
        stub.fail_with = 503
    else:
        client._rest_client.base_urls = [f"{stub.url}/wrong-path"]
    with pytest.raises(RegistryUnavailable):
        d.fetch(d.unknown_ids([value]))
    assert d.unknown_ids([value]) == {2}  # nothing cached, nothing remembered as missing
    with pytest.raises(RegistryUnavailable):
        d.decode(value)
    stub.start()  # back, on the same port
    stub.fail_with = None
    client._rest_client.base_urls = [stub.url]
    d.fetch(d.unknown_ids([value]))
    assert d.decode(value)[0] is EventKind.ORDER


@pytest.mark.parametrize(("value", "reason"), [
    (b"", "empty"),
    (b"\x07abc", "bad_framing"),
    (b"\x00\x00", "bad_framing"),
    (b"\xc3\x01\x00", "bad_framing"),
    (b"\xc3\x01" + b"\x00" * 8 + b"x", "unknown_schema"),
    (confluent_frame(99, b"x"), "unknown_schema"),
])
def test_bad_framing(value, reason):
    with pytest.raises(DecodeError) as info:
        Decoder().decode(value)
    assert info.value.reason == reason


def test_truncated_and_wrong_types():
    good = encode(EventKind.PRODUCT_VIEW, make_view(1, 1))
    with pytest.raises(DecodeError) as info:
        Decoder().decode(good[:-20])
    assert info.value.reason == "truncated"
    with pytest.raises(DecodeError) as info:  # an order body framed with the view's id: say what it is
        Decoder().decode(confluent_frame(1, encode(EventKind.ORDER, make_order(1, 1))[5:]))
    assert info.value.reason == "invalid_data"
    assert info.value.detail == ("does not decode as shop.events.ProductView (schema id 1) but as "
                                 "shop.events.OrderCompleted: framed with the wrong schema id")
    with pytest.raises(DecodeError) as info:
        Decoder().decode(good[:-20])
    assert "(shop.events.ProductView (schema id 1))" in info.value.detail
    with pytest.raises(DecodeError) as info:
        Decoder().decode(good + b"\x00\x00")
    assert info.value.reason == "invalid_data"


def test_writer_schemas_carry_the_parse_hint_so_fastavro_does_not_reparse_them(tmp_path, monkeypatch):
    """fastavro's schemaless_reader re-parses, on every message, a schema parsed without its hint:
    that once cost more than the decoding itself (bench/README.md)."""
    import processor.codec as codec

    writers = []
    real = codec.schemaless_reader
    monkeypatch.setattr(codec, "schemaless_reader", lambda fo, w, r: writers.append(w) or real(fo, w, r))
    old = old_view_schema()
    path = tmp_path / "view-v0.avsc"
    path.write_text(json.dumps(old))
    rec = make_view(1, 1)
    del rec["experiments"], rec["customer"]
    Decoder().decode(encode(EventKind.ORDER, make_order(1)))
    Decoder(local_ids={7: path}).decode(confluent_frame(7, body(old, rec)))
    registry = Decoder(registry=FakeRegistry({42: VIEW}))
    registry.fetch({42})
    registry.decode(confluent_frame(42, body(VIEW, make_view(1, 1))))
    Decoder().decode(single_object_frame(VIEW, body(VIEW, make_view(1, 1))))
    assert len(writers) == 4
    assert all("__fastavro_parsed" in w for w in writers)


def test_non_utf8_strings_are_invalid_data():
    value = bytearray(encode(EventKind.PRODUCT_VIEW, make_view(1, 1)))
    site = b"shop-1"
    at = value.index(site)
    value[at:at + len(site)] = b"\xff\xfe\xfd\xfc\xfb\xfa"  # the same length, not UTF-8
    with pytest.raises(DecodeError) as info:
        Decoder().decode(bytes(value))
    assert (info.value.reason, info.value.detail) == ("invalid_data", "a string in the body is not valid UTF-8")


JSON_SCHEMA = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
               "properties": {"a": {"$ref": "common.json"}}}
PROTO = 'syntax = "proto3";\npackage shop;\nimport "common.proto";\nmessage View { common.Id id = 1; }\n'


@pytest.mark.parametrize(("sid", "kind"), [(30, "JSON"), (31, "JSON"), (32, "PROTOBUF"), (33, "PROTOBUF")])
def test_a_schema_of_another_type_is_unknown_schema_with_or_without_references(sid, kind):
    refs = [{"name": "common.json", "subject": "common-json", "version": 1}]
    proto_refs = [{"name": "common.proto", "subject": "common-proto", "version": 1}]
    subjects = {("common-json", 1): Registered({"type": "object", "properties": {}}, "JSON"),
                ("common-proto", 1): Registered('syntax = "proto3";\npackage common;\nmessage Id { string v = 1; }\n',
                                                "PROTOBUF")}
    schemas = {30: Registered({"type": "object"}, "JSON"), 31: Registered(JSON_SCHEMA, "JSON", refs),
               32: Registered('syntax = "proto3";\nmessage V { string a = 1; }\n', "PROTOBUF"),
               33: Registered(PROTO, "PROTOBUF", proto_refs)}
    with RegistryStub(schemas, subjects=subjects) as stub, SchemaRegistryClient(
            {"url": stub.url, "max.retries": 0, "timeout": 5}) as client:
        d = Decoder(registry=client)
        value = confluent_frame(sid, b"\x02")
        d.fetch(d.unknown_ids([value]))  # raised RegistryUnavailable for a reference that is not Avro
        assert d.unknown_ids([value]) == set()
        with pytest.raises(DecodeError) as info:
            d.decode(value)
        assert info.value.reason == "unknown_schema" and f"is {kind}, not AVRO" in info.value.detail


def test_an_avro_schema_with_references_resolves_them():
    customer = load_canonical_schemas()["shop.events.OrderCompleted"]
    named_ref = {"type": "record", "name": "Ref", "namespace": "x", "fields": [{"name": "a", "type": "int"}]}
    outer = {"type": "record", "name": "Outer", "namespace": "x", "fields": [{"name": "r", "type": "x.Ref"}]}
    schemas = {40: Registered(outer, None, [{"name": "x.Ref", "subject": "ref", "version": 1}]), 2: customer}
    with RegistryStub(schemas, subjects={("ref", 1): Registered(named_ref)}) as stub, SchemaRegistryClient(
            {"url": stub.url, "max.retries": 0, "timeout": 5}) as client:
        d = Decoder(registry=client)
        d.fetch({40})
        assert d.decode(confluent_frame(40, b"\x04")) == (None, {"r": {"a": 2}})  # valid Avro, not routed


def test_the_resolver_waits_with_backoff_and_says_so_while_the_registry_is_down(stub, client, caplog):
    import asyncio
    import logging

    from processor.codec import SchemaResolver

    caplog.set_level(logging.INFO, "processor.codec")
    now = [0.0]
    changes: list[bool] = []
    r = SchemaResolver(Decoder(registry=client), "replay to qubit", changes.append, clock=lambda: now[0])
    order = encode(EventKind.ORDER, make_order(1, 1))
    stub.stop()

    async def attempts() -> list[bool]:
        out = [await r.ready([order])]
        asked = stub.requests
        out.append(await r.ready([order]))  # before the backoff is over: not asked again
        assert stub.requests == asked
        now[0] = 1.0
        out.append(await r.ready([order]))  # asked again, still down: the next wait doubles
        assert r._retry_at == 3.0
        stub.start()
        now[0] = 3.0
        out.append(await r.wait([order]))
        return out

    assert asyncio.run(attempts()) == [False, False, False, True]
    assert changes == [False, True] and r.down is None
    waits = [m for m in caplog.messages if "replay to qubit waiting for the schema registry" in m]
    assert len(waits) == 2 and "reachable again" in caplog.messages[-1]
    assert r.decoder.decode(order)[0] is EventKind.ORDER


def test_the_registry_client_is_bounded_by_timeout_s_and_a_registry_that_never_answers_is_unavailable():
    import threading
    import time

    from processor.codec import build_decoder
    from processor.config import SchemaRegistryConfig

    with RegistryStub({1: VIEW}) as stub:
        stub.hold()  # accepts, never answers
        d = build_decoder(SchemaRegistryConfig(url=stub.url, timeout_s=0.5))
        out: list[BaseException | None] = []

        def fetch() -> None:
            try:
                d.fetch({1})
                out.append(None)
            except BaseException as exc:
                out.append(exc)

        started = time.monotonic()
        t = threading.Thread(target=fetch, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "the registry client waited past its timeout"
        assert isinstance(out[0], RegistryUnavailable) and "schema id 1" in str(out[0])
        assert time.monotonic() - started < 3  # one request, no retries of the client's own
        assert d.failing == {1: str(out[0])}


def test_an_id_the_registry_fails_for_does_not_hold_the_other_ids_of_the_fetch(stub, client):
    d = Decoder(registry=client)
    stub.fail_ids = {1: 500}
    order, view = encode(EventKind.ORDER, make_order(1, 1)), encode(EventKind.PRODUCT_VIEW, make_view(1, 1))
    with pytest.raises(RegistryUnavailable) as info:
        d.fetch({1, 2})
    assert "HTTP 500 for schema id 1" in str(info.value) and info.value.answered
    assert d.decode(order)[0] is EventKind.ORDER  # id 2 fetched although id 1, asked first, failed
    assert d.waits(view) and not d.waits(order) and set(d.failing) == {1}
    stub.fail_ids = {}
    d.fetch({1})
    assert not d.waits(view) and d.failing == {}


def test_a_fetch_outstanding_past_a_few_seconds_makes_the_resolver_name_the_registry_and_id_and_hears_the_stop(
        stub, client, caplog):
    import asyncio
    import logging
    import time

    from processor.codec import SchemaResolver, registry_name

    caplog.set_level(logging.INFO, "processor.codec")
    now = [0.0]
    changes: list[bool] = []
    r = SchemaResolver(Decoder(registry=client), "the relay", changes.append, clock=lambda: now[0],
                       registry=registry_name(stub.url.replace("http://", "http://user:pw@")))
    view = confluent_frame(1, body(VIEW, make_view(1, 1)))
    stub.hold()

    async def run() -> tuple[bool, float]:
        stopping = asyncio.Event()
        assert not await r.ready([view], stopping)  # waits at most wait_s (1 s), the fetch goes on
        assert r.waiting() is None  # not yet a few seconds
        now[0] = 4.0
        assert not await r.ready_ids({1}, stopping, wait_s=0.01)
        why = r.waiting()
        assert why is not None and f"schema registry http://127.0.0.1:{stub.port}" in why
        assert "has not answered for 4s (schema id 1)" in why and "pw" not in why
        assert changes == [False]
        waiter = asyncio.create_task(r.wait([view], stopping))
        await asyncio.sleep(0.05)
        stopping.set()
        started = time.monotonic()
        stopped = await waiter
        return stopped, time.monotonic() - started

    stopped, took = asyncio.run(run())
    assert stopped is False and took < 0.5  # the stop ends the wait, whatever the registry does
    assert any("the relay waiting for the schema registry (no answer for schema id 1" in m for m in caplog.messages)
    stub.release()
