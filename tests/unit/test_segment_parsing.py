"""Segment-compatible request parsing: examples for each call type, the limits and auth,
then properties over arbitrary and mutated payloads (only SegmentRejected, always 4xx)."""

from __future__ import annotations

import base64
import gzip
import json
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rudderstack.analytics.client import Client as RudderClient
from segment.analytics import Client as SegmentClient

from hilo.intake.segment_api import parse_request
from hilo.intake.segment_spec import (
    CALL_TYPES,
    KINDS,
    MAX_BATCH_BYTES,
    MAX_BATCH_CALLS,
    MAX_CALL_BYTES,
    MAX_NESTING,
    FieldError,
    RejectionStatus,
    SegmentRejected,
    SegmentRequest,
    json_size,
    segment_error_body,
    segment_success_body,
)

WRITE_KEY = "wk_test_123"
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def basic(username: str, password: str = "") -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


AUTH = basic(WRITE_KEY)


def encode(payload: Any) -> bytes:
    return payload if isinstance(payload, bytes) else json.dumps(payload).encode()


def parse(
    kind: str, payload: Any, headers: dict[str, str] | None = None, received_at: datetime = NOW
) -> SegmentRequest:
    return parse_request(
        kind, encode(payload), AUTH if headers is None else headers, received_at=received_at
    )


def reject(kind: str, payload: Any, headers: dict[str, str] | None = None) -> SegmentRejected:
    with pytest.raises(SegmentRejected) as info:
        parse(kind, payload, headers)
    return info.value


def problems(rejected: SegmentRejected) -> dict[str, str]:
    return {error.field: error.message for error in rejected.errors}


# --- each call type -----------------------------------------------------------------------


def test_track_is_normalised() -> None:
    body = {
        "userId": "42",
        "event": "Order Completed",
        "properties": {"total": 19.99, "currency": "EUR"},
        "context": {
            "ip": "203.0.113.7",
            "locale": "es-ES",
            "timezone": "Europe/Madrid",
            "traits": {"email": "ana@example.com"},
            "library": {"name": "analytics.js", "version": "2.11.1"},
        },
        "integrations": {"All": True, "Mixpanel": False},
        "messageId": "msg-1",
        "timestamp": "2024-05-01T11:59:00Z",
    }
    (call,) = parse("track", body).calls
    assert call.type == "track"
    assert call.message_id == "msg-1"
    assert call.user_id == "42" and call.anonymous_id is None
    assert call.event == "Order Completed"
    assert call.properties == {"total": 19.99, "currency": "EUR"}
    assert call.traits == {"email": "ana@example.com"}
    assert call.context == body["context"]
    assert call.integrations == {"All": True, "Mixpanel": False}
    assert call.timestamp == datetime(2024, 5, 1, 11, 59, tzinfo=UTC)
    assert call.received_at == NOW and call.sent_at is None
    assert (call.timezone, call.locale, call.ip) == ("Europe/Madrid", "es-ES", "203.0.113.7")
    assert call.raw == body


def test_identify_traits_win_over_context_traits() -> None:
    body = {
        "anonymousId": "anon-1",
        "traits": {"email": "new@example.com", "plan": "pro"},
        "context": {"traits": {"email": "old@example.com", "name": "Ana"}},
    }
    (call,) = parse("identify", body).calls
    assert call.type == "identify" and call.event is None
    assert call.anonymous_id == "anon-1"
    assert call.traits == {"email": "new@example.com", "plan": "pro", "name": "Ana"}


@pytest.mark.parametrize(("kind", "event"), [("page", "Page Viewed"), ("screen", "Screen Viewed")])
def test_page_and_screen_become_viewed_events_with_name_and_category(kind: str, event: str) -> None:
    body = {
        "userId": "42",
        "name": "Pricing",
        "category": "Docs",
        "properties": {"path": "/pricing", "name": "old name"},
    }
    (call,) = parse(kind, body).calls
    assert call.type == kind
    assert call.event == event
    assert call.properties == {"path": "/pricing", "name": "Pricing", "category": "Docs"}


