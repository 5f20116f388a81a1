"""Setup errors: an answer that says the relay's configuration is wrong for every event of a site (3xx,
401, 403, 404, 407) dead-letters nothing: the site's events are held (block) or parked (park), the site
is probed every ``retry.setup_retry_s``, an ERROR names vendor, site, status and Location, a metric counts
it; a per-event rejection (400, 422) stays a dead letter. And the status table of every adapter."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

from processor.admission import Admission
from processor.config import interpolate
from processor.devstack.samples import as_event, make_order, make_view
from processor.events import EventKind
from processor.metrics import Metrics
from processor.service import RequestService
from processor.transport import Sender
from processor.vendors import REGISTRY, adapter_class
from processor.vendors.base import SETUP_STATUSES, Verdict, is_setup_status
from tests.unit.test_delivery import FakeAdapter, Harness, answer

SETUP = [301, 302, 303, 307, 308, 401, 403, 404, 407]
RETRY = {"max_attempts": 3, "base_delay_ms": 10, "max_delay_ms": 100, "max_elapsed_s": 60, "setup_retry_s": 45}


def setup_count(h: Harness, status_class: str) -> float:
    return h.metrics.registry.get_sample_value(
        "processor_vendor_setup_errors_total", {"vendor": "fake", "status_class": status_class}) or 0


def site_events(h: Harness, sites: list[str], start: int = 0) -> list[Any]:
    if ("shop.events", 0) not in h.tracker.tracks:
        h.tracker.assign("shop.events", 0)
    evs = [as_event(EventKind.PRODUCT_VIEW, make_view(i, i, site_id=site), i)
           for i, site in enumerate(sites, start)]
    h.tracker.register_many(evs, [1] * len(evs))
    return evs


@pytest.mark.parametrize("status", SETUP)
async def test_a_setup_error_dead_letters_nothing_and_delivers_once_the_answer_changes(status, caplog):
    def script(call, offsets):
        if call <= 3:
            return answer([], status=status, headers={"Location": "https://moved.example/v2/events"})
        return answer(["ok"] * len(offsets))

    h = Harness(script, retry=RETRY)
    with caplog.at_level(logging.WARNING, logger="processor.service"):
        await h.run(3)
    assert not h.dead and sorted(h.settled) == [0, 1, 2] and len(h.calls) == 4
    assert max(h.sleeps) == pytest.approx(45, abs=0.5)  # retried slowly: retry.setup_retry_s
    assert setup_count(h, f"{status // 100}xx") == 3
    assert h.gauge("processor_vendor_setup_held_sites") == 0  # the answer changed: nothing held
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # once per change, not once per request
    assert all(word in errors[0] for word in ("fake", "shop-1", f"HTTP {status}", "https://moved.example/v2/events"))
    assert any("delivery resumes" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("status", [307, 308, 401])
async def test_a_parking_vendor_parks_a_setup_error_as_such(status):
    h = Harness(lambda call, offsets: answer([], status=status, headers={"Location": "https://moved.example/"}),
                parking=True, retry=RETRY)
    await h.run(2)
    assert not h.dead and sorted(p[0] for p in h.parked) == [0, 1]
    assert {p[1] for p in h.parked} == {"setup_error"}
    assert all(f"setup error: HTTP {status} to https://moved.example/" in p[2] for p in h.parked)
    assert h.gauge("processor_vendor_setup_held_sites") == 1


@pytest.mark.parametrize("status", [400, 422])
async def test_a_per_event_rejection_stays_a_dead_letter(status):
    h = Harness(lambda call, offsets: answer([], status=status), retry=RETRY)
    await h.run(2)
    assert [(d[0], d[1], d[2]) for d in h.dead] == [(0, "rejected", status), (1, "rejected", status)]
    assert setup_count(h, "4xx") == 0


async def test_a_held_site_is_not_asked_again_before_its_probe_and_other_sites_flow():
    """Site shop-1 answers 401; shop-2 delivers meanwhile; shop-1's later events are held without a request
    until the probe, which finds the credentials fixed."""
    fixed = False

    def script(call, offsets):
        if not fixed and any(o % 2 == 0 for o in offsets):  # the even offsets are shop-1's
            return answer([], status=401)
        return answer(["ok"] * len(offsets))

    h = Harness(script, retry=RETRY, batch={"max_events": 1})
    pipe = h.pipe

    now = [1000.0]

    async def yielding_sleep(d: float) -> None:  # the clock moves only when the test says
        h.sleeps.append(d)
        await asyncio.sleep(0)

    pipe.sleep = yielding_sleep
    pipe.clock = lambda: now[0]
    pipe.submit_many(site_events(h, ["shop-1", "shop-2"]))
    pipe.flush()
    # before the first probe: more events of both sites; shop-1's are answered without a request
    await _until(lambda: len(h.calls) >= 2)
    calls_before = len(h.calls)
    assert pipe.service.setup_holds.keys() == {"shop-1"}
    pipe.submit_many(site_events(h, ["shop-1", "shop-2", "shop-1"], start=2))
    pipe.flush()
    await _until(lambda: 3 in h.settled)
    assert len(h.calls) == calls_before + 1  # shop-2's only
    assert max(h.sleeps) == pytest.approx(45, abs=0.5)
    await _until(lambda: len(h.sleeps) > 20)  # shop-1's events retried, held without a request
    assert len(h.calls) == calls_before + 1
    fixed = True
    now[0] += 46  # the probe is due
    assert await pipe.drain(5)
    assert sorted(h.settled) == [0, 1, 2, 3, 4] and not h.dead
    assert not pipe.service.setup_holds
    await pipe.close()


async def _until(cond, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.001)


def test_the_default_status_table():
    assert frozenset({401, 403, 404, 407}) == SETUP_STATUSES
    assert all(is_setup_status(s) for s in range(300, 400))
    assert not any(is_setup_status(s) for s in (200, 204, 400, 408, 409, 410, 413, 422, 429, 500, 501, 503))


async def test_an_adapter_overrides_the_setup_row_where_its_vendor_documents_more():
    class NotFoundNamesTheEvent(FakeAdapter):
        setup_statuses = frozenset({401, 403})

    h = Harness(lambda call, offsets: answer([], status=404), retry=RETRY)
    h.adapter = h.pipe.adapter = h.pipe.service.adapter = NotFoundNamesTheEvent(h.adapter.settings)
    await h.run(1)
    assert [(d[1], d[2]) for d in h.dead] == [("rejected", 404)]


def _service(name: str) -> tuple[RequestService, Any]:
    cls = adapter_class(name)
    raw = interpolate(cls.example_settings("http://127.0.0.1:9"), "", cls.example_env)
    settings = cls.settings_model().model_validate(raw)
    adapter = cls(settings)
    s = adapter.settings
    admission = Admission(1000, True, s.batch.max_events, s.breaker, s.concurrency)
    service = RequestService(adapter, Sender(httpx.MockTransport(lambda r: httpx.Response(200))), admission,
                             Metrics())
    kind = next(iter(sorted(adapter.enabled_kinds)))
    record = make_order(1) if kind is EventKind.ORDER else make_view(1, 1)
    plan = adapter.plan([as_event(kind, record, 0)])
    assert plan.requests, (name, plan.rejected)
    return service, plan.requests[0]


class _Reply:
    def __init__(self, status: int, headers: dict[str, str] | None = None, content: bytes = b"") -> None:
        self.status_code = status
        self.headers = httpx.Headers(headers or {})
        self.content = content


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize(("status", "expected"), [
    *[(s, "setup") for s in SETUP],
    (400, Verdict.REJECTED), (422, Verdict.REJECTED),
    (408, Verdict.RETRYABLE), (429, Verdict.RETRYABLE), (500, Verdict.RETRYABLE), (503, Verdict.RETRYABLE),
])
def test_each_adapter_status_table(name, status, expected, caplog):
    service, req = _service(name)
    body = b'{"message": "nope"}'
    got = service._answered(req, _Reply(status, {"content-type": "application/json"}, body), 0.01)
    assert got.outcomes is not None and len(got.outcomes) == len(req.events)
    if expected == "setup":
        assert got.setup and not got.counted
        assert {o.verdict for o in got.outcomes} == {Verdict.RETRYABLE}
        assert all(o.reason.startswith(f"setup error: HTTP {status}") for o in got.outcomes)
    else:
        assert not got.setup
        assert {o.verdict for o in got.outcomes} == {expected}


def test_the_setup_reason_and_log_never_carry_a_credential(caplog):
    service, req = _service("convead")
    secret = next(iter(service.adapter._secrets), None)
    assert secret, "the example settings carry a credential"
    with caplog.at_level(logging.ERROR, logger="processor.service"):
        got = service._answered(req, _Reply(302, {"location": f"https://login.example/?key={secret}"}), 0.01)
    assert got.outcomes is not None and secret not in got.outcomes[0].reason
    assert "<redacted>" in got.outcomes[0].reason
    assert not any(secret in r.getMessage() for r in caplog.records)


def test_an_adapter_failing_on_a_setup_answer_changes_nothing():
    service, req = _service("qubit")

    def boom(*_: Any) -> Any:
        raise ValueError("not this answer")

    service.adapter.interpret = boom  # type: ignore[method-assign]
    got = service._answered(req, _Reply(401), 0.01)
    assert got.setup and got.outcomes is not None and got.outcomes[0].reason == "setup error: HTTP 401"


@pytest.mark.parametrize(("name", "status", "said", "note"), [
    ("tracardi", 401, "check sites.default.source_id", "bad_source"),
    ("convert", 301, "refused by Convert's firewall (User-Agent)", "firewall_301"),
])
def test_an_adapter_names_its_vendors_setup_answer(name, status, said, note):
    service, req = _service(name)
    got = service._answered(req, _Reply(status, {"content-type": "application/json"}, b"{}"), 0.01)
    assert got.setup and got.outcomes is not None
    assert said in got.outcomes[0].reason and got.outcomes[0].reason.startswith(f"setup error: HTTP {status}")
    assert got.outcomes[0].note == note


async def test_a_request_mixing_sites_holds_each_of_them_and_one_probe_frees_them():
    """Sites sharing an endpoint share requests (QuickLizard's array): the vendor's answer is theirs alike."""
    held_at_probe: list[set[str]] = []

    def script(call, offsets):
        if call == 1:
            return answer([], status=401)
        held_at_probe.append(set(h.pipe.service.setup_holds))
        return answer(["ok"] * len(offsets))

    h = Harness(script, retry=RETRY)
    h.pipe.submit_many(site_events(h, ["shop-1", "shop-2"]))
    h.pipe.flush()
    assert await h.pipe.drain(5)
    assert sorted(h.settled) == [0, 1] and not h.dead and len(h.calls) == 2
    assert held_at_probe == [{"shop-1", "shop-2"}]
    assert h.gauge("processor_vendor_setup_held_sites") == 0
    await h.pipe.close()
