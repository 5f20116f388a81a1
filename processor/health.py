"""/metrics, /healthz (liveness) and /readyz (readiness) on one port; a failing check answers 503 with
its reason.

Liveness fails only where a restart cures it: the event loop has not turned for ``relay.loop_stall_s``
(the server beats its own heartbeat from the start, so a relay waiting for Kafka is alive), or
``stalled`` names a message that nothing in the relay owns any more. Everything the relay waits
through (Kafka, the schema registry, an unwritable topic, a vendor that blocks for hours) is
readiness (``not_ready``) and alerts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class HealthServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int, not_ready: Callable[[], str | None],
                 stalled: Callable[[], str | None] = lambda: None, loop_stall_s: float = 30.0) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.not_ready = not_ready
        self.stalled = stalled
        self.loop_stall_s = loop_stall_s
        self.heartbeat = time.monotonic()
        self._runner: web.AppRunner | None = None
        self._beating: asyncio.Task[None] | None = None

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    async def _beat(self) -> None:
        """The heartbeat: as long as the event loop turns, from the start to the stop."""
        step = min(1.0, self.loop_stall_s / 4)
        while True:
            self.beat()
            await asyncio.sleep(step)

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.get("/metrics", self._metrics), web.get("/healthz", self._healthz),
                        web.get("/readyz", self._readyz)])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self._beating = asyncio.create_task(self._beat(), name="heartbeat")
        addresses = self._runner.addresses  # the bound sockets' names: port 0 becomes the real port
        if addresses:
            self.port = addresses[0][1]

    async def stop(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        """The exposition; ``?name[]=<sample name>`` (repeatable) restricts it to those metrics, as
        prometheus_client's own exposition server does (a frequent scraper of one counter renders only it)."""
        names = request.query.getall("name[]", [])
        body = generate_latest(self.registry.restricted_registry(names) if names else self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        age = time.monotonic() - self.heartbeat
        if age > self.loop_stall_s:
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
