"""Convert's twin (Convert's document "New Tracking Structure - Advanced Integrations", and the SDKs'
serving API as processor.vendors.convert describes it).

The project id that Convert reads from the host name is a path segment here:

* ``POST /convert/{pid}/track`` - the document's ``{cid, pid, seg?, vid, ev}``;
* ``POST /convert/{pid}/v1/track/{accountId}/{projectId}`` - the serving API's
  ``{accountId, projectId, enrichData?, source?, visitors: [{visitorId, segments?, events}]}``,
  with an optional ``Authorization: Bearer <secret>``.

A request without a User-Agent value is answered 301 (the document's firewall). Bodies are checked
strictly: required keys, types, the documented enumerations (browser, devices, source, new/visitorType,
two-letter country), event names and what each needs (``viewExp`` exps+vars, ``hitGoal`` goals, ``tr``
goals+r+prc numbers; bucketing ids, conversion goalId and goalData keys), unknown keys, and that the
ids in the body match the URL. Any problem refuses the whole request with
``400 {code, message, fields}``, ``fields`` listing every offending path (``ev[1].r``,
``visitors[0].events[2].data.goalId``); injected partial failures are reported the same way.
Accepted requests answer 200 and record one item per tracking row (``ev`` entry / visitor event).

``GET /_sandbox/convert/conversions`` counts what was recorded as Convert counts it without
``enrichData`` (every row it is sent): ``goals`` per (project, visitor, goal) (``hitGoal`` goals, v1
conversions without ``goalData``), ``orders`` per (project, visitor, goal, transactionId) (v1 conversions
with ``goalData``), ``transactions`` per (project, visitor, goal) (``tr`` goals, v1 conversions with
``goalData``: the document's ``tr`` carries no order id)
and ``bucketings`` per (project, visitor, experience) (``viewExp`` experiences, v1 bucketing events);
keys are joined with ``/``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from processor.sandbox.core import Twin, json_response, read_json

Check = tuple[Callable[[Any], bool], str]
Problems = list[tuple[str, str]]
Rows = list[tuple[str, dict[str, Any]]]

DEVICES = ("DESK", "OTHDEV", "IPAD", "ALLTAB", "OTHTAB", "OTHPH", "IPH", "ALLPH")
TRACK_BROWSERS = ("IE", "CH", "FF", "OP", "SF", "OTH")
# the serving API's type (SendTrackingEventsRequestData's VisitorSegments.browser), not the SDK's own
# BrowserType enum (which adds EDG, MO and NS for its rules): what the endpoint's contract allows
V1_BROWSERS = TRACK_BROWSERS
CUSTOM_DIMENSIONS = tuple(f"customDimension{i}" for i in range(1, 6))


def _text(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _ids(v: Any) -> bool:
    return isinstance(v, list) and all(_text(x) for x in v)


def _one_of(*values: Any) -> Check:
    return (lambda v: type(v) is type(values[0]) and v in values), "one of " + ", ".join(map(str, values))


def _some_of(*values: str) -> Check:
    return (lambda v: isinstance(v, list) and bool(v) and all(x in values for x in v)), \
        "a non-empty array of " + ", ".join(values)


TEXT: Check = (_text, "a non-empty string")
STRING: Check = (lambda v: isinstance(v, str), "a string")
IDS: Check = (_ids, "an array of non-empty strings")
NUMBER: Check = (_number, "a number")
OBJECT: Check = (lambda v: isinstance(v, dict), "an object")
LIST: Check = (lambda v: isinstance(v, list) and bool(v), "a non-empty array")
COUNTRY: Check = (lambda v: isinstance(v, str) and len(v) == 2 and v.isascii() and v.isalpha() and v.isupper(),
                  "a two-letter ISO country code")

TRACK_TOP = {"cid": TEXT, "pid": TEXT, "seg": OBJECT, "vid": TEXT, "ev": LIST}
TRACK_SEG = {"browser": _one_of(*TRACK_BROWSERS), "devices": _some_of(*DEVICES),
             "source": _one_of("direct", "referral", "Search", "Campaign"), "campaign": STRING,
             "new": _one_of(0, 1), "ctry": COUNTRY, "cust": IDS}
TRACK_EV = {"evt": _one_of("viewExp", "hitGoal", "tr"), "exps": IDS, "vars": IDS,
            "goals": (lambda v: isinstance(v, list) and bool(v) and all(type(g) is int and g > 0 for g in v),
                      "a non-empty array of goal ids (numbers)"),
            "r": NUMBER, "prc": (lambda v: type(v) is int and v >= 0, "a non-negative integer")}
TRACK_NEEDS = {"viewExp": ("exps", "vars"), "hitGoal": ("goals",), "tr": ("goals", "r", "prc")}

V1_TOP = {"accountId": TEXT, "projectId": TEXT, "enrichData": (lambda v: isinstance(v, bool), "a boolean"),
          "source": STRING, "visitors": LIST}
V1_VISITOR = {"visitorId": TEXT, "segments": OBJECT, "events": LIST}
V1_SEG = {"browser": _one_of(*V1_BROWSERS), "devices": _some_of(*DEVICES),
          "source": _one_of("direct", "referral", "search", "campaign", "ai_tool"), "campaign": STRING,
          "visitorType": _one_of("new", "returning"), "country": COUNTRY, "customSegments": IDS}
V1_EVENT = {"eventType": _one_of("bucketing", "conversion"), "data": OBJECT}
V1_BUCKETING = {"experienceId": TEXT, "variationId": TEXT}
V1_CONVERSION = {"goalId": TEXT, "goalData": (lambda v: isinstance(v, list), "an array"),
                 "bucketingData": (lambda v: isinstance(v, dict) and all(_text(x) for x in v.values()),
                                   "an object of experience id -> variation id")}
GOAL_DATA_VALUES = {"amount": NUMBER, "productsCount": NUMBER, "transactionId": TEXT,
                    **dict.fromkeys(CUSTOM_DIMENSIONS, TEXT)}
V1_GOAL_DATA = {"key": _one_of(*GOAL_DATA_VALUES), "value": (lambda v: v is not None, "present")}


def check(obj: Any, path: str, spec: dict[str, Check], required: tuple[str, ...], problems: Problems) -> bool:
    """Check one object against its spec: required keys, no unknown keys, each value's type."""
    if not isinstance(obj, dict):
        problems.append((path, "must be an object"))
        return False
    before = len(problems)
    at = f"{path}." if path else ""
    problems.extend((at + key, "is required") for key in required if key not in obj)
    for key, value in obj.items():
        rule = spec.get(key)
        if rule is None:
            problems.append((at + key, "is not a known field"))
        elif not rule[0](value):
            problems.append((at + key, f"must be {rule[1]}"))
    return len(problems) == before


