"""Tracardi's twin: POST /tracardi/track with one tracker payload
(Tracardi's document "API integration", and its server's model as processor.vendors.tracardi says).

Validates the payload as Tracardi's server model does and answers as it does:

* 422 with FastAPI's ``{"detail": [{"loc", "msg", "type"}]}`` when the body is
  not a JSON object or a field is missing or of the wrong type: ``source.id``
  (required), ``session.id`` / ``profile.id`` when given, ``context``,
  ``properties``, ``options`` objects, ``events`` a non-empty list (the
  document lists it as required) of ``{type (non-empty), id?, properties?,
  options?, context?, tags?}``. Unknown fields are ignored, as the server does.
* 401 ``{"detail": ...}`` when ``source.id`` is not a known event source:
  ``KNOWN_SOURCES`` (the document's two example source ids; the demo uses the
  first one).
* 406 (event validation error) for an injected partial failure: Tracardi takes
  one payload per (profile, session), so the unit of ``partial_failure_rate``
  is the payload, and a failed payload fails all of its events.
* 200 ``{profile: {id}, session: {id}, events, errors, warnings, source}``.
  The twin's "database" holds every profile id that is a well-formed UUID: such
  an id is answered back unchanged; a missing or malformed one gets a new
  profile id, ``new_profile_id(session id)`` (deterministic, so tests can
  predict it). A missing session gets ``new_session_id(profile id)``.

Accepted events are recorded one row per event, with the payload's profile and
session ids. Event ids are kept as given (Tracardi stores them, so a resend
overwrites).
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from processor.sandbox.core import Twin, json_response, read_json

KNOWN_SOURCES = frozenset({"3ee63fc6-490a-4fd8-bfb3-bf0c8c8d3387", "f14dc4b1-8dd8-4fc1-bd14-d6823ba7013e"})
TWIN_NAMESPACE = uuid.UUID("0b7f4f1e-9a55-4d7c-8a0b-3c2f1d6e5a90")
OBJECTS = ("context", "properties", "options")
EVENT_OBJECTS = ("properties", "options", "context")


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
    if events is None:
        errors.append(_error(("events",), "field required", "value_error.missing"))
    elif not isinstance(events, list):
        errors.append(_error(("events",), "value is not a valid list", "type_error.list"))
    elif not events:
        errors.append(_error(("events",), "at least one event is required", "value_error"))
    else:
        for i, ev in enumerate(events):
            errors.extend(_event_errors(i, ev))
    return errors


class TracardiTwin(Twin):
    name = "tracardi"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/tracardi/track", self.guarded(self.track))]

    def _refuse(self, body: Any, status: int, detail: Any) -> web.Response:
        events = body.get("events") if isinstance(body, dict) else None
        self.sandbox.count_rejected(self.name, len(events) if isinstance(events, list) and events else 1)
        return json_response({"detail": detail}, status=status)

    async def track(self, request: web.Request) -> web.Response:
        body, err = await read_json(request)
        if err is not None:
            return self._refuse(None, 422, [_error((), err, "value_error.jsondecode")])
        errors = validate_payload(body)
        if errors:
            return self._refuse(body, 422, errors)
        if body["source"]["id"] not in KNOWN_SOURCES:
            return self._refuse(body, 401, "Access denied. Invalid or disabled event source.")
        events = body["events"]
        if self.sandbox.fail_item(self.name):
            return self._refuse(body, 406, f"Event {events[0]['type']!r} is invalid: injected validation failure")
        session = (body.get("session") or {}).get("id")
        profile = (body.get("profile") or {}).get("id")
        if not profile or not _is_uuid(profile):
            profile = new_profile_id(session)
        session = session or new_session_id(profile)
        self.sandbox.record(self.name, ({**ev, "profile": {"id": profile}, "session": {"id": session}}
                                        for ev in events))
        return json_response({
            "profile": {"id": profile},
            "session": {"id": session},
            "events": [ev.get("id") or str(uuid.uuid4()) for ev in events],
            "errors": [],
            "warnings": [],
            "source": {"consent": False},
        }, headers={"x-process-time": "0.001"})
