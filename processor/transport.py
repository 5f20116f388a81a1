"""The relay's HTTP senders: one call, ``request(method, url, content, headers)``, answering with a
``Reply`` (status, headers, body) or raising one of the relay's ``TransportError`` classes (processor.errors).

* ``Sender`` hands an ``httpx.Request`` to any httpx transport (httpx's own, or ``httpx.MockTransport``
  in tests) and reads the body.
* ``AiohttpSender``, the default, goes straight onto aiohttp's client: no ``httpx.Request`` and no
  ``httpx.Response`` per request (URL parsing, header normalisation, a byte stream and its decoder),
  which is most of what the relay paid per request on top of aiohttp's own client (bench/README.md,
  the client ceiling row). A body with a ``Content-Encoding`` is decoded by httpx, as it was through httpx.

Whatever either stack raises is translated at this one boundary by one table, ``TRANSPORT_ERRORS``: the
first row that any exception in the raised chain matches (its causes, the OSError aiohttp keeps, the
members of an exception group) names what happened. Rows go from what happened (a refused connection,
a certificate the trust store does not know) to how the library saw it, so the truth wins over a
library's guess (httpx-aiohttp's own mapping turns a refused connection and a certificate failure into
``httpx.ConnectTimeout``; this table does not use it).

Both send through the egress proxy ``processor.egress`` names for the URL (the setting, else
``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` as curl and httpx read them), decided per URL by the relay, never
by aiohttp's ``trust_env`` (a thread hop a request, and ``.netrc`` credentials sent to vendors).
Neither follows redirects (an answer is the answer: adapters classify 3xx) nor keeps cookies. Each reads at
most ``max_body`` bytes of an answer (the vendor's ``max_answer_bytes``): a longer body is cut there, marked
``oversize`` (an unrecognised answer for the request service), and the rest is never read.
"""

from __future__ import annotations

import errno
import math
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import httpx

from processor.egress import Egress
from processor.errors import (
    ConnectError,
    ConnectionLost,
    ConnectionRefused,
    ConnectTimeout,
    DnsFailure,
    ProtocolError,
    ProxyError,
    ReadTimeout,
    RequestTimeout,
    TlsError,
    TlsVerificationFailed,
    TransportError,
    UnmappedError,
)

# (foreign exception, errno or None, ours): the first row that any exception of the raised chain matches
# names the failure. What happened first (the OSError under a library's class; the proxy's own refusal is a
# proxy error), then aiohttp's classes (a wrapper over aiohttp, such as httpx-aiohttp, guesses: what aiohttp
# raised beneath it is the fact), then httpx's, each from specific to general, then the stdlib's.
TRANSPORT_ERRORS: tuple[tuple[type[BaseException], int | None, type[TransportError]], ...] = (
    (aiohttp.ClientProxyConnectionError, None, ProxyError),
    (aiohttp.ClientHttpProxyError, None, ProxyError),
    (httpx.ProxyError, None, ProxyError),
    (ssl.SSLCertVerificationError, None, TlsVerificationFailed),  # aiohttp's certificate error is one too
    (aiohttp.ServerFingerprintMismatch, None, TlsVerificationFailed),
    (aiohttp.ClientConnectorDNSError, None, DnsFailure),
    (socket.gaierror, None, DnsFailure),
    (ConnectionRefusedError, None, ConnectionRefused),
    (OSError, errno.ECONNREFUSED, ConnectionRefused),
    (ssl.SSLError, None, TlsError),
    (aiohttp.ClientSSLError, None, TlsError),
    # aiohttp
    (aiohttp.ConnectionTimeoutError, None, ConnectTimeout),
    (aiohttp.SocketTimeoutError, None, ReadTimeout),
    (aiohttp.ServerTimeoutError, None, RequestTimeout),
    (aiohttp.ClientResponseError, None, ProtocolError),  # an answer aiohttp cannot parse
    (aiohttp.ServerDisconnectedError, None, ConnectionLost),
    (aiohttp.ClientPayloadError, None, ConnectionLost),
    (aiohttp.ClientConnectorError, None, ConnectError),
    (aiohttp.ClientOSError, None, ConnectionLost),  # an OSError on an open connection
    # httpx
    (httpx.ConnectTimeout, None, ConnectTimeout),
    (httpx.PoolTimeout, None, ConnectTimeout),
    (httpx.ReadTimeout, None, ReadTimeout),
    (httpx.TimeoutException, None, RequestTimeout),  # WriteTimeout
    (httpx.RemoteProtocolError, None, ProtocolError),
    (httpx.LocalProtocolError, None, ProtocolError),
    (httpx.DecodingError, None, ProtocolError),  # a Content-Encoding that does not decode
    (httpx.ReadError, None, ConnectionLost),
    (httpx.WriteError, None, ConnectionLost),
    (httpx.ConnectError, None, ConnectError),
    # the stdlib
    (TimeoutError, None, RequestTimeout),  # aiohttp's whole-request timer
    (ConnectionResetError, None, ConnectionLost),
    (BrokenPipeError, None, ConnectionLost),
)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, the errors aiohttp keeps (``os_error``, ``certificate_error``) and
    the members of exception groups, each once, at most 32."""
    seen: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo and len(seen) < 32:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend((getattr(e, "certificate_error", None), getattr(e, "os_error", None), e.__cause__,
                     e.__context__))
    return seen


def _detail(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientConnectorCertificateError):  # an ssl.CertificateError itself too
        return _detail(e.certificate_error)
    if isinstance(e, ssl.SSLCertVerificationError) and getattr(e, "verify_message", None):
        return str(e.verify_message)
    return (str(e) or type(e).__name__)[:200]


def transport_error(exc: BaseException, url: str) -> TransportError:
    """``exc``, raised by an HTTP stack while sending to ``url``, as the relay's class (the table's first
    matching row; ``UnmappedError`` naming the type when none matches)."""
    if isinstance(exc, TransportError):
        return exc
    host = urlsplit(url).hostname or ""
    chain = _chain(exc)
    for foreign, code, ours in TRANSPORT_ERRORS:
        for e in chain:
            if isinstance(e, foreign) and (code is None or getattr(e, "errno", None) == code):
                return ours(_detail(e), host)
    return UnmappedError(f"{type(exc).__name__}: {_detail(exc)}", host)


MAX_BODY = 1_048_576  # the default of a vendor's max_answer_bytes


class Reply(Protocol):
    """What a sender answers with; ``httpx.Response`` is one."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> bytes: ...


