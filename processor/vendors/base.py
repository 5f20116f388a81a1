"""The one interface every vendor adapter implements.

An adapter is pure: it turns a batch of canonical events into HTTP requests
(``plan``) and an HTTP response into one outcome per event (``interpret``).
It never does I/O, never sleeps, never imports prometheus_client: the shared
sender (``processor.service``, driven by ``processor.delivery``) does HTTP, retries, dead letters and metrics.

Adding a vendor: one module here defining an ``Adapter`` subclass, one line
in ``processor.vendors.REGISTRY``, its sandbox twin, its tests.

Each adapter declares ``needs``: the canonical fields it sends and needs, as
``processor.validation`` names them. ``plan`` rejects, before the adapter's
``build`` sees it, an event that breaks a validation rule on one of those
fields (reason: the field and what is wrong); the other vendors still get it.
Bodies are encoded with ``json_body``: strict RFC 8259 JSON, never ``null``,
``NaN`` or ``Infinity``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from operator import attrgetter
from typing import Any, ClassVar, Generic, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, create_model

from processor.events import UNCHECKED, Event, EventKind
from processor.validation import reason, validate
from processor.vendors.recent import RecentKeys

_invalid = attrgetter("invalid")
SiteT = TypeVar("SiteT", bound=BaseModel)
OptionsT = TypeVar("OptionsT", bound=BaseModel)


class Frozen(BaseModel):
    """Base of every config model: immutable, unknown keys are errors."""

    # hide_input_in_errors: a validation error (and its traceback) never carries a value, which may be a secret
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class NoOptions(Frozen):
    pass


class BatchSettings(Frozen):
    max_events: int = Field(500, ge=1, le=100_000, description="close the batch at this many events")
    max_bytes: int = Field(1_000_000, ge=1, description="close at this many bytes of source messages")
    max_wait_ms: int = Field(1000, ge=1, le=600_000, description="close this long after the first event")


class RetrySettings(Frozen):
    max_attempts: int = Field(6, ge=1, le=100, description="fast retries of one delivery (429s do not count)")
    base_delay_ms: int = Field(200, ge=1)
    max_delay_ms: int = Field(30_000, ge=1)
    park_after_s: float = Field(10.0, gt=0, description="on_outage park: park what still fails after this long")
    max_elapsed_s: float = Field(
        21_600.0, gt=0, description="from the first failure: dead letter as exhausted after this (parked or "
        "not); waiting on a throttle or a setup error never uses it up")
    max_retry_after_s: float = Field(
        300.0, gt=0, le=86_400, description="a vendor's Retry-After (seconds or an HTTP date) is clamped to this")
    setup_retry_s: float = Field(
        60.0, gt=0, le=3_600, description="after a setup error (3xx, 401, 403, 404): the site's next try")


class BreakerSettings(Frozen):
    consecutive_failures: int = Field(5, ge=1, description="open after this many failed requests in a row")
    failure_ratio: float = Field(0.5, gt=0, le=1, description="or when this share of the window's requests failed")
    window_s: float = Field(10.0, gt=0)
    min_requests: int = Field(20, ge=1, description="the ratio needs at least this many requests in the window")
    cooldown_s: float = Field(5.0, gt=0, description="open this long before the first probe")
    max_cooldown_s: float = Field(30.0, gt=0, description="the cooldown doubles up to this while probes fail")
    probes: int = Field(2, ge=1, description="requests let through half-open; all must succeed to close")


class TimeoutSettings(Frozen):
    connect_s: float = Field(3.0, gt=0)
    total_s: float = Field(10.0, gt=0, description="whole request: connect, send, wait, read")


class VendorSettings(Frozen, Generic[SiteT, OptionsT]):
    """Settings every vendor has; ``sites`` and ``options`` are the adapter's own models."""

    enabled: bool = True
    base_url: str | None = Field(None, description="override the vendor's endpoint (e.g. the sandbox)")
    allow_insecure: bool = Field(False, description="allow http:// URLs for this vendor that are not loopback")
    kinds: frozenset[EventKind] | None = Field(None, description="event kinds to send (default: all it takes)")
    batch: BatchSettings = BatchSettings()
    concurrency: int = Field(8, ge=1, le=1024, description="concurrent requests to this vendor")
    timeout: TimeoutSettings = TimeoutSettings()
    retry: RetrySettings = RetrySettings()
    user_agent: str = "event-relay/0.1"
    on_outage: Literal["park", "block"] = Field(
        "park", description="park: events wait on the vendor's retry topic, the others never wait (order may "
        "change); block: the vendor holds its events and pauses the source at its budget (order kept)")
    max_inflight_events: int | None = Field(
        None, ge=1, description="unsettled events this vendor holds (default: relay.max_inflight_events "
        "shared among the enabled vendors)")
    breaker: BreakerSettings = BreakerSettings()
    max_answer_bytes: int = Field(
        1_048_576, ge=1024, description="read at most this much of an answer's body; a longer body is an "
        "unrecognised answer (retried)")
    sites: dict[str, SiteT] = Field(description="per site_id credentials; the key 'default' applies to others")
    options: OptionsT


