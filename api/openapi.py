"""What the OpenAPI schema says beyond what FastAPI derives: statuses, patterns, 405s.

Every status a route can return is listed on it (or on its router), so that a client, a
code generator or a fuzzer reading ``/openapi.json`` knows the whole contract.
"""

import re
from datetime import datetime
from typing import Annotated, Any
from zoneinfo import available_timezones

from fastapi import Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

__all__ = [
    "NOT_BLANK",
    "SPACE",
    "UNAUTHORIZED",
    "Message",
    "NOT_JSON",
    "SETTINGS_INVALID",
    "TIME_ZONES",
    "DateTimeText",
    "Responses",
    "ValidationProblems",
    "message",
    "method_not_allowed",
]

Responses = dict[int | str, dict[str, Any]]


class Message(BaseModel):
    """An error that is one sentence: what was wrong and what would be right."""

    detail: str


class ValidationProblem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationProblems(BaseModel):
    """FastAPI's own 422: every parameter or body field that is not as declared."""

    detail: list[ValidationProblem]


MESSAGE_SCHEMA = Message.model_json_schema()


def message(status: int, description: str) -> Responses:
    """A status answered as ``{"detail": "..."}``, JSON whatever the route's own media type."""
    return {
        status: {
            "description": description,
            "content": {"application/json": {"schema": MESSAGE_SCHEMA}},
        }
    }


# What str.strip() and str.isspace() take for white space: "not blank" is "has a character
# outside this", in the schema as in the checks behind it.
SPACE = (
    "\\t\\n\\v\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
)
NOT_BLANK = f"[^{SPACE}]"

# The names ZoneInfo knows, so that a client can tell a time zone Hilo would refuse.
TIME_ZONES: dict[str, Any] = {"enum": [*sorted(available_timezones()), None]}

# Routes that read the channel settings (the journey catalog, webhooks, links) cannot work
# while HILO_* channel variables are invalid.
SETTINGS_INVALID = message(
    503, "Hilo's channel settings are invalid or missing; the body names them."
)

# A JSON body that is not UTF-8 text: FastAPI refuses it before validation.
NOT_JSON = message(400, "The body is not UTF-8 JSON.")

# RFC 3339, as the schema's date-time says; pydantic alone would also read a number as Unix
# seconds and a date alone as its midnight.
_DATE_TIME = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


def _date_time(value: object) -> object:
    if isinstance(value, str):
        if not _DATE_TIME.fullmatch(value):
            raise ValueError("must be a date-time with its offset, such as 2024-05-01T12:00:00Z")
        return value.upper()
    if not isinstance(value, datetime):
        raise ValueError("must be a date-time string with its offset, such as 2024-05-01T12:00:00Z")
    return value


DateTimeText = Annotated[datetime, BeforeValidator(_date_time)]

# Every admin route: the dependency refuses before anything else runs.
UNAUTHORIZED = message(401, "No admin token, or a wrong one (Authorization: Bearer <token>).")


def _methods_by_path(app: Any) -> list[tuple[re.Pattern[str], set[str]]]:
    """Each documented path's pattern and methods (HEAD with GET), from the schema itself."""
    known = getattr(app.state, "methods_by_path", None)
    if known is None:
        known = []
        for path, operations in app.openapi()["paths"].items():
            methods = {method.upper() for method in operations}
            if "GET" in methods:
                methods.add("HEAD")
            known.append((compile_path(path)[0], methods))
        app.state.methods_by_path = known
    return list(known)


async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
    """405 with every method of the path in ``Allow``: Starlette names only those of the
    first route that matched, and a path with GET and POST is two routes. The path is the
    first that matches, in the order routes are tried (/journeys/validate before
    /journeys/{key})."""
    path = request.scope["path"]
    methods = next(
        (methods for pattern, methods in _methods_by_path(request.app) if pattern.match(path)),
        set(),
    )
    if not methods and isinstance(exc, HTTPException) and exc.headers:
        methods = {m.strip() for m in exc.headers.get("Allow", "").split(",") if m.strip()}
    allow = ", ".join(sorted(methods))
    return JSONResponse(
        {"detail": f"{request.method} is not allowed here; use {allow}"},
        status_code=status.HTTP_405_METHOD_NOT_ALLOWED,
        headers={"Allow": allow},
    )
