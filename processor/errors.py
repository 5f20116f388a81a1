"""The relay's error taxonomy, decided in one place per concern.

::

    RelayError
    ├── ConfigError          bad configuration: fail at start, name the field (fatal)
    ├── DecodeError          a message that cannot be decoded: dead letter as "undecodable"
    │                        (.reason is one of DECODE_REASONS, a fixed label set)
    ├── RegistryUnavailable  the schema registry cannot answer (transport error, timeout, 5xx, auth):
    │                        retryable, never a dead letter: hold the messages, pause consumption
    │                        (readiness false) and fetch again with backoff
    └── FatalError           the relay cannot go on (e.g. lost the broker for good): stop, exit non-zero

Per-event delivery outcomes are not exceptions: adapters return an ``Outcome``
for every event (delivered / retryable / rejected); transport failures
(connect errors, timeouts) are translated to retryable outcomes at one
boundary, ``processor.service`` (every exception of one request becomes that request's outcome).

Dead-letter error classes (the ``error-class`` header and metric label):
rejected (the vendor refused it, or our own checks did: a field the vendor needs missing, or
breaking a rule of processor.validation; the reason names the field), exhausted (retries
ran out), undecodable (bytes that are not a known Avro event), unroutable
(decoded, but no event kind the relay knows), internal (the relay itself failed on it:
the reason names the exception type).
"""

from __future__ import annotations

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
