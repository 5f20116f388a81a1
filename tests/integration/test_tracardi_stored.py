"""What a Tracardi user sees, through ``processor run`` in the production shape (schema registry, parking on):
the twin keeps what Tracardi keeps (processor.sandbox.tracardi), so these assert on Tracardi's stored events.

- A parked-then-redriven event and a replayed dead letter keep the moment they happened: Tracardi stores an
  event's own ``time.create`` (Tracardi/tracardi ``EventPayload.to_event``) as ``metadata.time.create``,
  whenever it arrives; ``insert`` is the arrival.
- Varied events (views and orders of two sites, odd ids, ids differing only in case, long ids, padded
  profile and session ids, no session id, every device and referrer shape, a bot) are stored as Tracardi's
  model stores them: computed here from the canonical events by Tracardi's rules, not by the adapter.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from user_agents import parse as parse_user_agent

from processor.devstack.kafka_io import produce, read_all
from processor.devstack.samples import Workload, encode, make_order, make_view, with_changes
from processor.events import EventKind
from processor.sandbox.tracardi import new_profile_id
from processor.vendors.tracardi import event_id as sent_id
from tests.integration.conftest import relay_config, tracardi_vendor, wait_for
from tests.integration.test_replay import ONE_RECORD_A_BATCH, Cli, dead_letter, put_records

VIEW, ORDER = EventKind.PRODUCT_VIEW, EventKind.ORDER
PAST = 1_700_000_000_000  # 2023-11-14: long before any run of this test
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
IPAD = ("Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 "
        "Mobile/15E148 Safari/604.1")


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rows_by_create(sandbox: Any) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in sandbox.received("tracardi"):
        rows.setdefault(row["id"], []).append(row)
    return rows


def past_view(i: int) -> tuple[bytes, bytes, int]:
    t = PAST + i * 61_001  # a minute and a bit apart: every event its own time
    rec = make_view(i, i, event_time=t)
    rec["event_id"] = f"t{i}"
    return f"v{i}".encode(), encode(VIEW, rec), t


def assert_kept_their_time(sandbox: Any, times: dict[str, int]) -> None:
    rows = rows_by_create(sandbox)
    for eid, t in times.items():
        for row in rows[eid]:
            assert row["metadata"]["time"]["create"] == iso(t), eid  # when it happened
            assert row["metadata"]["time"]["insert"] > iso(t + 365 * 86_400_000), eid  # when Tracardi stored it


def test_a_parked_then_redriven_event_keeps_its_time(broker, topics, sandbox, relays):
    vendor = tracardi_vendor(
        sandbox, batch={"max_events": 20, "max_wait_ms": 100},
        retry={"max_attempts": 3, "base_delay_ms": 50, "max_delay_ms": 200, "park_after_s": 1, "max_elapsed_s": 600},
        breaker={"consecutive_failures": 3, "cooldown_s": 1, "max_cooldown_s": 2, "probes": 1})
    relay = relays(relay_config(broker, topics, sandbox, {"tracardi": vendor}))
    relay.wait_ready()
    sandbox.faults("tracardi", error_rate=1.0, error_status=503)  # Tracardi down: its events are parked
    views = [past_view(i) for i in range(40)]
    produce(broker.bootstrap, topics.events, [(k, v) for k, v, _ in views])
    wait_for(lambda: relay.metric("processor_parked_total", vendor="tracardi") >= 40, 90, "every event parked")
    assert sandbox.stats()["tracardi"].get("accepted", 0) == 0
    sandbox.faults("tracardi")  # recovered: the parked events are redriven
    times = {f"t{i}": t for i, (_, _, t) in enumerate(views)}
    wait_for(lambda: set(times) <= set(rows_by_create(sandbox)), 120, "the parked events redriven")
    assert relay.metric("processor_redriven_events_total", vendor="tracardi", outcome="delivered") >= 40
    assert_kept_their_time(sandbox, times)
    assert read_all(broker.bootstrap, topics.dlq, idle_s=1) == []
    assert relay.stop() == 0


def test_a_replayed_dead_letter_keeps_its_time(broker, topics, sandbox, tmp_path):
    views = [past_view(i) for i in range(30)]
    put_records(broker.bootstrap, topics.dlq, [dead_letter(i, value, vendor="tracardi", status=503)
                                               for i, (_, value, _) in enumerate(views)])
    cfg = relay_config(broker, topics, sandbox, {"tracardi": tracardi_vendor(sandbox)})
    cfg["deadletter"]["producer"] = dict(ONE_RECORD_A_BATCH)
    done = Cli(cfg, tmp_path).json("replay", "--vendor", "tracardi")
    assert (done["replayed"], done["delivered"], done["failed_again"]) == (30, 30, 0)
    assert_kept_their_time(sandbox, {f"t{i}": t for i, (_, _, t) in enumerate(views)})


# -- varied events: what Tracardi's model stores, computed here by its rules -------------------------------

def varied() -> list[tuple[EventKind, dict[str, Any]]]:
    """A workload of views and orders on two sites, then events that test each rule, each its own visitor."""
    workload = Workload(visitors=30, order_rate=0.3, seed=5, sites=("shop-1", "shop-2"), start_ms=PAST)
    out = [(kind, rec) for kind, rec, _ in itertools.islice(iter(workload), 150)]
    odd: list[tuple[EventKind, dict[str, Any]]] = []
    n = 900
    for eid in ("ORD-77/Ä", "ord-77/ä", "Ord-77/ä", "e" * 64, "E" * 64, "x" * 90, "x" * 90 + "Y", "İd-1"):
        odd.append((VIEW, with_changes(make_view(n, 3, event_time=PAST + n), "event_id", eid)))
        n += 1
    for device, agent in (("desktop", IPAD), ("tablet", None), ("other", IPAD), (None, IPAD), ("tv", None)):
        rec = with_changes(with_changes(make_view(n, 4, event_time=PAST + n), "page.device", device),
                           "page.user_agent", agent)
        odd.append((VIEW, rec))
        n += 1
    for referrer in ("", None, "android-app://com.example.app", "https://u:p@Ref.Example.com:8443/a?b#c"):
        odd.append((VIEW, with_changes(make_view(n, 5, event_time=PAST + n), "page.referrer", referrer)))
        n += 1
    padded = make_order(n, items=2, event_time=PAST + n)
    padded["visitor"]["vendor_ids"].update(tracardi_profile_id=f" {uuid.uuid4()} ", tracardi_session_id=" s-pad ")
    no_session = make_view(n + 1, 6, event_time=PAST + n + 1)
    del no_session["visitor"]["vendor_ids"]["tracardi_session_id"]
    no_session["visitor"]["session_id"] = ""
    no_visit = make_order(n + 2, items=1, event_time=PAST + n + 2)
    del no_visit["visitor"]["vendor_ids"]["tracardi_session_id"]
    long_session = make_view(n + 3, 7, event_time=PAST + n + 3)
    long_session["visitor"]["vendor_ids"]["tracardi_session_id"] = "S" * 100
    bot = with_changes(make_view(n + 4, 8, event_time=PAST + n + 4), "page.user_agent", GOOGLEBOT)
    bot["event_id"] = "a-bot"
    odd += [(ORDER, padded), (VIEW, no_session), (ORDER, no_visit), (VIEW, long_session), (VIEW, bot)]
    return out + odd


def origin(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        return url
    authority = rest
    for end in "/?#":
        authority = authority.split(end, 1)[0]
    return f"{scheme}://{authority.rpartition('@')[2]}"


def check_stored(row: dict[str, Any], kind: EventKind, rec: dict[str, Any]) -> None:
    """``row`` is what Tracardi stores for the canonical event ``rec`` (its rules, restated here)."""
    page = rec["page"]
    assert row["type"] == ("product-details-page-view" if kind is VIEW else "checkout-completed")
    assert row["metadata"]["time"]["create"] == iso(rec["event_time"])
    hit = {k: v for k, v in (("name", page["title"]), ("url", page["url"])) if v}
    if page["referrer"]:
        hit["referer"] = origin(page["referrer"])
    assert row["hit"] == hit
    # the session's device: the visitor's User-Agent as Tracardi's parser reads it
    agent = parse_user_agent(page["user_agent"] or "event-relay/0.1")  # no visitor's agent: the request's
    ua_type = ("mobile" if agent.is_mobile else "pc" if agent.is_pc else "tablet" if agent.is_tablet else None)
    assert row["device"] == {"name": agent.device.family, "brand": agent.device.brand, "model": agent.device.model,
                             "touch": agent.is_touch_capable, "type": ua_type}, (page["device"], row["device"])
    assert (row["os"]["name"], row["app"]["name"], row["app"]["bot"]) == (agent.os.family, agent.browser.family,
                                                                           False)
    if page["language"] and page["user_agent"]:
        assert row["app"]["language"] == page["language"]
    ids = rec["visitor"]["vendor_ids"]
    session = (ids.get("tracardi_session_id") or "").strip()
    if session and len(session) <= 64:
        assert row["session"]["id"] == session
    else:  # derived from the visit, or the long id's stable form: one a session, never random
        assert len(row["session"]["id"]) <= 64 and row["session"]["id"]
    profile = (ids.get("tracardi_profile_id") or "").strip()
    assert row["profile"]["id"] == (profile or new_profile_id(row["session"]["id"]))
    if kind is VIEW:
        p = rec["product"]
        assert row["data"]["ec"]["product"]["id"] == p["product_id"] and row["data"]["ec"]["product"]["price"] == p[
            "price"]
        assert row["journey"] == {"state": "awareness"}
    else:
        assert row["data"]["ec"]["checkout"] == {"id": rec["order"]["order_id"], "status": "completed"}
        assert row["properties"]["value"] == rec["order"]["total"]
        assert row["journey"] == {"state": "purchase"}


def test_varied_events_are_stored_as_tracardis_model_stores_them(broker, topics, sandbox, relays):
    events = varied()
    produce(broker.bootstrap, topics.events,
            [(rec["visitor"]["visitor_id"].encode() or b"k", encode(kind, rec)) for kind, rec in events])
    relay = relays(relay_config(broker, topics, sandbox, {"tracardi": tracardi_vendor(sandbox)}))
    people = [(kind, rec) for kind, rec in events if rec["event_id"] != "a-bot"]
    wait_for(lambda: len(sandbox.received("tracardi")) >= len(people), 90, "every event but the bot's stored")
    wait_for(lambda: relay.metric("processor_vendor_events_total", vendor="tracardi", outcome="filtered") >= 1, 30,
             "the bot's event filtered")
    assert relay.stop() == 0
    rows = sandbox.received("tracardi")
    assert sandbox.stats()["tracardi"].get("rejected", 0) == 0
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(people) == len(rows)  # one stored event each: case and length never merge two
    assert all(i == i.lower() and len(i) <= 64 for i in ids)  # kept by Tracardi as sent
    by_id = {row["id"]: row for row in rows}
    for kind, rec in people:
        eid = rec["event_id"]
        kept = sent_id(eid)  # which row is this event's (its stable form when Tracardi would change the id)
        assert kept == eid if eid == eid.lower() and len(eid) <= 64 else kept.startswith(eid.lower()[:47] + "~")
        check_stored(by_id[kept], kind, rec)
    assert "a-bot" not in by_id
    assert Counter(row["type"] for row in rows) == Counter(
        "product-details-page-view" if k is VIEW else "checkout-completed" for k, _ in people)
