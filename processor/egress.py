"""Which egress proxy a vendor request goes through, decided the same way for both senders.

The explicit setting (``relay.proxy``, its bypass list ``relay.no_proxy``) wins; without it the environment
is read as curl and httpx read it: ``https_proxy``/``HTTPS_PROXY`` for https URLs, ``http_proxy``/
``HTTP_PROXY`` for http ones, ``all_proxy``/``ALL_PROXY`` for either (lower case first), and
``no_proxy``/``NO_PROXY`` lists what goes direct: ``*`` (everything), a host name (itself and its
subdomains; a leading ``.`` or ``*.`` is the same), an IP address or a CIDR range; a ``:port`` on an entry
is ignored. A proxy's credentials (``http://user:password@proxy:3128``) are never printed
(``Route.shown``).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

_ENV = {"https": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
        "http": ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")}


@dataclass(frozen=True, slots=True)
class Route:
    """Where requests to one URL go: ``proxy`` (None: direct) and why (the setting or variable that said so)."""

    proxy: str | None
    source: str

    @property
    def shown(self) -> str:
        """For check-config and logs: the proxy without credentials, and why."""
        if self.proxy is None:
            return f"direct ({self.source})"
        return f"{redact_userinfo(self.proxy)} ({self.source})"


def redact_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def _bypassed(host: str, no_proxy: str) -> bool:
    host = host.lower().strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
                continue
            except ValueError:
                pass
        if entry.count(":") == 1:  # host:port (an IPv6 address has more colons)
            entry = entry.split(":", 1)[0]
        entry = entry.removeprefix("*").lstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


class Egress:
    """``route(url)``: the proxy for a request to ``url``, from the setting or the environment (read once)."""

    def __init__(self, proxy: str | None = None, no_proxy: str | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._proxy = proxy or None
        self._env = {scheme: next(((name, env[name]) for name in names if env.get(name)), None)
                     for scheme, names in _ENV.items()}
        env_no = next(((n, env[n]) for n in ("no_proxy", "NO_PROXY") if env.get(n)), None)
        if self._proxy is not None:
            self._no = ("relay.no_proxy", no_proxy) if no_proxy else env_no
        else:
            self._no = env_no
        self._routes: dict[str, Route] = {}

    def route(self, url: str) -> Route:
        got = self._routes.get(url)
        if got is None:
            got = self._decide(url)
            if len(self._routes) >= 4096:  # URLs repeat per vendor and site: a bound, not a working set
                self._routes.clear()
            self._routes[url] = got
        return got

    def proxy_for(self, url: str) -> str | None:
        return self.route(url).proxy

    def _decide(self, url: str) -> Route:
        parts = urlsplit(url)
        if self._proxy is not None:
            proxy, source = self._proxy, "relay.proxy"
        else:
            found = self._env.get(parts.scheme)
            if found is None:
                return Route(None, "no proxy set")
            source, proxy = found
        if self._no is not None and _bypassed(parts.hostname or "", self._no[1]):
            return Route(None, f"{self._no[0]} names {parts.hostname}")
        return Route(proxy, source)