class Verdict(IntEnum):
    DELIVERED = 0
    RETRYABLE = 1
    REJECTED = 2


@dataclass(slots=True, frozen=True)
class Outcome:
    """What happened to one event in one request.

    ``note`` is an optional label from the adapter's ``notes`` set (counted in
    ``processor_vendor_notes_total``), e.g. a vendor warning on a delivered event."""

    verdict: Verdict
    reason: str = ""
    retry_after_s: float | None = None
    note: str | None = None


DELIVERED = Outcome(Verdict.DELIVERED)


def retryable(reason: str, retry_after_s: float | None = None, note: str | None = None) -> Outcome:
    return Outcome(Verdict.RETRYABLE, reason, retry_after_s, note)


def rejected(reason: str, note: str | None = None) -> Outcome:
    return Outcome(Verdict.REJECTED, reason, None, note)


@dataclass(slots=True)
class VendorRequest:
    """One HTTP request and the events it carries (``context``: the adapter's own bookkeeping).

    Its repr shows neither URL, headers nor content: they carry credentials and payload fields."""

    url: str
    content: bytes
    events: list[Event]
    headers: Mapping[str, str] = field(default_factory=dict)
    method: str = "POST"
    context: Any = None

    def __repr__(self) -> str:
        return f"VendorRequest({self.method}, {len(self.events)} events, {len(self.content)} bytes)"


@dataclass(slots=True)
class Plan:
    """A batch turned into requests; events that cannot be sent are rejected or filtered here."""

    requests: list[VendorRequest] = field(default_factory=list)
    rejected: list[tuple[Event, str]] = field(default_factory=list)
    filtered: list[Event] = field(default_factory=list)


