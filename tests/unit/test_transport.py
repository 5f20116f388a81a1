"""The lean sender answers as httpx over httpx-aiohttp did: the same status, headers and body, the same
httpx error classes, against a scripted server and against every vendor twin."""

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


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.add_routes([web.post("/ok", _ok), web.post("/throttled", _throttled), web.post("/redirect", _redirect),
                    web.post("/gzip", _gzip_ok), web.post("/garbled", _gzip_garbled), web.post("/slow", _slow),
                    web.post("/drop", _drop), web.post("/empty", _empty)])
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
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
    """(status, chosen headers, body) or ("raised", the httpx error class)."""
    try:
        r = await sender.request("POST", url, content, headers or {"Content-Type": "application/x-www-form-urlencoded"})
    except httpx.HTTPError as exc:
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
        assert before == ("raised", httpx.DecodingError)
    if path == "/slow":
        assert before[0] == "raised" and issubclass(before[1], httpx.TimeoutException)
    if path == "/drop":
        assert before[0] == "raised" and issubclass(before[1], httpx.TransportError)


async def test_refused_connection_is_the_same_error() -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/x"
        before = await _answer(reference(), url)
        after = await _answer(lean(), url)
    assert after == before
    assert before[0] == "raised" and issubclass(before[1], httpx.TransportError)


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
