"""Request bodies read with a cap, so no caller can make the API hold or parse more than it needs.

A Content-Length over the cap is refused at once; otherwise the body is read chunk by chunk
and refused as soon as it passes the cap, so memory and event-loop time stay bounded
whatever a client sends. Forms are read the same way, then parsed by python-multipart
(through Starlette's parsers, as ``Request.form`` does) with limits on fields and part sizes.

Not FastAPI's own ``max_body_size``: it needs a newer FastAPI than we require, answers a bare
"Content Too Large" where ours names the limit, and does not close the connection, so the
client may go on sending the rest; /v1 also needs the size to answer in Segment's format.

    HTTPException
    └── BodyTooLarge   413 with ``Connection: close``: the rest of the upload is never read
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import HTTPException, Request, status
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

__all__ = ["BodyTooLarge", "read_body", "read_form"]


class BodyTooLarge(HTTPException):
    """The body is over its route's cap; ``size`` is how much was declared or read."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"the request body is over {limit:,} bytes ({size:,} declared or read); "
            f"this endpoint takes at most {limit:,}",
            # Closing is what stops the rest of the upload: no worker reads it.
            headers={"Connection": "close"},
        )
        self.size = size
        self.limit = limit


def _refuse_declared(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(int(declared), limit)


async def _capped(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size, limit)
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes; :class:`BodyTooLarge` past it."""
    _refuse_declared(request, limit)
    return b"".join([chunk async for chunk in _capped(request, limit)])


async def read_form(request: Request, limit: int, max_fields: int) -> dict[str, str]:
    """An HTML form's fields, urlencoded or multipart (RFC 8058 allows both); the last of a
    repeated name wins. 413 past ``limit`` bytes, 400 past ``max_fields`` or for file parts."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in ("multipart/form-data", "application/x-www-form-urlencoded", ""):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"expected a form (application/x-www-form-urlencoded), got {media}",
        )
    # The whole (capped) body first: past the cap is always a 413, whatever the parts.
    body = await read_body(request, limit)

    async def whole_body() -> AsyncGenerator[bytes, None]:
        yield body

    parser: FormParser | MultiPartParser
    if media == "multipart/form-data":
        parser = MultiPartParser(
            request.headers, whole_body(), max_files=0, max_fields=max_fields, max_part_size=limit
        )
    else:
        parser = FormParser(
            request.headers, whole_body(), max_fields=max_fields, max_part_size=limit
        )
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, f"the form cannot be read: {error.message}"
        ) from None
    return {name: value for name, value in form.multi_items() if isinstance(value, str)}
