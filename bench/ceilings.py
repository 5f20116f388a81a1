"""The two physical ceilings, and the adapters' floor, measured on the same machine in the same run as the relay.

* Decode: a bare loop with the relay's consumer settings (librdkafka, the same
  client settings and ``consume()`` batch size) that consumes the benchmark
  topic and decodes every value with fastavro, doing nothing else.
* HTTP: a bare loop that sends the relay's own requests (each adapter
  ``plan``s real batches of the benchmark's events, cut by the same batch
  limits) to the same sandbox, through the same sender (``make_sender``: httpx
  over the configured transport, the vendor's pool limits) with the vendor's
  concurrency, doing nothing else. Measured per vendor alone, then combined
  in the scenario's own proportions of requests (``mix_ceiling``): sending
  every vendor flat out at once would let the big array requests crowd out
  the small ones and measure a mix the relay never sends.
* Client: the relay's sender against aiohttp's own client, CPU a request (``client_ceiling``).
* Adapters' floor: the CPU every event costs before the relay does anything of its own (decode,
  validate, batch, each vendor's ``plan``), against decoding alone (``adapter_floor``): the highest
  decode ratio any relay with these adapters could reach, and what each request carries of it.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import time
import uuid
from typing import Any

import yaml
from confluent_kafka import Consumer, TopicPartition
from fastavro import parse_schema, schemaless_reader

from processor.batching import Batcher
from processor.codec import EMBEDDED_IDS, Decoder, load_canonical_schemas
from processor.config import load_config
from processor.devstack.broker import LOCAL_CONSUMER_SETTINGS
from processor.events import Event, Source
from processor.transport import make_sender
from processor.validation import validate_all
from processor.vendors import adapter_class
from processor.vendors.base import Adapter, VendorRequest


def decode_ceiling(bootstrap: str, topic: str, events: int, consume_batch: int = 1000) -> dict[str, Any]:
    """Events/s of consume + fastavro decode, from the first message to the last."""
    readers = load_canonical_schemas()
    writers = {sid: parse_schema(readers[name]) for sid, name in EMBEDDED_IDS.items()}
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-decode-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False, "log_level": 3,
                  **LOCAL_CONSUMER_SETTINGS})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, 0) for p in parts])  # no group join: the clock starts at the data
        n = 0
        started = None
        deadline = time.monotonic() + 600
        while n < events and time.monotonic() < deadline:
            msgs = c.consume(consume_batch, 0.5)
            if not msgs:
                continue
            if started is None:
                started = time.perf_counter()
            for m in msgs:
                if m.error() is not None:
                    continue
                v = m.value()
                buf = io.BytesIO(v)
                buf.seek(5)
                schemaless_reader(buf, writers[int.from_bytes(v[1:5], "big")], None)
                n += 1
        elapsed = time.perf_counter() - (started or time.perf_counter())
    finally:
        c.close()
    return {"events": n, "seconds": round(elapsed, 3), "events_per_s": round(n / max(elapsed, 1e-9), 1)}


def decoded_events(values: list[tuple[bytes, bytes]]) -> list[Event]:
    """The benchmark's (key, value) messages as the relay holds them after decoding, offsets in order."""
    decoder = Decoder()
    events = []
    for i, (key, value) in enumerate(values):
        kind, record = decoder.decode(value)
        events.append(Event.of(kind, record, Source("bench", 0, i, record["event_time"], key, value, None)))  # type: ignore[arg-type]
    return events


def configured_adapters(vendors: dict[str, Any], env: dict[str, str]) -> list[tuple[Adapter[Any, Any], Any]]:
    """(adapter, settings) of each enabled vendor, configured as the relay configures it."""
    from bench.scenarios import relay_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(yaml.safe_dump(relay_config("127.0.0.1:9", "t", "g", vendors, 0)))
        f.flush()
        config = load_config(f.name, env)
    return [(adapter_class(name)(settings), settings) for name, settings in config.enabled_vendors().items()]