def test_group_keeps_account_traits_apart_from_the_person() -> None:
    body = {
        "userId": "42",
        "groupId": "acme",
        "traits": {"name": "Acme", "employees": 420},
        "context": {"traits": {"email": "ana@example.com"}},
    }
    (call,) = parse("group", body).calls
    assert call.group_id == "acme"
    assert call.group_traits == {"name": "Acme", "employees": 420}
    assert call.traits == {"email": "ana@example.com"}


def test_alias_needs_previous_id_and_user_id() -> None:
    (call,) = parse("alias", {"previousId": "anon-1", "userId": "42"}).calls
    assert (call.type, call.previous_id, call.user_id) == ("alias", "anon-1", "42")

    rejected = reject("alias", {"anonymousId": "anon-1"})
    assert rejected.status == 400
    assert set(problems(rejected)) == {"previousId", "userId"}


def test_group_needs_group_id() -> None:
    assert problems(reject("group", {"userId": "42"})) == {
        "groupId": "is required for group: the id of the account joined"
    }


@pytest.mark.parametrize("kind", ["track", "identify", "page", "screen", "group"])
def test_a_user_id_or_anonymous_id_is_required(kind: str) -> None:
    body = {"event": "Signed Up", "groupId": "acme", "userId": "  ", "anonymousId": None}
    errors = problems(reject(kind, body))
    assert "userId or anonymousId is required" in errors["userId"]


@pytest.mark.parametrize("event", [None, "", "   "])
def test_track_needs_an_event_name(event: str | None) -> None:
    errors = problems(reject("track", {"userId": "42", "event": event}))
    assert errors == {
        "event": 'is required for track: what the customer did, e.g. "Order Completed"'
    }


def test_unknown_fields_are_accepted_and_kept() -> None:
    body = {"userId": "42", "event": "X", "channel": "server", "context": {"custom": {"a": 1}}}
    (call,) = parse("track", body).calls
    assert call.raw["channel"] == "server"
    assert call.context["custom"] == {"a": 1}


@pytest.mark.parametrize("key", ["user_id", "model_config", "__class__", "model_dump", "_x"])
def test_unknown_fields_named_like_python_attributes_are_only_data(key: str) -> None:
    (call,) = parse("track", {"userId": "42", "event": "X", key: 5}).calls
    assert call.user_id == "42" and call.raw[key] == 5


@pytest.mark.parametrize(
    ("field", "value", "path", "message"),
    [
        ("userId", 42, "userId", "must be a string"),
        ("properties", ["a"], "properties", "must be a JSON object"),
        ("context", "web", "context", "must be a JSON object"),
        ("context", {"timezone": 1}, "context.timezone", "must be a string"),
        ("context", {"active": "true"}, "context.active", "must be true or false"),
        ("context", {"device": "phone"}, "context.device", "must be a JSON object"),
        ("integrations", {"Mixpanel": "no"}, "integrations.Mixpanel", "must be true, false"),
        ("timestamp", "yesterday", "timestamp", "must be an ISO-8601 date-time"),
        ("timestamp", 1714564800, "timestamp", "must be an ISO-8601 date-time"),
        ("sentAt", "2024-05-01", "sentAt", "a date alone is not enough"),
        ("originalTimestamp", "2024-13-01T00:00:00Z", "originalTimestamp", "ISO-8601"),
        ("messageId", "m" * 100, "messageId", "must be at most 99 characters"),
        ("type", "identify", "type", 'is "identify" but this is a track request'),
    ],
)
def test_wrong_types_for_known_fields_are_rejected(
    field: str, value: Any, path: str, message: str
) -> None:
    rejected = reject("track", {"userId": "42", "event": "X", field: value})
    assert rejected.status == 400
    assert message in problems(rejected)[path]


