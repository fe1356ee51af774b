"""Errors that reach a client, and the one body shape every SDK can parse.

``together`` 1.x asserts that ``error`` is a dict and crashes on an integer ``code``; openai and
``together`` 3.x read ``error.message``. So every failure anywhere in the server becomes
``{"error": {"message", "type", "param", "code"}}`` with ``param`` and ``code`` strings or null.
"""

from __future__ import annotations

from typing import Any


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class DarkroomError(Exception):
    """An error with the HTTP status and Together-style fields it is answered with."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(DarkroomError):
    pass


class FetchError(InvalidRequest):
    """A URL a request names that cannot be used: refused, unreachable, too big, or not an image
    (raised by the guarded fetcher, server/fetch.py, and the image decoder, server/images.py)."""

    code = "invalid_image_url"


class Unsupported(DarkroomError):
    """A valid field this server or this model does not serve."""

    code = "unsupported_parameter"


class Unauthorized(DarkroomError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(DarkroomError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class QueueFull(DarkroomError):
    """Too many jobs wait: the server is overloaded (503, as Together answers an overloaded engine), not the
    caller over a limit (that is 429). Sent with ``retry-after``; every SDK retries it (README, Errors)."""

    status = 503
    type = "service_unavailable"
    code = "queue_full"


class ServerBusy(DarkroomError):
    """The request bodies held at once reached ``server.max_inflight_body_bytes``: overload (503, like a full
    queue), sent with ``retry-after``."""

    status = 503
    type = "service_unavailable"
    code = "server_busy"


class ServiceUnavailable(DarkroomError):
    status = 503
    type = "service_unavailable"
    code = "not_ready"


class DeadlineExceeded(DarkroomError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class InternalError(DarkroomError):
    status = 500
    type = "server_error"
    code = "internal_error"


class TooLargeForDevice(InvalidRequest):
    """A request that does not fit in its device's memory even alone (after the batch was split): a 400, so
    the SDKs do not retry it (they retry a 500 three times)."""

    code = "too_large_for_device"


class Forbidden(DarkroomError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class UnsupportedMediaType(DarkroomError):
    status = 415
    code = "unsupported_media_type"


class PayloadTooLarge(DarkroomError):
    status = 413
    code = "payload_too_large"


class SafetyFlagged(DarkroomError):
    """The safety checker flagged a request: 422, as Together answers (no image, no flag field).

    ``code`` says which stage: ``prompt_flagged`` (before any GPU work) or ``image_flagged``.
    """

    status = 422
    type = "safety_checker_error"
    code = "image_flagged"
