"""Segment's HTTP Tracking API: any shop, app or CDP that speaks Segment can send to Hilo.

Answers are Segment's: ``200 {"success": true}`` once every call of the request is
committed, and a 4xx whose body names each bad field when anything is wrong, in which
case nothing of the request is stored.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security.http import HTTPBase
from pydantic import BaseModel

from api.bodies import BodyTooLarge, read_body
from api.deps import SettingsDep, get_dispatcher, get_ingestor, source_for_write_key
from api.openapi import NOT_BLANK
from hilo.clock import utcnow
from hilo.ids import MAX_ID_CHARS
from hilo.intake.acceptance import Accepted
from hilo.intake.segment_api import parse_request
from hilo.intake.segment_spec import (
    CALL_MODELS,
    CALL_TYPES,
    KINDS,
    MAX_BATCH_BYTES,
    MAX_BATCH_CALLS,
    FieldError,
    RejectionStatus,
    SegmentContext,
    SegmentRejected,
    segment_error_body,
    segment_success_body,
)

# Only for the schema: parse_request reads the write key itself, from this header or from
# the body's writeKey, and answers Segment's own 401.
write_key = HTTPBase(
    scheme="basic",
    scheme_name="SegmentWriteKey",
    description="The source's write key as the username, with an empty password "
    "(or writeKey in the body).",
    auto_error=False,
)
router = APIRouter(prefix="/v1", tags=["segment"], dependencies=[Depends(write_key)])


class SegmentAccepted(BaseModel):
    success: Literal[True] = True


class SegmentRefused(BaseModel):
    success: Literal[False] = False
    message: str
    errors: list[FieldError]


# --- the calls as the schema states them ----------------------------------------------
# The body is read by hand (gzip, Segment's size limits, every problem at once), so the
# schema is built from the same spec models parse_request validates with, plus the rules
# it checks across fields.

NOT_BLANK_ID = {"type": "string", "pattern": NOT_BLANK, "maxLength": MAX_ID_CHARS}
# Clock-skew correction moves a call's time by sentAt - timestamp: within these years it
# stays on the calendar.
DATE_TIME = {
    "anyOf": [
        {"type": "string", "format": "date-time", "pattern": "^(19|2[01])[0-9][0-9]-"},
        {"type": "null"},
    ],
    "description": "An ISO-8601 date-time with its offset, in the years 1900 to 2199.",
}
WRITE_KEY = {"type": ["string", "null"], "description": "Or the Basic auth username."}
INTEGRATIONS = {
    "anyOf": [
        {"type": "object", "additionalProperties": {"type": ["boolean", "object"]}},
        {"type": "null"},
    ],
    "description": "By destination: true, false or the destination's settings.",
}


def _inline(schema: Any, definitions: dict[str, Any]) -> Any:
    """The schema with its local $refs replaced by what they name (none is recursive)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(definitions[ref.removeprefix("#/$defs/")], definitions)
        return {key: _inline(value, definitions) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(item, definitions) for item in schema]
    return schema


def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True)
    inlined: dict[str, Any] = _inline(schema, schema.pop("$defs", {}))
    return inlined


def _context_schema() -> dict[str, Any]:
    return {"anyOf": [_model_schema(SegmentContext), {"type": "null"}]}


def call_schema(kind: str, *, in_batch: bool = False) -> dict[str, Any]:
    """One call of ``kind``; in a batch its ``type`` is required."""
    schema = _model_schema(CALL_MODELS[kind])
    properties = schema["properties"]
    properties["type"] = {"const": kind} if in_batch else {"enum": [kind, None]}
    for name in ("timestamp", "originalTimestamp", "sentAt"):
        properties[name] = DATE_TIME
    properties["integrations"] = INTEGRATIONS
    properties["context"] = _context_schema()
    required: list[str] = ["type"] if in_batch else []
    if kind == "alias":
        required += ["previousId", "userId"]
        schema["allOf"] = [
            {"properties": {"previousId": NOT_BLANK_ID, "userId": NOT_BLANK_ID}},
        ]
    else:
        schema["anyOf"] = [
            {"required": ["userId"], "properties": {"userId": NOT_BLANK_ID}},
            {"required": ["anonymousId"], "properties": {"anonymousId": NOT_BLANK_ID}},
        ]
    needed = {"track": "event", "group": "groupId"}.get(kind)
    if needed:
        required.append(needed)
        schema["allOf"] = [{"properties": {needed: NOT_BLANK_ID}}]
    schema["required"] = required
    if not in_batch:
        properties["writeKey"] = WRITE_KEY
    return schema


def batch_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "title": "Batch",
        "required": ["batch"],
        "properties": {
            "batch": {
                "type": "array",
                "maxItems": MAX_BATCH_CALLS,
                "items": {"anyOf": [call_schema(kind, in_batch=True) for kind in CALL_TYPES]},
            },
            "context": _context_schema(),
            "integrations": INTEGRATIONS,
            "sentAt": DATE_TIME,
            "writeKey": WRITE_KEY,
        },
    }


def request_body(kind: str) -> dict[str, Any]:
    schema = batch_schema() if kind == "batch" else call_schema(kind)
    limit = "500 KB" if kind == "batch" else "32 KB"
    return {
        "requestBody": {
            "required": True,
            "description": f"JSON, up to {limit}; gzip-compressed with Content-Encoding: gzip.",
            "content": {"application/json": {"schema": schema}},
        }
    }


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
        source = source_for_write_key(settings.sources, parsed.write_key)
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
        response_model=SegmentAccepted,
        responses={
            400: {"model": SegmentRefused, "description": "A bad field; errors names each one."},
            401: {"model": SegmentRefused, "description": "No write key, or an unknown one."},
            413: {
                "model": SegmentRefused,
                "description": "Over 32 KB per call or 500 KB per batch.",
            },
            415: {"model": SegmentRefused, "description": "A Content-Encoding other than gzip."},
        },
        openapi_extra=request_body(_kind),
    )