@dataclass(slots=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters ("" when none is given)."""
        value = self.headers.get("content-type") or self.headers.get("Content-Type") or ""
        return value.split(";", 1)[0].strip().lower()

    def says_json(self) -> bool:
        """The answer is labelled JSON (``application/json`` or a ``+json`` type), or not labelled at all."""
        ctype = self.content_type
        return not ctype or ctype == "application/json" or ctype.endswith("+json")

    def json_object(self) -> dict[str, Any] | None:
        """The body as a JSON object when the answer says JSON (or nothing) and is one, else None."""
        if not self.says_json():
            return None
        try:
            body = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None
        return body if isinstance(body, dict) else None


# the reason of an answer that is not the vendor's documented success (nor one of its documented errors):
# retryable, counted per vendor, never a success for the breaker or the limit (processor.service)
UNRECOGNISED = "unrecognised answer"
_UNPRINTABLE = dict.fromkeys(range(32), " ")


# The status table, the default every adapter starts from (an adapter overrides ``setup_statuses`` where its
# vendor documents more, and reads the body of the others in ``interpret``):
#
#   2xx                            delivered (when the body is the vendor's success answer)
#   408, 429, 5xx except 501       retryable (429 and 503 with Retry-After: throttled, not an attempt)
#   3xx, 401, 403, 404, 407        a setup error: the relay's configuration (endpoint, credentials, proxy) is
#                                  wrong for every event of the site; never the event's fault: held or parked,
#                                  retried slowly (``retry.setup_retry_s``), an ERROR and an alert
#   other 4xx (400, 422, ...)      rejected: this event, dead-lettered with the vendor's reason
#
# The request service applies the setup row before the adapter reads the answer; ``classify_status`` is the
# per-event verdict of the other rows.
SETUP_STATUSES: frozenset[int] = frozenset({401, 403, 404, 407})


def is_setup_status(status: int, setup_statuses: frozenset[int] = SETUP_STATUSES) -> bool:
    """A status that says the relay's setup is wrong for every event (every 3xx: the relay follows no
    redirect; an endpoint that moved is a configuration change)."""
    return 300 <= status < 400 or status in setup_statuses


def classify_status(status: int) -> Verdict:
    """Default HTTP classes: 2xx ok; 408, 429 and 5xx except 501 retry; other statuses reject (the setup
    statuses never reach an adapter: the request service holds them first)."""
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in (408, 429) or (status >= 500 and status != 501):
        return Verdict.RETRYABLE
    return Verdict.REJECTED


def status_outcome(status: int, detail: str = "") -> Outcome:
    verdict = classify_status(status)
    if verdict is Verdict.DELIVERED:
        return DELIVERED
    reason = f"HTTP {status}" + (f": {detail}" if detail else "")
    return Outcome(verdict, reason)


class MissingField(Exception):
    """Raised by adapters' mapping code: the event lacks a field this vendor requires."""

    def __init__(self, field_path: str) -> None:
        super().__init__(f"missing required field {field_path}")
        self.field_path = field_path


class InvalidField(ValueError):
    """The event has a field this vendor cannot take as it is (the reason names the canonical field and
    why, never the value)."""

    def __init__(self, field_path: str, why: str) -> None:
        super().__init__(f"invalid field {field_path}: {why}")
        self.field_path = field_path


class NotJSON(ValueError):
    """A body would carry a value JSON cannot (NaN, Infinity) or one we never send (null): a relay bug
    (an adapter sends a field it does not declare in ``needs``), never sent."""


def json_body(obj: Any) -> bytes:
    """``obj`` as strict RFC 8259 JSON, refusing what orjson would write as ``null`` silently (NaN,
    Infinity) and ``None`` itself: NotJSON naming the path. The walk runs only when the body holds
    ``null`` (a string containing it, or a bug): one byte search on the common path."""
    body = orjson.dumps(obj)
    if b"null" in body:
        path = null_path(obj, "")
        if path is not None:
            raise NotJSON(f"{path or 'body'} would be sent as null")
    return body


