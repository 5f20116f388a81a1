"""Convert experiment tracking: Convert's document "New Tracking Structure - Advanced Integrations"
(the ``track`` API), and Convert's current serving API as its public JavaScript and server SDKs call it
(``v1``).

Two APIs, chosen per site with ``api``:

* ``track`` (the document): ``POST https://{pid}.metrics.convertexperiments.com/track`` with one
  visitor a request: ``{cid, pid, seg?, vid, ev: [{evt: viewExp|hitGoal|tr, exps, vars, goals, r, prc}]}``.
* ``v1`` (the SDKs' serving API): ``POST .../v1/track/{accountId}/{projectId}`` with many visitors a
  request: ``{accountId, projectId, enrichData?, source?, visitors: [{visitorId, segments?, events: [{eventType:
  bucketing|conversion, data}]}]}`` and an optional ``Authorization: Bearer <secret>``; bucketing data
  ``{experienceId, variationId}``, conversion data ``{goalId, goalData?: [{key, value}], bucketingData?}``
  with keys ``amount``, ``productsCount``, ``transactionId``; segments ``browser``, ``devices``,
  ``source``, ``campaign``, ``visitorType`` (new/returning), ``country``, ``customSegments``; errors
  answer ``{code, message, fields}``.

Both are built by the same code: an event's experiments become bucketing rows (``viewExp`` / ``bucketing``),
the site's configured goals become ``hitGoal`` for product views and ``tr`` (revenue ``r`` = order total,
``prc`` = units ordered) for orders. In v1 an order goal is sent as Convert's SDK sends it
(``DataManager.convert`` with ``forceMultipleTransactions``): the goal's first conversion for the visitor
``{goalId}``, then the transaction ``{goalId, goalData}`` (amount/productsCount/transactionId), and for a
later order of the same visitor the transaction alone; v1 bodies carry ``source``, the relay's name and
version (the SDK sends its own), and ``enrichData: true`` unless the site turns it off (the SDK sends it
unless it keeps a data store of its own).

**A conversion counts once.** Convert's request types say that without ``enrichData`` "it's up to the
client to ensure that duplicates of the same event for the same visitor do not get sent"; the SDK fires a
goal once per visitor and a bucketing once (its data store). So does the relay, in both APIs and with
``enrichData`` on or off: a (visitor, experience, variation) bucketing and a (visitor, goal) view goal or
first conversion are sent once, an order's transaction once per order id (an order without one each
time), within what the relay can know: the visitor's earlier events in the batch and a per-process memory
(``options.memory_size`` keys, least recently used out; ``processor.vendors.recent``) of what was
*delivered*: keys enter it only when the request carrying them was answered as delivered
(``delivered``), so a retried, parked or dead-lettered request carries its rows again. What repeats
regardless: a restart, another replica, a partition moving, a redelivery after the memory forgot, two
requests of one visitor in flight at once; ``enrichData`` (Convert records each event once) is the cure.
An event whose rows were all sent before is filtered.

The visitor id is ``vendor_ids["convert_visitor_id"]``, else ``visitor.visitor_id`` (the document asks for
no format; ``visitor_id_fallback: false`` turns it off).

What it needs (``needs``, checked by processor.validation before ``build``): the site id, non-empty
experience and variation ids, a finite, non-negative ``order.total`` (``r`` / ``amount``) and order
lines of at least 1 unit (``prc`` / ``productsCount``); it sends no timestamp and no price, so an
``event_time`` in seconds or a NaN product price does not stop a Convert event. Where the document is
silent: product names are not sent (an empty one does not matter); an order without lines (a gift
card, a voucher) is a transaction by its revenue, sent with ``prc`` 0 (the document describes ``tr``
by its amount; no product was ordered); a total of 0 is sent as 0.0; a site id no config names (and
no ``default``) is rejected naming the site id.

With ``base_url`` set (the sandbox) the project id becomes a path segment: ``{base_url}/{pid}/track`` and
``{base_url}/{pid}/v1/track/{aid}/{pid}``; a ``{project_id}`` placeholder in ``base_url`` is filled instead.
Every request carries exactly ``User-Agent: ConvertAgent/1.0``: the document asks for any value
(without one the firewall answers 301); Convert's SDK sends exactly that on every server-side request, "an
SDK invariant relied on by the metrics endpoint's isbot bypass and not customer- or env-configurable", so
a configured ``user_agent`` is not sent (a warning at start says so). Edge is ``OTH`` in both APIs: the
document's list and the serving API's type (``SendTrackingEventsRequestData``, browser ``IE|CH|FF|OP|SF|
OTH``) have no code for it; the SDK's own ``BrowserType`` enum has ``EDG`` (exported for callers, used
by none of its code), and a value outside the endpoint's type would risk the whole
request. Only HTTP 200 is success. An error
``{code, message, fields}`` whose fields name rows (``ev[2].r``, ``visitors[1].events[0].data``) rejects
the events that produced them; the rest of the refused request is retried.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from itertools import chain
from typing import Any, Literal

import orjson
from pydantic import Field, PositiveInt, SecretStr, model_validator

from processor.events import Event, EventKind
from processor.validation import EXPERIENCE_ID, ITEM_QUANTITY, ORDER_TOTAL, SITE_ID, VARIATION_ID
from processor.vendors import codes
from processor.vendors.base import (
    DELIVERED,
    Adapter,
    BatchSettings,
    Frozen,
    MissingField,
    Outcome,
    Plan,
    Response,
    VendorRequest,
    VendorSettings,
    Verdict,
    json_body,
    rejected,
    require,
    retryable,
    status_outcome,
)
from processor.vendors.codes import COUNTRIES
from processor.vendors.recent import RecentKeys

logger = logging.getLogger(__name__)

CONVERT_AGENT = "ConvertAgent/1.0"
# both APIs: the document's list, and the serving API's type (SendTrackingEventsRequestData's segments);
# Edge is OTH in both (see the module docstring)
BROWSERS = {"chrome": "CH", "firefox": "FF", "safari": "SF", "ie": "IE", "opera": "OP"}  # else OTH
SOURCES = {"direct": "direct", "referral": "referral", "search": "Search", "campaign": "Campaign"}
SOURCES_V1 = {k: k for k in SOURCES}
# wire names of the segment keys that differ between the two APIs
SEG_KEYS = {"new": "new", "ctry": "ctry", "cust": "cust"}
SEG_KEYS_V1 = {"new": "visitorType", "ctry": "country", "cust": "customSegments"}
_FIELD_ROW = re.compile(r"\b(?:visitors\[(\d+)\]\.events\[(\d+)\]|ev\[(\d+)\]|visitors\[(\d+)\])")


class ConvertSite(Frozen):
    account_id: str = Field(pattern=r"^\d+$", description="cid / accountId")
    project_id: str = Field(pattern=r"^\d+$", description="pid / projectId (also the tracking host)")
    api: Literal["track", "v1"] = Field("track", description="track: the documented /track; v1: /v1/track")
    secret: SecretStr | None = Field(None, description="v1 only: sent as Authorization: Bearer")
    enrich_data: bool | None = Field(
        None, description="v1 only: enrichData (Convert merges stored bucketing and records each event once); "
        "default on, as Convert's SDK sends it")
    view_goals: list[PositiveInt] = Field(default_factory=list, description="goal ids fired for product views")
    order_goals: list[PositiveInt] = Field(default_factory=list, description="goal ids fired (tr) for orders")
    customer_segments: list[str] = Field(default_factory=list,
                                         description="seg.cust audience ids sent for logged-in customers")
    visitor_id_fallback: bool = Field(True, description="use visitor.visitor_id when convert_visitor_id is absent")

    @model_validator(mode="after")
    def _v1_only(self) -> ConvertSite:
        if self.api == "track" and (self.secret is not None or self.enrich_data is not None):
            raise ValueError("secret and enrich_data are only sent with api: v1")
        return self


class ConvertOptions(Frozen):
    memory_size: int = Field(
        100_000, ge=0, le=10_000_000,
        description="goals, orders and bucketings remembered as delivered, per process (0: none): each is "
        "sent once while remembered")


def _source() -> str:
    """``source``: the relay's name and version, as Convert's SDK sends its own."""
    try:
        return f"event-relay/{version('event-relay')}"
    except PackageNotFoundError:
        return "event-relay"


SOURCE = _source()


@dataclass(slots=True, eq=False)
class _Endpoint:
    """A site's request constants, computed once (hashed by identity: a key of the batch's groups)."""

    v1: bool
    url: str
    headers: dict[str, str]
    account_id: str
    project_id: str
    enrich: bool
    view_goals: list[Any]
    order_goals: list[Any]
    view_marks: list[tuple[Any, tuple[str, Any, str]]]  # (goal, its mark: a goal once per visitor)
    order_marks: list[tuple[Any, tuple[str, Any, str]]]
    customer_segments: list[str]
    fallback: bool
    # the API's segment vocabulary
    browsers: dict[str, str]
    sources: dict[str, str]
    seg_new: str
    seg_ctry: str
    seg_cust: str


class _Context(list[tuple[int, int, int]]):
    """A request's context: each event's (visitor index, start, end) of its rows, and in ``keys`` the
    memory keys each event's rows carry (remembered once the request is delivered)."""

    __slots__ = ("keys",)
    keys: list[list[Hashable]]


