"""Segment's HTTP Tracking API: any shop, app or CDP that speaks Segment can send to Hilo.

Answers are Segment's: ``200 {"success": true}`` once every call of the request is
committed, and a 4xx whose body names each bad field when anything is wrong, in which
case nothing of the request is stored.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.bodies import BodyTooLarge, read_body
from api.deps import SettingsDep, get_dispatcher, get_ingestor
from hilo.ingest import Accepted
from hilo.segment import (
    KINDS,
    MAX_BATCH_BYTES,
    FieldError,
    RejectionStatus,
    SegmentRejected,
    parse_request,
    segment_error_body,
    segment_success_body,
)
from hilo.storage import utcnow

router = APIRouter(prefix="/v1", tags=["segment"])

# A compressed body is never larger than its content plus a little framing; reading stops
# beyond this, so an oversized upload is refused without being held in memory.
MAX_BODY_BYTES = MAX_BATCH_BYTES + 4096


async def _read_body(request: Request) -> bytes:
    try:
        return await read_body(request, MAX_BODY_BYTES)
    except BodyTooLarge as error:
        raise _too_large(error.size) from None


def _too_large(size: int) -> SegmentRejected:
    return SegmentRejected(
        RejectionStatus.PAYLOAD_TOO_LARGE,
        [
            FieldError(
                field="body",
                message=f"the request body is over {size} bytes; Segment's limit is "
                f"{MAX_BATCH_BYTES // 1024} KB per batch and 32 KB per call",
            )
        ],
    )


def _refused(rejected: SegmentRejected) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Basic realm="Hilo"'} if rejected.status == 401 else None
    return JSONResponse(segment_error_body(rejected), status_code=rejected.status, headers=headers)


async def receive(kind: str, request: Request, settings: SettingsDep) -> Any:
    try:
        body = await _read_body(request)
    except SegmentRejected as rejected:
        return _refused(rejected)
    received_at = utcnow()

    def accept() -> Accepted:
        parsed = parse_request(kind, body, request.headers, received_at=received_at)
        source = settings.sources.get(parsed.write_key)
        if source is None:
            raise SegmentRejected(
                RejectionStatus.UNAUTHORIZED,
                [
                    FieldError(
                        field="writeKey",
                        message="unknown write key: use one of the keys in HILO_WRITE_KEYS "
                        "as the Basic auth username (or the body's writeKey)",
                    )
                ],
            )
        return get_ingestor(request).accept(parsed.calls, source)

    try:
        # Parsing a batch takes milliseconds: in the thread that stores it, with one hand-off,
        # so the event loop goes on reading other requests meanwhile.
        accepted = await run_in_threadpool(accept)
    except SegmentRejected as rejected:
        return _refused(rejected)
    if accepted.routed:
        dispatcher = get_dispatcher(request)
        if dispatcher is not None:
            dispatcher.wake()
    return segment_success_body()


def _endpoint(kind: str) -> Any:
    async def endpoint(request: Request, settings: SettingsDep) -> Any:
        return await receive(kind, request, settings)

    endpoint.__name__ = f"segment_{kind}"
    endpoint.__doc__ = f"Segment's `{kind}` call" + (
        ": up to 500 KB of calls of any type." if kind == "batch" else "."
    )
    return endpoint


for _kind in KINDS:
    router.add_api_route(
        f"/{_kind}",
        _endpoint(_kind),
        methods=["POST"],
        responses={
            400: {"description": "A bad field; the body names each one."},
            401: {"description": "No write key, or an unknown one."},
            413: {"description": "Over 32 KB per call or 500 KB per batch."},
        },
    )
