"""The ASGI middleware around every request: request id, per-request response headers, metrics, a log line.

- ``x-request-id``: the client's (when it is a sane token) or a new one; on the response, in the request's
  log line, and carried by the job into the worker's ``job done`` line.
- Headers a handler decided on (the ``x-ratelimit-*`` headers) are put on whatever response goes out,
  errors included.
- ``darkroom_requests_total{route,status,model}`` and the request duration histogram. ``route`` is the
  matched route's path template (a FastAPI route's, or a plain Starlette route's or mount's such as
  ``/openapi.json`` and ``/docs/assets``); "unmatched" for a path no route answers.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import metrics

log = logging.getLogger("server.requests")

_SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# Probes and scrapes: counted, not logged.
_QUIET = {"/health", "/ready", "/metrics"}


def request_id_from(value: str | None) -> str:
    if value and _SANE_ID.fullmatch(value):
        return value
    return f"req-{uuid.uuid4().hex}"


def route_label(scope: Scope, probe: Scope) -> str:
    """The path template of the route that answered: FastAPI's routes leave themselves in ``scope["route"]``;
    the others (plain Starlette routes and mounts: the API docs) are found again by matching ``probe``, the
    request as it arrived. Bounded: a template, never the request's own path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return str(path)
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", ()):
        if candidate.matches(probe)[0] is not Match.NONE and getattr(candidate, "path", None):
            return str(candidate.path)
    return "unmatched"


def request_id(request: Any) -> str | None:
    return request.scope.get("state", {}).get("request_id")


class ObserveMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        probe = {"type": "http", "path": scope["path"], "root_path": scope.get("root_path", ""),
                 "method": "GET"}
        supplied = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = request_id_from(supplied)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = {"x-request-id": rid, **state.get("response_headers", {})}
                present = {k.lower() for k, _ in message.get("headers", [])}
                headers = list(message.get("headers", []))
                headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()
                            if k.encode("latin-1") not in present]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            route = route_label(scope, probe)
            model = str(state.get("model") or "")
            metrics.REQUESTS.labels(route=route, status=str(status), model=model).inc()
            metrics.REQUEST_SECONDS.labels(route=route).observe(elapsed)
            if scope["path"] not in _QUIET:
                key = state.get("api_key")
                # user: what an openai client says its end user is (``user`` / ``safety_identifier``).
                user = state.get("user")
                fields = {"request_id": rid, "method": scope["method"], "path": scope["path"],
                          "status": status, "model": model or None, "key": getattr(key, "name", None),
                          "duration_ms": round(elapsed * 1000, 1), **({"user": user} if user else {})}
                log.info("request done request_id=%s method=%s path=%s status=%d model=%s key=%s "
                         "duration_ms=%.1f%s", rid, scope["method"], scope["path"], status, model or "-",
                         fields["key"] or "-", elapsed * 1000, f" user={user}" if user else "",
                         extra={"fields": fields})
