"""Segment-compatible requests: the bytes and headers of a Tracking API call in, validated
and normalised calls out. Pure: no storage, no network, no clock (the caller passes
``received_at``).

Every problem is raised as one exception carrying all of them::

    SegmentRejected(status, errors: list[FieldError])
      400  the body is not gzip/JSON, or a call breaks Segment's spec
      401  no write key (Basic auth username, or ``writeKey`` in the body)
      413  the body, a call or a batch is over Segment's limits
      415  a Content-Encoding other than gzip

A request with any invalid call is rejected whole: nothing from it is to be stored. The
client then fixes and resends the same request, and since every call keeps its
``messageId`` nothing is counted twice; with partial acceptance it would have to work out
which calls to leave out of the resend.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import uuid
import zlib
from collections.abc import Mapping
from datetime import datetime
from functools import cache
from typing import Any, cast
from zoneinfo import available_timezones

from annotated_types import MaxLen
from pydantic import BaseModel, ValidationError

from hilo.clock import as_utc
from hilo.ids import customer_id_problem
from hilo.intake import strict_json
from hilo.intake.phones import PHONE_HINT, e164
from hilo.intake.segment_spec import (
    _FLOAT_GROWTH,
    _GZIP_SLACK,
    _ISO_HINT,
    _MAX_GZIP_MEMBERS,
    _PAGE_EVENTS,
    _TYPE_HINT,
    CALL_MODELS,
    CALL_TYPES,
    KINDS,
    MAX_BATCH_BYTES,
    MAX_BATCH_CALLS,
    MAX_CALL_BYTES,
    MAX_NESTING,
    CallType,
    FieldError,
    IsoDateTime,
    RejectionStatus,
    SegmentCall,
    SegmentContext,
    SegmentRejected,
    SegmentRequest,
    _CommonCall,
    _instant,
    _SpecModel,
    json_size,
)

__all__ = [
    "parse_request",
    "text_problem",
]

# --- parsing ------------------------------------------------------------------------------


class _TooLarge(FieldError):
    """A FieldError that makes the rejection a 413."""


def parse_request(
    kind: str, body: bytes, headers: Mapping[str, str], *, received_at: datetime
) -> SegmentRequest:
    """Parse one Tracking API request (``kind`` is its endpoint: track ... alias, batch).

    Raises ``SegmentRejected`` listing every problem; any other exception is a bug.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    received_at = as_utc(received_at)
    lowered = {name.lower(): value for name, value in headers.items()}
    limit = MAX_BATCH_BYTES if kind == "batch" else MAX_CALL_BYTES

    text, size = _decoded_body(body, lowered.get("content-encoding", ""), limit, kind)
    payload, floats = _json_object(text)
    write_key = _write_key(lowered.get("authorization"), payload)

    errors: list[FieldError] = []
    if kind == "batch":
        # No call of a body this small can be over the limit: skip measuring each one.
        measure_calls = size + floats * _FLOAT_GROWTH > MAX_CALL_BYTES
        calls = _batch_calls(payload, received_at, errors, measure_calls)
    else:
        call = _call(payload, kind, "", _Defaults(), received_at, errors)
        calls = [call] if call else []
    if errors:
        too_large = any(isinstance(error, _TooLarge) for error in errors)
        status = RejectionStatus.PAYLOAD_TOO_LARGE if too_large else RejectionStatus.BAD_REQUEST
        # Plain FieldErrors out, whatever was used to pick the status.
        raise SegmentRejected(status, [FieldError(**error.model_dump()) for error in errors])
    return SegmentRequest(write_key=write_key, calls=calls)


def _reject(status: RejectionStatus, field: str, message: str) -> SegmentRejected:
    return SegmentRejected(status, [FieldError(field=field, message=message)])


