"""What the request service makes of an answer that is not the vendor's success: retryable and named, counted
per vendor, logged at most once a minute, a failure for the breaker and never a success for the limit; and a
body over the vendor's limit, read no further than the limit by either sender."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web

from processor.admission import Admission
from processor.config import load_config
from processor.devstack.samples import as_event, make_view
from processor.events import EventKind
from processor.metrics import Metrics
from processor.service import RequestService
from processor.transport import AiohttpSender, Sender
from processor.vendors import adapter_class
from processor.vendors.base import Verdict

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=30)
TIMEOUT = httpx.Timeout(5.0, connect=1.0, read=2.0)
PAGE = b"<html><body>Sign in to the network</body></html>"


def tracardi(url: str, tmp_path: Path, **settings: Any) -> Any:
    cls = adapter_class("tracardi")
    config = {"kafka": {"bootstrap_servers": "127.0.0.1:9", "group_id": "g", "topics": ["t"]},
              "deadletter": {"topic": "t.dlq"}, "vendors": {"tracardi": {**cls.example_settings(url), **settings}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return cls(load_config(path, env=cls.example_env).vendors["tracardi"])


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    yield start
    for runner in runners:
        await runner.cleanup()


async def _page(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=PAGE, content_type="text/html")


async def _endless(request: web.Request) -> web.StreamResponse:
    """A 200 JSON answer whose body never ends (chunked): only a reader that stops at its limit returns."""
    await request.read()
    r = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    await r.prepare(request)
    try:
        await r.write(b'{"profile": {"id": "0d2d9dc5"}, "padding": "')
        while True:
            await r.write(b"x" * 4096)
            await asyncio.sleep(0)
    except (ConnectionResetError, RuntimeError):  # the client stopped reading and closed
        pass
    return r


async def _long(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b'{"profile": {"id": "0d2d9dc5"}, "padding": "' + b"x" * 8192 + b'"}',
                        content_type="application/json")


def _service(adapter: Any, sender: Any) -> RequestService:
    s = adapter.settings
    return RequestService(adapter, sender, Admission(100, False, 10, s.breaker, s.concurrency), Metrics())


def _request(adapter: Any) -> Any:
    (req,) = adapter.plan([as_event(EventKind.PRODUCT_VIEW, make_view(1, 1), 0)]).requests
    return req


async def test_an_unrecognised_answer_is_named_counted_logged_once_and_no_success(
        serve: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = await serve(_page)
    a = tracardi(url, tmp_path)
    svc = _service(a, AiohttpSender(LIMITS, TIMEOUT))
    try:
        with caplog.at_level(logging.WARNING, logger="processor.service"):
            answers = [await svc.send(_request(a)) for _ in range(3)]
    finally:
        await svc.client.aclose()
    (outcome,) = answers[-1].outcomes
    assert outcome.verdict is Verdict.RETRYABLE and answers[-1].counted
    assert outcome.reason == f"unrecognised answer: HTTP 200 text/html, {len(PAGE)} bytes: {PAGE[:48].decode()!r}"
    m = svc.metrics.registry
    assert m.get_sample_value("processor_vendor_unrecognised_answers_total", {"vendor": "tracardi"}) == 3
    assert m.get_sample_value("processor_vendor_requests_total", {"vendor": "tracardi", "status_class": "2xx"}) == 3
    assert svc.admission.breaker.consecutive == 3  # failures for the breaker
    assert svc.admission.limit.rtt is None  # no success seen by the limit
    logged = [r for r in caplog.records if "success answer" in r.getMessage()]
    assert len(logged) == 1 and "text/html" in logged[0].getMessage()


@pytest.mark.parametrize("which", ["aiohttp", "httpx"])
@pytest.mark.parametrize("handler", [_endless, _long], ids=["endless", "content-length"])
async def test_a_body_over_the_limit_is_unrecognised_and_never_read_whole(
        serve: Any, tmp_path: Path, which: str, handler: Handler) -> None:
    url = await serve(handler)
    a = tracardi(url, tmp_path, max_answer_bytes=1024)
    sender = (AiohttpSender(LIMITS, TIMEOUT, max_body=1024) if which == "aiohttp"
              else Sender(httpx.AsyncHTTPTransport(limits=LIMITS), TIMEOUT, max_body=1024))
    svc = _service(a, sender)
    try:
        async with asyncio.timeout(5):  # the endless body: only a reader that stops at the limit returns
            answer = await svc.send(_request(a))
    finally:
        await sender.aclose()
    (outcome,) = answer.outcomes
    assert outcome.verdict is Verdict.RETRYABLE
    assert outcome.reason.startswith("unrecognised answer: HTTP 200 application/json, body over 1024 bytes: "
                                     "'{\"profile\": {\"id\": \"0d2d9dc5\"}, \"padding\": \"xxx")
    assert svc.metrics.registry.get_sample_value("processor_vendor_unrecognised_answers_total",
                                                 {"vendor": "tracardi"}) == 1
