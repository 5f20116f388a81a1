"""Tracardi's twin: POST /tracardi/track with one tracker payload (Tracardi's document "API
integration"), kept as Tracardi's open-source server keeps it (Tracardi/tracardi and the ``/track``
endpoint of Tracardi/tracardi-api, as processor.vendors.tracardi describes them).

Validates the payload as Tracardi's ``TrackerPayload`` model does and answers as it does:

* 422 with FastAPI's ``{"detail": [{"loc", "msg", "type"}]}`` when the body is not a JSON object or a
  field is missing or of the wrong type: ``source.id`` (required), ``session.id`` / ``profile.id`` when
  given, ``context``, ``properties``, ``options`` objects, ``events`` a list (missing or empty is
  accepted: Tracardi answers ``null`` and stores nothing) of ``{type (non-empty), id?, time?,
  properties?, options?, context?, tags?}``, ``time`` an object of ``insert`` / ``create`` / ``update``
  date-times. Unknown fields are ignored, as the server does.
* 401 ``{"detail": ...}`` when ``source.id`` (stripped) is not a known event source: ``KNOWN_SOURCES``
  (the document's two example source ids; the demo uses the first one); and, as with Tracardi's
  ``DISALLOW_BOT_TRAFFIC`` on (its default), for every payload of a session whose User-Agent is a bot.
* 406 (event validation error) for an injected partial failure: Tracardi takes one payload per
  (profile, session), so the unit of ``partial_failure_rate`` is the payload, and a failed payload fails
  all of its events.
* 500 when an event of a predefined type carries a property its ``data.ec`` model cannot hold (e.g. a
  list as a product's ``category``): Tracardi fails building the event.
* 200 ``{profile: {id}, session: {id}, events, errors, warnings, source}``. The twin's "database" holds
  every profile id that is a well-formed UUID: such an id is answered back unchanged; a missing or
  malformed one gets a new profile id, ``new_profile_id(session id)`` (deterministic, so tests can
  predict it). A missing session gets ``new_session_id(profile id)``.

Accepted events are recorded one row per event as Tracardi stores them (``EventPayload.to_event``):
``id`` lower-cased (``Event`` is a ``NamedEntity``; a resend overwrites), ``type`` stripped and
lower-cased, ``metadata.time.create`` from the event's own ``time`` and ``insert`` the arrival time (the
payload's ``metadata`` is replaced on arrival), ``hit`` from ``context.page`` (``referer`` is
``context.page.referer.host``), ``os`` / ``app`` / ``device`` of the session, computed when the session is
new from ``context.browser.local.browser.userAgent`` (else the request's User-Agent) with
``user_agents`` (the parser Tracardi uses; ``session_of`` says what a ``context.device`` does), and,
for the predefined types the relay sends, ``data.ec`` and ``journey.state`` as their schemas copy them.
Profile and session ids are stripped first, as ``Tracker.track_event`` does.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from user_agents import parse as parse_user_agent  # type: ignore[import-untyped]

from processor.sandbox.core import Twin, json_response, read_json

KNOWN_SOURCES = frozenset({"3ee63fc6-490a-4fd8-bfb3-bf0c8c8d3387", "f14dc4b1-8dd8-4fc1-bd14-d6823ba7013e"})
TWIN_NAMESPACE = uuid.UUID("0b7f4f1e-9a55-4d7c-8a0b-3c2f1d6e5a90")
OBJECTS = ("context", "properties", "options")
EVENT_OBJECTS = ("properties", "options", "context")
TIMES = ("insert", "create", "update")
# Tracardi's predefined types the relay sends (tracardi/service/setup/events/ecommerce.json): what each
# copies from the event into its data (destination, source) and the journey state it sets
PREDEFINED: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    "product-details-page-view": (tuple((f"data.ec.product.{k}", f"properties.{k}") for k in (
        "id", "name", "sku", "category", "brand", "variant", "price")), "awareness"),
    "checkout-completed": ((("data.ec.checkout.id", "properties.id"),
                            ("data.ec.checkout.status", "properties.status")), "purchase"),
}
# the type of each data.ec field Tracardi's Event model holds (EventProduct, EventCheckout): str or number
_EC_TYPES: dict[str, type | tuple[type, ...]] = {
    **{f"data.ec.product.{k}": str for k in ("id", "name", "sku", "category", "brand")},
    "data.ec.product.variant": dict, "data.ec.product.price": (int, float),
    "data.ec.checkout.id": str, "data.ec.checkout.status": str,
}


def new_profile_id(session_id: str | None) -> str:
    return str(uuid.uuid5(TWIN_NAMESPACE, f"profile/{session_id}") if session_id else uuid.uuid4())


def new_session_id(profile_id: str) -> str:
    return str(uuid.uuid5(TWIN_NAMESPACE, f"session/{profile_id}"))


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _error(loc: tuple[Any, ...], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": msg, "type": kind}


def _entity(body: dict[str, Any], key: str, required: bool) -> dict[str, Any] | None:
    value = body.get(key)
    if value is None:
        return _error((key,), "field required", "value_error.missing") if required else None
    if not isinstance(value, dict):
        return _error((key,), "value is not a valid dict", "type_error.dict")
    if "id" not in value or value["id"] is None:
        return _error((key, "id"), "field required", "value_error.missing")
    if not isinstance(value["id"], str):
        return _error((key, "id"), "str type expected", "type_error.str")
    return None


def parse_time(value: Any) -> datetime | None:
    """A date-time as Tracardi's ``Time`` model reads it (ISO 8601, naive meaning UTC), or None."""
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value)
        except ValueError:
            return None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            t = datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    else:
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _event_errors(i: int, ev: Any) -> list[dict[str, Any]]:
    where = ("events", i)
    if not isinstance(ev, dict):
        return [_error(where, "value is not a valid dict", "type_error.dict")]
    errors = []
    kind = ev.get("type")
    if kind is None:
        errors.append(_error((*where, "type"), "field required", "value_error.missing"))
    elif not isinstance(kind, str) or not kind.strip():
        errors.append(_error((*where, "type"), "event type must be a non-empty string", "value_error"))
    if ev.get("id") is not None and not isinstance(ev["id"], str):
        errors.append(_error((*where, "id"), "str type expected", "type_error.str"))
    for key in EVENT_OBJECTS:
        if ev.get(key) is not None and not isinstance(ev[key], dict):
            errors.append(_error((*where, key), "value is not a valid dict", "type_error.dict"))
    time = ev.get("time")
    if time is not None:
        if not isinstance(time, dict):
            errors.append(_error((*where, "time"), "value is not a valid dict", "type_error.dict"))
        else:
            errors.extend(_error((*where, "time", k), "invalid datetime format", "value_error.datetime")
                          for k in TIMES if time.get(k) is not None and parse_time(time[k]) is None)
    tags = ev.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errors.append(_error((*where, "tags"), "value is not a valid list of strings", "type_error.list"))
    return errors


