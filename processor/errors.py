"""The relay's error taxonomy, decided in one place per concern.

::

    RelayError
    ├── ConfigError          bad configuration: fail at start, name the field (fatal)
    ├── DecodeError          a message that cannot be decoded: dead letter as "undecodable"
    │                        (.reason is one of DECODE_REASONS, a fixed label set)
    ├── RegistryUnavailable  the schema registry cannot answer (transport error, timeout, 5xx, auth):
    │                        retryable, never a dead letter: hold the messages, pause consumption
    │                        (readiness false) and fetch again with backoff
    ├── TransportError       a vendor request that got no HTTP answer, named by what happened (the
    │   │                    senders of processor.transport raise only these, mapped from aiohttp's and
    │   │                    httpx's errors by one table there): retryable; a failure for the breaker,
    │   │                    back-pressure for the adaptive limit only where marked (bp)
    │   ├── ConnectionRefused       nothing listens at the vendor's address
    │   ├── DnsFailure              the vendor's host name does not resolve
    │   ├── TlsVerificationFailed   the vendor's certificate is not trusted (ERROR once per vendor)
    │   ├── TlsError                any other TLS failure (handshake, protocol version)
    │   ├── ProxyError              the egress proxy refused or failed the tunnel
    │   ├── ConnectError            any other failure to connect (unreachable network ...)
    │   ├── ConnectTimeout     bp   no connection within timeout.connect_s (or no pooled one)
    │   ├── ReadTimeout        bp   the answer stopped coming for a socket read's timeout
    │   ├── RequestTimeout     bp   no whole answer within timeout.total_s
    │   ├── ConnectionLost          the connection broke mid-request (reset, closed, body cut short)
    │   ├── ProtocolError           an answer that is not HTTP, or a body that does not decode
    │   └── UnmappedError           an error of the HTTP stack the table does not name (logged)
    └── FatalError           the relay cannot go on (e.g. lost the broker for good): stop, exit non-zero

Per-event delivery outcomes are not exceptions: adapters return an ``Outcome``
for every event (delivered / retryable / rejected); transport failures
(``TransportError``, each class's ``label`` the reason) become retryable outcomes at one
boundary, ``processor.service`` (every exception of one request becomes that request's outcome).

Dead-letter error classes (the ``error-class`` header and metric label):
rejected (the vendor refused it, or our own checks did: a field the vendor needs missing, or
breaking a rule of processor.validation; the reason names the field), exhausted (retries
ran out), undecodable (bytes that are not a known Avro event), unroutable
(decoded, but no event kind the relay knows), internal (the relay itself failed on it:
the reason names the exception type).
"""

from __future__ import annotations

from typing import ClassVar

DECODE_REASONS = (
    "empty",
    "bad_framing",
    "unknown_schema",
    "truncated",
    "invalid_data",
)
ERROR_CLASSES = ("rejected", "exhausted", "undecodable", "unroutable", "internal")


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """The configuration is invalid; the message names the field."""


class DecodeError(RelayError):
    """A message could not be decoded into a canonical event."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in DECODE_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RegistryUnavailable(RelayError):
    """The schema registry did not answer whether a schema id exists: wait and fetch again.

    Never a dead letter: an id is dead-lettered only when the registry answers that it does not
    exist (``DecodeError("unknown_schema")``). ``answered``: the registry answered (an error status),
    as opposed to no answer at all (a timeout, a refused connection)."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


class FatalError(RelayError):
    """The relay must stop."""


class TransportError(RelayError):
    """A vendor request got no HTTP answer. ``label``: what happened, the retryable reason; ``metric``: the
    ``error`` label of ``processor_vendor_transport_errors_total``; ``backpressure``: the vendor may be
    overloaded (the adaptive limit shrinks); ``detail``: the library's words (logs only); ``host``: the
    host the request went to."""

    label: ClassVar[str] = "transport error"
    metric: ClassVar[str] = "other"
    backpressure: ClassVar[bool] = False

    def __init__(self, detail: str = "", host: str = "") -> None:
        super().__init__(f"{self.label}: {detail}" if detail else self.label)
        self.detail = detail
        self.host = host


class ConnectionRefused(TransportError):
    label, metric = "connection refused", "connection_refused"


class DnsFailure(TransportError):
    label, metric = "dns failure", "dns_failure"


class TlsVerificationFailed(TransportError):
    label, metric = "tls: certificate verify failed", "tls_verify_failed"


class TlsError(TransportError):
    label, metric = "tls: handshake failed", "tls_error"


class ProxyError(TransportError):
    label, metric = "proxy error", "proxy_error"


class ConnectError(TransportError):
    label, metric = "connect error", "connect_error"


class ConnectTimeout(TransportError):
    label, metric, backpressure = "connect timeout", "connect_timeout", True


class ReadTimeout(TransportError):
    label, metric, backpressure = "read timeout", "read_timeout", True


class RequestTimeout(TransportError):
    label, metric, backpressure = "timeout", "timeout", True


class ConnectionLost(TransportError):
    label, metric = "connection lost", "connection_lost"


class ProtocolError(TransportError):
    label, metric = "protocol error", "protocol_error"


class UnmappedError(TransportError):
    label, metric = "transport error", "other"


TRANSPORT_ERRORS: tuple[type[TransportError], ...] = (
    ConnectionRefused, DnsFailure, TlsVerificationFailed, TlsError, ProxyError, ConnectError, ConnectTimeout,
    ReadTimeout, RequestTimeout, ConnectionLost, ProtocolError, UnmappedError)
