"""Errors the API answers with: a status and a message, sent as ``{"error": message, "status": status}``."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse


class ApiError(Exception):
    """A request the API refuses: ``status`` (4xx) and a ``message`` that says what to change."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    headers = {"Cache-Control": "no-store", **(headers or {})}
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route: 404, wrong method: 405, a malformed form: 400) as JSON too."""
    return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))


HANDLERS = {ApiError: api_error, HTTPException: http_error}
