from processor.deadletter import dlq_headers, headers_dict, redact
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
