"""The sandbox's shared machinery: recording what each twin accepted, and
injecting faults on demand. Twins (one module per vendor) validate requests
as strictly as their documents say and answer with the documented shapes.

Control API (JSON), served next to the twins:

* ``GET  /_sandbox/stats``              -> {vendor: {requests, accepted, rejected, faults}}
* ``GET  /_sandbox/received/{vendor}``  -> {"items": [...]} what the twin accepted (one item per event row)
* ``PUT  /_sandbox/faults/{vendor}``    <- Faults fields; ``DELETE`` clears them
* ``POST /_sandbox/reset``              clears records, counters and faults
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Faults:
    """What to break for one vendor. Rates are probabilities per request (per item for partial)."""

    error_rate: float = 0.0          # answer error_status
    error_status: int = 503
    throttle_rate: float = 0.0       # answer 429 with Retry-After
    retry_after_s: float = 1.0
    burst: int = 0                   # the next N requests answer error_status, then normal
    latency_ms: float = 0.0          # added to every request
    timeout_rate: float = 0.0        # hold the request for hang_s (the client times out)
    hang_s: float = 30.0
    drop_rate: float = 0.0           # close the connection without an answer
    partial_failure_rate: float = 0.0  # per item: the twin reports it failed in a documented shape

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Faults:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        return cls(**data)


class Sandbox:
    """State shared by all twins in one server."""

    def __init__(self, keep: int = 200_000, seed: int | None = None) -> None:
        self.keep = keep
        self.rng = random.Random(seed)
        self.received: dict[str, deque[Any]] = {}
        self.stats: dict[str, Counter[str]] = {}
        self.faults: dict[str, Faults] = {}
        self.state: dict[str, dict[str, Any]] = {}  # what a twin's vendor keeps between requests (sessions)

    def _stats(self, vendor: str) -> Counter[str]:
        return self.stats.setdefault(vendor, Counter())

    def record(self, vendor: str, items: Iterable[Any]) -> None:
        box = self.received.get(vendor)
        if box is None:
            box = self.received[vendor] = deque(maxlen=self.keep or None)
        n = 0
        for item in items:
            if self.keep:
                box.append(item)
            n += 1
        self._stats(vendor)["accepted"] += n

    def count_rejected(self, vendor: str, n: int = 1) -> None:
        self._stats(vendor)["rejected"] += n

    def count(self, vendor: str, key: str, n: int = 1) -> None:
        """Any other per-vendor counter shown in /_sandbox/stats (e.g. events a twin silently ignores)."""
        self._stats(vendor)[key] += n

    def fail_item(self, vendor: str) -> bool:
        f = self.faults.get(vendor)
        return bool(f and f.partial_failure_rate and self.rng.random() < f.partial_failure_rate)

    async def apply_faults(self, vendor: str, request: web.Request) -> web.StreamResponse | None:
        """Count the request and, if a fault fires, return its response (or break the connection)."""
        stats = self._stats(vendor)
        stats["requests"] += 1
        f = self.faults.get(vendor)
        if f is None:
            return None
        if f.latency_ms:
            await asyncio.sleep(f.latency_ms / 1000)
        rnd = self.rng.random
        if f.burst > 0:
            f.burst -= 1
            stats["faults"] += 1
            return error_response(f.error_status, "injected burst")
        if f.drop_rate and rnd() < f.drop_rate:
            stats["faults"] += 1
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # aiohttp drops the request without an answer
        if f.timeout_rate and rnd() < f.timeout_rate:
            stats["faults"] += 1
            await asyncio.sleep(f.hang_s)
            return error_response(504, "injected hang")
        if f.throttle_rate and rnd() < f.throttle_rate:
            stats["faults"] += 1
            return web.json_response(
                {"status": 429, "message": "Too Many Requests"}, status=429,
                headers={"Retry-After": f"{f.retry_after_s:g}"},
            )
        if f.error_rate and rnd() < f.error_rate:
            stats["faults"] += 1
            return error_response(f.error_status, "injected error")
        return None

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_sandbox/stats", self._get_stats),
            web.get("/_sandbox/received/{vendor}", self._get_received),
            web.put("/_sandbox/faults/{vendor}", self._put_faults),
            web.delete("/_sandbox/faults/{vendor}", self._delete_faults),
            web.post("/_sandbox/reset", self._reset),
        ]

    async def _get_stats(self, request: web.Request) -> web.Response:
        return json_response({v: dict(c) for v, c in self.stats.items()})

    async def _get_received(self, request: web.Request) -> web.Response:
        return json_response({"items": list(self.received.get(request.match_info["vendor"], ()))})

    async def _put_faults(self, request: web.Request) -> web.Response:
        try:
            faults = Faults.from_json(await request.json())
        except (ValueError, TypeError) as exc:
            return json_response({"error": str(exc)}, status=400)
        self.faults[request.match_info["vendor"]] = faults
        return json_response(asdict(faults))

    async def _delete_faults(self, request: web.Request) -> web.Response:
        self.faults.pop(request.match_info["vendor"], None)
        return json_response({})

    async def _reset(self, request: web.Request) -> web.Response:
        self.received.clear()
        self.stats.clear()
        self.faults.clear()
        self.state.clear()
        return json_response({})


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers=headers)


def error_response(status: int, message: str) -> web.Response:
    return json_response({"status": status, "message": message}, status=status)


async def read_json(request: web.Request) -> tuple[Any, str | None]:
    """The body as strict RFC 8259 JSON (orjson refuses ``NaN``, ``Infinity`` and ``-Infinity``, which
    Python's json module would take), or an error message naming what is wrong."""
    ctype = request.headers.get("Content-Type", "")
    if not ctype.startswith("application/json"):
        return None, f"Content-Type must be application/json, got {ctype or 'nothing'}"
    try:
        return orjson.loads(await request.read()), None
    except orjson.JSONDecodeError as exc:
        return None, f"body is not JSON: {exc}"


class Twin:
    """Base of a vendor's sandbox twin: ``routes`` maps its documented paths to handlers."""

    name: str

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    def guarded(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        """Wrap a handler with the vendor's fault injection."""

        async def wrapper(request: web.Request) -> web.StreamResponse:
            fault = await self.sandbox.apply_faults(self.name, request)
            if fault is not None:
                return fault
            return await handler(request)  # type: ignore[no-any-return]

        return wrapper
