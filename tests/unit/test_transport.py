"""The lean sender answers as httpx over httpx-aiohttp did: the same status, headers and body, the same
relay error classes (processor.errors, from the one table), against a scripted server and every vendor twin."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web
from httpx_aiohttp import AiohttpTransport

from processor import errors
from processor.config import load_config
from processor.devstack.samples import as_event, make_order, make_view
from processor.events import EventKind
from processor.sandbox import Faults, SandboxServer
from processor.transport import AiohttpSender, Sender
from processor.vendors import adapter_class
from processor.vendors.base import Adapter, Response

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=30)
TIMEOUT = httpx.Timeout(2.0, connect=1.0, read=0.3)


def reference() -> Sender:
    """What the relay sent through before: an httpx Request over httpx-aiohttp's transport."""
    return Sender(AiohttpTransport(limits=LIMITS), TIMEOUT)


def lean() -> AiohttpSender:
    return AiohttpSender(LIMITS, TIMEOUT)


async def _ok(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(status=200, body=b'{"echo":%d}' % len(body), content_type="application/json",
                        headers={"X-Seen-Ua": request.headers.get("User-Agent", ""),
                                 "X-Seen-Type": request.headers.get("Content-Type", "")})


async def _throttled(request: web.Request) -> web.Response:
    return web.Response(status=429, text="slow down", headers={"Retry-After": "7"})


async def _redirect(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/ok"})


async def _gzip_ok(request: web.Request) -> web.Response:
    return web.Response(status=200, body=gzip.compress(b'{"a":1}'), headers={"Content-Encoding": "gzip"})


async def _gzip_garbled(request: web.Request) -> web.Response:
    return web.Response(status=200, body=b"this is not gzip", headers={"Content-Encoding": "gzip"})


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(2)
    return web.Response(status=200)


async def _drop(request: web.Request) -> web.Response:
    assert request.transport is not None
    request.transport.abort()
    raise asyncio.CancelledError


async def _empty(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def _slow_body(request: web.Request) -> web.StreamResponse:
    """Headers at once, then a chunk every 0.1 s for 3 s: no single read waits long, the whole does."""
    r = web.StreamResponse(status=200)
    await r.prepare(request)
    try:
        for _ in range(30):
            await r.write(b"x" * 10)
            await asyncio.sleep(0.1)
    except ConnectionResetError:  # the client gave up: what the tests make it do
        pass
    return r


async def _hung(request: web.Request) -> web.Response:
    await asyncio.sleep(1.5)
    return web.Response(status=200)


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.add_routes([web.post("/ok", _ok), web.post("/throttled", _throttled), web.post("/redirect", _redirect),
                    web.post("/gzip", _gzip_ok), web.post("/garbled", _gzip_garbled), web.post("/slow", _slow),
                    web.post("/drop", _drop), web.post("/empty", _empty), web.post("/slow-body", _slow_body),
                    web.post("/hung", _hung)])
    # the teardown cancels a handler still sleeping (the client gave up on it) instead of waiting it out
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _answer(sender: Any, url: str, content: bytes = b"a=1&b=2",
                  headers: dict[str, str] | None = None) -> tuple[Any, ...]:
    """(status, chosen headers, body) or ("raised", the relay's error class)."""
    try:
        r = await sender.request("POST", url, content, headers or {"Content-Type": "application/x-www-form-urlencoded"})
    except errors.TransportError as exc:
        return ("raised", type(exc))
    finally:
        await sender.aclose()
    seen = {k: r.headers.get(k) for k in ("content-type", "retry-after", "location", "x-seen-ua", "x-seen-type")}
    return (r.status_code, seen, r.content)


@pytest.mark.parametrize("path", ["/ok", "/throttled", "/redirect", "/gzip", "/garbled", "/slow", "/drop", "/empty"])
async def test_answers_as_httpx_over_aiohttp_did(server: str, path: str) -> None:
    before = await _answer(reference(), server + path)
    after = await _answer(lean(), server + path)
    assert after == before
    if path == "/garbled":
        assert before == ("raised", errors.ProtocolError)
    if path == "/slow":
        assert before == ("raised", errors.ReadTimeout)
    if path == "/drop":
        assert before == ("raised", errors.ConnectionLost)


async def test_refused_connection_is_the_same_error() -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/x"
        before = await _answer(reference(), url)
        after = await _answer(lean(), url)
    assert after == before
    assert before == ("raised", errors.ConnectionRefused)


async def test_sends_no_cookies_back(server: str) -> None:
    async def set_cookie(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("Cookie", "none"), headers={"Set-Cookie": "s=1; Path=/"})

    app = web.Application()
    app.add_routes([web.post("/c", set_cookie)])
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/c"  # type: ignore[union-attr]
    sender = lean()
    try:
        first = await sender.request("POST", url, b"", {})
        second = await sender.request("POST", url, b"", {})
    finally:
        await sender.aclose()
        await runner.cleanup()
    assert (first.content, second.content) == (b"none", b"none")


def _example_adapter(vendor: str, sandbox_url: str, tmp_path: Path) -> Adapter[Any, Any]:
    cls = adapter_class(vendor)
    config = {"kafka": {"bootstrap_servers": "127.0.0.1:9", "group_id": "g", "topics": ["t"]},
              "deadletter": {"topic": "t.dlq"}, "vendors": {vendor: cls.example_settings(sandbox_url)}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return cls(load_config(path, env=cls.example_env).vendors[vendor])


@pytest.mark.parametrize("vendor", ["qubit", "quicklizard", "convert", "tracardi", "convead"])
async def test_every_twin_answers_the_same(vendor: str, tmp_path: Path) -> None:
    """Each twin's answers to the adapter's own requests, to a malformed body and when throttling,
    through both senders."""
    server = SandboxServer("127.0.0.1", 0)
    await server.start()
    try:
        a = _example_adapter(vendor, server.url, tmp_path)
        events = [as_event(EventKind.PRODUCT_VIEW, make_view(i, i), i) for i in range(3)] + [
            as_event(EventKind.ORDER, make_order(7, 2), 3)]
        requests = a.plan([e for e in events if a.takes(e.kind)]).requests
        assert requests
        for req in requests:
            headers = dict(req.headers)
            answers = [await _answer(sender, req.url, req.content, headers) for sender in (lean(), reference())]
            # the twin numbers what it receives: compare status, headers and what the adapter reads off the body
            outcomes = [a.interpret(req, Response(s, {}, body)) for s, _, body in answers]
            assert answers[0][:2] == answers[1][:2] and outcomes[0] == outcomes[1]
            assert answers[0][0] == 200
            assert (await _answer(lean(), req.url, b"{not json", headers)
                    == await _answer(reference(), req.url, b"{not json", headers))
        server.sandbox.faults[vendor] = Faults(throttle_rate=1.0, retry_after_s=3)
        req = requests[0]
        throttled = await _answer(lean(), req.url, req.content, dict(req.headers))
        assert throttled == await _answer(reference(), req.url, req.content, dict(req.headers))
        assert throttled[0] == 429 and throttled[1]["retry-after"] == "3"
    finally:
        await server.stop()


# -- the whole-request timeout: aiohttp's own timer instead of asyncio.timeout around the sender ---------

TOTAL_S = 0.5
LONG_READS = httpx.Timeout(5.0, connect=1.0)  # no socket read waits 5 s: only the total timeout can fire


def _service(sender: Any) -> Any:
    from processor.admission import Admission
    from processor.metrics import Metrics
    from processor.service import RequestService
    from tests.unit.test_delivery import FakeAdapter

    adapter = FakeAdapter(FakeAdapter.settings_model().model_validate(
        {"sites": {"default": {}}, "options": {}, "timeout": {"total_s": TOTAL_S}, "concurrency": 4}))
    s = adapter.settings
    return RequestService(adapter, sender, Admission(100, False, 10, s.breaker, s.concurrency), Metrics())


async def _timed_out(sender: Any, url: str) -> tuple[Any, ...]:
    """What the request service makes of a request that outlives the total timeout: the answer, the
    metrics and the admission's state after it."""
    from processor.vendors.base import VendorRequest

    svc = _service(sender)
    try:
        answer = await svc.send(VendorRequest(url, b"[1]", [object()]))
    finally:
        await sender.aclose()
    m, a = svc.metrics.registry, svc.admission
    return (svc._timer, answer.status, answer.outcomes, answer.counted, answer.internal,
            m.get_sample_value("processor_vendor_requests_total", {"vendor": "fake", "status_class": "error"}),
            m.get_sample_value("processor_vendor_request_duration_seconds_count", {"vendor": "fake"}),
            a.breaker.consecutive, a.limit.in_use, a.limit.current)


@pytest.mark.parametrize("path", ["/slow-body", "/hung"])
async def test_a_total_timeout_is_the_same_outcome_when_aiohttp_enforces_it(server: str, path: str) -> None:
    """Before: asyncio.timeout in the request service around a sender without a total timeout. Now: the
    sender's aiohttp timer, no timer in the service. The same outcome (timeout: retryable, back-pressure),
    the same metrics and admission state."""
    from processor.vendors.base import retryable

    before = await _timed_out(AiohttpSender(LIMITS, LONG_READS), server + path)
    after = await _timed_out(AiohttpSender(LIMITS, LONG_READS, total_s=TOTAL_S), server + path)
    assert before[0] is True and after[0] is False  # one timer a request: the service's, or aiohttp's
    assert after[1:] == before[1:]
    assert before[1:5] == (None, [retryable("timeout")], True, "")
    assert before[5:] == (1.0, 1.0, 1, 0, 2)  # counted as an error, a breaker failure, the limit halved


@pytest.mark.parametrize("path", ["/slow-body", "/hung"])
async def test_the_sender_raises_a_timeout_as_asyncio_timeout_did(server: str, path: str) -> None:
    untimed, sender = AiohttpSender(LIMITS, LONG_READS), AiohttpSender(LIMITS, LONG_READS, total_s=TOTAL_S)
    try:
        with pytest.raises(TimeoutError) as before:
            async with asyncio.timeout(TOTAL_S):
                await untimed.request("POST", server + path, b"", {})
        with pytest.raises(errors.RequestTimeout) as after:
            await sender.request("POST", server + path, b"", {})
    finally:
        await untimed.aclose()
        await sender.aclose()
    assert type(before.value) is TimeoutError  # the service names its own timer's alike: RequestTimeout
    assert after.value.label == "timeout"


async def test_a_sender_that_cannot_bound_itself_is_bounded_by_the_service(server: str) -> None:
    """httpx's transports have no whole-request timeout: the service keeps its own timer for them."""
    from processor.vendors.base import retryable

    got = await _timed_out(Sender(AiohttpTransport(limits=LIMITS), LONG_READS), server + "/slow-body")
    assert got[0] is True and got[2] == [retryable("timeout")]
    longer = await _timed_out(AiohttpSender(LIMITS, LONG_READS, total_s=TOTAL_S * 10), server + "/empty")
    assert longer[0] is True  # a sender's total longer than the vendor's: the service's timer still bounds it


@pytest.mark.parametrize("events", [1, 3])
async def test_a_pipeline_over_a_hung_vendor_times_out_each_request_once(server: str, events: int) -> None:
    """Through the delivery pipeline (a batch of one request awaited in the batch's task; several on worker
    tasks): aiohttp's timer ends each attempt as a timeout, the task goes on, every event gets one outcome."""
    from tests.unit.test_delivery import Harness, PerEventAdapter

    h = Harness(lambda c, o: None, base_url=server + "/hung", timeout={"total_s": TOTAL_S},
                retry={"max_attempts": 2, "base_delay_ms": 10, "max_delay_ms": 10, "max_elapsed_s": 60},
                breaker={"consecutive_failures": 100}, batch={"max_events": events})
    h.adapter = h.pipe.adapter = h.pipe.service.adapter = PerEventAdapter(h.adapter.settings)
    h.pipe.service.client = AiohttpSender(LIMITS, LONG_READS, total_s=TOTAL_S)
    assert not h.pipe.service._timer
    await h.run(events)
    assert sorted(d[0] for d in h.dead) == list(range(events)) and not h.settled
    assert {(d[1], d[3]) for d in h.dead} == {("exhausted", "timeout (after 2 attempts)")}
    assert h.metrics.registry.get_sample_value(
        "processor_vendor_requests_total", {"vendor": "fake", "status_class": "error"}) == 2 * events
    assert h.pipe.admission.unsettled == 0 and h.pipe.unsent == 0 and h.pipe.admission.limit.in_use == 0
