"""/metrics, /healthz (the event loop is alive and work is not stuck) and /readyz (assigned and able to
work) on one port; a failing check answers 503 with its reason."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

STALL_S = 30.0


class HealthServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int, not_ready: Callable[[], str | None],
                 stalled: Callable[[], str | None] = lambda: None) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.not_ready = not_ready
        self.stalled = stalled
        self.heartbeat = time.monotonic()
        self._runner: web.AppRunner | None = None

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.get("/metrics", self._metrics), web.get("/healthz", self._healthz),
                        web.get("/readyz", self._readyz)])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if server is not None and server.sockets:  # type: ignore[union-attr]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        age = time.monotonic() - self.heartbeat
        if age > STALL_S:
            return web.Response(status=503, text=f"event loop stalled for {age:.0f}s\n")
        why = self.stalled()
        if why:
            return web.Response(status=503, text=f"stalled: {why}\n")
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        why = self.not_ready()
        if why is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {why}\n")
