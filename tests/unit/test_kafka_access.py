"""librdkafka's reports of a refused login, an untrusted broker certificate and a missing permission, named
once (the texts are librdkafka 2.x's, as seen against the TLS and SASL front of the integration tests)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from processor.kafka_access import AccessWatch, RepeatedFailures, access_problem, reach

SASL = ("sasl_ssl://127.0.0.1:9094/bootstrap: SASL authentication error: Authentication failed during "
        "authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 48ms in state AUTH_REQ)")
UNTRUSTED = ("sasl_ssl://127.0.0.1:9094/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate "
             "verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly "
             "configured or root CA certificates are installed (install ca-certificates package) (after 1ms in state "
             "SSL_HANDSHAKE)")
GROUP = "FindCoordinator response error: Group authorization failed."


@pytest.mark.parametrize(("code", "text", "named"), [
    (KafkaError._AUTHENTICATION, SASL, "SASL authentication failed"),
    (KafkaError.SASL_AUTHENTICATION_FAILED, "Authentication failed", "sasl.password"),
    (KafkaError._SSL, UNTRUSTED, "ssl.ca.location"),
    (KafkaError._SSL, "SSL handshake failed: wrong version number", "TLS handshake with the broker failed"),
    (KafkaError.GROUP_AUTHORIZATION_FAILED, GROUP, "READ on kafka.group_id"),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, "Topic authorization failed", "not authorized"),
    (KafkaError.CLUSTER_AUTHORIZATION_FAILED, "Cluster authorization failed", "not authorized"),
    (None, SASL, "SASL authentication failed"),  # a log line: by its text
    (None, "bootstrap: error:0A000086:SSL routines::certificate verify failed (after 1ms)", "ssl.ca.location"),
])
def test_what_keeps_a_client_out_is_named_with_the_settings_that_fix_it(code, text, named):
    why = access_problem(code, text)
    assert why is not None and named in why and text in why


@pytest.mark.parametrize(("code", "text"), [
    (KafkaError._TRANSPORT, "Connection refused"),
    (KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"),
    (KafkaError._TIMED_OUT, "Timed out"),
    (KafkaError.NOT_COORDINATOR, "Not coordinator"),
    (None, "Disconnected (after 3529ms in state UP)"),
])
def test_an_outage_is_not_an_access_problem(code, text):
    assert access_problem(code, text) is None


def test_a_watch_names_a_cause_once_then_again_only_when_it_changes(caplog):
    watch = AccessWatch("the relay")
    with caplog.at_level(logging.INFO, "processor.kafka_access"):
        for ms in (48, 61, 27):  # every reconnect says it again, with another timing
            assert watch.report(KafkaError(KafkaError._AUTHENTICATION, SASL.replace("48ms", f"{ms}ms")))
        assert not watch.report(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
        assert watch.problem is not None and "27ms" in watch.problem  # the latest words, for readiness
        assert watch.report(KafkaError(KafkaError._SSL, UNTRUSTED))
        watch.clear()
        assert watch.problem is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "SASL" in errors[0] and "ssl.ca.location" in errors[1]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # brokers down: the cause is named
    assert "lets it in again" in caplog.records[-1].getMessage()


def test_other_errors_stay_warnings(caplog):
    watch = AccessWatch("the relay")
    with caplog.at_level(logging.INFO, "processor.kafka_access"):
        assert not watch.report(KafkaError(KafkaError._TRANSPORT, "Connection refused"))
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and watch.problem is None


def test_librdkafkas_own_lines_of_each_failed_attempt_are_left_to_debug():
    AccessWatch("x")
    [flt] = [f for f in logging.getLogger("librdkafka").filters if isinstance(f, RepeatedFailures)]

    def line(level: int, text: str) -> logging.LogRecord:
        return logging.LogRecord("librdkafka", level, __file__, 1, "%s [%s] %s", ("FAIL", "rdkafka#producer-1", text),
                                 None)

    assert not flt.filter(line(logging.ERROR, SASL))
    assert not flt.filter(line(logging.ERROR, UNTRUSTED))
    assert flt.filter(line(logging.ERROR, "Connect to ipv4#127.0.0.1:9094 failed: Connection refused"))


class FakeClient:
    """list_topics fails like librdkafka's against a refusing broker; poll serves the error callback."""

    def __init__(self, watch: AccessWatch | None, errors: list[KafkaError], answer_after: int | None = None) -> None:
        self.watch = watch
        self.errors = errors
        self.answer_after = answer_after
        self.calls = 0

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        self.calls += 1
        if self.answer_after is not None and self.calls > self.answer_after:
            return "metadata"
        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata: Broker transport failure"))

    def poll(self, timeout: float) -> int:
        for err in self.errors:
            if self.watch is not None:
                self.watch(err)
        return len(self.errors)


def test_reach_gives_up_at_once_naming_the_cause():
    watch = AccessWatch("topics")
    client = FakeClient(watch, [KafkaError(KafkaError._SSL, UNTRUSTED)])
    with pytest.raises(KafkaException) as caught:
        reach(client, watch, 30.0)
    assert client.calls == 1
    assert caught.value.args[0].code() == KafkaError._SSL and "ssl.ca.location" in caught.value.args[0].str()


def test_reach_waits_through_an_outage_and_clears_the_cause_when_let_in():
    watch = AccessWatch("topics")
    outage = FakeClient(watch, [KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")], answer_after=2)
    assert reach(outage, watch, 30.0) == "metadata" and outage.calls == 3
    watch.report(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED, GROUP))
    assert reach(FakeClient(watch, [], answer_after=0), watch, 30.0) == "metadata"
    assert watch.problem is None
    with pytest.raises(KafkaException) as caught:
        reach(FakeClient(watch, []), watch, 0.2)
    assert caught.value.args[0].code() == KafkaError._TRANSPORT