class HttpSender(Protocol):
    """What the delivery pipeline sends through. ``total_s``: the whole-request timeout the sender enforces
    itself (past it a request raises ``TimeoutError``), or None when it cannot: then the request service
    bounds each request with ``asyncio.timeout``."""

    total_s: float | None

    async def request(self, method: str, url: str, content: bytes, headers: Mapping[str, str]) -> Reply: ...

    async def aclose(self) -> None: ...


class Answered:
    """A reply as read: the status, the headers (case-insensitive) and the body as sent; ``oversize``: the
    body is longer than the sender's ``max_body``, and ``content`` is its first ``max_body`` bytes only."""

    __slots__ = ("content", "headers", "oversize", "status_code")

    def __init__(self, status_code: int, headers: Mapping[str, str], content: bytes, oversize: bool = False) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.oversize = oversize


async def _read_capped(r: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of ``r``'s body, and whether there was more (then the rest is never read:
    the connection is closed, not reused)."""
    if r.content_length is not None and r.content_length > limit:
        return await r.content.read(256), True
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await r.content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], True


class Sender:
    """An ``httpx.Request`` handed to an httpx transport, its body read.

    httpx.AsyncClient wraps every request in layers a relay does not use (a cookie jar, auth and
    redirect handling, default-header merging): the transport is called directly. Its errors are
    translated by ``TRANSPORT_ERRORS``. httpx has no whole-request timeout: ``total_s`` is None."""

    total_s: float | None = None

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout | None = None,
                 max_body: int = MAX_BODY, egress: Egress | None = None,
                 proxied: Callable[[str], httpx.AsyncBaseTransport] | None = None) -> None:
        self.transport = transport
        self._timeout = (timeout or httpx.Timeout(10.0)).as_dict()
        self._max_body = max_body
        self._egress = egress
        self._proxied = proxied  # a transport through one proxy (made on first use, one per proxy)
        self._through: dict[str, httpx.AsyncBaseTransport] = {}

    def _transport(self, url: str) -> httpx.AsyncBaseTransport:
        proxy = self._egress.proxy_for(url) if self._egress is not None else None
        if proxy is None or self._proxied is None:
            return self.transport
        through = self._through.get(proxy)
        if through is None:
            through = self._through[proxy] = self._proxied(proxy)
        return through

    async def request(self, method: str, url: str, content: bytes, headers: Mapping[str, str]) -> Reply:
        request = httpx.Request(method, url, content=content, headers=headers,
                                extensions={"timeout": self._timeout})
        limit = self._max_body
        chunks: list[bytes] = []
        size = 0
        try:
            response = await self._transport(url).handle_async_request(request)
            try:
                async for chunk in response.aiter_bytes():  # decoded; never more than the limit kept
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        break
            finally:
                await response.aclose()
        except Exception as exc:  # everything the stack raises leaves as the relay's class (the table)
            raise transport_error(exc, url) from exc
        body = b"".join(chunks)
        return Answered(response.status_code, response.headers, body[:limit], oversize=size > limit)

    async def aclose(self) -> None:
        await self.transport.aclose()
        for through in self._through.values():
            await through.aclose()
        self._through.clear()


class AiohttpSender:
    """aiohttp's client with the vendor's pool limits and timeouts, nothing in between.

    The session is made on first use (inside the running event loop). Timeouts as httpx-aiohttp sets
    them from an ``httpx.Timeout``: connect -> ``sock_connect``, read -> ``sock_read``, pool -> ``connect``
    (the wait for a pooled connection); and ``total_s``, when given, bounds the whole request (pool wait,
    connect, send, the answer and its body) with aiohttp's own timer, to the moment as ``asyncio.timeout``
    would (no rounding up to a whole second): past it the request raises ``TimeoutError``, as
    ``asyncio.timeout`` around it did, and the request service sets no timer of its own."""

    def __init__(self, limits: httpx.Limits, timeout: httpx.Timeout | None = None,
                 ssl_context: ssl.SSLContext | None = None, total_s: float | None = None,
                 max_body: int = MAX_BODY, egress: Egress | None = None) -> None:
        self._limits = limits
        self._max_body = max_body
        self._egress = egress
        self.total_s = total_s
        t = (timeout or httpx.Timeout(10.0)).as_dict()
        exact = {"ceil_threshold": math.inf} if total_s is not None else {}
        self._timeout = aiohttp.ClientTimeout(total=total_s, sock_connect=t.get("connect"), sock_read=t.get("read"),
                                              connect=t.get("pool"), **exact)
        self._ssl = ssl_context if ssl_context is not None else httpx.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._limits.max_connections or 0, ssl=self._ssl,
                                         keepalive_timeout=self._limits.keepalive_expiry)
        self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                              auto_decompress=False, timeout=self._timeout)
        return self._session

    async def request(self, method: str, url: str, content: bytes, headers: Mapping[str, str]) -> Reply:
        session = self._session or self._open()
        try:
            async with session.request(method, url, data=content or None, headers=headers, allow_redirects=False,
                                       proxy=self._egress.proxy_for(url) if self._egress is not None else None) as r:
                status, raw = r.status, r.headers
                body, oversize = await _read_capped(r, self._max_body)
            if "Content-Encoding" in raw and not oversize:  # rare for a vendor's answer: httpx decodes it
                decoded = httpx.Response(status, headers=list(r.raw_headers), content=body)
                if len(decoded.content) <= self._max_body:
                    return decoded
                return Answered(status, decoded.headers, decoded.content[:self._max_body], oversize=True)
        except Exception as exc:  # everything the stack raises leaves as the relay's class (the table)
            raise transport_error(exc, url) from exc
        return Answered(status, raw, body, oversize)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def make_sender(adapter: Any, transport: str = "aiohttp", egress: Egress | None = None) -> HttpSender:
    """The vendor's sender: pool limits from its concurrency, its timeouts, its answer size limit, the
    egress proxy ``egress`` names for each URL (default: the environment's, processor.egress);
    ``transport`` is aiohttp's client (the default) or httpx's own transport."""
    egress = egress if egress is not None else Egress()
    s = adapter.settings
    limits = httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency,
                          keepalive_expiry=30)
    timeout = httpx.Timeout(s.timeout.total_s, connect=s.timeout.connect_s)
    if transport == "aiohttp":
        return AiohttpSender(limits, timeout, total_s=s.timeout.total_s, max_body=s.max_answer_bytes,
                             egress=egress)
    return Sender(httpx.AsyncHTTPTransport(limits=limits), timeout, max_body=s.max_answer_bytes, egress=egress,
                  proxied=lambda proxy: httpx.AsyncHTTPTransport(limits=limits, proxy=proxy))
