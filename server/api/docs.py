"""``GET /openapi.json`` and the Swagger UI at ``/docs``: public (no API key), on unless ``server.api_docs``
is false.

They describe the API, not its data: the schema names the routes and the request fields (Together's public
API), never keys, models or settings, and every operation in it still needs a bearer key (Swagger UI's
"Authorize" button sends one). The Swagger UI's scripts and styles come from the ``fastapi-offline`` package
and are served by Darkroom itself, so the page loads nothing from the internet.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline

from ..config import Settings
from .schemas import ImageRequest

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
# Where fastapi-offline serves the Swagger UI's bundle, CSS and favicon.
ASSETS_URL = "/docs/assets"
# Routes whose operations need a bearer key (the others in the schema: /health, /ready, /v1/files).
KEYED_PREFIXES = ("/v1/images/generations", "/v1/models")


def make_app(settings: Settings, **kwargs: Any) -> FastAPI:
    """The FastAPI application object, with or without the public API docs (``server.api_docs``)."""
    if not settings.server.api_docs:
        return FastAPI(docs_url=None, redoc_url=None, openapi_url=None, **kwargs)
    app = FastAPIOffline(docs_url=DOCS_URL, redoc_url=None, openapi_url=OPENAPI_URL, static_url=ASSETS_URL,
                         swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None}, **kwargs)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus what it cannot see: the generation request body (the route reads raw JSON to
    bound its size) and the bearer key the keyed operations need."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="Together AI's image API, served by Darkroom. Errors are "
                                     '`{"error": {"message", "type", "param", "code"}}`.')
    components = schema.setdefault("components", {})
    request = ImageRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = components.setdefault("schemas", {})
    schemas.update(request.pop("$defs", {}))
    schemas["ImageRequest"] = request
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer",
        "description": "An API key (`Authorization: Bearer <key>`); any key when none is configured.",
    }
    # Every failure answers Together's error shape (server/api/errors.py), never FastAPI's 422 detail list.
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    error = {"description": "An error (400, 401, 403, 404, 413, 422 safety, 429, 500, 503, 504)",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            operation["responses"].pop("422", None)
            operation["responses"]["default"] = error
            if path.startswith(KEYED_PREFIXES):
                operation["security"] = [{"bearer": []}]
            if method == "post" and path == "/v1/images/generations":
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ImageRequest"}}}}
    app.openapi_schema = schema
    return schema
