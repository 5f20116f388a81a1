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
import logging
import time
from collections.abc import Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)


class HealthRules:
    """The relay's health rules, from facts the relay reports: ``checks`` (in order: each a reason not to
    be ready, or None), the age of the oldest unsettled message (``oldest_unsettled``) and what still
    works on unsettled messages (``owners``: vendors holding events, pending topic writes).

    * liveness (``stalled``): a message unsettled past ``stall_after_s`` that nothing owns any more: only
      a restart, redelivering it, settles it;
    * readiness (``not_ready``): the first failing check, else a stall, else a message unsettled past
      ``stall_after_s`` that something still works on (a vendor retrying in place through an outage, a
      topic write not acknowledged): an alert, not a restart;
    * ``watch``: logs when a message goes past ``stall_after_s`` and when that ends (once each)."""

    def __init__(self, stall_after_s: float, checks: Sequence[Callable[[], str | None]],
                 oldest_unsettled: Callable[[], float], owners: Callable[[], list[str]]) -> None:
        self.stall_after_s = stall_after_s
        self.checks = checks
        self.oldest_unsettled = oldest_unsettled
        self.owners = owners
        self._logged: str | None = None  # the stall last logged

    def not_ready(self) -> str | None:
        """Why the relay cannot do its work now (None: ready)."""
        for check in self.checks:
            why = check()
            if why is not None:
                return why
        return self.stalled() or self.waiting_past_stall()

    def stalled(self) -> str | None:
        oldest = self.oldest_unsettled()
        if oldest <= self.stall_after_s or self.owners():
            return None
        return f"a message has been unsettled for {oldest:.0f}s (relay.stall_after_s) and nothing works on it"

    def waiting_past_stall(self) -> str | None:
        oldest = self.oldest_unsettled()
        if oldest <= self.stall_after_s:
            return None
        owners = self.owners()
        if not owners:
            return None  # nothing owns it: liveness (``stalled``)
        return f"a message has been unsettled for {oldest:.0f}s (past relay.stall_after_s): {'; '.join(owners)}"

    def watch(self) -> None:
        why = self.stalled() or self.waiting_past_stall()
        if why is not None and self._logged is None:
            logger.error("%s", why)
        elif why is None and self._logged is not None:
            logger.info("no message unsettled past relay.stall_after_s any more")
        self._logged = why


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
        addresses = self._runner.addresses  # aiohttp's public view of the bound sockets (port 0: the one chosen)
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
