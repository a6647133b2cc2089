"""One place that turns every error into RFC 9457 problem+json with a stable `code`."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.service import RPCError

from federation.errors import FederationError
from federation.models import TEXT_INVALID

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


def problem(
    request: Request, *, status: int, code: str, title: str, detail: str, **extra: Any
) -> JSONResponse:
    body = {
        "type": f"urn:fedagent:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "instance": request.url.path,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


async def federation_error(request: Request, exc: FederationError) -> JSONResponse:
    return problem(
        request,
        status=exc.status,
        code=exc.code,
        title=exc.title,
        detail=exc.detail,
        **exc.extra,
    )


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {
            "field": ".".join(str(p) for p in e["loc"] if p != "body") or "body",
            "message": e["msg"],
        }
        for e in exc.errors()
    ]
    fields = ", ".join(e["field"] for e in errors)
    # Text that cannot be kept (NUL, unpaired surrogates, control characters in a name)
    # has a code of its own: the request is well-formed, its text is not acceptable.
    text = all(e["type"] == TEXT_INVALID for e in exc.errors())
    return problem(
        request,
        status=422,
        code=TEXT_INVALID if text else "validation_error",
        title="Request holds text that is not allowed"
        if text
        else "Request does not match the schema",
        detail=f"invalid: {fields}",
        errors=errors,
    )


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and str(exc.detail) == "There was an error parsing the body":
        # FastAPI's answer to a JSON body it cannot read (e.g. nested too deeply).
        return problem(
            request,
            status=422,
            code="body_invalid",
            title="Request body is not readable JSON",
            detail="the JSON body could not be read (malformed or nested too deeply)",
        )
    code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
        exc.status_code, f"http_{exc.status_code}"
    )
    return problem(
        request,
        status=exc.status_code,
        code=code,
        title=str(exc.detail),
        detail=str(exc.detail),
    )


async def temporal_error(request: Request, exc: RPCError) -> JSONResponse:
    # The engine's own words (addresses, namespaces, internals) stay in our logs.
    log.warning("temporal call failed: %s", exc)
    return problem(
        request,
        status=503,
        code="temporal_unavailable",
        title="The durable engine is unavailable",
        detail="the durable engine could not be reached; try again later",
    )


async def too_deep(request: Request, exc: RecursionError) -> JSONResponse:
    return problem(
        request,
        status=422,
        code="body_too_deep",
        title="Request body is nested too deeply",
        detail="the JSON body is nested too deeply to be read",
    )


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("backing service failed: %r", exc)
    return problem(
        request,
        status=503,
        code="database_unavailable",
        title="The database is unavailable",
        detail=exc.__class__.__name__,
    )


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return problem(
        request,
        status=500,
        code="internal_error",
        title="Internal error",
        detail="the server failed to handle this request; see its logs",
    )


DATABASE_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InternalClientError,
    # A refused or missing socket of the database server (the only sockets the API opens
    # outside httpx, whose errors are domain errors already).
    OSError,
)


def install(app: FastAPI) -> None:
    """Every error the app can meet, answered as problem+json (the most specific handler of an
    exception's class wins, so `Exception` only catches what nothing else names)."""
    handlers: list[tuple[type[Exception], Any]] = [
        (FederationError, federation_error),
        (RequestValidationError, validation_error),
        (StarletteHTTPException, http_error),
        (RPCError, temporal_error),
        (RecursionError, too_deep),
        *((kind, database_error) for kind in DATABASE_ERRORS),
        (Exception, unexpected),
    ]
    for kind, handler in handlers:
        app.add_exception_handler(kind, handler)