class _Visitor:
    """One visitor's rows in this batch; ``index`` is the visitor's place in its request and
    ``spans`` are each event's (index, start, end) of its rows, the request's context; ``seen`` what the
    visitor's rows so far carry (bucketings, goals, orders), ``keys`` each event's memory keys.
    Made with its first event's rows (most visitors have one event in a batch)."""

    __slots__ = ("ep", "events", "first", "index", "keys", "rows", "seen", "spans", "vid")

    def __init__(self, ep: _Endpoint, vid: str, event: Event, seen: set[Hashable], index: int,
                 rows: list[dict[str, Any]], keys: list[Hashable]) -> None:
        self.ep = ep
        self.vid = vid
        self.first: dict[str, Any] = event.record
        self.seen = seen
        self.index = index
        self.events = [event]
        self.rows = rows
        self.spans = [(index, 0, len(rows))]
        self.keys = [keys]

    def add(self, event: Event, rows: list[dict[str, Any]], keys: list[Hashable]) -> None:
        start = len(self.rows)
        self.events.append(event)
        self.spans.append((self.index, start, start + len(rows)))
        self.keys.append(keys)
        self.rows += rows


def _devices(device: str, user_agent: str | None) -> tuple[str, ...]:
    if device == "desktop":
        return ("DESK",)
    if device == "mobile":
        return ("IPH", "ALLPH") if "iPhone" in (user_agent or "") else ("OTHPH", "ALLPH")
    if device == "tablet":
        return ("IPAD", "ALLTAB") if "iPad" in (user_agent or "") else ("OTHTAB", "ALLTAB")
    return ("OTHDEV",)