def validate_payload(body: Any) -> list[dict[str, Any]]:
    """FastAPI-style validation errors for a tracker payload (empty when valid)."""
    if not isinstance(body, dict):
        return [_error((), "value is not a valid dict", "type_error.dict")]
    errors = [e for e in (_entity(body, "source", True), _entity(body, "session", False),
                          _entity(body, "profile", False)) if e is not None]
    for key in OBJECTS:
        if body.get(key) is not None and not isinstance(body[key], dict):
            errors.append(_error((key,), "value is not a valid dict", "type_error.dict"))
    events = body.get("events")
    if events is not None and not isinstance(events, list):
        errors.append(_error(("events",), "value is not a valid list", "type_error.list"))
    elif events:
        for i, ev in enumerate(events):
            errors.extend(_event_errors(i, ev))
    return errors


def _get(doc: Any, path: str) -> Any:
    """``doc``'s value at a dotted path, or KeyError."""
    for key in path.split("."):
        if not isinstance(doc, dict) or key not in doc:
            raise KeyError(path)
        doc = doc[key]
    return doc


def _put(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc.setdefault(key, {})
    doc[last] = value


def session_of(context: dict[str, Any], header_agent: str | None) -> dict[str, Any]:
    """A new session's ``os``, ``app`` and ``device`` as Tracardi computes them
    (``session_data_computation.compute_session``): from ``context.browser.local.browser.userAgent``, else
    the request's User-Agent; the browser's language. With a ``context.device`` Tracardi takes its name,
    brand and model over the User-Agent's, then fails reading a touch flag the parser's device does not
    have: the session keeps no device type or touch, and no app (name, version, bot flag)."""
    try:
        agent = _get(context, "browser.local.browser.userAgent")
    except KeyError:
        agent = header_agent
    session: dict[str, Any] = {"os": {}, "app": {}, "device": {}}
    if isinstance(agent, str) and agent:
        ua = parse_user_agent(agent)
        kind = ("mobile" if ua.is_mobile else "pc" if ua.is_pc else "tablet" if ua.is_tablet
                else "email" if ua.is_email_client else None)
        session["os"] = {"name": ua.os.family, "version": ua.os.version_string}
        if "device" in context:
            given = context["device"]
            if isinstance(given, dict):
                session["device"] = {"name": given.get("name", ua.device.family),
                                     "brand": given.get("brand", ua.device.brand),
                                     "model": given.get("model", ua.device.model)}
        else:
            session["device"] = {"name": ua.device.family, "brand": ua.device.brand, "model": ua.device.model,
                                 "touch": ua.is_touch_capable, "type": kind}
            session["app"] = {"bot": ua.is_bot, "name": ua.browser.family, "version": ua.browser.version_string,
                              "type": "browser"}
    with contextlib.suppress(KeyError):
        session["app"]["language"] = _get(context, "browser.local.browser.language")
    return session


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def stored_event(ev: dict[str, Any], source: str, profile: str, session_id: str, session: dict[str, Any],
                 now: datetime) -> dict[str, Any]:
    """What Tracardi stores for one event of an accepted payload (ValueError: it would fail on it)."""
    kind = ev["type"].strip().lower().replace(" ", "-")
    times = {"insert": _iso(now)}
    create = parse_time((ev.get("time") or {}).get("create"))
    if create is not None:
        times["create"] = _iso(create)
    tags = ev.get("tags") or []
    context = ev.get("context") or {}
    row: dict[str, Any] = {
        "id": (ev.get("id") or str(uuid.uuid4())).lower(), "type": kind, "metadata": {"time": times},
        "source": {"id": source}, "session": {"id": session_id}, "profile": {"id": profile},
        "properties": ev.get("properties") or {}, "context": context, "config": ev.get("options") or {},
        "tags": {"values": list(tags), "count": len(tags)},
        "os": session["os"], "app": session["app"], "device": session["device"],
    }
    hit = {}
    for key, path in (("name", "page.title"), ("url", "page.url"), ("referer", "page.referer.host")):
        with contextlib.suppress(KeyError):
            hit[key] = _get(context, path)
    row["hit"] = hit
    copy, state = PREDEFINED.get(kind, ((), ""))
    for destination, src in copy:
        try:
            value = _get(row, src)
        except KeyError:
            continue
        want = _EC_TYPES[destination]
        if value is not None and (isinstance(value, bool) or not isinstance(value, want)):
            raise ValueError(f"{destination}: {type(value).__name__} where Tracardi's event model holds "
                             f"{getattr(want, '__name__', 'a number')}")
        _put(row, destination, value)
    if state:
        row["journey"] = {"state": state}
    return row


class TracardiTwin(Twin):
    name = "tracardi"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/tracardi/track", self.guarded(self.track))]

    def _refuse(self, body: Any, status: int, detail: Any) -> web.Response:
        events = body.get("events") if isinstance(body, dict) else None
        self.sandbox.count_rejected(self.name, len(events) if isinstance(events, list) and events else 1)
        return json_response({"detail": detail}, status=status)

    @property
    def sessions(self) -> dict[str, dict[str, Any]]:
        """The sessions Tracardi has stored (cleared with the sandbox)."""
        return self.sandbox.state.setdefault(self.name, {})

    async def track(self, request: web.Request) -> web.Response:
        body, err = await read_json(request)
        if err is not None:
            return self._refuse(None, 422, [_error((), err, "value_error.jsondecode")])
        errors = validate_payload(body)
        if errors:
            return self._refuse(body, 422, errors)
        source = body["source"]["id"].strip()
        if source not in KNOWN_SOURCES:
            return self._refuse(body, 401, "Access denied. Invalid or disabled event source.")
        events = body.get("events") or []
        if not events:
            return json_response(None)  # Tracardi's tracker returns nothing for a payload without events
        if self.sandbox.fail_item(self.name):
            return self._refuse(body, 406, f"Event {events[0]['type']!r} is invalid: injected validation failure")
        session_id = ((body.get("session") or {}).get("id") or "").strip() or None
        profile = ((body.get("profile") or {}).get("id") or "").strip()
        if not profile or not _is_uuid(profile):
            profile = new_profile_id(session_id)
        session_id = session_id or new_session_id(profile)
        session = self.sessions.get(session_id)
        if session is None:
            session = session_of(body.get("context") or {}, request.headers.get("User-Agent"))
        if session["app"].get("bot"):
            return self._refuse(body, 401, "Traffic from bot is not allowed.")
        now = datetime.now(UTC)
        try:
            rows = [stored_event(ev, source, profile, session_id, session, now) for ev in events]
        except ValueError as exc:
            return self._refuse(body, 500, str(exc))
        self.sessions[session_id] = session
        self.sandbox.record(self.name, rows)
        return json_response({
            "profile": {"id": profile},
            "session": {"id": session_id},
            "events": [row["id"] for row in rows],
            "errors": [],
            "warnings": [],
            "source": {"consent": False},
        }, headers={"x-process-time": "0.001"})
