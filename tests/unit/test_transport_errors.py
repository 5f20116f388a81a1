"""Transport failures named by what happened: the one table (``processor.transport.TRANSPORT_ERRORS``) case
by case, both senders against real failures on loopback, and what the request service makes of each."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from httpx_aiohttp import AiohttpTransport

from processor import errors
from processor.transport import TRANSPORT_ERRORS, AiohttpSender, Sender, transport_error
from tests.certs import TestCA

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=30)
TIMEOUT = httpx.Timeout(2.0, connect=1.0, read=1.0)
KEY = ConnectionKey("vendor.example", 443, True, True, None, None, None)
URL = "https://vendor.example/track"


def _raised(outer: BaseException, cause: BaseException | None = None) -> BaseException:
    """``outer`` as a library raises it: ``raise outer from cause``."""
    try:
        try:
            if cause is not None:
                raise cause
        except BaseException as inner:
            raise outer from inner
        raise outer
    except BaseException as exc:
        return exc


def _cert_error() -> ssl.SSLCertVerificationError:
    e = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    e.verify_message = "unable to get local issuer certificate"
    return e


def _request_info() -> Any:
    from aiohttp import RequestInfo
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL as YURL

    return RequestInfo(YURL(URL), "POST", CIMultiDictProxy(CIMultiDict()), YURL(URL))


refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")
# (what the library raises, the relay's class): every row of the table, and the chains the libraries build
CASES: list[tuple[str, Callable[[], BaseException], type[errors.TransportError]]] = [
    ("aiohttp refused", lambda: _raised(aiohttp.ClientConnectorError(KEY, refused), refused),
     errors.ConnectionRefused),
    ("aiohttp refused, plain OSError", lambda: aiohttp.ClientConnectorError(
        KEY, OSError(errno.ECONNREFUSED, "Connect call failed")), errors.ConnectionRefused),
    ("aiohttp dns", lambda: aiohttp.ClientConnectorDNSError(KEY, socket.gaierror(-2, "Name or service not known")),
     errors.DnsFailure),
    ("aiohttp certificate", lambda: aiohttp.ClientConnectorCertificateError(KEY, _cert_error()),
     errors.TlsVerificationFailed),
    ("aiohttp fingerprint", lambda: aiohttp.ServerFingerprintMismatch(b"a", b"b", "vendor.example", 443),
     errors.TlsVerificationFailed),
    ("aiohttp ssl", lambda: aiohttp.ClientConnectorSSLError(KEY, ssl.SSLError(1, "WRONG_VERSION_NUMBER")),
     errors.TlsError),
    ("aiohttp proxy refused", lambda: aiohttp.ClientProxyConnectionError(KEY, refused), errors.ProxyError),
    ("aiohttp proxy answered", lambda: aiohttp.ClientHttpProxyError(_request_info(), (), status=407),
     errors.ProxyError),
    ("aiohttp connect timeout", lambda: aiohttp.ConnectionTimeoutError("Connection timeout to host"),
     errors.ConnectTimeout),
    ("aiohttp read timeout", lambda: aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
     errors.ReadTimeout),
    ("aiohttp server timeout", lambda: aiohttp.ServerTimeoutError("timeout"), errors.RequestTimeout),
    ("aiohttp total timer", lambda: TimeoutError(), errors.RequestTimeout),
    ("aiohttp bad answer", lambda: aiohttp.ClientResponseError(_request_info(), (), status=400,
                                                               message="Invalid status line"),
     errors.ProtocolError),
    ("aiohttp disconnected", lambda: aiohttp.ServerDisconnectedError(), errors.ConnectionLost),
    ("aiohttp payload", lambda: aiohttp.ClientPayloadError("Response payload is not completed"),
     errors.ConnectionLost),
    ("aiohttp reset", lambda: aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"),
     errors.ConnectionLost),
    ("aiohttp unreachable", lambda: aiohttp.ClientConnectorError(KEY, OSError(errno.ENETUNREACH, "unreachable")),
     errors.ConnectError),
    ("reset", lambda: ConnectionResetError(errno.ECONNRESET, "reset"), errors.ConnectionLost),
    ("broken pipe", lambda: BrokenPipeError(errno.EPIPE, "broken pipe"), errors.ConnectionLost),
    ("httpx refused", lambda: _raised(httpx.ConnectError("All connection attempts failed"),
                                      _raised(OSError("All connection attempts failed"),
                                              ExceptionGroup("attempts", [refused]))), errors.ConnectionRefused),
    ("httpx dns", lambda: _raised(httpx.ConnectError("[Errno -2] Name or service not known"),
                                  socket.gaierror(-2, "Name or service not known")), errors.DnsFailure),
    ("httpx certificate", lambda: _raised(httpx.ConnectError("certificate verify failed"), _cert_error()),
     errors.TlsVerificationFailed),
    ("httpx ssl", lambda: _raised(httpx.ConnectError("wrong version"), ssl.SSLError(1, "WRONG_VERSION_NUMBER")),
     errors.TlsError),
    ("httpx connect", lambda: httpx.ConnectError("unreachable"), errors.ConnectError),
    ("httpx proxy", lambda: httpx.ProxyError("407 Proxy Authentication Required"), errors.ProxyError),
    ("httpx connect timeout", lambda: httpx.ConnectTimeout("timed out"), errors.ConnectTimeout),
    ("httpx pool timeout", lambda: httpx.PoolTimeout("timed out"), errors.ConnectTimeout),
    ("httpx read timeout", lambda: httpx.ReadTimeout("timed out"), errors.ReadTimeout),
    ("httpx write timeout", lambda: httpx.WriteTimeout("timed out"), errors.RequestTimeout),
    ("httpx remote protocol", lambda: httpx.RemoteProtocolError("illegal status line"), errors.ProtocolError),
    ("httpx local protocol", lambda: httpx.LocalProtocolError("illegal header"), errors.ProtocolError),
    ("httpx decoding", lambda: httpx.DecodingError("incorrect header check"), errors.ProtocolError),
    ("httpx read", lambda: httpx.ReadError("reset"), errors.ConnectionLost),
    ("httpx write", lambda: httpx.WriteError("broken pipe"), errors.ConnectionLost),
    ("httpx-aiohttp's guess", lambda: _raised(httpx.ConnectTimeout("Cannot connect"),
                                              _raised(aiohttp.ClientConnectorError(KEY, refused), refused)),
     errors.ConnectionRefused),
    ("unknown", lambda: httpx.UnsupportedProtocol("gopher"), errors.UnmappedError),
]


@pytest.mark.parametrize(("raised", "ours"), [(make, ours) for _, make, ours in CASES],
                         ids=[name for name, _, _ in CASES])
def test_the_table_names_each_exception(raised: Callable[[], BaseException],
                                        ours: type[errors.TransportError]) -> None:
    got = transport_error(raised(), URL)
    assert type(got) is ours
    assert got.host == "vendor.example"
    assert str(got).startswith(ours.label)


def test_every_row_of_the_table_is_exercised() -> None:
    names = {type(make()) for _, make, _ in CASES} | {type(c) for _, make, _ in CASES for c in [make().__cause__]}
    rows = {foreign for foreign, _, _ in TRANSPORT_ERRORS}
    assert all(any(issubclass(n, row) for n in names) for row in rows)
    assert {ours for _, _, ours in CASES} == set(errors.TRANSPORT_ERRORS)


def test_a_certificate_failure_names_the_verification_error() -> None:
    got = transport_error(aiohttp.ClientConnectorCertificateError(KEY, _cert_error()), URL)
    assert got.detail == "unable to get local issuer certificate"
    assert str(got) == "tls: certificate verify failed: unable to get local issuer certificate"


# -- real failures on loopback, through each sender ------------------------------------------------------

def senders(ca: TestCA | None = None) -> list[Any]:
    ctx = ca.client_context() if ca else None
    return [AiohttpSender(LIMITS, TIMEOUT, ssl_context=ctx),
            Sender(httpx.AsyncHTTPTransport(verify=ctx or True), TIMEOUT),
            Sender(AiohttpTransport(verify=ctx or True), TIMEOUT)]  # httpx-aiohttp's own mapping beneath


async def _raises(sender: Any, url: str) -> Any:
    try:
        await sender.request("POST", url, b"{}", {"Content-Type": "application/json"})
    except Exception as exc:
        return exc
    finally:
        await sender.aclose()
    return None


@pytest.fixture
def closed_port() -> Any:
    with socket.socket() as s:  # bound, never listening: the connection is refused
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
async def https_twin(tmp_path: Path) -> AsyncIterator[str]:
    """An HTTPS server whose certificate comes from a CA no trust store knows."""
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({})

    ca = TestCA(tmp_path / "unknown-ca")
    app = web.Application()
    app.router.add_post("/track", answer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ca.server_context())
    await site.start()
    try:
        yield f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/track"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def _garbage_server(answer: bytes) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(65536)
            writer.write(answer)
            await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/track"


@pytest.mark.parametrize("which", ["aiohttp", "httpx", "httpx-aiohttp"])
async def test_a_refused_connection_is_named(closed_port: int, which: str) -> None:
    """httpx-aiohttp's own mapping raised httpx.ConnectTimeout here; the relay's table names it."""
    sender = dict(zip(["aiohttp", "httpx", "httpx-aiohttp"], senders(), strict=True))[which]
    exc = await _raises(sender, f"http://127.0.0.1:{closed_port}/track")
    assert type(exc) is errors.ConnectionRefused and exc.host == "127.0.0.1"


@pytest.mark.parametrize("which", ["aiohttp", "httpx", "httpx-aiohttp"])
async def test_an_unknown_certificate_authority_is_named(https_twin: str, which: str) -> None:
    sender = dict(zip(["aiohttp", "httpx", "httpx-aiohttp"], senders(), strict=True))[which]
    exc = await _raises(sender, https_twin)
    assert type(exc) is errors.TlsVerificationFailed
    assert exc.detail == "unable to get local issuer certificate" and exc.host == "127.0.0.1"


@pytest.mark.parametrize("which", ["aiohttp", "httpx"])
async def test_an_answer_that_is_not_http_is_a_protocol_error(which: str) -> None:
    server, url = await _garbage_server(b"SSH-2.0-OpenSSH_9.6\r\nnot http at all\r\n\r\n")
    try:
        sender = dict(zip(["aiohttp", "httpx"], senders()[:2], strict=True))[which]
        exc = await _raises(sender, url)
    finally:
        server.close()
        await server.wait_closed()
    assert type(exc) is errors.ProtocolError


@pytest.mark.parametrize("which", ["aiohttp", "httpx"])
async def test_a_connection_closed_before_the_answer_is_named(which: str) -> None:
    server, url = await _garbage_server(b"")
    try:
        sender = dict(zip(["aiohttp", "httpx"], senders()[:2], strict=True))[which]
        exc = await _raises(sender, url)
    finally:
        server.close()
        await server.wait_closed()
    # aiohttp sees the server disconnect; httpx (h11) calls a missing status line a protocol error
    assert type(exc) is (errors.ConnectionLost if which == "aiohttp" else errors.ProtocolError)


# -- the request service: reasons, metrics, the breaker and the limit ------------------------------------

def _service() -> Any:
    from processor.admission import Admission
    from processor.metrics import Metrics
    from processor.service import RequestService
    from tests.unit.test_delivery import FakeAdapter

    adapter = FakeAdapter(FakeAdapter.settings_model().model_validate(
        {"sites": {"default": {}}, "options": {}, "concurrency": 8}))
    s = adapter.settings
    return RequestService(adapter, AiohttpSender(LIMITS, TIMEOUT), Admission(100, False, 10, s.breaker,
                                                                             s.concurrency), Metrics())


async def _send(svc: Any, url: str, times: int = 1) -> Any:
    from processor.vendors.base import VendorRequest

    try:
        for _ in range(times):
            answer = await svc.send(VendorRequest(url, b"[1]", [object(), object()]))
    finally:
        await svc.client.aclose()
    return answer


def _errors(svc: Any, label: str) -> float | None:
    return svc.metrics.registry.get_sample_value("processor_vendor_transport_errors_total",
                                                 {"vendor": "fake", "error": label})


async def test_refusals_are_breaker_failures_and_not_back_pressure(closed_port: int) -> None:
    from processor.vendors.base import retryable

    svc = _service()
    answer = await _send(svc, f"http://127.0.0.1:{closed_port}/track", times=3)
    assert answer.outcomes == [retryable("connection refused")] * 2 and answer.status is None
    assert _errors(svc, "connection_refused") == 3
    assert svc.admission.limit.current == 8 and svc.admission.limit.in_use == 0  # the limit unchanged
    assert svc.admission.breaker.consecutive == 3


async def test_a_certificate_failure_is_an_error_once_naming_host_and_reason(
        https_twin: str, caplog: pytest.LogCaptureFixture) -> None:
    from processor.vendors.base import retryable

    svc = _service()
    with caplog.at_level(logging.ERROR, logger="processor.service"):
        answer = await _send(svc, https_twin, times=3)
    assert answer.outcomes == [retryable("tls: certificate verify failed")] * 2
    assert _errors(svc, "tls_verify_failed") == 3
    assert svc.admission.limit.current == 8
    logged = [r.getMessage() for r in caplog.records if "TLS" in r.getMessage()]
    assert len(logged) == 1
    assert "127.0.0.1" in logged[0] and "unable to get local issuer certificate" in logged[0]


async def test_a_read_timeout_is_back_pressure() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(65536)
            await reader.read(65536)  # until the client gives up and closes
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    svc = _service()
    svc.client = AiohttpSender(LIMITS, httpx.Timeout(5.0, connect=1.0, read=0.2))
    try:
        answer = await _send(svc, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/track")
    finally:
        server.close()
        await server.wait_closed()
    from processor.vendors.base import retryable

    assert answer.outcomes == [retryable("read timeout")] * 2
    assert _errors(svc, "read_timeout") == 1
    assert svc.admission.limit.current == 4  # halved


async def test_anything_else_the_stack_raises_is_an_unmapped_error_and_gives_the_limit_back(
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug or an error of the HTTP stack the table does not name: retryable, logged naming its type, and
    the request's concurrency slot released (the service catches the relay's classes only)."""
    from processor.vendors.base import retryable

    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("Session is closed")

    svc = _service()
    svc.client = Sender(httpx.MockTransport(broken), TIMEOUT)
    with caplog.at_level(logging.WARNING, logger="processor.service"):
        answer = await _send(svc, "https://vendor.example/track", times=2)
    assert answer.outcomes == [retryable("transport error")] * 2
    assert _errors(svc, "other") == 2
    assert svc.admission.limit.in_use == 0 and svc.admission.limit.current == 8
    assert any("RuntimeError: Session is closed" in r.getMessage() for r in caplog.records)