def segments(rec: dict[str, Any], ep: _Endpoint) -> dict[str, Any] | None:
    """``seg`` (track) or ``segments`` (v1) from the page context, values as each API allows."""
    page = rec["page"]
    seg: dict[str, Any] = {}
    browser = page["browser"]
    if browser:
        seg["browser"] = ep.browsers.get(browser, "OTH")
    device = page["device"]
    if device:
        seg["devices"] = _devices(device, page["user_agent"])
    source = ep.sources.get(page["traffic_source"] or "")
    if source:
        seg["source"] = source
    campaign = page["campaign"]
    if campaign is not None:
        seg["campaign"] = campaign
    returning = page["returning_visitor"]
    if returning is not None:
        seg[ep.seg_new] = ("returning" if returning else "new") if ep.v1 else int(returning)
    country = page["country"]
    if country:  # "Two-letter ISO country code": normalised, or left out (the segment is optional)
        code = country if country in COUNTRIES else codes.country(country)
        if code is not None:
            seg[ep.seg_ctry] = code
    if ep.customer_segments and rec["visitor"]["customer_id"]:
        seg[ep.seg_cust] = ep.customer_segments
    return seg or None


def _order_totals(order: dict[str, Any]) -> tuple[float, int]:
    """Revenue and units ordered (quantities are at least 1: processor.validation); no lines: 0 units."""
    count = 0
    for item in order["items"]:
        count += item["quantity"]
    return float(require(order["total"], "order.total")), count


