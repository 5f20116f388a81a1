"""Qubit's twin: POST /qubit/events/{trackingId} with ``{"events": [...]}``
(Qubit's document "Set up call center tracking", and the QProtocol rules in processor.vendors.qubit).

The envelope must be JSON (``Content-Type: application/json``) holding exactly
``events``, an array of any length; otherwise 400 in the document's
``{status, message}`` error shape. Each event is validated on its own and
answered by one result, in order: ``{eventId, eventType, status: "success",
warnings?}`` or ``{status: "failed", error}``. Checked: ``context.id``,
``meta.type`` (``ecView`` or a transaction summary of the document's table,
optionally namespaced ``someco.``), ``meta.ts`` (integer epoch ms),
``meta.url``/``meta.source`` (optional strings; a missing source is the
documented ``Missing meta.source`` warning), ``transaction.id`` and the
amount's ``total.{value, currency}``, the ``ecView`` fields (``language`` an
IETF tag, ``country`` ISO 3166-1 alpha-2 and ``currency`` ISO 4217, both upper
case), and no field outside the schema anywhere (Qubit rejects custom fields).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any, Union

from aiohttp import web

from processor.sandbox.core import Sandbox, Twin, error_response, json_response, read_json

Rule = Union[Callable[[Any], bool], "Spec"]
Spec = dict[str, tuple[bool, Rule]]  # field -> (required, check or nested spec)

_IETF = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*\Z")
_ALPHA2 = re.compile(r"[A-Z]{2}\Z")
_ISO4217 = re.compile(r"[A-Z]{3}\Z")
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]+\Z")


def _text(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _epoch_ms(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 10**11  # seconds would be ~1.7e9


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _matches(pattern: re.Pattern[str]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and pattern.match(v) is not None


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


COMMON: Spec = {
    "context": (True, {"id": (True, _text)}),
    "meta": (True, {"type": (True, _text), "ts": (True, _epoch_ms), "url": (False, _text),
                    "source": (False, _text)}),
}
# The document's table: transaction event -> the object holding ``total``.
TRANSACTIONS = {
    "ecBasketTransactionSummary": "basket", "egBetslipTransactionSummary": "betslip",
    "pbBasketTransactionSummary": "basket", "loBasketTransactionSummary": "basket",
    "trPackageTransactionSummary": "package", "fiBasketTransactionSummary": "basket",
}
_TOTAL: Spec = {"total": (True, {"value": (True, _number), "currency": (True, _matches(_ISO4217))})}
SPECS: dict[str, Spec] = {
    "ecView": {**COMMON, "type": (True, _text), "subtypes": (False, _strings),
               "language": (True, _matches(_IETF)), "country": (True, _matches(_ALPHA2)),
               "currency": (True, _matches(_ISO4217))},
    **{event: {**COMMON, box: (True, _TOTAL), "transaction": (True, {"id": (True, _text)})}
       for event, box in TRANSACTIONS.items()},
}


def check(obj: Any, spec: Spec, path: str = "", strict: bool = True) -> str | None:
    """The first problem of ``obj`` against ``spec`` in Qubit's words, or None."""
    if not isinstance(obj, dict):
        return f"Invalid {path}: must be an object" if path else "Invalid event: must be an object"
    prefix = f"{path}." if path else ""
    if strict:
        for key in obj:
            if key not in spec:
                return f"Unknown field {prefix}{key}"
    for key, (required, rule) in spec.items():
        value = obj.get(key)
        if value is None or value == "":
            if required:
                return f"Missing {prefix}{key}"
            continue
        problem = check(value, rule, prefix + key) if isinstance(rule, dict) else (
            None if rule(value) else f"Invalid {prefix}{key}")
        if problem:
            return problem
    return None


def validate_event(ev: Any) -> tuple[str | None, list[str]]:
    """(the reason the event fails, or None; its warnings)."""
    problem = check(ev, COMMON, strict=False)
    if problem:
        return problem, []
    event_type: str = ev["meta"]["type"]
    namespace, _, base = event_type.rpartition(".")
    spec = SPECS.get(base)
    if spec is None or (namespace and not _NAMESPACE.match(namespace)):
        return f"Unsupported meta.type {event_type}", []
    problem = check(ev, spec)
    if problem:
        return problem, []
    return None, ([] if "source" in ev["meta"] else ["Missing meta.source"])


class QubitTwin(Twin):
    name = "qubit"

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(sandbox)
        self._ids = itertools.count(1)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/qubit/events/{tracking_id}", self.guarded(self.events))]

    async def events(self, request: web.Request) -> web.Response:
        body, err = await read_json(request)
        if err is None:
            if not isinstance(body, dict) or not isinstance(body.get("events"), list):
                err = "body must be an object with an events array"
            elif len(body) != 1:
                err = f"Unknown field {sorted(set(body) - {'events'})[0]}"
        if err is not None:
            self.sandbox.count_rejected(self.name)
            return error_response(400, err)
        results: list[dict[str, Any]] = []
        accepted = []
        for ev in body["events"]:
            problem, warnings = validate_event(ev)
            if problem is None and self.sandbox.fail_item(self.name):
                problem = "injected partial failure"
            if problem is not None:
                results.append({"status": "failed", "error": problem})
                continue
            accepted.append(ev)
            result = {"eventId": f"sbx{next(self._ids):09x}-qubit", "eventType": ev["meta"]["type"],
                      "status": "success"}
            if warnings:
                result["warnings"] = warnings
            results.append(result)
        self.sandbox.record(self.name, accepted)
        if len(accepted) < len(results):
            self.sandbox.count_rejected(self.name, len(results) - len(accepted))
        return json_response({"results": results})
