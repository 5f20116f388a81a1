"""What keeps a Kafka client of the relay out of the cluster, named once: a refused SASL login, a broker
certificate the client does not trust, a permission the principal lacks.

librdkafka reports these as errors it retries for ever (every reconnect, a few times a second) and
as a transport failure to the call that was waiting (``list_topics``: "Broker transport failure"). One
function, ``access_problem``, reads librdkafka's error (code and text) and names the cause with the
settings that fix it; ``AccessWatch`` is the ``error_cb`` that logs a cause once as an ERROR and keeps it
for readiness, and ``reach`` is ``list_topics`` that gives up as soon as the cause is known instead of
waiting out its timeout. librdkafka's own log lines for each failed attempt are left to DEBUG
(``RepeatedFailures``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message

logger = logging.getLogger(__name__)

_AUTHENTICATION = (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED)
_PERMISSIONS = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "a topic (READ on the input topics, WRITE on the dead-letter and retry "
                                           "topics, DESCRIBE on all)",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "the consumer group (READ on kafka.group_id and the replay groups)",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "the cluster (DESCRIBE_CONFIGS, CREATE for `topics create`)",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "a transactional id",
}
_UNTRUSTED = ("certificate verify failed", "certificate could not be verified")
_CONSEQUENCES = (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT)  # what follows a refusal, said already


def access_problem(code: int | None, text: str) -> str | None:
    """The cause, with the settings that fix it, when librdkafka's error (``code``: None for a log line,
    read by its text alone) says the cluster keeps the client out; None for anything else."""
    found = _classify(code, text)
    return None if found is None else f"{found[1]}: {text}"


def _classify(code: int | None, text: str) -> tuple[str, str] | None:
    """(kind, what it means): the kind stays the same from one failed attempt to the next."""
    if code in _AUTHENTICATION or "SASL authentication error" in text or "SASL authentication failed" in text:
        return "authentication", ("SASL authentication failed: the broker refused the credentials (kafka.client "
                                  "sasl.username, sasl.password, sasl.mechanism)")
    if any(s in text for s in _UNTRUSTED):
        return "untrusted", ("TLS: the broker's certificate is not signed by a CA the client trusts (kafka.client "
                             "ssl.ca.location names the CA bundle)")
    if code == KafkaError._SSL or "SSL handshake failed" in text:
        return "tls", "TLS handshake with the broker failed (kafka.client ssl.*)"
    if code is not None and code in _PERMISSIONS:
        return f"permission {code}", f"not authorized: the broker refuses the principal access to {_PERMISSIONS[code]}"
    return None


class AccessWatch:
    """The ``error_cb`` of one or more librdkafka clients of ``who``: a cause that keeps them out of the
    cluster is logged once as an ERROR (again only when it changes) and kept in ``problem`` (readiness)
    until ``clear()``; other errors are warnings, and the disconnects that follow a named cause debug lines.
    Called from librdkafka's poll, on any thread."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.problem: str | None = None
        self.code: int | None = None  # librdkafka's code of the problem
        self._kind: str | None = None  # ``_classify``'s kind of the problem: logged again only when it changes
        self._lock = threading.Lock()
        RepeatedFailures.install()

    def __call__(self, err: KafkaError) -> None:
        self.report(err)

    def report(self, err: KafkaError) -> bool:
        """Whether ``err`` keeps the client out (then named, once)."""
        found = _classify(err.code(), err.str())
        if found is None:
            if self.problem is None or err.code() not in _CONSEQUENCES:
                logger.warning("%s: Kafka error: %s", self.who, err.str())
            return False
        with self._lock:
            new = found[0] != self._kind
            self._kind, self.code, self.problem = found[0], err.code(), f"{found[1]}: {err.str()}"
        if new:
            logger.error("%s: %s", self.who, self.problem)
        return True

    def clear(self) -> None:
        """The cluster let the client in (an answer came back): the named cause is over."""
        with self._lock:
            was, self.problem, self._kind = self.problem, None, None
        if was is not None:
            logger.info("%s: the Kafka cluster lets it in again", self.who)


class RepeatedFailures(logging.Filter):
    """On the ``librdkafka`` logger of a process with an ``AccessWatch``: the per-attempt lines that say what
    the watch names once (a failed SASL login or TLS handshake, a few a second) only at DEBUG."""

    _installed = False

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            logging.getLogger("librdkafka").addFilter(cls())
            cls._installed = True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or logger.isEnabledFor(logging.DEBUG):
            return True
        return access_problem(None, record.getMessage()) is None


def reach(client: Any, watch: AccessWatch, timeout_s: float, topic: str | None = None) -> Any:
    """``client.list_topics(topic)`` within ``timeout_s``, serving the client's callbacks between tries, so a
    refusal ends the wait at once: raises KafkaException naming the cause (``AccessWatch``), or librdkafka's
    own error when the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            md = client.list_topics(topic, timeout=max(0.1, min(1.0, left)))
        except KafkaException as exc:
            _serve(client, watch)
            if watch.problem is not None:
                raise KafkaException(KafkaError(watch.code or KafkaError._AUTHENTICATION, watch.problem)) from exc
            if time.monotonic() >= deadline:
                raise
            continue
        watch.clear()
        return md


def _serve(client: Any, watch: AccessWatch) -> None:
    """Serve the client's error callbacks (and, for a consumer not yet reading anything, its error events:
    ``reach`` is for the time before a consumer is assigned, when a poll returns no message to lose)."""
    got = client.poll(0)
    err = got.error() if isinstance(got, Message) else None
    if err is not None:
        watch.report(err)