def validate_track(body: Any, pid: str) -> tuple[Rows, Problems]:
    """The document's POST body for project ``pid``: the rows it carries and every problem found."""
    problems: Problems = []
    rows: Rows = []
    if not check(body, "", TRACK_TOP, ("cid", "pid", "vid", "ev"), problems):
        return rows, problems
    if body["pid"] != pid:
        problems.append(("pid", "does not match the tracking host's project id"))
    if "seg" in body:
        check(body["seg"], "seg", TRACK_SEG, (), problems)
    for j, ev in enumerate(body["ev"]):
        path = f"ev[{j}]"
        if not check(ev, path, TRACK_EV, ("evt",), problems):
            continue
        needs = TRACK_NEEDS[ev["evt"]]
        problems.extend((f"{path}.{k}", f"is required for {ev['evt']}") for k in needs if k not in ev)
        problems.extend((f"{path}.{k}", f"is not allowed on {ev['evt']}") for k in ("goals", "r", "prc")
                        if k in ev and k not in needs)
        if len(ev.get("exps", ())) != len(ev.get("vars", ())):
            problems.append((f"{path}.vars", "must pair one variation with each experience in exps"))
        rows.append((path, {"pid": pid, "vid": body["vid"], **ev}))
    return rows, problems


def validate_v1(body: Any, account_id: str, project_id: str) -> tuple[Rows, Problems]:
    """The serving API's body for the ids in the URL: the rows it carries and every problem found."""
    problems: Problems = []
    rows: Rows = []
    if not check(body, "", V1_TOP, ("accountId", "projectId", "visitors"), problems):
        return rows, problems
    for key, want in (("accountId", account_id), ("projectId", project_id)):
        if body[key] != want:
            problems.append((key, "does not match the URL"))
    for i, visitor in enumerate(body["visitors"]):
        vpath = f"visitors[{i}]"
        if not check(visitor, vpath, V1_VISITOR, ("visitorId", "events"), problems):
            continue
        if "segments" in visitor:
            check(visitor["segments"], f"{vpath}.segments", V1_SEG, (), problems)
        for j, event in enumerate(visitor["events"]):
            path = f"{vpath}.events[{j}]"
            if not check(event, path, V1_EVENT, ("eventType", "data"), problems):
                continue
            data = event["data"]
            if event["eventType"] == "bucketing":
                check(data, f"{path}.data", V1_BUCKETING, ("experienceId", "variationId"), problems)
            elif check(data, f"{path}.data", V1_CONVERSION, ("goalId",), problems):
                for k, item in enumerate(data.get("goalData", ())):
                    gpath = f"{path}.data.goalData[{k}]"
                    if check(item, gpath, V1_GOAL_DATA, ("key", "value"), problems):
                        ok, desc = GOAL_DATA_VALUES[item["key"]]
                        if not ok(item["value"]):
                            problems.append((f"{gpath}.value", f"must be {desc} for {item['key']}"))
            rows.append((path, {"projectId": project_id, "visitorId": visitor["visitorId"], **event}))
    return rows, problems


