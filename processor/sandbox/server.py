"""The vendor sandbox: one aiohttp server hosting every vendor's twin plus the control API."""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Iterable

from aiohttp import web

from processor.sandbox.core import Sandbox, Twin

logger = logging.getLogger(__name__)

# vendor -> "module:Class"; one line per vendor, like processor.vendors.REGISTRY.
TWINS: dict[str, str] = {
    "qubit": "processor.sandbox.qubit:QubitTwin",
    "quicklizard": "processor.sandbox.quicklizard:QuickLizardTwin",
    "convert": "processor.sandbox.convert:ConvertTwin",
    "tracardi": "processor.sandbox.tracardi:TracardiTwin",
    "convead": "processor.sandbox.convead:ConveadTwin",
}


def available_twins() -> list[str]:
    out = []
    for name, ref in TWINS.items():
        try:
            importlib.import_module(ref.partition(":")[0])
        except ModuleNotFoundError:
            continue
        out.append(name)
    return out


def build_app(sandbox: Sandbox, vendors: Iterable[str] | None = None) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    for name in vendors if vendors is not None else available_twins():
        module, _, attr = TWINS[name].partition(":")
        twin: Twin = getattr(importlib.import_module(module), attr)(sandbox)
        app.add_routes(twin.routes())
    app.add_routes(sandbox.routes())
    return app


class SandboxServer:
    """Start/stop the sandbox inside a running event loop (tests, demo, bench)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, sandbox: Sandbox | None = None,
                 vendors: Iterable[str] | None = None) -> None:
        self.sandbox = sandbox or Sandbox()
        self.app = build_app(self.sandbox, vendors)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the bound socket's name: port 0 becomes the real port
        return self.url

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def serve_forever(host: str, port: int, vendors: Iterable[str] | None = None, keep: int = 200_000) -> None:
    server = SandboxServer(host, port, Sandbox(keep=keep), vendors=vendors)
    url = await server.start()
    logger.info("sandbox listening on %s (twins: %s)", url, ", ".join(vendors or available_twins()))
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
