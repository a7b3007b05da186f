"""The error answers in /openapi.json: what each operation can answer besides its success.

FastAPI documents only the success and a 422 with its own body (HTTPValidationError,
application/json); Trawler answers every error as application/problem+json (app.api.errors),
and the Firecrawl-compatible routes as {"success": false, "error": ...} with a 400 for bad
input. The generated schema is corrected once, when it is first built: every operation
documents the statuses it can answer with the body it really sends, so generated clients
and schema-driven checks (tests/reliability/test_fuzz.py) agree with the server.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.api.errors import PROBLEM_JSON

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
FIRECRAWL_ERROR_REF = {"$ref": "#/components/schemas/FirecrawlError"}

_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; a 422 for invalid input also lists `errors`",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}

_FIRECRAWL_ERROR_SCHEMA: dict[str, Any] = {
    "title": "FirecrawlError",
    "type": "object",
    "required": ["success", "error"],
    "properties": {"success": {"type": "boolean", "const": False}, "error": {"type": "string"}},
}

_HEALTH_DOWN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string"}},
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "schema": {"type": "string"},
    }
}

_DESCRIPTIONS = {
    400: "Invalid request",
    401: "Missing, malformed, unknown or revoked API key",
    403: "Not allowed (an admin route, or a refused target)",
    404: "Unknown resource (or another tenant's)",
    408: "The target did not answer in time",
    409: "The resource is in the wrong state for this",
    422: "Invalid input",
    429: "The tenant's limits: try again after Retry-After",
    502: "The target did not answer usefully",
    503: "The database or its pool is unavailable: try again after Retry-After",
}

# Statuses an operation answers beyond the ones every operation of its kind does (see
# _statuses); the fuzz test fails on any status an operation answers but does not document.
_EXTRA: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/api/v1/scrape"): (409, 429),
    ("post", "/api/v1/crawl"): (409, 429),
    ("post", "/api/v1/scrape/preview"): (429,),
    ("post", "/api/v1/jobs/bulk"): (429,),
    ("delete", "/api/v1/jobs/{job_id}"): (409,),
    ("post", "/api/v1/jobs/{job_id}/cancel"): (409,),
    ("post", "/api/v1/jobs/{job_id}/retry"): (409, 429),
    ("post", "/api/v1/jobs/{job_id}/resume"): (409, 429),
    ("post", "/api/v1/jobs/{job_id}/webhooks/{delivery_id}/redeliver"): (409,),
    ("post", "/api/v1/admin/workers/{worker_id}/drain"): (409,),
    ("delete", "/api/v1/admin/api-keys/{key_id}"): (409,),
    # Firecrawl: a refused target is a 403 there; inline fetches can time out or fail
    ("post", "/v1/crawl"): (403, 409, 429),
    ("post", "/v2/crawl"): (403, 409, 429),
    ("post", "/v2/batch/scrape"): (403, 409, 429),
    ("delete", "/v1/crawl/{job_id}"): (409,),
    ("delete", "/v2/crawl/{job_id}"): (409,),
    ("delete", "/v2/batch/scrape/{job_id}"): (409,),
    ("post", "/v1/scrape"): (403, 408, 429, 502),
    ("post", "/v2/scrape"): (403, 408, 429, 502),
    ("post", "/v2/map"): (403, 408, 429, 502),
}

_FIRECRAWL_PREFIXES = ("/v1/", "/v2/")
_HEALTH_PROBES = ("/health", "/health/ready")
_ADMIN_ONLY = ("/api/v1/admin/", "/metrics")


def _statuses(method: str, path: str, operation: dict[str, Any]) -> set[int]:
    firecrawl = path.startswith(_FIRECRAWL_PREFIXES)
    parameters = operation.get("parameters") or []
    statuses: set[int] = {503}  # every operation but the liveness probe reads the database
    if operation.get("security"):
        statuses.add(401)
    if path.startswith(_ADMIN_ONLY):
        statuses.add(403)
    if any(p.get("in") == "path" for p in parameters):
        statuses.add(404)
    if parameters or "requestBody" in operation or "422" in operation.get("responses", {}):
        statuses.add(400 if firecrawl else 422)
    if "requestBody" in operation:
        statuses.add(400)  # a body that is not JSON text (not UTF-8): FastAPI's own 400
    statuses.update(_EXTRA.get((method, path), ()))
    return statuses


_DATE_TIME = {"type": "string", "format": "date-time"}
_UNIX_TIME = {"type": "number", "description": "Unix time in seconds"}


def _document_unix_times(parameters: list[dict[str, Any]]) -> None:
    """A date-time query parameter also takes Unix time (pydantic reads `?created_after=
    1700000000` as such); say so, rather than have clients believe it would be refused."""
    for parameter in parameters:
        schema = parameter.get("schema", {})
        options = schema.get("anyOf")
        if parameter.get("in") == "query" and options and _DATE_TIME in options:
            options.insert(options.index(_DATE_TIME) + 1, _UNIX_TIME)


def _error_response(status: int, firecrawl: bool) -> dict[str, Any]:
    if firecrawl:
        content = {"application/json": {"schema": FIRECRAWL_ERROR_REF}}
    else:
        content = {PROBLEM_JSON: {"schema": PROBLEM_REF}}
    response: dict[str, Any] = {"description": _DESCRIPTIONS[status], "content": content}
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    return response


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Correct a generated schema in place (and return it)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = _PROBLEM_SCHEMA
    components["FirecrawlError"] = _FIRECRAWL_ERROR_SCHEMA
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            if path == "/health/live":
                continue  # no database, no input: always 200
            if path in _HEALTH_PROBES:
                responses["503"] = {
                    "description": "Not ready / down (the body says why)",
                    "headers": _RETRY_AFTER,
                    "content": {"application/json": {"schema": _HEALTH_DOWN_SCHEMA}},
                }
                continue
            _document_unix_times(operation.get("parameters") or [])
            firecrawl = path.startswith(_FIRECRAWL_PREFIXES)
            responses.pop("422", None)  # FastAPI's, with a body Trawler never sends
            for status in sorted(_statuses(method, path, operation)):
                responses[str(status)] = _error_response(status, firecrawl)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install_openapi(app: FastAPI) -> None:
    """Build the app's schema with its error answers documented (once, then cached)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
