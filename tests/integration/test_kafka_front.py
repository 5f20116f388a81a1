"""The TLS and SASL front's reading and writing of the Kafka protocol, against answers built here by the
protocol's layouts (https://kafka.apache.org/protocol), both the classic and the flexible versions."""

from __future__ import annotations

import struct

import pytest
from scramp import ScramClient

from tests.integration.kafka_front import (
    GROUP_AUTHORIZATION_FAILED,
    NO_TAGS,
    TOPIC_AUTHORIZATION_FAILED,
    Reader,
    SaslExchange,
    User,
    array_len,
    edit_api_versions,
    rewrite_find_coordinator,
    rewrite_metadata,
    string,
)

pytestmark = pytest.mark.integration

TAIL = b"\x00\x00\x00\x07" + b"\x01\x00\x02\xab\xcd"  # throttle_time_ms and a tagged field, copied as they are


def api_versions(entries: list[tuple[int, int, int]], compact: bool) -> bytes:
    out = struct.pack(">h", 0) + array_len(len(entries), compact)
    for key, lo, hi in entries:
        out += struct.pack(">hhh", key, lo, hi) + (NO_TAGS if compact else b"")
    return out + (TAIL if compact else b"\x00\x00\x00\x07")


def read_api_versions(body: bytes, compact: bool) -> tuple[dict[int, tuple[int, int]], bytes]:
    r = Reader(body)
    assert r.int16() == 0
    out = {}
    for _ in range(r.array_len(compact)):
        key, lo, hi = r.int16(), r.int16(), r.int16()
        if compact:
            r.skip_tags()
        out[key] = (lo, hi)
    return out, r.rest()


@pytest.mark.parametrize("version", [0, 2, 3])
def test_api_versions_advertise_the_fronts_sasl_and_hide_describe_cluster(version):
    compact = version >= 3
    body = api_versions([(0, 0, 9), (3, 0, 12), (10, 0, 4), (17, 0, 1), (60, 0, 1)], compact)
    edited, rest = read_api_versions(edit_api_versions(body, version), compact)
    assert edited == {0: (0, 9), 3: (0, 12), 10: (0, 3), 17: (0, 1), 36: (0, 1)}
    assert rest == (TAIL if compact else b"\x00\x00\x00\x07")


def test_an_api_versions_error_answer_is_left_as_it_is():
    body = struct.pack(">h", 35) + array_len(1) + struct.pack(">hhh", 18, 0, 3)
    assert edit_api_versions(body, 3) == body


def metadata(version: int, brokers: list[tuple[int, str, int, str | None]]) -> bytes:
    compact = version >= 9
    out = b"\x00\x00\x00\x00" if version >= 3 else b""
    out += array_len(len(brokers), compact)
    for node, host, port, rack in brokers:
        out += struct.pack(">i", node) + string(host, compact) + struct.pack(">i", port)
        if version >= 1:
            out += string(rack, compact)
        if compact:
            out += NO_TAGS
    return out + b"REST-OF-THE-ANSWER"


@pytest.mark.parametrize("version", [0, 1, 3, 8, 9, 12])
def test_metadata_names_the_front_for_every_broker_and_keeps_the_rest(version):
    body = metadata(version, [(1, "broker-a.internal", 9092, "r1"), (2, "broker-b.internal", 9092, None)])
    expected = metadata(version, [(1, "127.0.0.1", 9094, "r1"), (2, "127.0.0.1", 9094, None)])
    assert rewrite_metadata(body, version, "127.0.0.1", 9094) == expected


def topic(version: int, name: str, internal: bool, partitions: int, error: int = 0) -> bytes:
    """One topic of a Metadata answer: ``partitions`` partitions with two replicas each."""
    compact = version >= 9
    out = struct.pack(">h", error) + string(name, compact)
    if version >= 10:
        out += bytes(range(16))  # topic_id
    if version >= 1:
        out += struct.pack(">b", internal)
    out += array_len(partitions, compact)
    for p in range(partitions):
        out += struct.pack(">hii", 0, p, 1) + (struct.pack(">i", 5) if version >= 7 else b"")
        for _ in range(3 if version >= 5 else 2):
            out += array_len(2, compact) + struct.pack(">ii", 1, 2)
        out += NO_TAGS if compact else b""
    if version >= 8:
        out += struct.pack(">i", -2147483648)
    return out + (NO_TAGS if compact else b"")


