"""The egress proxy: which proxy a URL's requests use (the setting, else the environment as curl and httpx
read it, NO_PROXY honoured), both senders through a real CONNECT proxy, and what check-config shows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner

from processor.egress import Egress
from processor.transport import AiohttpSender, Sender
from tests.certs import TestCA
from tests.proxy import ForwardProxy

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=30)
TIMEOUT = httpx.Timeout(5.0, connect=2.0)
P = "http://proxy.internal:3128"


@pytest.mark.parametrize(("env", "url", "proxy", "source"), [
    ({"HTTPS_PROXY": P}, "https://api.vendor.com/x", P, "HTTPS_PROXY"),
    ({"https_proxy": P, "HTTPS_PROXY": "http://other:1"}, "https://api.vendor.com/x", P, "https_proxy"),
    ({"HTTPS_PROXY": P}, "http://api.vendor.com/x", None, "no proxy set"),
    ({"HTTP_PROXY": P}, "http://api.vendor.com/x", P, "HTTP_PROXY"),
    ({"ALL_PROXY": P}, "https://api.vendor.com/x", P, "ALL_PROXY"),
    ({}, "https://api.vendor.com/x", None, "no proxy set"),
    ({"HTTPS_PROXY": P, "NO_PROXY": "vendor.com"}, "https://api.vendor.com/x", None, "NO_PROXY names api.vendor.com"),
    ({"HTTPS_PROXY": P, "NO_PROXY": ".vendor.com"}, "https://vendor.com/x", None, "NO_PROXY names vendor.com"),
    ({"HTTPS_PROXY": P, "no_proxy": "*.vendor.com"}, "https://a.b.vendor.com/x", None,
     "no_proxy names a.b.vendor.com"),
    ({"HTTPS_PROXY": P, "NO_PROXY": "notvendor.com"}, "https://vendor.com/x", P, "HTTPS_PROXY"),
    ({"HTTPS_PROXY": P, "NO_PROXY": "other.com, vendor.com:443"}, "https://vendor.com/x", None,
     "NO_PROXY names vendor.com"),
    ({"HTTPS_PROXY": P, "NO_PROXY": "*"}, "https://vendor.com/x", None, "NO_PROXY names vendor.com"),
    ({"HTTPS_PROXY": P, "NO_PROXY": "10.0.0.0/8"}, "https://10.1.2.3/x", None, "NO_PROXY names 10.1.2.3"),
    ({"HTTPS_PROXY": P, "NO_PROXY": "10.0.0.0/8"}, "https://11.1.2.3/x", P, "HTTPS_PROXY"),
    ({"HTTPS_PROXY": P, "NO_PROXY": "127.0.0.1"}, "https://127.0.0.1:8443/x", None, "NO_PROXY names 127.0.0.1"),
    ({"HTTPS_PROXY": P, "NO_PROXY": "::1"}, "https://[::1]:8443/x", None, "NO_PROXY names ::1"),
])
def test_the_environment_as_curl_reads_it(env: dict[str, str], url: str, proxy: str | None, source: str) -> None:
    route = Egress(environ=env).route(url)
    assert (route.proxy, route.source) == (proxy, source)


def test_the_setting_wins_over_the_environment_and_keeps_no_proxy() -> None:
    env = {"HTTPS_PROXY": "http://env:1", "NO_PROXY": "internal.example"}
    e = Egress("http://u:s3cret@setting:3128", environ=env)
    assert e.route("https://api.vendor.com/x").proxy == "http://u:s3cret@setting:3128"
    assert e.route("http://api.vendor.com/x").source == "relay.proxy"
    assert e.route("https://svc.internal.example/x").proxy is None
    own = Egress("http://setting:3128", "vendor.com", environ=env)
    assert own.route("https://api.vendor.com/x").source == "relay.no_proxy names api.vendor.com"
    assert own.route("https://svc.internal.example/x").proxy == "http://setting:3128"


def test_credentials_are_never_shown() -> None:
    route = Egress("http://user:s3cret@proxy.internal:3128", environ={}).route("https://api.vendor.com/")
    assert route.shown == "http://***@proxy.internal:3128 (relay.proxy)"
    assert "s3cret" not in route.shown


# -- both senders through a real proxy -------------------------------------------------------------------

@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    with ForwardProxy(hosts={"vendor.test": "127.0.0.1"}) as p:
        yield p


@pytest.fixture
async def https_twin(tmp_path: Path) -> AsyncIterator[tuple[int, TestCA]]:
    """An HTTPS server known as vendor.test (a name only the proxy resolves), its certificate from a test CA."""
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"got": len(await request.read()), "auth": request.headers.get("Proxy-Authorization")})

    ca = TestCA(tmp_path / "ca", hosts=("vendor.test",))
    app = web.Application()
    app.router.add_post("/track", answer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ca.server_context())
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1], ca  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def _senders(ca: TestCA, egress: Egress) -> dict[str, Any]:
    ctx = ca.client_context()
    return {"aiohttp": AiohttpSender(LIMITS, TIMEOUT, ssl_context=ctx, egress=egress),
            "httpx": Sender(httpx.AsyncHTTPTransport(verify=ctx), TIMEOUT, egress=egress,
                            proxied=lambda p: httpx.AsyncHTTPTransport(verify=ctx, proxy=p))}


@pytest.mark.parametrize("which", ["aiohttp", "httpx"])
@pytest.mark.parametrize("how", ["HTTPS_PROXY", "setting"])
async def test_both_senders_tunnel_through_the_proxy(proxy: ForwardProxy, https_twin: tuple[int, TestCA],
                                                     which: str, how: str) -> None:
    port, ca = https_twin
    url = proxy.url.replace("http://", "http://relay:pw@")
    egress = Egress(environ={"HTTPS_PROXY": url}) if how == "HTTPS_PROXY" else Egress(url, environ={})
    sender = _senders(ca, egress)[which]
    try:
        for _ in range(3):
            r = await sender.request("POST", f"https://vendor.test:{port}/track", b"{}", {})
            assert r.status_code == 200
    finally:
        await sender.aclose()
    assert {(s.method, s.target) for s in proxy.seen} == {("CONNECT", f"vendor.test:{port}")}
    assert {s.authorization for s in proxy.seen} == {"Basic cmVsYXk6cHc="}  # relay:pw, to the proxy only
    assert b'"auth":null' in r.content or b'"auth": null' in r.content


@pytest.mark.parametrize("which", ["aiohttp", "httpx"])
async def test_no_proxy_goes_direct(proxy: ForwardProxy, https_twin: tuple[int, TestCA], which: str) -> None:
    port, ca = https_twin
    sender = _senders(ca, Egress(environ={"HTTPS_PROXY": proxy.url, "NO_PROXY": "localhost,127.0.0.1"}))[which]
    try:
        r = await sender.request("POST", f"https://127.0.0.1:{port}/track", b"{}", {})
    finally:
        await sender.aclose()
    assert r.status_code == 200 and proxy.seen == []


def test_check_config_shows_each_vendors_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from processor.cli import main
    from processor.vendors import adapter_class

    vendors = {name: adapter_class(name).example_settings("https://sandbox.internal:8443")
               for name in ("qubit", "convead")}
    vendors["convead"]["base_url"] = "https://tracker.convead.io/watch/event"
    env: dict[str, str] = {}
    for name in vendors:
        env.update(adapter_class(name).example_env)
    config = {"kafka": {"bootstrap_servers": "127.0.0.1:9", "group_id": "g", "topics": ["t"]},
              "deadletter": {"topic": "t.dlq"},
              "relay": {"proxy": "http://${PROXY_USER}:${PROXY_PASSWORD}@proxy.internal:3128",
                        "no_proxy": "sandbox.internal"},
              "vendors": vendors}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    for k, v in {**env, "PROXY_USER": "relay", "PROXY_PASSWORD": "s3cret"}.items():
        monkeypatch.setenv(k, v)
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "s3cret" not in out
    assert "# egress of qubit: https://sandbox.internal:8443 -> direct (relay.no_proxy names sandbox.internal)" in out
    assert "# egress of convead: https://tracker.convead.io -> http://***@proxy.internal:3128 (relay.proxy)" in out