def count_conversions(items: Iterable[dict[str, Any]]) -> dict[str, Counter[str]]:
    """The recorded rows counted as Convert counts them when each row is recorded (see the docstring)."""
    out: dict[str, Counter[str]] = {k: Counter() for k in ("goals", "orders", "transactions", "bucketings")}
    for item in items:
        if "evt" in item:  # the document's row
            who = f"{item['pid']}/{item['vid']}"
            if item["evt"] == "viewExp":
                out["bucketings"].update(f"{who}/{e}" for e in item["exps"])
            elif item["evt"] == "hitGoal":
                out["goals"].update(f"{who}/{g}" for g in item["goals"])
            else:
                out["transactions"].update(f"{who}/{g}" for g in item["goals"])
            continue
        who, data = f"{item['projectId']}/{item['visitorId']}", item["data"]
        if item["eventType"] == "bucketing":
            out["bucketings"][f"{who}/{data['experienceId']}"] += 1
        elif "goalData" not in data:
            out["goals"][f"{who}/{data['goalId']}"] += 1
        else:
            out["transactions"][f"{who}/{data['goalId']}"] += 1
            ids = [kv["value"] for kv in data["goalData"] if kv["key"] == "transactionId"]
            if ids:
                out["orders"][f"{who}/{data['goalId']}/{ids[0]}"] += 1
    return out


class ConvertTwin(Twin):
    name = "convert"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/convert/{host_pid}/track", self.guarded(self.track)),
                web.post("/convert/{host_pid}/v1/track/{account_id}/{project_id}", self.guarded(self.v1)),
                web.get("/_sandbox/convert/conversions", self.conversions)]

    async def conversions(self, request: web.Request) -> web.Response:
        return json_response(count_conversions(self.sandbox.received.get(self.name, ())))

    async def track(self, request: web.Request) -> web.Response:
        return await self._handle(request, lambda body: validate_track(body, request.match_info["host_pid"]))

    async def v1(self, request: web.Request) -> web.Response:
        info = request.match_info
        if info["project_id"] != info["host_pid"]:
            return self.refuse(400, "projectId in the path does not match the tracking host", "projectId")
        auth = request.headers.get("Authorization")
        if auth is not None and not (auth.startswith("Bearer ") and auth[7:].strip()):
            return self.refuse(401, "Authorization must be 'Bearer <secret>'")
        return await self._handle(request, lambda body: validate_v1(body, info["account_id"], info["project_id"]))

    async def _handle(self, request: web.Request, validate: Callable[[Any], tuple[Rows, Problems]]) -> web.Response:
        if not request.headers.get("User-Agent", "").strip():
            self.sandbox.count_rejected(self.name)
            return web.Response(status=301, text="Moved Permanently")  # the firewall, as documented
        body, err = await read_json(request)
        if err is not None:
            return self.refuse(400, err)
        rows, problems = validate(body)
        problems.extend((path, "injected partial failure") for path, _ in rows if self.sandbox.fail_item(self.name))
        if problems:
            path, message = problems[0]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return self.refuse(400, f"{path or 'body'} {message}{more}", ", ".join(p for p, _ in problems),
                               max(1, len(rows)))
        self.sandbox.record(self.name, (item for _, item in rows))
        return json_response({})

    def refuse(self, status: int, message: str, fields: str = "", rows: int = 1) -> web.Response:
        """Count the refused rows and answer Convert's ``{code, message, fields}`` error."""
        self.sandbox.count_rejected(self.name, rows)
        return json_response({"code": status, "message": message, "fields": fields}, status=status)
