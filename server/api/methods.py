"""Requests no route declares: ``HEAD``, and WebSocket upgrades.

- ``HEAD``: HTTP asks every resource that answers GET to answer HEAD too, with the GET's status and headers
  and no body (RFC 9110 §9.3.2); load balancers, uptime probes and downloaders use it. FastAPI's routes
  declare GET alone, so ``HeadAsGet`` runs a HEAD request as the GET it stands for and drops the body:
  every GET route (the signed ``/v1/files/...`` URLs, ``/health``, ``/metrics``, ``/openapi.json``, ...),
  present and future, and the 404 / 405 answers alike (a POST-only route answers 405 ``allow: POST``).
- WebSocket: nothing here speaks it. Starlette would close the handshake, which servers turn into a bare 403;
  ``RefuseWebSockets`` answers 400 in Together's error shape instead, through the ASGI WebSocket Denial
  Response extension (uvicorn has it; a server without it still gets the close).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from ..errors import InvalidRequest


class HeadAsGet:
    """ASGI middleware: a HEAD request is routed as a GET; its answer keeps the status and headers (the
    GET's ``content-length`` included, as RFC 9110 §9.3.2 allows) and loses the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        # A copy: the server keeps its own scope saying HEAD (uvicorn sends no body for it either), and the
        # request log above says HEAD.
        inner = {**scope, "method": "GET"}
        # Without the file-sending extension, so a FileResponse sends body messages, which are dropped here.
        inner["extensions"] = {k: v for k, v in scope.get("extensions", {}).items()
                               if k != "http.response.pathsend"}
        ended = False

        async def headers_only(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.start":
                await send(message)
            elif message["type"] == "http.response.body" and not ended:
                ended = not message.get("more_body", False)
                if ended:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif message["type"] not in ("http.response.body", "http.response.pathsend"):
                await send(message)

        try:
            await self.app(inner, receive, headers_only)
        finally:
            if "route" in inner:  # for the request metrics (server/api/observe.py)
                scope["route"] = inner["route"]


class RefuseWebSockets:
    """ASGI middleware: a WebSocket handshake is refused with a 400 in Together's error shape."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        if "websocket.http.response" not in scope.get("extensions", {}):
            await WebSocketClose()(scope, receive, send)
            return
        refusal = InvalidRequest(
            f"{scope['path']} is not served over WebSocket; call it over plain HTTP, without 'Upgrade'",
            code="websocket_not_supported")
        await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)