def null_path(value: Any, path: str) -> str | None:
    """The path of the first None or non-finite float in ``value``, or None."""
    if value is None:
        return path
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        for k, v in value.items():
            found = null_path(v, f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = null_path(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def url_group(groups: dict[str, tuple[list[Any], ...]], url: str, width: int) -> tuple[list[Any], ...]:
    """``url``'s group of ``width`` lists in ``groups`` (a request's events, rows, ...), made on first use:
    an adapter's ``build`` asks once a run of events of one site, not once an event."""
    group = groups.get(url)
    if group is None:
        group = groups[url] = tuple([] for _ in range(width))
    return group


def require(value: Any, field_path: str) -> Any:
    """``value`` if present (not None, not empty), else MissingField naming the canonical field."""
    if not value and (value is None or value == "" or value == []):  # a truthy value is present: one test
        raise MissingField(field_path)
    return value


class Adapter(ABC, Generic[SiteT, OptionsT]):
    name: ClassVar[str]
    kinds: ClassVar[frozenset[EventKind]]
    Site: ClassVar[type[BaseModel]]
    Options: ClassVar[type[BaseModel]] = NoOptions
    default_base_url: ClassVar[str]
    default_batch: ClassVar[BatchSettings] = BatchSettings()
    default_concurrency: ClassVar[int] = 8
    notes: ClassVar[tuple[str, ...]] = ()
    secret_fields: ClassVar[tuple[str, ...]] = ()  # site fields holding credentials (scrubbed from reasons)
    site_url_fields: ClassVar[tuple[str, ...]] = ()  # per-site URL overrides (checked for https at load)
    # canonical fields this vendor sends and needs (processor.validation's keys): an event breaking a rule
    # on one of them is rejected for this vendor, naming the field
    needs: ClassVar[frozenset[str]] = frozenset()
    # 4xx statuses that mean the relay's setup is wrong for every event of a site (besides every 3xx): the
    # status table's default, overridden where a vendor documents more (or a 404 that names an event)
    setup_statuses: ClassVar[frozenset[int]] = SETUP_STATUSES

    def __init__(self, settings: VendorSettings[SiteT, OptionsT]) -> None:
        self.settings = settings
        self.options: OptionsT = settings.options
        self.base_url = (settings.base_url or self.default_base_url).rstrip("/")
        self.enabled_kinds = frozenset(settings.kinds) if settings.kinds is not None else self.kinds
        # per site_id, what ``plan`` needs of the site, prepared once; ``default_route`` serves other sites
        self.routes: dict[str, Any] = {sid: self.prepare_site(sid, site) for sid, site in settings.sites.items()}
        self.default_route: Any = self.routes.get("default")
        secrets = {getattr(site, f, None) for site in settings.sites.values() for f in self.secret_fields}
        self._secrets = sorted({s.get_secret_value() for s in secrets if isinstance(s, SecretStr)} - {""},
                               key=len, reverse=True)  # longest first: a secret containing another goes whole

    @classmethod
    def settings_model(cls) -> type[VendorSettings[Any, Any]]:
        """The vendor's settings model: its site and options models, its default batch and concurrency
        (so ``check-config`` prints the limits that really apply)."""
        model: type[VendorSettings[Any, Any]] | None = cls.__dict__.get("_settings_model")
        if model is None:
            # parametrised at run time by the adapter's own models, which no static type names
            base: type[VendorSettings[Any, Any]] = VendorSettings[cls.Site, cls.Options]  # type: ignore[name-defined]
            model = create_model(
                f"{cls.__name__}Settings", __base__=base,
                batch=(BatchSettings, cls.default_batch),
                concurrency=(int, Field(cls.default_concurrency, ge=1, le=1024,
                                        description="concurrent requests to this vendor")),
            )
            cls._settings_model = model  # type: ignore[attr-defined]
        return model

    def prepare_site(self, site_id: str, site: SiteT) -> Any:
        """What ``plan`` needs of one site (URLs, secrets, lookup maps), computed once at start so the
        per-event path only does ``self.routes.get(record["site_id"], self.default_route)``.
        Called from ``Adapter.__init__``: use only ``self.settings``, ``options`` and ``base_url``."""
        return site

    # what the vendor was already sent, for a vendor that counts a thing once (None: nothing remembered);
    # the delivery pipeline reports its hits and evictions and calls ``delivered``
    memory: RecentKeys | None = None

    def delivered(self, request: VendorRequest, outcomes: Sequence[Outcome]) -> None:
        """For an adapter with a ``memory``: an answered request's outcomes (one per event, in order), told
        before they are settled, so what its delivered events carried is remembered. Default: nothing."""

    def takes(self, kind: EventKind) -> bool:
        return kind in self.enabled_kinds

    def plan(self, events: Sequence[Event]) -> Plan:
        """Turn a batch into requests: events breaking a validation rule on a field this vendor
        ``needs`` are rejected naming it (one set intersection an invalid event; nothing for a valid
        one), the rest go to ``build``. An event not validated yet (tests, tools) is validated here."""
        needs = self.needs
        if not needs or not any(map(_invalid, events)):  # every event validated and valid: nothing to do
            return self.build(events)
        bad: list[tuple[Event, str]] | None = None
        for ev in events:
            invalid = ev.invalid
            if invalid is None:
                continue
            if invalid is UNCHECKED:
                invalid = validate(ev)
                if invalid is None:
                    continue
            hit = needs.intersection(invalid)
            if hit:
                if bad is None:
                    bad = []
                bad.append((ev, reason(invalid, hit)))
        if bad is None:
            return self.build(events)
        refused = {id(ev) for ev, _ in bad}
        plan = self.build([ev for ev in events if id(ev) not in refused])
        plan.rejected.extend(bad)
        return plan

    @abstractmethod
    def build(self, events: Sequence[Event]) -> Plan:
        """Turn valid events into requests (through ``plan``). Events missing required fields go to
        ``Plan.rejected`` with a reason naming the field; events this vendor does not want go to
        ``Plan.filtered``."""

    def setup_error(self, status: int) -> bool:
        """Whether this answer's status says the relay's setup is wrong (held by the request service, never
        handed to ``interpret``)."""
        return is_setup_status(status, self.setup_statuses)

    def interpret(self, request: VendorRequest, response: Response) -> list[Outcome]:
        """One outcome per ``request.events`` entry, in order. Default: by status only."""
        outcome = status_outcome(response.status)
        return [outcome] * len(request.events)

    @classmethod
    def example_settings(cls, sandbox_url: str) -> dict[str, Any]:
        """A working settings section pointing at the sandbox twin (the demo and the benchmark use it).

        Secrets are written as ``${VAR}`` references; ``example_env`` gives the demo's values."""
        raise NotImplementedError(f"{cls.name} has no example settings")

    example_env: ClassVar[dict[str, str]] = {}

    def vendor_text(self, value: Any, limit: int = 200) -> str:
        """A vendor's own words (an error message, a failed row's error) as they may enter a reason: text,
        without any of this vendor's credentials (a vendor may echo a key or a URL holding one), then cut
        to ``limit`` characters. Failure paths only."""
        text = str(value)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "<redacted>")
        return text[:limit]

    def unrecognised(self, response: Response, why: str = "", size: str = "") -> Outcome:
        """Retryable: ``response`` is not this vendor's success answer. The reason names the status, the
        content type, ``why`` when given, the body's length (or ``size``: what is known of it, for a body
        read only in part) and its first bytes (without this vendor's credentials, control characters as
        spaces, short): ``unrecognised answer: HTTP 200 text/html, 1234 bytes: '<html>...'``."""
        body = response.body
        head = self.vendor_text(body[:200].decode("utf-8", "replace").translate(_UNPRINTABLE), 48)
        shown = f"{size or f'{len(body)} bytes'}: {head!r}" if body else (size or "empty body")
        return retryable(f"{UNRECOGNISED}: HTTP {response.status} {response.content_type or 'no content type'}"
                         f"{', ' + why if why else ''}, {shown}")

    def no_site_reason(self, event: Event) -> str:
        return f"no {self.name} site config for site_id {event.record['site_id']!r} and no 'default'"

    def route_or_reject(self, event: Event, plan: Plan) -> Any:
        """The event's site's route (``prepare_site``), or None with the event rejected in ``plan`` naming
        its site id."""
        route = self.routes.get(event.record["site_id"], self.default_route)
        if route is None:
            plan.rejected.append((event, self.no_site_reason(event)))
        return route