def with_topics(version: int, topics: list[bytes]) -> bytes:
    compact = version >= 9
    out = b"\x00\x00\x00\x00" if version >= 3 else b""
    out += array_len(1, compact) + struct.pack(">i", 1) + string("broker-a", compact) + struct.pack(">i", 9092)
    if version >= 1:
        out += string(None, compact)
    out += NO_TAGS if compact else b""
    if version >= 2:
        out += string("cluster-1", compact)
    if version >= 1:
        out += struct.pack(">i", 1)
    out += array_len(len(topics), compact) + b"".join(topics)
    if 8 <= version <= 10:
        out += struct.pack(">i", -2147483648)
    return out + (NO_TAGS if compact else b"")


@pytest.mark.parametrize("version", [0, 1, 2, 5, 7, 8, 9, 10, 12])
def test_metadata_refuses_every_topic_but_the_internal_ones_to_a_user_without_topics(version):
    body = with_topics(version, [topic(version, "orders", False, 3), topic(version, "__consumer_offsets", True, 2)])
    internal = (topic(version, "__consumer_offsets", True, 2) if version >= 1  # v0 does not say which are internal
                else topic(version, "__consumer_offsets", True, 0, TOPIC_AUTHORIZATION_FAILED))
    refused = with_topics(version, [topic(version, "orders", False, 0, TOPIC_AUTHORIZATION_FAILED), internal])
    before = rewrite_metadata(body, version, "127.0.0.1", 9094)
    after = rewrite_metadata(body, version, "127.0.0.1", 9094, deny_topics=True)
    assert after == rewrite_metadata(refused, version, "127.0.0.1", 9094)
    assert before != after and len(after) < len(before)


def find_coordinator(version: int, error: int, message: str | None, node: int, host: str, port: int) -> bytes:
    compact = version >= 3
    out = struct.pack(">i", 0) if version >= 1 else b""
    out += struct.pack(">h", error)
    if version >= 1:
        out += string(message, compact)
    out += struct.pack(">i", node) + string(host, compact) + struct.pack(">i", port)
    return out + (NO_TAGS if compact else b"")


@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_find_coordinator_names_the_front_or_refuses_the_group(version):
    body = find_coordinator(version, 0, None, 1, "broker-a.internal", 9092)
    assert rewrite_find_coordinator(body, version, "127.0.0.1", 9094, False) == find_coordinator(
        version, 0, None, 1, "127.0.0.1", 9094)
    denied = Reader(rewrite_find_coordinator(body, version, "127.0.0.1", 9094, True))
    if version >= 1:
        denied.int32()
    assert denied.int16() == GROUP_AUTHORIZATION_FAILED


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_lets_in_the_right_password_only(mechanism):
    users = {"svc": User("s3cret-pw")}
    for password, ok in (("s3cret-pw", True), ("wrong", False)):
        client = ScramClient([mechanism], "svc", password)
        server = SaslExchange(mechanism, users)
        first, done = server.step(client.get_client_first().encode())
        assert not done
        client.set_server_first(first.decode())
        if not ok:
            with pytest.raises(PermissionError):
                server.step(client.get_client_final().encode())
            assert server.user is None
            continue
        final, done = server.step(client.get_client_final().encode())
        client.set_server_final(final.decode())  # the client checks the server's signature too
        assert done and server.user == "svc"


def test_plain_checks_the_user_and_password():
    users = {"svc": User("s3cret-pw")}
    assert SaslExchange("PLAIN", users).step(b"\x00svc\x00s3cret-pw") == (b"", True)
    for wrong in (b"\x00svc\x00nope", b"\x00other\x00s3cret-pw", b"svc"):
        with pytest.raises(PermissionError):
            SaslExchange("PLAIN", users).step(wrong)