def test_every_problem_is_reported_at_once() -> None:
    body = {"userId": 42, "timestamp": "soon", "context": {"locale": 5}, "messageId": 7}
    assert set(problems(reject("track", body))) == {
        "userId",
        "timestamp",
        "context.locale",
        "messageId",
        "event",
    }


def test_an_unknown_time_zone_is_kept_in_context_but_not_trusted() -> None:
    (call,) = parse("identify", {"userId": "42", "context": {"timezone": "Mars/Olympus"}}).calls
    assert call.timezone is None
    assert call.context["timezone"] == "Mars/Olympus"


def test_a_missing_message_id_is_generated_afresh() -> None:
    first = parse("track", {"userId": "42", "event": "X"}).calls[0].message_id
    second = parse("track", {"userId": "42", "event": "X"}).calls[0].message_id
    assert first.startswith("hilo-") and second.startswith("hilo-") and first != second


# --- timestamps ---------------------------------------------------------------------------


def call_time(body: dict[str, Any], kind: str = "track") -> datetime:
    return parse(kind, {"userId": "42", "event": "X", **body}).calls[0].timestamp


def test_clock_skew_is_corrected_with_sent_at() -> None:
    # The phone's clock is 3 h fast; it tracked 10 min before sending.
    body = {"timestamp": "2024-05-01T14:50:00Z", "sentAt": "2024-05-01T15:00:00Z"}
    (call,) = parse("track", {"userId": "42", "event": "X", **body}).calls
    assert call.timestamp == NOW - timedelta(minutes=10)
    assert call.original_timestamp == datetime(2024, 5, 1, 14, 50, tzinfo=UTC)
    assert call.sent_at == datetime(2024, 5, 1, 15, 0, tzinfo=UTC)
    assert call.received_at == NOW


def test_original_timestamp_is_corrected_like_timestamp() -> None:
    body = {"originalTimestamp": "2024-05-01T08:55:00-03:00", "sentAt": "2024-05-01T12:00:00Z"}
    assert call_time(body) == NOW - timedelta(minutes=5)


def test_a_timestamp_without_sent_at_is_taken_as_given() -> None:
    assert call_time({"timestamp": "2019-01-01T00:00:00+02:00"}) == datetime(
        2018, 12, 31, 22, 0, tzinfo=UTC
    )


def test_naive_timestamps_are_utc() -> None:
    assert call_time({"timestamp": "2020-02-02T10:00:00"}) == datetime(
        2020, 2, 2, 10, 0, tzinfo=UTC
    )


def test_without_a_timestamp_the_call_happened_when_received() -> None:
    assert call_time({}) == NOW
    assert call_time({"sentAt": "2030-01-01T00:00:00Z"}) == NOW


def test_an_aware_received_at_in_another_zone_is_stored_as_utc() -> None:
    local = NOW.astimezone(timezone(timedelta(hours=2)))
    (call,) = parse("track", {"userId": "42", "event": "X"}, received_at=local).calls
    assert call.received_at == NOW and call.received_at.utcoffset() == timedelta(0)


def test_skew_correction_that_leaves_the_calendar_is_rejected() -> None:
    body = {"timestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-12-31T00:00:00Z"}
    assert "clock" in problems(reject("track", {"userId": "42", "event": "X", **body}))["sentAt"]


# --- batch --------------------------------------------------------------------------------


