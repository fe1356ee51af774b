"""The HTTP layer's limits: what a client's connection may cost before any route runs.

uvicorn serves the app with h11 (server/cli.py ``uvicorn_options``), whose settings bound what they can:
``h11_max_incomplete_event_size`` caps a request's line + headers (``server.max_header_bytes``),
``timeout_keep_alive`` closes idle connections. What uvicorn has no setting for (or answers in plain text) is
here:

- ``Protocol``: uvicorn's h11 protocol, answering what h11 refuses (malformed requests, TLS bytes on the
  plain port: 400) in Together's error shape, then closing; a cap on a request head's bytes however they
  arrive (h11's own applies only to a head still incomplete after a read: 431); and a deadline for a
  request's line and headers (``server.header_timeout_s``, 408, then close), which uvicorn does not have, so
  a client that trickles headers cannot hold a connection; and the cap on open connections
  (``server.max_connections``, instead of uvicorn's ``limit_concurrency``, whose 503 is plain text and
  refuses ``/health`` too): a connection past the cap first makes room by closing the oldest connection with
  no request in progress (idle keep-alive, or a head still arriving: what a slowloris client holds), and only
  when every connection is serving a request is it refused, with a 503 ``server_busy`` in the error shape
  and ``retry-after``. So idle sockets cannot lock out a probe or a real request.
- ``BodyGuard``: ASGI middleware refusing ``Content-Length`` together with ``Transfer-Encoding`` (request
  smuggling's ingredient, RFC 9112 6.1: 400, then close) and bounding how long a request body may take
  (``server.body_read_timeout_s`` of silence, ``server.body_timeout_s`` in all): 408 in the error shape with
  ``connection: close``.

A client that leaves while its body is read is logged as 499 (server/api/errors.py), without a traceback.
A reverse proxy in front should enforce the same limits (header size, header and body timeouts, body size,
connections) so that slow or oversized clients cost it, not the API process.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import ServerSettings
from ..errors import DarkroomError, error_body

log = logging.getLogger(__name__)


class RequestTimeout(DarkroomError):
    status = 408
    code = "request_timeout"


def _raw_error(status: int, reason: str, message: str, code: str, kind: str = "invalid_request_error",
               extra: str = "") -> bytes:
    body = json.dumps(error_body(message, kind, None, code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{extra}"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class Protocol(H11Protocol):
    """uvicorn's h11 protocol with errors in the error shape and a deadline for request heads."""

    # Set by ``protocol_class``.
    header_timeout_s: float = 10.0
    max_header_bytes: int = 32_768
    max_connections: int = 1024

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_of: object | None = None
        self._opened = self.loop.time()
        self._arm_head_timer()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def _serving(self) -> bool:
        """Whether a request is in progress here (its body arriving, or its answer not sent yet)."""
        return self.conn.their_state is not h11.IDLE or (
            self.cycle is not None and not self.cycle.response_complete)

    def _make_room(self) -> None:
        """Past ``max_connections``: close the oldest connection serving no request, else refuse this one."""
        idle = [c for c in self.connections if isinstance(c, Protocol) and c is not self
                and not c._serving() and not c.transport.is_closing()]
        if idle:
            oldest = min(idle, key=lambda c: c._opened)
            log.info("connection limit reached (%d): closing the oldest connection with no request",
                     self.max_connections)
            oldest._disarm_head_timer()
            oldest._refuse(503, "Service Unavailable", "the server is at its connection limit and closed "
                           "this idle connection", "server_busy", "service_unavailable", "retry-after: 1\r\n")
            return
        log.warning("connection limit reached (%d), every connection serving a request: refused",
                    self.max_connections)
        self._disarm_head_timer()
        self._refuse(503, "Service Unavailable", f"the server is at its limit of {self.max_connections} "
                     "connections; retry shortly", "server_busy", "service_unavailable", "retry-after: 1\r\n")

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_of = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.cycle is not self._head_of:
            return  # a request arrived meanwhile
        log.info("request head not received within %gs; connection closed", self.header_timeout_s)
        self._refuse(408, "Request Timeout", "the request line and headers did not arrive within "
                     f"{self.header_timeout_s:g} s", "request_timeout")

    def _refuse(self, status: int, reason: str, message: str, code: str, kind: str = "invalid_request_error",
                extra: str = "") -> None:
        self.transport.write(_raw_error(status, reason, message, code, kind, extra))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # these bytes start (or continue) a request head
            head = self.conn.trailing_data[0] + data
            end = head.find(b"\r\n\r\n")
            if (end < 0 and len(head) > self.max_header_bytes) or end > self.max_header_bytes:
                self._refuse_oversized()
                return
        super().data_received(data)

    def _refuse_oversized(self) -> None:
        self._disarm_head_timer()
        self._refuse(431, "Request Header Fields Too Large",
                     f"the request line and headers are larger than {self.max_header_bytes} bytes",
                     "headers_too_large")

    def handle_events(self) -> None:
        try:
            super().handle_events()
        except Exception as exc:  # noqa: BLE001 - h11 lets some malformed input raise (e.g. a huge length)
            log.info("malformed HTTP request refused: %s", type(exc).__name__)
            if not self.transport.is_closing():
                self._refuse(400, "Bad Request", "malformed HTTP request", "invalid_http_request")
            return
        if self.cycle is not self._head_of:  # a new request's head was parsed: its body has its own limits
            self._disarm_head_timer()
            self._head_of = self.cycle

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()  # may parse a pipelined request at once (handle_events)
        if not self.transport.is_closing() and self.cycle is finished:
            self._arm_head_timer()  # the next request's head (keep-alive) gets the same deadline

    def send_400_response(self, msg: str) -> None:
        """What h11 refused: 431 when the head outgrew ``max_header_bytes``, else 400 (malformed,
        ``Content-Length`` with ``Transfer-Encoding``, not HTTP at all)."""
        self._disarm_head_timer()
        if len(self.conn.trailing_data[0]) > self.max_header_bytes:
            self._refuse_oversized()
        else:
            self._refuse(400, "Bad Request", "malformed HTTP request (invalid request line or headers, or "
                         "both Content-Length and Transfer-Encoding)", "invalid_http_request")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