class ConvertAdapter(Adapter[ConvertSite, ConvertOptions]):
    name = "convert"
    kinds = frozenset({EventKind.PRODUCT_VIEW, EventKind.ORDER})
    Site = ConvertSite
    Options = ConvertOptions
    default_base_url = "https://{project_id}.metrics.convertexperiments.com"
    default_batch = BatchSettings(max_events=500, max_wait_ms=2000)  # a longer window groups more per visitor
    default_concurrency = 32  # one request per visitor/session/event: parallelism carries the throughput
    notes = ("firewall_301", "not_200")
    secret_fields = ("secret",)
    needs = frozenset({SITE_ID, EXPERIENCE_ID, VARIATION_ID, ORDER_TOTAL, ITEM_QUANTITY})

    example_env = {"CONVERT_TRACKING_SECRET": "demo-convert-secret"}

    @classmethod
    def example_settings(cls, sandbox_url: str) -> dict[str, Any]:
        common = {"view_goals": [100234], "order_goals": [100235], "customer_segments": ["200001"]}
        return {"base_url": f"{sandbox_url}/convert",
                "sites": {"default": {"account_id": "10022898", "project_id": "10023736", **common},
                          "shop-2": {"account_id": "10022898", "project_id": "10023737", "api": "v1",
                                     "secret": "${CONVERT_TRACKING_SECRET}", **common}},
                "options": {}}

    def __init__(self, settings: VendorSettings[ConvertSite, ConvertOptions]) -> None:
        super().__init__(settings)
        size = self.options.memory_size
        self.memory = RecentKeys(size) if size else None
        self._recent = self.memory if self.memory is not None else RecentKeys(0)  # 0: never remembers
        if "user_agent" in settings.model_fields_set and settings.user_agent != CONVERT_AGENT:
            logger.warning("convert: user_agent is not sent to Convert: its requests carry exactly %s, as "
                           "Convert's SDKs send it", CONVERT_AGENT)

    def prepare_site(self, site_id: str, site: ConvertSite) -> _Endpoint:
        pid, v1 = site.project_id, site.api == "v1"
        base = self.base_url
        host = base.replace("{project_id}", pid) if "{project_id}" in base else f"{base}/{pid}"
        headers = {"Content-Type": "application/json", "User-Agent": CONVERT_AGENT}
        if site.secret is not None:
            headers["Authorization"] = f"Bearer {site.secret.get_secret_value()}"
        goal_id = str if v1 else int  # v1 goalId is a string, the document's goals are numbers
        keys = SEG_KEYS_V1 if v1 else SEG_KEYS
        view_goals, order_goals = [goal_id(g) for g in site.view_goals], [goal_id(g) for g in site.order_goals]
        return _Endpoint(v1, f"{host}/v1/track/{site.account_id}/{pid}" if v1 else f"{host}/track", headers,
                         site.account_id, pid, v1 and site.enrich_data is not False, view_goals, order_goals,
                         [(g, ("goal", g, "")) for g in view_goals], [(g, ("goal", g, "")) for g in order_goals],
                         site.customer_segments, site.visitor_id_fallback, BROWSERS,
                         SOURCES_V1 if v1 else SOURCES, keys["new"], keys["ctry"], keys["cust"])

    def rows(self, event: Event, ep: _Endpoint, vid: str, seen: set[Hashable]
             ) -> tuple[list[dict[str, Any]], list[Hashable]]:
        """The event's rows in the site's API and the memory keys they carry. What the visitor's rows so
        far in this batch carry (``seen``, updated here) or the memory holds as delivered is left out: a
        bucketing (experience, variation) and a goal once per visitor, an order once (no rows: nothing to
        send for Convert, the event is filtered)."""
        rec = event.record
        pairs: list[tuple[str, str]] = []  # (experience, variation) in the event's order
        for i, bucket in enumerate(rec["experiments"]):
            exp, var = bucket["experience_id"], bucket["variation_id"]
            if not (exp and var):  # rare: let require name the missing field
                require(exp, f"experiments[{i}].experience_id")
                require(var, f"experiments[{i}].variation_id")
            pairs.append((exp, var))
        order = rec["order"] if event.kind is EventKind.ORDER else None
        goals = ep.view_goals if order is None else ep.order_goals
        if not pairs and not goals:
            return [], []
        if goals and order is not None:
            amount, count = _order_totals(order)
        # What these rows carry: ``marks`` (seen in this batch), ``keys`` (the memory's, remembered once
        # delivered). A miss in the memory costs one membership test; ``memory.hit`` counts and refreshes.
        memory, pid = self._recent, ep.project_id
        recent = memory.keys
        marks: list[Hashable] = []
        keys: list[Hashable] = []
        new: list[tuple[str, str]] = []
        for pair in dict.fromkeys(pairs) if len(pairs) > 1 else pairs:  # each pair once, in order
            if pair in seen:
                continue
            key: tuple[str, str, tuple[Any, ...]] = (pid, vid, pair)
            if key in recent:
                memory.hit(key)
                continue
            keys.append(key)
            new.append(pair)
            marks.append(pair)
        fired: list[Any] = []  # goals converting for the first time (view goals; v1: an order's goals too)
        if goals and (order is None or ep.v1):
            for g, mark in ep.view_marks if order is None else ep.order_marks:
                if mark in seen:
                    continue
                key = (pid, vid, mark)
                if key in recent:
                    memory.hit(key)
                    continue
                keys.append(key)
                fired.append(g)
                marks.append(mark)
        paid = False  # the order's transaction is sent: an order id once, an order without one always
        order_id: str | None = None
        if goals and order is not None:
            order_id = order["order_id"]
            if not order_id:
                paid = True
            else:
                mark = ("order", order_id, "")
                key = (pid, vid, mark)
                if mark not in seen and key not in recent:
                    paid = True
                    keys.append(key)
                    marks.append(mark)
                elif key in recent:
                    memory.hit(key)
        rows: list[dict[str, Any]] = []
        if ep.v1:
            for e, v in new:
                rows.append({"eventType": "bucketing", "data": {"experienceId": e, "variationId": v}})
            if fired or paid:
                goal_data: list[dict[str, Any]] | None = None
                if paid:
                    goal_data = [{"key": "amount", "value": amount}, {"key": "productsCount", "value": count}]
                    if order_id:
                        goal_data.append({"key": "transactionId", "value": order_id})
                bucketing = dict(pairs) if pairs else None
                for g in goals:  # as Convert's SDK: the goal (its first conversion), then the transaction
                    if g in fired:
                        data: dict[str, Any] = {"goalId": g}
                        if bucketing is not None:
                            data["bucketingData"] = bucketing
                        rows.append({"eventType": "conversion", "data": data})
                    if goal_data is not None:
                        data = {"goalId": g, "goalData": goal_data}
                        if bucketing is not None:
                            data["bucketingData"] = bucketing
                        rows.append({"eventType": "conversion", "data": data})
        else:
            if pairs:
                variations, experiences = [v for _, v in pairs], [e for e, _ in pairs]
            if new:  # mostly all the event's pairs (one, not seen yet): their lists serve both rows
                rows.append({"evt": "viewExp", "vars": variations, "exps": experiences} if new == pairs else
                            {"evt": "viewExp", "vars": [v for _, v in new], "exps": [e for e, _ in new]})
            if fired or paid:
                row: dict[str, Any] = ({"evt": "hitGoal", "goals": fired if len(fired) < len(goals) else goals}
                                       if order is None else {"evt": "tr", "goals": goals})
                if pairs:
                    row["vars"], row["exps"] = variations, experiences
                if order is not None:
                    row["r"], row["prc"] = amount, count
                rows.append(row)
        if marks:
            seen.update(marks)
        return rows, keys

    def _fallback_visitor_id(self, visitor: dict[str, Any], ep: _Endpoint) -> str:
        """``visitor.visitor_id`` for a visitor without ``convert_visitor_id``, if the site allows it."""
        if not ep.fallback:
            raise MissingField("visitor.vendor_ids.convert_visitor_id")
        fallback: str = require(visitor["visitor_id"], "visitor.visitor_id")
        return fallback

    def build(self, events: Sequence[Event]) -> Plan:
        plan = Plan()
        visitors: dict[tuple[_Endpoint, str], _Visitor] = {}
        v1_groups: dict[_Endpoint, list[_Visitor]] = {}  # one request per v1 endpoint, visitors in order
        endpoints, default = self.routes, self.default_route
        for event in events:
            rec = event.record
            ep = endpoints.get(rec["site_id"], default)
            if ep is None:
                plan.rejected.append((event, self.no_site_reason(event)))
                continue
            try:
                visitor = rec["visitor"]
                key = (ep, visitor["vendor_ids"].get("convert_visitor_id")
                       or self._fallback_visitor_id(visitor, ep))
                acc = visitors.get(key)
                seen = acc.seen if acc is not None else set()
                rows, keys = self.rows(event, ep, key[1], seen)
            except MissingField as exc:
                plan.rejected.append((event, str(exc)))
                continue
            if not rows:  # no experiment and no goal, or all of it sent before
                plan.filtered.append(event)
                continue
            if acc is not None:
                acc.add(event, rows, keys)
            elif ep.v1:
                group = v1_groups.setdefault(ep, [])
                acc = visitors[key] = _Visitor(ep, key[1], event, seen, len(group), rows, keys)
                group.append(acc)
            else:
                visitors[key] = _Visitor(ep, key[1], event, seen, 0, rows, keys)
        for acc in visitors.values():
            if not acc.ep.v1:
                plan.requests.append(self.request(acc.ep, [acc]))
        plan.requests.extend(self.request(ep, accs) for ep, accs in v1_groups.items())
        return plan

    def request(self, ep: _Endpoint, accs: list[_Visitor]) -> VendorRequest:
        """One request for these visitors; context: (visitor index, start, end) per event, and each
        event's memory keys."""
        body: dict[str, Any]
        if ep.v1:
            events: list[Event] = []
            spans: list[tuple[int, int, int]] = []
            keys: list[list[Hashable]] = []
            for acc in accs:
                events.extend(acc.events)
                spans.extend(acc.spans)
                keys.extend(acc.keys)
            body = {"accountId": ep.account_id, "projectId": ep.project_id}
            if ep.enrich:
                body["enrichData"] = True
            body["source"] = SOURCE
            body["visitors"] = [self._v1_visitor(acc) for acc in accs]
        else:
            (acc,) = accs
            events, spans, keys = acc.events, acc.spans, acc.keys
            body = {"cid": ep.account_id, "pid": ep.project_id}
            seg = segments(acc.first, ep)
            if seg:
                body["seg"] = seg
            body["vid"], body["ev"] = acc.vid, acc.rows
        context = _Context(spans)
        context.keys = keys
        return VendorRequest(url=ep.url, content=json_body(body), events=events, headers=ep.headers,
                             context=context)

    def delivered(self, request: VendorRequest, outcomes: Sequence[Outcome]) -> None:
        """Remember what the delivered events' rows carried: sent again only once forgotten."""
        memory, keys = self.memory, getattr(request.context, "keys", None)
        if memory is None or keys is None:
            return
        if outcomes.count(DELIVERED) == len(keys):  # the common case: one call a request
            memory.add(chain.from_iterable(keys))
        else:
            memory.add(chain.from_iterable(k for k, o in zip(keys, outcomes, strict=True)
                                           if o.verdict is Verdict.DELIVERED))

    @staticmethod
    def _v1_visitor(acc: _Visitor) -> dict[str, Any]:
        out: dict[str, Any] = {"visitorId": acc.vid}
        seg = segments(acc.first, acc.ep)
        if seg:
            out["segments"] = seg
        out["events"] = acc.rows
        return out

    def interpret(self, request: VendorRequest, response: Response) -> list[Outcome]:
        status, n = response.status, len(request.events)
        if status == 200:
            # Success: "New Tracking Structure - Advanced Integrations" documents no answer body, and only a
            # 200 counts (Convert's own SDKs): a 200 whose body is empty or the empty JSON object. A page
            # or a body with content is an answer we do not know: retried, never delivered.
            if not response.body.strip() or (response.says_json() and response.json_object() == {}):
                return [DELIVERED] * n
            return [self.unrecognised(response)] * n
        if 200 <= status < 300:
            return [retryable(f"HTTP {status}: only 200 is success for Convert", note="not_200")] * n
        if status == 301:
            return [rejected("HTTP 301: refused by Convert's firewall (User-Agent)", note="firewall_301")] * n
        message, fields = _error(response)
        message = self.vendor_text(message)
        outcome = status_outcome(status, message)
        if outcome.verdict is Verdict.REJECTED and fields:
            bad = _events_named(fields, request.context)
            if bad:
                return [rejected(f"convert refused {bad[i]}: {message}"[:300]) if i in bad
                        else retryable("convert refused another event in the same request") for i in range(n)]
        return [outcome] * n


def _error(response: Response) -> tuple[str, str]:
    """``message`` and ``fields`` of Convert's ``{code, message, fields}`` error (empty when absent)."""
    try:
        body = response.json()
    except orjson.JSONDecodeError:
        return "", ""
    if not isinstance(body, dict):
        return "", ""
    return str(body.get("message") or ""), str(body.get("fields") or "")


def _events_named(fields: str, spans: list[tuple[int, int, int]]) -> dict[int, str]:
    """Indexes of the request's events whose rows (or visitor) the error's field paths name."""
    bad: dict[int, str] = {}
    for m in _FIELD_ROW.finditer(fields):
        v1_visitor, v1_row, track_row, whole_visitor = m.groups()
        visitor = int(v1_visitor or whole_visitor or 0)
        row = v1_row or track_row
        for i, (v, start, end) in enumerate(spans):
            if v == visitor and (row is None or start <= int(row) < end):
                bad.setdefault(i, m.group(0))
    return bad