def test_batch_defaults_merge_into_each_call() -> None:
    first_call = {
        "type": "track",
        "userId": "42",
        "event": "A",
        "context": {"device": {"id": "d1"}},
    }
    body = {
        "batch": [
            first_call,
            {
                "type": "identify",
                "userId": "42",
                "context": {"locale": "fr-FR"},
                "integrations": {"Mixpanel": True},
                "sentAt": "2024-05-01T12:30:00Z",
                "timestamp": "2024-05-01T12:29:00Z",
            },
        ],
        "context": {"device": {"type": "phone"}, "locale": "en-US", "timezone": "Europe/Paris"},
        "integrations": {"All": False, "Mixpanel": False},
        "sentAt": "2024-05-01T13:00:00Z",
        "writeKey": WRITE_KEY,
    }
    first, second = parse("batch", body).calls
    assert first.context == {
        "device": {"type": "phone", "id": "d1"},
        "locale": "en-US",
        "timezone": "Europe/Paris",
    }
    assert first.integrations == {"All": False, "Mixpanel": False}
    assert first.sent_at == datetime(2024, 5, 1, 13, 0, tzinfo=UTC)
    assert (first.locale, first.timezone) == ("en-US", "Europe/Paris")
    assert second.locale == "fr-FR"
    assert second.integrations == {"All": False, "Mixpanel": True}
    # Its own sentAt wins over the batch's: 1 minute before it was sent.
    assert second.timestamp == NOW - timedelta(minutes=1)
    # The archive keeps what the client sent for that call.
    assert first.raw == first_call
    assert all("writeKey" not in call.raw for call in (first, second))


def test_every_bad_call_in_a_batch_is_reported_by_index() -> None:
    body = {
        "batch": [
            {"type": "track", "userId": "42", "event": "Fine"},
            {"type": "track", "userId": "42"},
            "not a call",
            {"userId": "42"},
            {"type": "track", "userId": "42", "event": "X", "timestamp": "nope"},
            {"type": "t", "userId": "42"},
        ]
    }
    rejected = reject("batch", body)
    assert rejected.status == 400
    assert set(problems(rejected)) == {
        "batch[1].event",
        "batch[2]",
        "batch[3].type",
        "batch[4].timestamp",
        "batch[5].type",
    }


def test_batch_level_problems_are_named_once() -> None:
    body = {
        "batch": [{"type": "track", "userId": "42", "event": "A"}],
        "context": {"ip": 7},
        "integrations": [],
        "sentAt": "later",
    }
    assert set(problems(reject("batch", body))) == {"context.ip", "integrations", "sentAt"}


@pytest.mark.parametrize(
    ("body", "message"),
    [({}, "is required"), ({"batch": {"type": "track"}}, "must be an array of calls")],
)
def test_a_batch_needs_its_array(body: dict[str, Any], message: str) -> None:
    assert message in problems(reject("batch", body))["batch"]


def test_an_empty_batch_is_accepted_with_no_calls() -> None:
    assert parse("batch", {"batch": []}).calls == []