def planned_requests(vendors: dict[str, Any], env: dict[str, str], values: list[tuple[bytes, bytes]],
                     sample: int) -> tuple[dict[str, tuple[Adapter[Any, Any], list[VendorRequest]]], int]:
    """Per vendor: the adapter (configured as the relay is) and the requests it plans for the first
    ``sample`` benchmark events, batched by its effective batch limits; and the number of events."""
    events = decoded_events(values[:sample])
    out = {}
    for adapter, settings in configured_adapters(vendors, env):
        name = adapter.name
        batcher = Batcher(settings.batch)  # the vendor's default batch limits unless configured
        requests: list[VendorRequest] = []
        closed = [b for b in (batcher.add(e) for e in events if adapter.takes(e.kind)) if b]
        last = batcher.flush()
        for b in [*closed, *([last] if last else [])]:
            plan = adapter.plan(b)
            requests += plan.requests
        out[name] = (adapter, requests)
    return out, len(events)


def _decode_round(decoder: Decoder, values: list[bytes]) -> float:
    t0 = time.process_time()
    for value in values:
        decoder.decode(value)
    return time.process_time() - t0


def _floor_round(decoder: Decoder, values: list[bytes], adapters: list[tuple[Adapter[Any, Any], Batcher]],
                 poll: int) -> tuple[float, int]:
    """CPU seconds to decode, validate, batch and plan ``values`` a poll at a time; requests planned."""
    requests = 0
    t0 = time.process_time()
    for start in range(0, len(values), poll):
        events = []
        for offset, value in enumerate(values[start:start + poll], start):
            kind, record = decoder.decode(value)
            events.append(Event(kind, record, "bench", 0, offset, None, None, value, None))  # type: ignore[arg-type]
        validate_all(events)
        for adapter, batcher in adapters:
            for batch in batcher.add_many([e for e in events if adapter.takes(e.kind)]):
                requests += len(adapter.plan(batch).requests)
    for adapter, batcher in adapters:
        last = batcher.flush()
        if last:
            requests += len(adapter.plan(last).requests)
    return time.process_time() - t0, requests