def _decoded_body(body: bytes, encoding: str, limit: int, kind: str) -> tuple[str, int]:
    """The body as text, and its size in bytes once decompressed."""
    what = "a batch request" if kind == "batch" else "a single call"
    too_large = f"{what} must be at most {limit:,} bytes ({limit // 1024} KB)"
    if kind == "batch":
        too_large += "; split it into smaller batches"
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        if len(body) > limit + _GZIP_SLACK:
            raise _reject(
                RejectionStatus.PAYLOAD_TOO_LARGE,
                "body",
                f"is {len(body):,} bytes compressed; {too_large}",
            )
        body = _gunzip(body, limit, too_large)
    elif encoding not in ("", "identity"):
        raise _reject(
            RejectionStatus.UNSUPPORTED_MEDIA_TYPE,
            "Content-Encoding",
            f"{_quote(encoding)} is not supported; send gzip or an uncompressed body",
        )
    if len(body) > limit:
        raise _reject(
            RejectionStatus.PAYLOAD_TOO_LARGE, "body", f"is {len(body):,} bytes; {too_large}"
        )
    try:
        return body.decode("utf-8"), len(body)
    except UnicodeDecodeError as exc:
        hint = (
            "; it looks gzip-compressed: send Content-Encoding: gzip"
            if body[:2] == b"\x1f\x8b"
            else ""
        )
        raise _reject(
            RejectionStatus.BAD_REQUEST,
            "body",
            f"is not UTF-8 (byte {exc.start}){hint}; send UTF-8 JSON",
        ) from None


def _gunzip(body: bytes, limit: int, too_large: str) -> bytes:
    """Decompress, stopping as soon as the output passes ``limit``: a small bomb never costs
    more than ``limit`` bytes of memory."""
    out = bytearray()
    data = body
    try:
        # Clients send one gzip member; a few are allowed, as gzip itself allows them, but
        # not thousands of empty ones (each member copies the rest of the input).
        for _member in range(_MAX_GZIP_MEMBERS):
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += inflater.decompress(data, limit + 1 - len(out))
            while inflater.unconsumed_tail and len(out) <= limit:
                out += inflater.decompress(inflater.unconsumed_tail, limit + 1 - len(out))
            if len(out) > limit:
                raise _reject(
                    RejectionStatus.PAYLOAD_TOO_LARGE,
                    "body",
                    f"decompresses to more than {limit:,} bytes; {too_large}",
                )
            if not inflater.eof:
                raise zlib.error("truncated")
            data = inflater.unused_data
            # gzip writers may pad the last member with zero bytes.
            if not data or (data[0] == 0 and not data.strip(b"\x00")):
                return bytes(out)
        raise zlib.error("too many members")
    except zlib.error:
        raise _reject(
            RejectionStatus.BAD_REQUEST,
            "body",
            "is not valid gzip (corrupt or truncated); compress the whole JSON body with gzip, "
            "or drop Content-Encoding",
        ) from None