def test_payloads_from_segment_and_rudderstack_python_libraries() -> None:
    messages = []
    segment = SegmentClient(WRITE_KEY, send=False)
    messages.append(segment.track(user_id="42", event="Order Completed", properties={"n": 1})[1])
    messages.append(segment.page(anonymous_id="a1", category="Docs", name="Intro")[1])
    messages.append(segment.group(user_id="42", group_id="acme", traits={"name": "Acme"})[1])
    messages.append(segment.alias(previous_id="a1", user_id="42")[1])
    rudder = RudderClient(WRITE_KEY, "http://localhost", send=False)
    messages.append(rudder.identify(user_id="42", traits={"email": "ana@example.com"})[1])
    messages.append(rudder.screen(user_id="42", name="Home")[1])
    sent_at = datetime.now(UTC)
    # As both libraries post it: a gzip'd batch with sentAt and writeKey at the top.
    body = {"batch": messages, "sentAt": sent_at.isoformat(), "writeKey": WRITE_KEY}
    headers = {**AUTH, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    request = parse_request(
        "batch", gzip.compress(encode(body)), headers, received_at=sent_at + timedelta(seconds=1)
    )
    assert request.write_key == WRITE_KEY
    assert [call.type for call in request.calls] == [
        "track",
        "page",
        "group",
        "alias",
        "identify",
        "screen",
    ]
    assert [call.message_id for call in request.calls] == [m["messageId"] for m in messages]
    assert request.calls[4].traits == {"email": "ana@example.com"}


# --- body, encoding, auth -----------------------------------------------------------------


def test_a_gzip_body_is_decompressed() -> None:
    body = gzip.compress(encode({"userId": "42", "event": "X"}))
    (call,) = parse("track", body, {**AUTH, "content-encoding": "GZIP"}).calls
    assert call.event == "X"


def test_bad_gzip_is_a_400_naming_the_body() -> None:
    truncated = gzip.compress(encode({"userId": "42", "event": "X"}))[:-6]
    for body in (b"not gzip at all", truncated):
        rejected = reject("track", body, {**AUTH, "Content-Encoding": "gzip"})
        assert rejected.status == 400
        assert "is not valid gzip" in problems(rejected)["body"]


def test_gzip_members_are_joined_but_not_without_end() -> None:
    halves = gzip.compress(b'{"userId": "42", ') + gzip.compress(b'"event": "X"}') + b"\x00" * 8
    (call,) = parse("track", halves, {**AUTH, "Content-Encoding": "x-gzip"}).calls
    assert call.event == "X"
    empties = gzip.compress(b"{}") + gzip.compress(b"") * 16
    rejected = reject("track", empties, {**AUTH, "Content-Encoding": "gzip"})
    assert "is not valid gzip" in problems(rejected)["body"]


def test_gzip_sent_without_its_header_gets_a_hint() -> None:
    body = gzip.compress(encode({"userId": "42", "event": "X"}))
    assert "send Content-Encoding: gzip" in problems(reject("track", body))["body"]


def test_other_encodings_are_unsupported() -> None:
    rejected = reject("track", b"{}", {**AUTH, "Content-Encoding": "br"})
    assert rejected.status == RejectionStatus.UNSUPPORTED_MEDIA_TYPE
    assert "Content-Encoding" in problems(rejected)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "is not valid JSON"),
        (b"[]", "must be a JSON object, not an array"),
        (b"\xff\xfe", "is not UTF-8"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_400(body: bytes, message: str) -> None:
    rejected = reject("track", body)
    assert rejected.status == 400
    assert message in problems(rejected)["body"]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (b'{"userId": NaN}', "userId", "NaN is not valid JSON"),
        (b'{"properties": {"a": [1, -Infinity]}}', "properties.a[1]", "-Infinity is not valid"),
        (b'{"n": 1e400}', "n", "out of range"),
    ],
)
def test_numbers_no_database_reads_back_are_a_400_naming_the_field(
    body: bytes, field: str, message: str
) -> None:
    rejected = reject("track", body)
    assert rejected.status == 400
    assert message in problems(rejected)[field]


def test_deep_nesting_is_rejected_with_its_path() -> None:
    deep: Any = "leaf"
    for _ in range(MAX_NESTING):
        deep = {"a": deep}
    rejected = reject("track", {"userId": "42", "event": "X", "properties": deep})
    (field,) = problems(rejected)
    assert field.startswith("properties.a.a.")
    # Deeper than Python's own JSON parser goes is still only a 400.
    assert reject("batch", b"[" * 200_000 + b"]" * 200_000).status == 400


def test_a_lone_surrogate_is_rejected_with_a_printable_path() -> None:
    body = b'{"userId": "42", "event": "X", "properties": {"\\ud800": "a", "b": "\\udfff"}}'
    rejected = reject("track", body)
    assert set(problems(rejected)) == {'properties["\\ud800"]', "properties.b"}
    json.dumps(segment_error_body(rejected), ensure_ascii=False).encode()


def test_write_key_from_basic_auth() -> None:
    assert parse("track", {"userId": "42", "event": "X"}).write_key == WRITE_KEY
    # Segment still takes a key encoded without the colon.
    legacy = {"Authorization": "Basic " + base64.b64encode(WRITE_KEY.encode()).decode()}
    assert parse("track", {"userId": "42", "event": "X"}, legacy).write_key == WRITE_KEY


