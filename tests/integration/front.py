"""A misbehaving server in front of the vendor twins, on loopback, in a thread of its own: each request to
``/<vendor>/...`` is answered by the front itself as its plan for that vendor says (a page, an empty body,
JSON of another shape, a long body), or forwarded to the sandbox and its answer passed back."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections import Counter
from collections.abc import Callable

import aiohttp
from aiohttp import web

PAGE = b"<!DOCTYPE html><html><head><title>Proxy error</title></head><body>Try again later.</body></html>"
ANSWERS: dict[str, Callable[[], web.Response]] = {
    "html": lambda: web.Response(body=PAGE, content_type="text/html"),
    "empty": lambda: web.Response(status=200, headers={"Content-Type": "application/json"}),
    "other_json": lambda: web.json_response({"status": "queued", "items": [1, 2, 3]}),
    "oversize": lambda: web.Response(body=b'{"results": "' + b"x" * 16384 + b'"}', content_type="application/json"),
}

# vendor -> the answers of its requests in turn ("forward": the twin's); past the plan's end, "forward"
Plan = dict[str, list[str]]


class Front:
    def __init__(self, upstream: str, plan: Plan | None = None, then: str = "forward",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context``: serve HTTPS with it (an HTTPS twin: the twin's answers over TLS)."""
        self.upstream = upstream
        self.ssl_context = ssl_context
        self.plan = plan or {}
        self.then = then
        self.counts: Counter[tuple[str, str]] = Counter()  # (vendor, answer) -> requests
        self._seen: Counter[str] = Counter()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> Front:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            loop.run_until_complete(self._start())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="front", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the front did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def _stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        vendor = request.path.strip("/").split("/", 1)[0]
        plan = self.plan.get(vendor, [])
        i = self._seen[vendor]
        self._seen[vendor] += 1
        answer = plan[i] if i < len(plan) else self.then
        self.counts[(vendor, answer)] += 1
        if answer != "forward":
            return ANSWERS[answer]()
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                         headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as r:
            content = await r.read()
            return web.Response(status=r.status, body=content,
                                headers={k: v for k, v in r.headers.items()
                                         if k.lower() in ("content-type", "retry-after", "location")})
