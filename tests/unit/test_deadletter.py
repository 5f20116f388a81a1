from processor.deadletter import dlq_headers, headers_dict, prior_replay_count, redact
from processor.events import Source


def test_headers_keep_the_originals_and_say_everything():
    src = Source("shop.events", 2, 41, 1_700_000_000_000, b"k", b"v", [("trace", b"t"), ("relay.replay_count", b"2"),
                                                                      ("relay.vendor", b"old")])
    h = dlq_headers(src, "qubit", "exhausted", 503, "HTTP 503 (after 6 attempts)", 6, 1000, 2000)
    assert ("trace", b"t") in h
    d = headers_dict(h)
    assert d == {
        "relay.vendor": "qubit", "relay.error_class": "exhausted", "relay.http_status": "503",
        "relay.reason": "HTTP 503 (after 6 attempts)", "relay.attempts": "6", "relay.first_failure_ms": "1000",
        "relay.last_failure_ms": "2000", "relay.original_topic": "shop.events", "relay.original_partition": "2",
        "relay.original_offset": "41", "relay.original_timestamp_ms": "1700000000000", "relay.replay_count": "2",
    }
    assert [k for k, _ in h].count("relay.vendor") == 1


def test_reasons_are_redacted_and_short():
    r = redact("invalid email jane.doe@example.com phone +44 20 7946 0000 api_key=abc123 " + "x" * 500)
    assert "jane" not in r and "7946" not in r and "abc123" not in r
    assert len(r) <= 240


def test_foreign_or_garbled_relay_headers_are_data_never_a_crash():
    # a poison message: a replay count that is not a number, a non-UTF-8 value, a header we never write
    src = Source("shop.events", 0, 7, None, None, b"\x00junk", [
        ("relay.replay_count", b"x"), ("relay.reason", b"\xff\xfe"), ("relay.custom", b"mine"),
        ("relay.attempts", b"3"), ("trace", b"t")])
    h = dlq_headers(src, None, "undecodable", None, "bad_framing: ...", 0, 1, 2)
    assert ("relay.replay_count", b"x") in h  # kept as it was
    assert ("relay.reason", b"\xff\xfe") in h
    assert ("relay.custom", b"mine") in h
    assert [v for k, v in h if k == "relay.attempts"] == [b"0"]  # ours: replaced, not repeated
    d = headers_dict(h)
    assert d["relay.replay_count"] == "0" and d["relay.reason"] == "bad_framing: ..."  # the fresh values win
    assert dlq_headers(src, None, "undecodable", None, "r", 0, 1, 2, replay_count=4)[-1] == (
        "relay.replay_count", b"4")


def test_prior_replay_count_takes_the_last_that_parses():
    assert prior_replay_count(None) is None
    assert prior_replay_count([("relay.replay_count", b"x")]) is None
    assert prior_replay_count([("relay.replay_count", b"2"), ("relay.replay_count", b"x")]) == 2
    assert prior_replay_count([("relay.replay_count", b"-1")]) is None