def test_write_key_from_the_body() -> None:
    body = {"userId": "42", "event": "X", "writeKey": WRITE_KEY}
    request = parse("track", body, {})
    assert request.write_key == WRITE_KEY
    assert "writeKey" not in request.calls[0].raw
    # An OAuth bearer token leaves the write key to the body.
    assert parse("track", body, {"Authorization": "Bearer tok"}).write_key == WRITE_KEY
    # The same key both ways is fine.
    assert parse("track", body, AUTH).write_key == WRITE_KEY


@pytest.mark.parametrize(
    ("body", "headers", "field"),
    [
        ({}, {}, "writeKey"),
        ({"writeKey": ""}, {}, "writeKey"),
        ({}, basic(""), "writeKey"),
        ({"writeKey": 123}, {}, "writeKey"),
        ({"writeKey": "other"}, AUTH, "writeKey"),
        ({}, {"Authorization": "Basic not-base64!"}, "Authorization"),
    ],
)
def test_no_usable_write_key_is_a_401(
    body: dict[str, Any], headers: dict[str, str], field: str
) -> None:
    rejected = reject("track", {"userId": "42", "event": "X", **body}, headers)
    assert rejected.status == RejectionStatus.UNAUTHORIZED
    assert list(problems(rejected)) == [field]


def test_an_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        parse("import", {"batch": []})


# --- limits -------------------------------------------------------------------------------


def padded_call(size: int, index: int = 0) -> dict[str, Any]:
    """A valid track call of exactly ``size`` bytes as compact JSON."""
    call: dict[str, Any] = {
        "type": "track",
        "userId": "42",
        "event": f"E{index}",
        "properties": {"pad": ""},
    }
    call["properties"]["pad"] = "x" * (size - json_size(call))
    assert json_size(call) == size
    return call


def test_a_call_of_33_kb_in_a_batch_is_rejected_naming_its_index_and_size() -> None:
    calls = [padded_call(1000, 0), padded_call(1000, 1), padded_call(33 * 1024, 2)]
    rejected = reject("batch", {"batch": calls})
    assert rejected.status == RejectionStatus.PAYLOAD_TOO_LARGE
    assert problems(rejected) == {
        "batch[2]": "is 33,792 bytes; a call must be at most 32,768 bytes (32 KB): "
        "keep large data out of properties and traits"
    }


def test_a_call_of_exactly_32_kb_in_a_batch_is_accepted() -> None:
    assert len(parse("batch", {"batch": [padded_call(MAX_CALL_BYTES)]}).calls) == 1


def test_a_single_call_over_32_kb_is_rejected() -> None:
    call = padded_call(33 * 1024)
    rejected = reject("track", call)
    assert rejected.status == 413
    assert "a single call must be at most 32,768 bytes" in problems(rejected)["body"]


def test_a_batch_of_501_kb_is_rejected() -> None:
    calls = [padded_call(30_000, index) for index in range(16)]
    short = len(encode({"batch": [*calls, padded_call(1000, 16)]}))
    body = encode({"batch": [*calls, padded_call(1000 + 501 * 1024 - short, 16)]})
    assert len(body) == 501 * 1024
    rejected = reject("batch", body)
    assert rejected.status == 413
    assert problems(rejected) == {
        "body": "is 513,024 bytes; a batch request must be at most 512,000 bytes (500 KB); "
        "split it into smaller batches"
    }


def test_a_batch_of_500_kb_is_accepted() -> None:
    calls = [padded_call(30_000, index) for index in range(16)]
    short = len(encode({"batch": [*calls, padded_call(1000, 16)]}))
    body = encode({"batch": [*calls, padded_call(1000 + MAX_BATCH_BYTES - short, 16)]})
    assert len(body) == MAX_BATCH_BYTES
    assert len(parse("batch", body).calls) == 17


def test_a_batch_of_more_than_2500_calls_is_rejected() -> None:
    call = {"type": "track", "userId": "1", "event": "E"}
    rejected = reject("batch", {"batch": [call] * (MAX_BATCH_CALLS + 1)})
    assert rejected.status == 413
    assert problems(rejected) == {"batch": "has 2,501 calls; send at most 2,500 a request"}


