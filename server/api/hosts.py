"""Where the image URLs a response hands out point, and which ``Host`` names the server answers to.

The ``Host`` header is the client's to choose, so it never goes into a URL (a request with ``Host:
evil.example`` must not get links to evil.example). The base of an image URL is, in order:

1. ``server.public_url``, when set (the address clients use, e.g. behind a load balancer);
2. ``X-Forwarded-Proto`` / ``-Host`` / ``-Port`` (the first value of each), only when the connection comes
   from an address in ``server.trusted_proxies``, the reverse proxy that sets them;
3. the address the connection was accepted on (the bound address; the socket's, not the client's words).

``server.allowed_hosts`` (``HostGuard``) refuses requests whose ``Host`` is not one of the names the server
answers to ("*.example.com" matches its subdomains), as Django's ALLOWED_HOSTS and Starlette's
TrustedHostMiddleware do; probes (``/health``, ``/ready``, ``/metrics``) are exempt: they come by address.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import ServerSettings
from ..errors import InvalidRequest
from .errors import error_response

# A host name or IPv4 address, or a bracketed IPv6 address, each with an optional port.
_HOST = re.compile(r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
                   r"(?::(?P<port>[0-9]{1,5}))?")
_PROBES = {"/health", "/ready", "/metrics"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.lru_cache(maxsize=16)
def _networks(trusted: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in trusted)


def _trusted(client: Any, trusted: Sequence[str]) -> bool:
    if not trusted or not client:
        return False
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return False
    return any(address in net for net in _networks(tuple(trusted)))


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of a header (the proxy nearest to the client wrote the first one)."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1").split(",")[0].strip()
    return None


def _base(scheme: str, host: str, port: int | None) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def public_base(scope: Scope, server: ServerSettings) -> str:
    """The base URL (no trailing slash) of links handed to the client of ``scope`` (see the module doc)."""
    if server.public_url:
        return server.public_url.rstrip("/")
    scheme = scope.get("scheme") or "http"
    if _trusted(scope.get("client"), server.trusted_proxies):
        proto = (_header(scope, b"x-forwarded-proto") or "").lower()
        scheme = proto if proto in _DEFAULT_PORTS else scheme
        forwarded = _HOST.fullmatch(_header(scope, b"x-forwarded-host") or "")
        if forwarded:
            port_text = forwarded["port"] or _header(scope, b"x-forwarded-port") or ""
            numeric = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
            port = int(port_text) if numeric else None
            return _base(scheme, forwarded["host"], port)
    bound = scope.get("server")
    if bound and bound[0]:
        return _base(scheme, str(bound[0]), bound[1])
    return _base(scheme, server.host, server.port)


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether a ``Host`` value (a port is ignored) is one of ``allowed`` ("*" any, "*.x.y" subdomains)."""
    match = _HOST.fullmatch(host)
    if match is None:
        return False
    name = match["host"].lower().rstrip(".")
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class HostGuard:
    """ASGI middleware: 400 in the error shape for a ``Host`` outside ``server.allowed_hosts`` (when set)."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = list(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.allowed or scope["path"] in _PROBES:
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host") or ""
        if host_allowed(host, self.allowed):
            await self.app(scope, receive, send)
            return
        refusal = InvalidRequest("this server does not answer to that Host header (server.allowed_hosts)",
                                 code="invalid_host")
        await error_response(refusal)(scope, receive, send)