def protocol_class(server: ServerSettings) -> type[Protocol]:
    """``Protocol`` with the limits of ``server``."""
    return type("DarkroomProtocol", (Protocol,), {"header_timeout_s": server.header_timeout_s,
                                                  "max_header_bytes": server.max_header_bytes,
                                                  "max_connections": server.max_connections})


def uvicorn_options(server: ServerSettings) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.run`` for the HTTP layer's limits."""
    return {
        "http": protocol_class(server),
        "h11_max_incomplete_event_size": server.max_header_bytes,
        "timeout_keep_alive": server.keep_alive_timeout_s,
        # X-Forwarded-* are read only from server.trusted_proxies, by server/api/hosts.py.
        "proxy_headers": False,
    }


class BodyGuard:
    """ASGI middleware: no ``Content-Length`` with ``Transfer-Encoding`` (400, close); a request body must
    keep arriving (``read_timeout_s`` of silence at most) and be complete within ``total_timeout_s``, else 408
    with ``connection: close``. Once the body is complete, ``receive`` is the server's own again (it then
    only reports a disconnect)."""

    def __init__(self, app: ASGIApp, read_timeout_s: float, total_timeout_s: float) -> None:
        self.app = app
        self.read_timeout_s = read_timeout_s
        self.total_timeout_s = total_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in scope["headers"]}
        if b"content-length" in names and b"transfer-encoding" in names:
            refusal = DarkroomError("a request may not carry both Content-Length and Transfer-Encoding",
                                    code="invalid_http_request", headers={"connection": "close"})
            await JSONResponse(refusal.body(), status_code=400, headers=refusal.headers)(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_timeout_s
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            wait = min(self.read_timeout_s, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(0.0, wait))
            except asyncio.TimeoutError:
                log.info("request body too slow path=%s", scope.get("path"))
                raise RequestTimeout(
                    f"the request body did not arrive in time (at most {self.read_timeout_s:g} s between "
                    f"parts and {self.total_timeout_s:g} s in all)", headers={"connection": "close"},
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, timed_receive, send)
