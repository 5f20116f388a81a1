"""Shared fixtures for adapter tests: the sandbox on a free loopback port, and a way
to send an adapter's planned requests to it and read back the per-event outcomes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from processor.sandbox import SandboxServer
from processor.vendors.base import Adapter, Outcome, Response, VendorRequest


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    server = SandboxServer("127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def exchange(adapter: Adapter, requests: list[VendorRequest]) -> list[tuple[Response, list[Outcome]]]:
    """Send each request as the relay would (no retries) and interpret the answer."""
    out = []
    async with httpx.AsyncClient(timeout=10) as client:
        for req in requests:
            r = await client.request(req.method, req.url, content=req.content, headers=dict(req.headers))
            resp = Response(r.status_code, r.headers, r.content)
            outcomes = adapter.interpret(req, resp)
            assert len(outcomes) == len(req.events)
            out.append((resp, outcomes))
    return out
