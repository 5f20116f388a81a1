"""QuickLizard's twin: POST /quicklizard/events with a JSON array of SDK events.

Validates each event as the document says (client_key, price as a float,
product_id, event view|conversion, permalink on views, optional vid/tags/
channels, conversions with at most one channel, units an integer) and answers
``{processed, failed, errors}``: malformed events are listed in failed with a
parse error, the rest processed.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from processor.sandbox.core import Twin, json_response, read_json

REQUIRED = {"view": ("client_key", "price", "product_id", "event", "permalink"),
            "conversion": ("client_key", "price", "product_id", "event")}
KNOWN = {"client_key", "price", "product_id", "event", "permalink", "vid", "tags", "channels", "units"}


def validate_event(ev: Any) -> str | None:
    if not isinstance(ev, dict):
        return "event is not an object"
    kind = ev.get("event")
    if kind not in REQUIRED:
        return f"event must be view or conversion, got {kind!r}"
    for key in REQUIRED[kind]:
        if key not in ev or ev[key] in (None, ""):
            return f"missing {key}"
    unknown = set(ev) - KNOWN
    if unknown:
        return f"unknown field {sorted(unknown)[0]}"
    if not isinstance(ev["price"], float):
        return "price must be a valid float"
    for key in ("client_key", "product_id", "permalink", "vid"):
        if key in ev and not isinstance(ev[key], str):
            return f"{key} must be a string"
    for key in ("tags", "channels"):
        if key in ev and not (isinstance(ev[key], list) and all(isinstance(t, str) for t in ev[key])):
            return f"{key} must be an array of strings"
    if kind == "conversion" and len(ev.get("channels", [])) > 1:
        return "conversion events take a single channel"
    if "units" in ev and (not isinstance(ev["units"], int) or isinstance(ev["units"], bool) or ev["units"] < 1):
        return "units must be a positive integer"
    return None


class QuickLizardTwin(Twin):
    name = "quicklizard"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/quicklizard/events", self.guarded(self.events))]

    async def events(self, request: web.Request) -> web.Response:
        body, err = await read_json(request)
        if err is None and not isinstance(body, list):
            err = "payload must be a JSON array of events"
        if err is not None:
            self.sandbox.count_rejected(self.name)
            return json_response({"error": err}, status=400)
        processed, failed, errors = [], [], []
        for ev in body:
            problem = validate_event(ev)
            if problem is None and self.sandbox.fail_item(self.name):
                problem = "injected partial failure"
            if problem is None:
                processed.append(ev)
            else:
                failed.append(ev)
                errors.append(problem)
        self.sandbox.record(self.name, processed)
        if failed:
            self.sandbox.count_rejected(self.name, len(failed))
        return json_response({"processed": processed, "failed": failed, "errors": errors})
