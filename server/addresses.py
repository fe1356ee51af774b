"""Where a URL a request names may lead: the address checks of the guarded fetcher (server/fetch.py).

A host is resolved once, and *every* address it resolves to is checked against loopback, private,
link-local, multicast, reserved and unspecified ranges, IPv4 and IPv6 (IPv4-mapped, 6to4, NAT64 and Teredo
addresses are checked by the IPv4 address they carry). The fetcher then connects to a checked address, never
through a second lookup. Operators may exempt hosts (``allow_hosts``) and networks (``allow_cidrs``).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Union

from .config import FetchSettings
from .errors import FetchError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64, Teredo client), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why an address must not be fetched from (``None``: a public address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # the socket talks IPv4 to the mapped address
            return blocked_reason(ip.ipv4_mapped)
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = blocked_reason(inner)
            if reason:
                return reason
    for attr, name in (
        ("is_loopback", "loopback"),
        ("is_unspecified", "unspecified"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(ip, attr):
            return name
    if not ip.is_global:  # shared address space (100.64/10), documentation ranges, ...
        return "non-public"
    return None


class AddressGuard:
    """Resolves hosts (off the caller's thread, within its deadline) and refuses non-public addresses."""

    def __init__(self, settings: FetchSettings) -> None:
        self._allow_hosts = {h.lower().rstrip(".") for h in settings.allow_hosts}
        self._allow_nets = [ipaddress.ip_network(c, strict=False) for c in settings.allow_cidrs]
        self._dns = ThreadPoolExecutor(max_workers=max(1, settings.max_concurrent),
                                       thread_name_prefix="fetch-dns")

    def close(self) -> None:
        self._dns.shutdown(wait=False, cancel_futures=True)

    def checked_addresses(self, host: str, port: int, field: str, deadline: float) -> list[IPAddress]:
        """The addresses of ``host``, every one of them allowed; ``FetchError`` naming ``field`` otherwise."""
        name = host.lower().rstrip(".")
        try:
            literal: IPAddress | None = ipaddress.ip_address(name.strip("[]").split("%")[0])
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            addresses = self._resolve(name, port, field, deadline)
        if name in self._allow_hosts:
            return addresses
        for ip in addresses:
            if any(ip in net for net in self._allow_nets):
                continue
            reason = blocked_reason(ip)
            if reason:
                shown = str(ip) if literal is not None else f"host '{host}'"
                what = "is" if literal is not None else "resolves to"
                raise FetchError(
                    f"'{field}' is refused: {shown} {what} a {reason} address; "
                    "only public addresses may be fetched",
                    param=field, code="url_not_allowed",
                )
        return addresses

    def _resolve(self, name: str, port: int, field: str, deadline: float) -> list[IPAddress]:
        pending = self._dns.submit(socket.getaddrinfo, name, port, 0, socket.SOCK_STREAM)
        try:
            infos = pending.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise FetchError(f"'{field}' timed out resolving host '{name}'", param=field,
                             code="fetch_failed") from None
        except (OSError, UnicodeError):
            raise FetchError(f"'{field}' could not be fetched: host '{name}' does not resolve",
                             param=field, code="fetch_failed") from None
        addresses: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise FetchError(f"'{field}' could not be fetched: host '{name}' does not resolve",
                             param=field, code="fetch_failed")
        return addresses