def adapter_floor(vendors: dict[str, Any], env: dict[str, str], values: list[tuple[bytes, bytes]], sample: int,
                  rounds: int = 3, poll: int = 1000) -> dict[str, Any]:
    """The work no relay with these adapters can skip, in this process's CPU time: decode (the relay's
    ``Decoder``), validate, batch and ``plan`` every event for every vendor (no Kafka, no HTTP, no
    settlement), against decoding alone, the same values in alternating rounds, median of each.

    ``decode_over_floor`` bounds the decode ratio of the scenario (a relay that did nothing else but
    this work would reach it); ``floor_cpu_us_per_request`` is what each request carries of it."""
    raw = [v for _, v in values[:sample]]
    decoder = Decoder()
    _decode_round(decoder, raw[:poll])  # warm-up: writer schemas cached, code paths hot
    decode: list[float] = []
    floor: list[float] = []
    requests = 0
    for _ in range(rounds):
        decode.append(_decode_round(decoder, raw))
        adapters = [(a, Batcher(s.batch)) for a, s in configured_adapters(vendors, env)]
        cpu, requests = _floor_round(decoder, raw, adapters, poll)
        floor.append(cpu)
    n = max(len(raw), 1)
    d, f = sorted(decode)[rounds // 2], sorted(floor)[rounds // 2]
    return {"events": len(raw), "rounds": rounds, "requests": requests,
            "decode_cpu_us_per_event": round(d / n * 1e6, 2), "floor_cpu_us_per_event": round(f / n * 1e6, 2),
            "decode_over_floor": round(d / max(f, 1e-12), 3),
            "floor_cpu_us_per_request": round(f / max(requests, 1) * 1e6, 1) if requests else None}


async def _vendor_ceiling(adapter: Adapter[Any, Any], requests: list[VendorRequest], transport: str,
                          seconds: float, warmup_s: float) -> dict[str, Any]:
    client = make_sender(adapter, transport)
    conc = adapter.settings.concurrency
    count = carried = bad = 0
    measuring = False
    stop_at = time.monotonic() + warmup_s + seconds

    async def worker(i: int) -> None:
        nonlocal count, carried, bad
        while time.monotonic() < stop_at:
            req = requests[i % len(requests)]
            i += conc
            r = await client.request(req.method, req.url, content=req.content, headers=req.headers)
            if measuring:
                count += 1
                carried += len(req.events)
                bad += r.status_code >= 300

    try:
        tasks = [asyncio.create_task(worker(k)) for k in range(conc)]
        await asyncio.sleep(warmup_s)
        measuring = True
        t0 = time.monotonic()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
    finally:
        await client.aclose()
    return {"requests_per_s": round(count / elapsed, 1), "events_per_s": round(carried / elapsed, 1),
            "concurrency": conc, "non_2xx": bad}


def vendor_ceiling(adapter: Adapter[Any, Any], requests: list[VendorRequest], transport: str, seconds: float,
                   warmup_s: float = 0.5) -> dict[str, Any]:
    """Requests/s of one vendor's planned requests sent flat out, alone, with its concurrency."""
    return asyncio.run(_vendor_ceiling(adapter, requests, transport, seconds, warmup_s))


def mix_ceiling(per_vendor: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The ceiling for the scenario's mix of requests. Each vendor ``v`` costs ``r_v`` requests per
    consumed event (from the planned sample) and its requests go at most ``C_v``/s alone; the vendors
    share the same client and sandbox, so one event's HTTP takes ``sum(r_v / C_v)`` seconds of that
    capacity: events/s = 1 / that, requests/s = sum(r_v) x events/s."""
    cost = sum(v["requests_per_event"] / v["requests_per_s"] for v in per_vendor.values() if v["requests_per_s"])
    events_per_s = 1 / cost if cost else 0.0
    requests_per_s = sum(v["requests_per_event"] for v in per_vendor.values()) * events_per_s
    return {"events_per_s": round(events_per_s, 1), "requests_per_s": round(requests_per_s, 1)}


async def _client_round(send: Any, requests: list[VendorRequest], count: int, concurrency: int) -> float:
    """CPU seconds of this process to send ``count`` requests, ``concurrency`` at a time (a gather of
    workers, as the relay sends a batch's requests)."""
    it = iter(range(count))

    async def worker() -> None:
        for i in it:
            req = requests[i % len(requests)]
            await send(req)

    t0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - t0


async def _client_ceiling(adapter: Adapter[Any, Any], requests: list[VendorRequest], concurrency: int,
                          count: int, rounds: int) -> dict[str, Any]:
    import aiohttp

    sender = make_sender(adapter)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
    statuses: dict[str, list[int]] = {"relay_sender": [], "aiohttp": []}

    async def via_sender(req: VendorRequest) -> None:
        r = await sender.request(req.method, req.url, req.content, req.headers)
        statuses["relay_sender"].append(r.status_code)

    async def via_aiohttp(req: VendorRequest) -> None:
        async with session.request(req.method, req.url, data=req.content, headers=req.headers) as r:
            await r.read()
            statuses["aiohttp"].append(r.status)

    cpu: dict[str, list[float]] = {"relay_sender": [], "aiohttp": []}
    try:
        for send in (via_sender, via_aiohttp):  # warm-up: connections open, code paths hot
            await _client_round(send, requests, concurrency * 4, concurrency)
        for _ in range(rounds):  # alternating: the machine's drift falls on both alike
            cpu["relay_sender"].append(await _client_round(via_sender, requests, count, concurrency))
            cpu["aiohttp"].append(await _client_round(via_aiohttp, requests, count, concurrency))
    finally:
        await sender.aclose()
        await session.close()
    per = {k: sorted(v)[len(v) // 2] / count * 1e6 for k, v in cpu.items()}  # median round, us a request
    return {"vendor": adapter.name, "concurrency": concurrency, "requests_per_round": count, "rounds": rounds,
            "relay_sender_cpu_us_per_request": round(per["relay_sender"], 1),
            "aiohttp_cpu_us_per_request": round(per["aiohttp"], 1),
            "sender_over_aiohttp": round(per["relay_sender"] / max(per["aiohttp"], 1e-9), 2),
            "non_2xx": {k: sum(s >= 300 for s in v) for k, v in statuses.items()}}


def client_ceiling(adapter: Adapter[Any, Any], requests: list[VendorRequest], concurrency: int = 32,
                   count: int = 2000, rounds: int = 3) -> dict[str, Any]:
    """Client CPU a request: the relay's sender (``make_sender``, as the relay sends) against aiohttp's own
    client, the same requests to the same sandbox at the same concurrency, in alternating rounds; the
    median round of each. The sandbox is another process: only the client's CPU is counted."""
    return asyncio.run(_client_ceiling(adapter, requests, concurrency, count, rounds))