@pytest.mark.parametrize(
    ("kind", "size"), [("batch", 64 * 1024 * 1024), ("track", 4 * 1024 * 1024)]
)
def test_a_gzip_bomb_is_rejected_quickly(kind: str, size: int) -> None:
    bomb = gzip.compress(b" " * size, compresslevel=9)
    assert len(bomb) < MAX_BATCH_BYTES
    started = time.perf_counter()
    with pytest.raises(SegmentRejected) as info:
        parse_request(kind, bomb, {**AUTH, "Content-Encoding": "gzip"}, received_at=NOW)
    assert time.perf_counter() - started < 0.5
    assert info.value.status == 413
    assert "decompresses to more than" in problems(info.value)["body"]


def test_a_compressed_body_far_over_the_limit_is_not_decompressed() -> None:
    rejected = reject(
        "track", b"\x1f\x8b" + b"\x00" * (MAX_CALL_BYTES * 2), {**AUTH, "Content-Encoding": "gzip"}
    )
    assert rejected.status == 413
    assert "bytes compressed" in problems(rejected)["body"]


# --- response bodies ----------------------------------------------------------------------


def test_error_and_success_bodies() -> None:
    rejected = reject("track", {"userId": "42"})
    assert segment_error_body(rejected) == {
        "success": False,
        "message": "Invalid request: 1 problem (event is required for track: what the "
        'customer did, e.g. "Order Completed"); nothing from this request was accepted',
        "errors": [
            {
                "field": "event",
                "message": 'is required for track: what the customer did, e.g. "Order Completed"',
            }
        ],
    }
    assert segment_success_body() == {"success": True}


# --- properties ---------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
header_choices = st.sampled_from(
    [{}, AUTH, basic(""), {"Authorization": "Basic ???"}, {"Authorization": "Bearer x"}]
)


def outcome(kind: str, body: bytes, headers: dict[str, str]) -> SegmentRequest | None:
    """The contract: a SegmentRequest, or SegmentRejected with a 4xx and located errors."""
    try:
        request = parse_request(kind, body, headers, received_at=NOW)
    except SegmentRejected as rejected:
        assert 400 <= rejected.status < 500
        assert rejected.errors
        assert all(isinstance(error, FieldError) for error in rejected.errors)
        assert all(error.field and error.message for error in rejected.errors)
        json.dumps(segment_error_body(rejected), ensure_ascii=False).encode()
        return None
    assert request.write_key
    for call in request.calls:
        assert call.type in CALL_TYPES and call.message_id
        assert call.timestamp.utcoffset() == timedelta(0)
        assert call.user_id or call.anonymous_id or call.type == "alias"
        call.model_dump_json()
    return request


@PROPERTY_SETTINGS
@given(kind=st.sampled_from(KINDS), value=json_values, headers=header_choices)
def test_any_json_value_is_parsed_or_rejected_with_4xx(
    kind: str, value: Any, headers: dict[str, str]
) -> None:
    outcome(kind, json.dumps(value).encode(), headers)


@PROPERTY_SETTINGS
@given(
    kind=st.sampled_from(KINDS),
    body=st.binary(max_size=200),
    encoding=st.sampled_from(["", "gzip", "identity", "deflate"]),
)
def test_any_bytes_are_parsed_or_rejected_with_4xx(kind: str, body: bytes, encoding: str) -> None:
    outcome(kind, body, {**AUTH, "Content-Encoding": encoding})