def _json_object(text: str) -> tuple[dict[str, Any], int]:
    """The body's JSON object, and how many floats it holds."""
    floats = 0

    def counted_float(number: str) -> float:
        nonlocal floats
        floats += 1
        return float(number)

    try:
        payload = strict_json.loads(text, parse_float=counted_float)
    except strict_json.NotStorableJSON as exc:
        raise _reject(RejectionStatus.BAD_REQUEST, _json_path(exc.path), exc.message) from None
    except json.JSONDecodeError as exc:
        raise _reject(
            RejectionStatus.BAD_REQUEST,
            "body",
            f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    except RecursionError:
        raise _reject(
            RejectionStatus.BAD_REQUEST, "body", f"nests deeper than {MAX_NESTING} levels"
        ) from None
    except ValueError as exc:  # integers longer than Python will parse
        raise _reject(RejectionStatus.BAD_REQUEST, "body", f"is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _reject(
            RejectionStatus.BAD_REQUEST,
            "body",
            f"must be a JSON object, not {_json_type(payload)}",
        )
    # UTF-8 text holds no surrogates and no NUL: only a \uD800-\uDFFF or \u0000 escape
    # makes one. Paths are built only when a cheap look finds something to name.
    if _UNSTORABLE_ESCAPE.search(text) or not _nests_within(payload, MAX_NESTING):
        problems = _shape_errors(payload)
        if problems:
            raise SegmentRejected(RejectionStatus.BAD_REQUEST, problems)
    return payload, floats


_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")


def _nests_within(payload: dict[str, Any], limit: int) -> bool:
    """Whether no object or array of ``payload`` is deeper than ``limit`` (it is at 1)."""
    level: list[Any] = [payload]
    depth = 1
    while level:
        if depth > limit:
            return False
        deeper: list[Any] = []
        for node in level:
            values = node.values() if isinstance(node, dict) else node
            deeper += [value for value in values if isinstance(value, (dict, list))]
        level = deeper
        depth += 1
    return True


def _shape_errors(payload: dict[str, Any]) -> list[FieldError]:
    """Too-deep nesting and text that cannot be stored (lone surrogates from ``\\ud800``
    escapes, which UTF-8 cannot encode; NUL from ``\\u0000``, which PostgreSQL refuses in
    text), found without recursion."""
    errors: list[FieldError] = []
    stack: list[tuple[Any, str, int]] = [(payload, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_NESTING:
                errors.append(
                    FieldError(
                        field=path or "body",
                        message=f"nests deeper than {MAX_NESTING} levels; flatten it",
                    )
                )
                continue
            if isinstance(node, dict):
                children = [(child, _key_path(path, key)) for key, child in node.items()]
            else:
                children = [(child, f"{path}[{index}]") for index, child in enumerate(node)]
            stack.extend((child, child_path, depth + 1) for child, child_path in reversed(children))
            if isinstance(node, dict):
                errors += [
                    FieldError(field=_key_path(path, key), message=f"name {problem}")
                    for key in node
                    if (problem := text_problem(key))
                ]
        elif isinstance(node, str) and (problem := text_problem(node)):
            errors.append(FieldError(field=path or "body", message=problem))
    return errors


def text_problem(text: str) -> str | None:
    """Why the database cannot store ``text`` (NUL, a lone surrogate), or None."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored; remove it"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "contains an unpaired UTF-16 surrogate; send valid Unicode text"
    return None


_PLAIN_KEY = re.compile(r"[A-Za-z_$][A-Za-z0-9_$-]*")


def _json_path(path: strict_json.JSONPath) -> str:
    text = ""
    for part in path:
        text = f"{text}[{part}]" if isinstance(part, int) else _key_path(text, part)
    return text or "body"


def _key_path(path: str, key: str) -> str:
    """``properties.total``, or ``properties["a.b"]`` when the key would read ambiguously."""
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]" if path else json.dumps(key)


def _quote(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 4] + '..."'


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _write_key(authorization: str | None, payload: dict[str, Any]) -> str:
    header_key = _basic_auth_user(authorization) if authorization else None
    body_key = payload.get("writeKey")
    if body_key is not None and not isinstance(body_key, str):
        raise _reject(
            RejectionStatus.UNAUTHORIZED,
            "writeKey",
            f"must be a string (the source's write key), not {_json_type(body_key)}",
        )
    body_key = body_key or None
    if header_key and body_key and header_key != body_key:
        raise _reject(
            RejectionStatus.UNAUTHORIZED,
            "writeKey",
            "differs from the write key in the Authorization header; send one write key",
        )
    write_key = header_key or body_key
    if not write_key:
        raise _reject(
            RejectionStatus.UNAUTHORIZED,
            "writeKey",
            "is missing: send the source's write key as the Basic auth username with an "
            "empty password, or as writeKey in the body",
        )
    return write_key


def _basic_auth_user(authorization: str) -> str | None:
    """The Basic auth username; other schemes (an OAuth bearer token) leave the write key
    to the body, as Segment does."""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise _reject(
            RejectionStatus.UNAUTHORIZED,
            "Authorization",
            "is not valid Basic auth: send 'Basic ' and the base64 of '<write key>:'",
        ) from None
    # Segment still accepts a write key encoded without the colon; so do we.
    username, _, _password = decoded.partition(":")
    return username or None


@dataclasses.dataclass
class _Defaults:
    """What a batch's top level gives each of its calls."""

    context: dict[str, Any] = dataclasses.field(default_factory=dict)
    integrations: dict[str, Any] = dataclasses.field(default_factory=dict)
    sent_at: datetime | None = None


def _batch_calls(
    payload: dict[str, Any],
    received_at: datetime,
    errors: list[FieldError],
    measure_calls: bool = True,
) -> list[SegmentCall]:
    defaults = _Defaults()
    context = payload.get("context")
    if context is not None:
        context_errors = _model_errors(SegmentContext, context, "context")
        errors += context_errors
        if not context_errors:
            defaults.context = context
    integrations = payload.get("integrations")
    if integrations is not None:
        integration_errors = _integration_errors(integrations, "integrations")
        errors += integration_errors
        if not integration_errors:
            defaults.integrations = integrations
    if payload.get("sentAt") is not None:
        try:
            defaults.sent_at = _instant(payload["sentAt"])
        except ValueError as exc:
            errors.append(FieldError(field="sentAt", message=str(exc)))

    items = payload.get("batch")
    if not isinstance(items, list):
        message = (
            "is required: an array of calls, each with a type"
            if items is None
            else f"must be an array of calls, not {_json_type(items)}"
        )
        errors.append(FieldError(field="batch", message=message))
        return []
    if len(items) > MAX_BATCH_CALLS:
        # Its calls are not checked one by one: they cannot be accepted together anyway,
        # and tens of thousands of tiny bad calls would make a huge error body.
        errors.append(
            _TooLarge(
                field="batch",
                message=f"has {len(items):,} calls; send at most {MAX_BATCH_CALLS:,} a request",
            )
        )
        return []

    calls: list[SegmentCall] = []
    for index, item in enumerate(items):
        path = f"batch[{index}]"
        if not isinstance(item, dict):
            errors.append(
                FieldError(
                    field=path,
                    message=f"must be a call (a JSON object with a type), not {_json_type(item)}",
                )
            )
            continue
        size = json_size(item) if measure_calls else 0
        if size > MAX_CALL_BYTES:
            errors.append(
                _TooLarge(
                    field=path,
                    message=f"is {size:,} bytes; a call must be at most {MAX_CALL_BYTES:,} bytes "
                    "(32 KB): keep large data out of properties and traits",
                )
            )
            continue
        call_type = item.get("type")
        if call_type not in CALL_TYPES:
            message = (
                f"is required in a batch: {_TYPE_HINT}"
                if call_type is None
                else f"must be {_TYPE_HINT}, not {_quote(call_type)}"
            )
            errors.append(FieldError(field=f"{path}.type", message=message))
            continue
        call = _call(item, call_type, path, defaults, received_at, errors)
        if call:
            calls.append(call)
    return calls


def _call(
    data: dict[str, Any],
    call_type: str,
    path: str,
    defaults: _Defaults,
    received_at: datetime,
    errors: list[FieldError],
) -> SegmentCall | None:
    """Validate one call (``path`` prefixes its errors) and normalise it."""
    before = len(errors)
    stated_type = data.get("type")
    # A non-string type is reported by the model.
    if isinstance(stated_type, str) and stated_type != call_type:
        errors.append(
            FieldError(
                field=_key_path(path, "type"),
                message=f"is {_quote(stated_type)} but this is a {call_type} request; "
                f"drop type or send it as {_quote(stated_type)}",
            )
        )
    merged = data
    if defaults.context or defaults.integrations:
        merged = dict(data)
        for key, default in (
            ("context", defaults.context),
            ("integrations", defaults.integrations),
        ):
            if default:
                merged[key] = _merge(default, data.get(key))

    fields = _valid_fields(merged, _CALL_CHECKS[call_type])
    if fields is None:
        # Something is wrong, or not plainly right: the model names each problem.
        try:
            fields = _model_fields(CALL_MODELS[call_type].model_validate(merged))
        except ValidationError as exc:
            errors += _translate(exc, path)
    bad_fields = {error.field for error in errors[before:]}
    integrations = merged.get("integrations")
    if isinstance(integrations, dict) and not all(
        isinstance(setting, bool | dict) for setting in integrations.values()
    ):
        errors += _integration_errors(integrations, _key_path(path, "integrations"))
    errors += _required_errors(call_type, data, path, bad_fields)
    if fields is not None:
        errors += _id_errors(fields, path)
        errors += _phone_errors(fields, call_type, path)

    timestamp: datetime | None = None
    if fields is not None:
        try:
            timestamp = _corrected(fields, defaults.sent_at, received_at)
        except OverflowError:
            errors.append(
                FieldError(
                    field=_key_path(path, "sentAt"),
                    message="is so far from the call's timestamp that correcting clock skew "
                    "leaves the calendar; check the client's clock",
                )
            )
    if len(errors) > before or fields is None or timestamp is None:
        return None
    return _normalised(fields, call_type, merged, data, defaults, timestamp, received_at)


# How _valid_fields checks a field, from its annotation in the spec models.
_FieldCheck = tuple[str, str, int | None]  # (field name, kind, max length)
_CHECKED_KINDS: dict[Any, str] = {
    str | None: "string",
    bool | None: "boolean",
    dict[str, Any] | None: "object",
    IsoDateTime | None: "instant",
    SegmentContext | None: "context",
}


def _field_checks(model_class: type[_SpecModel]) -> dict[str, _FieldCheck] | None:
    """By the name a client sends: what each field of ``model_class`` must be. None when
    the model has a field that only its own validation can check (all then go through it)."""
    checks: dict[str, _FieldCheck] = {}
    for name, info in model_class.model_fields.items():
        kind = _CHECKED_KINDS.get(info.annotation, "other")
        limits = [item.max_length for item in info.metadata if isinstance(item, MaxLen)]
        if info.is_required() or len(limits) != len(info.metadata):
            return None
        checks[info.alias or name] = (name, kind, limits[0] if limits else None)
    return checks


_CONTEXT_CHECKS = _field_checks(SegmentContext)
_CALL_CHECKS = {
    call_type: _field_checks(model_class) if _CONTEXT_CHECKS else None
    for call_type, model_class in CALL_MODELS.items()
}


def _valid_fields(
    data: dict[str, Any], checks: dict[str, _FieldCheck] | None
) -> dict[str, Any] | None:
    """The fields of a call (or of its context) by name, when each is what the spec model
    asks (strict types, lengths, ISO times), without building the model: most calls are
    valid, and pydantic's validation costs several times this. None if any is not; the
    model then finds every problem. Unknown keys are the model's extras, left as they are."""
    if checks is None:
        return None
    fields: dict[str, Any] = {}
    for key, value in data.items():
        check = checks.get(key)
        if check is None or value is None:
            continue
        name, kind, max_length = check
        if kind == "string":
            if type(value) is not str or (max_length is not None and len(value) > max_length):
                return None
        elif kind == "object":
            if type(value) is not dict:
                return None
        elif kind == "boolean":
            if type(value) is not bool:
                return None
        elif kind == "instant":
            try:
                value = _instant(value)
            except ValueError:
                return None
        elif kind == "context":
            if type(value) is not dict:
                return None
            value = _valid_fields(value, _CONTEXT_CHECKS)
            if value is None:
                return None
        else:
            return None
        fields[name] = value
    return fields


def _model_fields(model: _CommonCall) -> dict[str, Any]:
    """A validated call model as _valid_fields gives a call: its fields by name."""
    fields = {name: getattr(model, name) for name in type(model).model_fields}
    if model.context is not None:
        fields["context"] = {
            name: getattr(model.context, name) for name in SegmentContext.model_fields
        }
    return fields


def _merge(default: dict[str, Any], own: Any) -> Any:
    """A batch default under a call's own value: the call wins, nested objects merge."""
    if own is None:
        return default
    if not isinstance(own, dict):
        return own  # the wrong type is the call's to report
    merged = dict(default)
    for key, value in own.items():
        merged[key] = (
            _merge(merged[key], value)
            if isinstance(merged.get(key), dict) and isinstance(value, dict)
            else value
        )
    return merged


def _model_errors(model_class: type[BaseModel], value: Any, path: str) -> list[FieldError]:
    try:
        model_class.model_validate(value)
    except ValidationError as exc:
        return _translate(exc, path)
    return []


_MESSAGES = {
    "string_type": "must be a string",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "bool_type": "must be true or false",
    "datetime_type": _ISO_HINT,
}


def _translate(exc: ValidationError, path: str) -> list[FieldError]:
    """Pydantic's errors as FieldErrors at the client's own field names, under ``path``."""
    errors: list[FieldError] = []
    for item in exc.errors(include_url=False, include_input=False):
        field = path
        for part in item["loc"]:
            field = f"{field}[{part}]" if isinstance(part, int) else _key_path(field, str(part))
        kind = item["type"]
        if kind in _MESSAGES:
            message = _MESSAGES[kind]
        elif kind == "string_too_long":
            message = f"must be at most {item['ctx']['max_length']} characters"
        elif kind == "value_error":
            message = str(item["ctx"]["error"])
        else:
            message = item["msg"]
        errors.append(FieldError(field=field or "body", message=message))
    return errors


def _integration_errors(value: Any, path: str) -> list[FieldError]:
    if not isinstance(value, dict):
        return [FieldError(field=path, message="must be a JSON object")]
    return [
        FieldError(
            field=_key_path(path, name),
            message="must be true, false or an object of destination settings",
        )
        for name, setting in value.items()
        if not isinstance(setting, bool | dict)
    ]


def _present(data: dict[str, Any], key: str) -> bool:
    value = data.get(key)
    return isinstance(value, str) and bool(value.strip())


def _required_errors(
    call_type: str, data: dict[str, Any], path: str, bad_fields: set[str]
) -> list[FieldError]:
    """Segment's rules across fields; a field already reported (wrong type) is not
    reported again."""
    errors: list[FieldError] = []

    def require(key: str, message: str) -> None:
        if not _present(data, key):
            field = _key_path(path, key)
            if field not in bad_fields:
                errors.append(FieldError(field=field, message=message))

    if call_type == "alias":
        require("previousId", "is required for alias: the id the customer had before")
        require("userId", "is required for alias: the id the customer has now")
        return errors
    if not (_present(data, "userId") or _present(data, "anonymousId")):
        user_id, anonymous_id = _key_path(path, "userId"), _key_path(path, "anonymousId")
        if user_id not in bad_fields and anonymous_id not in bad_fields:
            errors.append(
                FieldError(
                    field=user_id,
                    message="userId or anonymousId is required: the customer's id, or an "
                    "anonymous id until they sign in",
                )
            )
    if call_type == "track":
        require("event", 'is required for track: what the customer did, e.g. "Order Completed"')
    if call_type == "group":
        require("groupId", "is required for group: the id of the account joined")
    return errors


_CUSTOMER_IDS = (
    ("user_id", "userId"),
    ("anonymous_id", "anonymousId"),
    ("previous_id", "previousId"),
)


def _id_errors(fields: dict[str, Any], path: str) -> list[FieldError]:
    """Ids a customer is keyed by must fit in a journey's workflow id: refused here, or the
    call's events could never reach Temporal."""
    errors = []
    for name, key in _CUSTOMER_IDS:
        value = fields.get(name)
        problem = customer_id_problem(value) if isinstance(value, str) else None
        if problem is not None:
            errors.append(FieldError(field=_key_path(path, key), message=problem))
    return errors


def _phone_errors(fields: dict[str, Any], call_type: str, path: str) -> list[FieldError]:
    """A phone Hilo would text must be one: refused here rather than failing at the send."""
    places: list[tuple[tuple[str, ...], Any]] = [
        (("context", "traits"), (fields.get("context") or {}).get("traits"))
    ]
    if call_type == "identify":
        places.append((("traits",), fields.get("traits")))
    errors = []
    for where, traits in places:
        if (
            isinstance(traits, dict)
            and traits.get("phone") not in (None, "")
            and (e164(traits["phone"]) is None)
        ):
            field = path
            for key in (*where, "phone"):
                field = _key_path(field, key)
            errors.append(
                FieldError(field=field, message=f"{PHONE_HINT}, not {_quote(traits['phone'])}")
            )
    return errors


def _corrected(
    fields: dict[str, Any], batch_sent_at: datetime | None, received_at: datetime
) -> datetime:
    """Segment's rule: timestamp = receivedAt - (sentAt - originalTimestamp), which removes
    the client clock's skew; without sentAt the client's time is taken as given (historical
    imports), without any client time it is receivedAt."""
    client_time = fields.get("timestamp") or fields.get("original_timestamp")
    sent_at = fields.get("sent_at") or batch_sent_at
    if client_time is None:
        return received_at
    if sent_at is None:
        return client_time
    return received_at - (sent_at - client_time)


@cache
def _known_zones() -> frozenset[str]:
    return frozenset(available_timezones())


def _non_blank(value: str | None) -> str | None:
    """Blank ids are absent ids."""
    return value if value is not None and value.strip() else None


def _normalised(
    fields: dict[str, Any],
    call_type: str,
    merged: dict[str, Any],
    data: dict[str, Any],
    defaults: _Defaults,
    timestamp: datetime,
    received_at: datetime,
) -> SegmentCall:
    context: dict[str, Any] = fields.get("context") or {}
    context_traits = dict(context.get("traits") or {})
    event: str | None = None
    properties: dict[str, Any] = {}
    traits = context_traits
    group_traits: dict[str, Any] = {}
    previous_id = group_id = None
    if call_type == "track":
        event = fields.get("event")
        properties = dict(fields.get("properties") or {})
    elif call_type in _PAGE_EVENTS:
        event = _PAGE_EVENTS[call_type]
        properties = dict(fields.get("properties") or {})
        # Destinations read page/screen name and category from properties; the call's own
        # fields are the authority when both are given.
        for key in ("name", "category"):
            if fields.get(key) is not None:
                properties[key] = fields[key]
    elif call_type == "identify":
        traits = {**context_traits, **(fields.get("traits") or {})}
    elif call_type == "group":
        group_id = fields.get("group_id")
        group_traits = dict(fields.get("traits") or {})
    elif call_type == "alias":
        previous_id = fields.get("previous_id")
    if traits.get("phone") not in (None, ""):
        traits = {**traits, "phone": e164(traits["phone"])}  # checked by _phone_errors
    zone = context.get("timezone")
    client_time = fields.get("timestamp") or fields.get("original_timestamp")
    return SegmentCall(
        type=cast(CallType, call_type),  # checked against CALL_TYPES by the caller
        # Segment's libraries always send one; a hand-written call without one gets a random
        # id, so resending that call is not recognised as a duplicate.
        message_id=_non_blank(fields.get("message_id")) or f"hilo-{uuid.uuid4()}",
        user_id=_non_blank(fields.get("user_id")),
        anonymous_id=_non_blank(fields.get("anonymous_id")),
        previous_id=previous_id,
        group_id=group_id,
        event=event,
        properties=properties,
        traits=traits,
        group_traits=group_traits,
        context=merged.get("context") or {},
        integrations=merged.get("integrations") or {},
        timestamp=timestamp,
        original_timestamp=client_time,
        sent_at=fields.get("sent_at") or defaults.sent_at,
        received_at=received_at,
        timezone=zone if zone in _known_zones() else None,
        locale=context.get("locale"),
        ip=context.get("ip"),
        raw={key: value for key, value in data.items() if key != "writeKey"},
    )