VALID_CALLS: dict[str, dict[str, Any]] = {
    "track": {"userId": "42", "event": "Order Completed", "properties": {"total": 3}},
    "identify": {"anonymousId": "a1", "traits": {"email": "ana@example.com"}},
    "page": {"userId": "42", "name": "Home", "category": "Docs"},
    "screen": {"anonymousId": "a1", "name": "Home"},
    "group": {"userId": "42", "groupId": "acme", "traits": {"name": "Acme"}},
    "alias": {"previousId": "a1", "userId": "42"},
}
COMMON = {
    "messageId": "m-1",
    "timestamp": "2024-05-01T11:00:00Z",
    "sentAt": "2024-05-01T11:01:00+02:00",
    "context": {"timezone": "Europe/Madrid", "locale": "es-ES", "ip": "203.0.113.7"},
    "integrations": {"All": True},
}
KNOWN_KEYS = sorted(
    {key for call in VALID_CALLS.values() for key in call}
    | set(COMMON)
    | {"type", "originalTimestamp", "writeKey", "batch"}
)
mutations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(KNOWN_KEYS) | st.text(max_size=8), json_values),
        st.tuples(st.just("delete"), st.sampled_from(KNOWN_KEYS), st.none()),
        st.tuples(
            st.just("context"),
            st.sampled_from(["timezone", "locale", "ip", "traits", "device", "active"]),
            json_values,
        ),
    ),
    max_size=4,
)


def mutated(call: dict[str, Any], changes: list[tuple[str, str, Any]]) -> dict[str, Any]:
    call = json.loads(json.dumps(call))
    for action, key, value in changes:
        if action == "set":
            call[key] = value
        elif action == "delete":
            call.pop(key, None)
        elif isinstance(call.get("context"), dict):
            call["context"][key] = value
    return call


@PROPERTY_SETTINGS
@given(
    call_type=st.sampled_from(CALL_TYPES),
    changes=mutations,
    in_batch=st.booleans(),
    batch_changes=mutations,
)
def test_mutated_valid_calls_are_parsed_or_rejected_with_4xx(
    call_type: str,
    changes: list[tuple[str, str, Any]],
    in_batch: bool,
    batch_changes: list[tuple[str, str, Any]],
) -> None:
    call = mutated({**COMMON, **VALID_CALLS[call_type]}, changes)
    if in_batch:
        body = mutated({"batch": [{**call, "type": call_type}], "context": {}}, batch_changes)
        outcome("batch", encode(body), AUTH)
    else:
        outcome(call_type, encode(call), AUTH)


def test_the_unmutated_calls_are_all_accepted() -> None:
    batch = [{**COMMON, **call, "type": kind} for kind, call in VALID_CALLS.items()]
    request = outcome("batch", encode({"batch": batch}), AUTH)
    assert request is not None and len(request.calls) == len(CALL_TYPES)


@PROPERTY_SETTINGS
@given(
    size=st.integers(MAX_CALL_BYTES - 64, MAX_CALL_BYTES + 64),
    index=st.integers(0, 3),
    compress=st.booleans(),
)
def test_calls_around_32_kb_are_accepted_exactly_up_to_the_limit(
    size: int, index: int, compress: bool
) -> None:
    calls = [padded_call(200, n) for n in range(4)]
    calls[index] = padded_call(size, index)
    body = encode({"batch": calls})
    headers = AUTH
    if compress:
        body, headers = gzip.compress(body), {**AUTH, "Content-Encoding": "gzip"}
    request = outcome("batch", body, headers)
    if size <= MAX_CALL_BYTES:
        assert request is not None and len(request.calls) == 4
    else:
        rejected = reject("batch", {"batch": calls})
        assert rejected.status == 413 and list(problems(rejected)) == [f"batch[{index}]"]


@PROPERTY_SETTINGS
@given(cut=st.integers(1, 60), flip=st.integers(0, 255), at=st.integers(0, 10_000))
def test_damaged_gzip_is_parsed_or_rejected_with_4xx(cut: int, flip: int, at: int) -> None:
    compressed = bytearray(gzip.compress(encode({**COMMON, **VALID_CALLS["track"]})))
    compressed[at % len(compressed)] ^= flip
    for body in (bytes(compressed), bytes(compressed[:-cut])):
        outcome("track", body, {**AUTH, "Content-Encoding": "gzip"})
