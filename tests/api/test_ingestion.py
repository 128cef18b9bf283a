"""Segment-compatible ingestion end to end: real client libraries against a real server,
malformed requests refused whole, identity merges that running journeys follow, consent
with its source and time, and each customer's events delivered in the order accepted."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlmodel import select
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RetryConfig

from hilo.db.models import (
    Device,
    Identity,
    JourneyInstance,
    OutboxEntry,
    PolicyDecisionRecord,
    StoredEvent,
)
from hilo.db.store import Store
from hilo.devtools.devserver import free_port
from hilo.devtools.simulation import JourneyLab
from hilo.intake.routing import EventRouter
from hilo.intake.segment_spec import MAX_BATCH_BYTES, MAX_CALL_BYTES
from tests.helpers.api import asgi, basic, counts, hilo_app
from tests.helpers.examples import example

CART = {"cart_id": "c1", "cart_value": 80, "product_name": "Mug"}


async def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``check`` (real time; the lab's clock does not move) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"still {value!r} after {timeout}s")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- real client libraries


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """A real uvicorn server (lifespan and all) in a thread; yields its URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="hilo-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def send_with_segment(url: str, now: datetime) -> None:
    """Segment's library: plain JSON bodies."""
    from segment import analytics

    client = analytics.Client("shop-key", host=url, sync_mode=True, max_retries=0)
    send_with(client, now)


def send_with_rudderstack(url: str, now: datetime) -> None:
    """RudderStack's library: gzip bodies."""
    from rudderstack import analytics

    client = analytics.Client("shop-key", host=url, sync_mode=True, max_retries=0)
    send_with(client, now)


def send_with(client: Any, now: datetime) -> None:
    """What a shop's backend sends: who the customer is, then what they did."""
    client.identify(
        "lib-1",
        {"email": "ana@example.com", "first_name": "Ana", "consent": {"email": True}},
        context={"device": {"token": "fcm-lib-1", "type": "android"}},
        timestamp=now,
    )
    client.track("lib-1", "Cart Abandoned", CART, timestamp=now)


@pytest.mark.parametrize("library", [send_with_segment, send_with_rudderstack])
async def test_client_libraries_start_a_journey(
    lab: JourneyLab, library: Callable[[str, datetime], None]
) -> None:
    """Configured with nothing but Hilo's URL and a write key, the libraries' identify and
    track land on one profile and start abandoned_cart through the dispatcher."""
    lab.publish(example("abandoned_cart"))
    workflow_id = "journey/abandoned_cart/lib-1/c1"
    now = await lab.now()
    with serving(hilo_app(lab.store, lab, dispatcher=True)) as url:
        await asyncio.to_thread(library, url, now)
        instance = await eventually(lambda: lab.store.get_instance(workflow_id))
        await eventually(lambda: workflow_id in lab.handles)
    assert (instance.customer_id, instance.journey_key) == ("lib-1", "abandoned_cart")
    profile = lab.store.get_profile("lib-1")
    assert profile is not None
    assert profile.traits == {"email": "ana@example.com", "first_name": "Ana"}
    assert profile.consent == {"email": True}
    with lab.store.session() as session:
        events = session.exec(select(StoredEvent).where(StoredEvent.customer_id == "lib-1"))
        assert sorted((e.type, e.source) for e in events) == [
            ("identify", "shop"),
            ("track", "shop"),
        ]
        device = session.exec(select(Device)).one()
        assert (device.customer_id, device.address, device.platform) == (
            "lib-1",
            "fcm-lib-1",
            "android",
        )
    result = await lab.result(workflow_id)
    assert result.status == "completed"
    assert lab.store.captured("lib-1")[0].recipient == "ana@example.com"


# ---------------------------------------------------------------- malformed requests

KINDS = ("track", "identify", "page", "screen", "group", "alias")
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
NOT_STRING = st.integers() | st.floats(allow_nan=False) | st.booleans() | st.lists(JSON, max_size=2)
NOT_OBJECT = st.integers() | st.text(max_size=10) | st.booleans() | st.lists(JSON, max_size=2)
BAD_INSTANTS = [
    "yesterday",
    "2024-13-01T00:00:00Z",
    "2024-02-30T10:00:00Z",
    "2024-05-01",  # a date alone
    "2024-05-01T25:00:00Z",
    "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
    "",
    "1714564800",
]


def valid_call(kind: str, index: int = 0) -> dict[str, Any]:
    """A call that would be accepted (and stored) as it is."""
    call: dict[str, Any] = {
        "userId": "prop-1",
        "messageId": f"prop-{kind}-{index}",
        "timestamp": "2024-05-01T12:00:00Z",
        "context": {"device": {"token": "fcm-prop"}},
    }
    extra: dict[str, dict[str, Any]] = {
        "track": {"event": "Cart Abandoned", "properties": dict(CART)},
        "identify": {"traits": {"email": "p@example.com", "consent": {"sms": True}}},
        "page": {"name": "Home", "properties": {"url": "/"}},
        "screen": {"name": "Home"},
        "group": {"groupId": "acme", "traits": {"plan": "pro"}},
        "alias": {"previousId": "anon-prop"},
    }
    return call | extra[kind]


def _is_instant(value: str) -> bool:
    try:
        datetime.fromisoformat(value.strip())
    except ValueError:
        return False
    return "T" in value or " " in value.strip()


@dataclass
class Attempt:
    """One request that must be refused: where it goes, its bytes and headers."""

    kind: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    why: str = ""


def attempt(kind: str, payload: Any, why: str, **headers: str) -> Attempt:
    return Attempt(kind, json.dumps(payload).encode(), {**basic("web-key"), **headers}, why)


@st.composite
def wrong_types(draw: st.DrawFn) -> Attempt:
    kind = draw(st.sampled_from(KINDS))
    call = valid_call(kind)
    strings = ["userId", "messageId", "timestamp"] + {
        "track": ["event"],
        "alias": ["previousId"],
    }.get(kind, [])
    objects = ["context", "integrations"] + {
        "track": ["properties"],
        "page": ["properties"],
        "identify": ["traits"],
        "group": ["traits"],
    }.get(kind, [])
    name = draw(st.sampled_from(strings + objects))
    call[name] = draw(NOT_STRING if name in strings else NOT_OBJECT)
    return attempt(kind, call, f"{name} of the wrong type")


@st.composite
def bad_timestamps(draw: st.DrawFn) -> Attempt:
    kind = draw(st.sampled_from(KINDS))
    name = draw(st.sampled_from(["timestamp", "sentAt", "originalTimestamp"]))
    value = draw(
        st.sampled_from(BAD_INSTANTS) | st.text(max_size=30).filter(lambda t: not _is_instant(t))
    )
    return attempt(kind, valid_call(kind) | {name: value}, f"{name} {value!r}")


@st.composite
def skewed_clocks(draw: st.DrawFn) -> Attempt:
    """Valid instants whose clock-skew correction leaves the calendar."""
    kind = draw(st.sampled_from(KINDS))
    call = valid_call(kind) | {
        "timestamp": "0001-01-02T00:00:00Z",
        "sentAt": "9999-12-30T00:00:00Z",
    }
    return attempt(kind, call, "sentAt far from timestamp")


@st.composite
def random_objects(draw: st.DrawFn) -> Attempt:
    kind = draw(st.sampled_from((*KINDS, "batch")))
    keys = st.text(max_size=12).filter(
        lambda k: k not in {"userId", "anonymousId", "previousId", "batch"}
    )
    return attempt(kind, draw(st.dictionaries(keys, JSON, max_size=6)), "random object")


@st.composite
def not_objects(draw: st.DrawFn) -> Attempt:
    kind = draw(st.sampled_from((*KINDS, "batch")))
    value = draw(JSON.filter(lambda v: not isinstance(v, dict)))
    return attempt(kind, value, "not an object")


@st.composite
def oversized(draw: st.DrawFn) -> Attempt:
    shape = draw(st.sampled_from(["call", "call in batch", "batch", "gzip batch"]))
    pad = draw(st.integers(0, 4096))
    if shape == "call":
        kind = draw(st.sampled_from(KINDS))
        call = valid_call(kind) | {"blob": "x" * (MAX_CALL_BYTES + pad)}
        return attempt(kind, call, "call over 32 KB")
    if shape == "call in batch":
        calls = [valid_call("track", 0), valid_call("track", 1)]
        calls[draw(st.integers(0, 1))]["blob"] = "x" * (MAX_CALL_BYTES + pad)
        return attempt("batch", {"batch": [{"type": "track", **c} for c in calls]}, shape)
    # Calls of 20 KB each, within the per-call limit, together over 500 KB.
    count = MAX_BATCH_BYTES // (20 * 1024) + 1 + draw(st.integers(0, 3))
    calls = [
        {"type": "track", **valid_call("track", i), "blob": "y" * (20 * 1024 - 300)}
        for i in range(count)
    ]
    body = json.dumps({"batch": calls}).encode()
    if shape == "batch":
        return Attempt("batch", body, basic("web-key"), "batch over 500 KB")
    # Small on the wire, over the limit once inflated.
    return Attempt(
        "batch",
        gzip.compress(body),
        {**basic("web-key"), "Content-Encoding": "gzip"},
        "gzip batch over 500 KB",
    )


@st.composite
def bad_encodings(draw: st.DrawFn) -> Attempt:
    kind = draw(st.sampled_from(KINDS))
    valid = gzip.compress(json.dumps(valid_call(kind)).encode())
    body = draw(
        st.binary(max_size=200).filter(lambda b: not b.startswith(b"\x1f\x8b"))
        | st.integers(0, len(valid) - 1).map(lambda n: valid[:n])  # cut short
        | st.just(gzip.compress(b"{not json"))
        | st.just(gzip.compress(b"\xff\xfe not utf-8"))
    )
    encoding = draw(st.sampled_from(["gzip", "gzip", "gzip", "br", "deflate", "zstd"]))
    return Attempt(kind, body, {**basic("web-key"), "Content-Encoding": encoding}, "bad body")


@st.composite
def bad_write_keys(draw: st.DrawFn) -> Attempt:
    kind = draw(st.sampled_from(KINDS))
    headers = draw(
        st.sampled_from([{}, basic("dev-write-key"), basic("nope"), {"Authorization": "Basic ***"}])
    )
    return Attempt(kind, json.dumps(valid_call(kind)).encode(), headers, "write key")


@st.composite
def one_bad_call_in_a_batch(draw: st.DrawFn) -> Attempt:
    """A batch is accepted whole or not at all: good calls beside a bad one are not kept."""
    bad = draw(wrong_types() | bad_timestamps())
    calls = [{"type": kind, **valid_call(kind, 9)} for kind in KINDS]
    position = draw(st.integers(0, len(calls)))
    calls.insert(position, {"type": bad.kind, **json.loads(bad.body)})
    return attempt("batch", {"batch": calls}, f"batch[{position}]: {bad.why}")


MALFORMED = st.one_of(
    wrong_types(),
    bad_timestamps(),
    skewed_clocks(),
    random_objects(),
    not_objects(),
    oversized(),
    bad_encodings(),
    bad_write_keys(),
    one_bad_call_in_a_batch(),
)


@pytest.fixture
def store_app(any_store: Store) -> FastAPI:
    """One app for every example: a new one costs more than the request."""
    return hilo_app(any_store)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=MALFORMED)
async def test_malformed_requests_are_refused_whole(
    any_store: Store, store_app: FastAPI, request: Attempt
) -> None:
    """Whatever arrives: a 4xx naming every bad field, never a 5xx, and nothing stored."""
    before = counts(any_store)
    async with asgi(store_app) as api:
        response = await api.post(
            f"/v1/{request.kind}", content=request.body, headers=request.headers
        )
    assert 400 <= response.status_code < 500, (request.why, response.text)
    body = response.json()
    assert body["success"] is False
    assert body["errors"], request.why
    assert all(error["field"] and error["message"] for error in body["errors"]), body
    assert counts(any_store) == before, request.why


async def test_the_valid_calls_the_properties_start_from_are_accepted(any_store: Store) -> None:
    """So that the refusals above are the mutations' doing, not the base calls'."""
    async with asgi(hilo_app(any_store)) as api:
        batch = {"batch": [{"type": kind, **valid_call(kind)} for kind in KINDS]}
        response = await api.post("/v1/batch", json=batch, headers=basic("web-key"))
    assert response.json() == {"success": True}
    assert counts(any_store)["StoredEvent"] == len(KINDS)


async def test_addresses_too_long_for_an_identity_stay_traits(any_store: Store) -> None:
    """Valid Segment calls whose email or push token exceed the identity and device columns
    are accepted (on PostgreSQL too, which enforces the sizes) without those rows. (A phone
    is E.164 now, at most 16 characters, or the call is refused: see the phone tests.)"""
    email = "a" * 400 + "@example.com"
    calls = [
        {"type": "identify", "userId": "long-1", "traits": {"email": email}},
        {"type": "identify", "userId": "long-1", "traits": {"email": "   "}},
        {"type": "track", "userId": "long-1", "event": "App Opened"}
        | {"context": {"device": {"token": "t" * 3000}}},
    ]
    async with asgi(hilo_app(any_store)) as api:
        # A server source: the second call changes the customer's email.
        response = await api.post("/v1/batch", json={"batch": calls}, headers=basic("shop-key"))
        assert response.json() == {"success": True}
        view = (await api.get("/profiles/long-1")).json()
    assert view["traits"] == {"email": "   "}
    assert [(i["kind"], i["value"]) for i in view["identities"]] == [("user_id", "long-1")]
    assert view["devices"] == []


# ---------------------------------------------------------------- duplicates, write keys


async def test_a_repeated_message_id_is_stored_routed_and_started_once(lab: JourneyLab) -> None:
    lab.publish(example("abandoned_cart"))
    app = hilo_app(lab.store, lab)
    call = {
        "userId": "dup-1",
        "event": "Cart Abandoned",
        "properties": CART,
        "messageId": "dup-message",
        "timestamp": (await lab.now()).isoformat(),
    }
    async with asgi(app) as api:
        for _attempt in range(2):  # a client retrying after a lost answer
            response = await api.post("/v1/track", json=call, headers=basic("web-key"))
            assert response.json() == {"success": True}
        twice = {"batch": [{"type": "track", **call}, {"type": "track", **call}]}
        assert (await api.post("/v1/batch", json=twice, headers=basic("web-key"))).is_success
        assert lab.store.outbox_size() == 1
        delivered, _pending = await app.state.dispatcher.dispatch_once()
        assert delivered == 1
        # After routing too: nothing new to store or route.
        assert (await api.post("/v1/track", json=call, headers=basic("web-key"))).is_success
        assert lab.store.outbox_size() == 0
        assert await app.state.dispatcher.dispatch_once() == (0, 0.0)
    assert counts(lab.store)["StoredEvent"] == 1
    instances = lab.store.instances_of_customer("dup-1")
    assert [i.trigger_message_id for i in instances] == ["dup-message"]
    assert (await lab.result("journey/abandoned_cart/dup-1/c1")).status == "completed"


async def test_each_write_key_is_its_source(any_store: Store) -> None:
    async with asgi(hilo_app(any_store)) as api:
        web = {"userId": "s-1", "event": "Product Viewed", "messageId": "from-web"}
        assert (await api.post("/v1/track", json=web, headers=basic("web-key"))).is_success
        ios = {"userId": "s-1", "name": "Cart", "messageId": "from-ios", "writeKey": "ios-key"}
        assert (await api.post("/v1/screen", json=ios)).is_success

        # Configured keys replace the development key.
        for headers in (basic("dev-write-key"), basic("unknown")):
            refused = await api.post("/v1/track", json=web | {"messageId": "x"}, headers=headers)
            assert refused.status_code == 401
            assert refused.json()["errors"][0]["field"] == "writeKey"
            assert refused.headers["www-authenticate"].startswith("Basic")

        entries = (await api.get("/profiles/s-1/timeline")).json()
    with any_store.session() as session:
        stored = {e.message_id: e.source for e in session.exec(select(StoredEvent))}
        identity = session.get(Identity, ("user_id", "s-1"))
    assert stored == {"from-web": "web", "from-ios": "ios"}
    assert identity is not None and identity.source == "web"
    assert {(e["summary"], e["source"]) for e in entries} == {
        ("Product Viewed", "web"),
        ("Screen Viewed", "ios"),
    }


# ---------------------------------------------------------------- identity merge


async def test_an_anonymous_journey_follows_the_customer_who_signs_in(lab: JourneyLab) -> None:
    """Anonymous browsing starts abandoned_cart; an identify merges the visitor into the
    known customer, whose email the next reminder goes to and whose purchase ends it."""
    lab.publish(example("abandoned_cart"))
    app = hilo_app(lab.store, lab)
    dispatcher = app.state.dispatcher
    workflow_id = "journey/abandoned_cart/anon-7/c1"
    key = basic("web-key")
    async with asgi(app) as api:
        now = (await lab.now()).isoformat()
        page = {"anonymousId": "anon-7", "name": "Mug", "timestamp": now}
        assert (await api.post("/v1/page", json=page, headers=key)).is_success
        cart = {"anonymousId": "anon-7", "event": "Cart Abandoned", "properties": CART}
        assert (await api.post("/v1/track", json=cart | {"timestamp": now}, headers=key)).is_success
        assert (await dispatcher.dispatch_once())[0] == 2
        anonymous = lab.store.get_instance(workflow_id)
        assert anonymous is not None and anonymous.customer_id == "anon-7"
        assert (await api.get("/profiles/anon-7")).json()["anonymous"] is True

        await lab.advance(timedelta(minutes=10))
        identify = {
            "userId": "user-7",
            "anonymousId": "anon-7",
            "traits": {"email": "Ana@Example.com", "first_name": "Ana"},
            "timestamp": (await lab.now()).isoformat(),
        }
        assert (await api.post("/v1/identify", json=identify, headers=key)).is_success
        assert (await dispatcher.dispatch_once())[0] == 1  # the running instance is told

        by_anonymous = (await api.get("/profiles/anon-7")).json()
        by_user = (await api.get("/profiles/user-7")).json()
        assert by_anonymous == by_user
        assert by_user["customer_id"] == "user-7" and by_user["anonymous"] is False
        assert by_user["merged_from"] == ["anon-7"]
        assert {(i["kind"], i["value"]) for i in by_user["identities"]} == {
            ("user_id", "user-7"),
            ("anonymous_id", "anon-7"),
            ("email", "ana@example.com"),
        }
        with lab.store.session() as session:
            owners = {e.customer_id for e in session.exec(select(StoredEvent))}
        assert owners == {"user-7"}
        moved = lab.store.get_instance(workflow_id)
        assert moved is not None and moved.customer_id == "user-7"

        # The first reminder is due 45 minutes after the cart: after the sign-in.
        await lab.advance(timedelta(minutes=40))
        sent = await eventually(lambda: lab.store.captured("user-7"))
        assert sent[0].template == "cart_reminder_1"
        assert (sent[0].recipient or "").lower() == "ana@example.com"
        assert sent[0].content["subject"] == "You left Mug in your cart"

        order: dict[str, Any] = {"userId": "user-7", "event": "Order Completed"}
        order["properties"] = {"cart_id": "c1", "total": 80}
        assert (await api.post("/v1/track", json=order, headers=key)).is_success
        assert (await dispatcher.dispatch_once())[0] == 1
        result = await lab.result(workflow_id)
        assert (result.status, result.reason) == ("exited", "purchased")

        entries = (await api.get("/profiles/anon-7/timeline")).json()
    kinds = [e["kind"] for e in entries]
    assert {"event", "identify", "journey_entry", "journey_exit", "message"} <= set(kinds)
    assert [e["summary"] for e in entries if e["kind"] == "journey_exit"] == [
        "left abandoned_cart: exited (purchased)"
    ]
    ats = [e["at"] for e in entries]
    assert ats == sorted(ats, reverse=True)


# ---------------------------------------------------------------- consent and devices

P256DH = base64.urlsafe_b64encode(b"\x04" + bytes(64)).decode().rstrip("=")
AUTH = base64.urlsafe_b64encode(bytes(16)).decode().rstrip("=")
SUBSCRIPTION = {"endpoint": "https://push.example/sub/1", "keys": {"p256dh": P256DH, "auth": AUTH}}


async def test_consent_from_traits_and_the_endpoint_keeps_source_and_time(
    any_store: Store,
) -> None:
    async with asgi(hilo_app(any_store)) as api:
        identify = {
            "userId": "c-1",
            "traits": {"consent": {"email": True, "sms": False}},
            "timestamp": "2024-05-01T09:00:00Z",
            "context": {"device": {"token": "fcm-c-1", "type": "ios"}},
        }
        # Granting consent takes a server source.
        assert (await api.post("/v1/identify", json=identify, headers=basic("shop-key"))).is_success
        sms = {"channel": "sms", "granted": True, "source": "support", "detail": "call 12"}
        answer = await api.post("/profiles/c-1/consent", json=sms)
        assert answer.status_code == 200, answer.text
        topic = {"channel": "email", "granted": False, "source": "web", "topic": "newsletter"}
        assert (await api.post("/profiles/c-1/consent", json=topic)).is_success
        webpush = {"channel": "webpush", "granted": True, "source": "web"}
        assert (
            await api.post("/profiles/c-1/consent", json=webpush | {"subscription": SUBSCRIPTION})
        ).is_success
        push = {"channel": "push", "granted": True, "source": "app", "token": "fcm-c-1-tablet"}
        assert (await api.post("/profiles/c-1/consent", json=push)).is_success
        withdraw = push | {"granted": False, "token": "fcm-c-1"}
        view = (await api.post("/profiles/c-1/consent", json=withdraw)).json()
        entries = (await api.get("/profiles/c-1/timeline")).json()

    # The channel's consent is the latest statement; a topic leaves it as it was.
    assert view["consent"] == {
        "email": True,
        "sms": True,
        "webpush": True,
        "push": False,
    }
    assert view["topics"] == {"email": {"newsletter": False}}
    history = [
        (c["channel"], c["granted"], c["topic"], c["source"], c["detail"])
        for c in view["consent_history"]
    ]
    assert history[:2] == [
        ("email", True, None, "shop", "identify traits"),
        ("sms", False, None, "shop", "identify traits"),
    ]
    assert history[2:] == [
        ("sms", True, None, "support", "call 12"),
        ("email", False, "newsletter", "web", None),
        ("webpush", True, None, "web", None),
        ("push", True, None, "app", None),
        ("push", False, None, "app", None),
    ]
    assert view["consent_history"][0]["changed_at"].startswith("2024-05-01T09:00:00")
    later = [datetime.fromisoformat(c["changed_at"]) for c in view["consent_history"][2:]]
    assert later == sorted(later) and later[0] > datetime.fromisoformat("2024-05-02T00:00:00+00:00")
    devices = {(d["kind"], d["address"]): (d["platform"], d["active"]) for d in view["devices"]}
    assert devices == {
        ("push", "fcm-c-1"): ("ios", False),
        ("webpush", "https://push.example/sub/1"): (None, True),
        ("push", "fcm-c-1-tablet"): (None, True),
    }
    with any_store.session() as session:
        stored = session.exec(select(Device).where(Device.kind == "webpush")).one()
    assert stored.data == {"keys": {"p256dh": P256DH, "auth": AUTH}}
    consent_entries = [(e["summary"], e["source"]) for e in entries if e["kind"] == "consent"]
    assert ("sms consent granted", "support") in consent_entries
    assert ("email newsletter consent withdrawn", "web") in consent_entries


BAD_CONSENT: list[tuple[dict[str, Any], list[str]]] = [
    (
        {"channel": "webpush", "granted": True, "source": "web"}
        | {"subscription": SUBSCRIPTION, "token": "fcm-1"},
        ["body", "token"],
    ),
    ({"channel": "fax", "granted": True, "source": "web"}, ["body", "channel"]),
    ({"channel": "email", "granted": True}, ["body", "source"]),
    ({"channel": "email", "granted": True, "source": "web", "token": "t"}, ["body", "token"]),
    ({"channel": "push", "granted": True, "source": "web", "token": "a b"}, ["body", "token"]),
    (
        {"channel": "webpush", "granted": True, "source": "web"}
        | {"subscription": {"endpoint": "https://push.example/1", "keys": {"p256dh": P256DH}}},
        ["body", "subscription", "keys", "auth"],
    ),
    (
        {"channel": "webpush", "granted": True, "source": "web"}
        | {"subscription": SUBSCRIPTION | {"endpoint": "http://push.example/1"}},
        ["body", "subscription", "endpoint"],
    ),
    (
        {"channel": "webpush", "granted": True, "source": "web"}
        | {"subscription": {**SUBSCRIPTION, "keys": {"p256dh": "c2hvcnQ", "auth": AUTH}}},
        ["body", "subscription", "keys", "p256dh"],
    ),
]


async def test_a_bad_consent_change_names_its_field_and_changes_nothing(store: Store) -> None:
    store.upsert_profile("c-2", consent={"email": True})
    before = counts(store)
    async with asgi(hilo_app(store)) as api:
        for body, location in BAD_CONSENT:
            refused = await api.post("/profiles/c-2/consent", json=body)
            assert refused.status_code == 422, (body, refused.text)
            assert refused.json()["detail"][0]["loc"] == location, body
            assert refused.json()["detail"][0]["msg"]
    assert counts(store) == before


async def test_unknown_profiles_are_404_and_consent_creates_one(store: Store) -> None:
    async with asgi(hilo_app(store)) as api:
        missing = await api.get("/profiles/ghost")
        assert missing.status_code == 404
        assert "no profile 'ghost'" in missing.json()["detail"]
        assert (await api.get("/profiles/ghost/timeline")).status_code == 404
        assert (await api.get("/profiles/ghost", headers={"Authorization": ""})).status_code == 401
        new = await api.post(
            "/profiles/ghost/consent", json={"channel": "sms", "granted": True, "source": "import"}
        )
        assert new.status_code == 200
        assert new.json()["consent"] == {"sms": True}
        too_long = await api.post(
            f"/profiles/{'x' * 201}/consent",
            json={"channel": "sms", "granted": True, "source": "import"},
        )
        assert too_long.status_code == 422
        assert too_long.json()["detail"][0]["loc"] == ["path", "customer_id"]


# ---------------------------------------------------------------- timeline


async def test_timeline_pages_and_shows_policy_decisions(any_store: Store) -> None:
    async with asgi(hilo_app(any_store)) as api:
        calls = [
            {"type": "track", "userId": "t-1", "event": f"Step {n}", "messageId": f"step-{n}"}
            | {"timestamp": f"2024-05-01T10:0{n}:00Z"}
            for n in range(5)
        ]
        assert (
            await api.post("/v1/batch", json={"batch": calls}, headers=basic("web-key"))
        ).is_success
        with any_store.session() as session:
            session.add(
                PolicyDecisionRecord(
                    message_id="msg-1",
                    customer_id="t-1",
                    journey_key="welcome",
                    channel="email",
                    category="marketing",
                    decision="defer",
                    reason="quiet hours until 08:00",
                    rule="global.quiet_hours",
                    policy_version=1,
                    decided_at=datetime.fromisoformat("2024-05-01T10:02:30+00:00"),
                )
            )
            session.commit()
        first = (await api.get("/profiles/t-1/timeline", params={"limit": 3})).json()
        rest = (await api.get("/profiles/t-1/timeline", params={"before": first[-1]["at"]})).json()
        too_many = await api.get("/profiles/t-1/timeline", params={"limit": 5000})
    assert [e["summary"] for e in first] == [
        "Step 4",
        "Step 3",
        "defer email for welcome: quiet hours until 08:00",
    ]
    assert first[2]["kind"] == "policy_decision"
    assert first[2]["data"]["rule"] == "global.quiet_hours"
    assert [e["summary"] for e in rest] == ["Step 2", "Step 1", "Step 0"]
    assert too_many.status_code == 422


async def test_timeline_without_the_policy_decisions_table(store: Store) -> None:
    """The contact policy's table comes with its own migration; the timeline does not
    need it."""
    with store.session() as session:
        session.execute(text("DROP TABLE policy_decisions"))
        session.commit()
    async with asgi(hilo_app(store)) as api:
        call = {"userId": "t-2", "event": "Signed Up"}
        assert (await api.post("/v1/track", json=call, headers=basic("web-key"))).is_success
        entries = (await api.get("/profiles/t-2/timeline")).json()
    assert [e["summary"] for e in entries] == ["Signed Up"]


# ---------------------------------------------------------------- order per customer


async def test_a_customers_events_reach_the_journey_in_the_order_accepted(
    lab: JourneyLab,
) -> None:
    """The cart's first delivery fails (Temporal unreachable); its purchase waits behind it
    rather than overtaking it, so the journey starts and then ends on the purchase. Another
    customer's event is not held up."""
    lab.publish(example("abandoned_cart"))
    app = hilo_app(lab.store, lab)
    dispatcher = app.state.dispatcher
    working = dispatcher.router
    unreachable = await Client.connect(
        f"127.0.0.1:{free_port()}",
        lazy=True,
        data_converter=pydantic_data_converter,
        retry_config=RetryConfig(max_retries=0),
    )
    dispatcher.router = EventRouter(lab.store, unreachable, lab.router.task_queue)
    now = (await lab.now()).isoformat()
    calls: list[dict[str, Any]] = [
        {"type": "track", "userId": "o-1", "event": "Cart Abandoned", "properties": CART},
        {"type": "track", "userId": "o-2", "event": "Newsletter Opened"},
        {"type": "track", "userId": "o-1", "event": "Order Completed"}
        | {"properties": {"cart_id": "c1", "total": 80}},
    ]
    batch = {"batch": [call | {"timestamp": now} for call in calls]}
    async with asgi(app) as api:
        assert (await api.post("/v1/batch", json=batch, headers=basic("web-key"))).is_success

    delivered, _pending = await dispatcher.dispatch_once()
    assert delivered == 1  # o-2's, which needs no workflow
    with lab.store.session() as session:
        waiting = list(session.exec(select(OutboxEntry).order_by(OutboxEntry.id)))  # type: ignore[arg-type]
    assert [(e.customer_id, e.attempts) for e in waiting] == [("o-1", 1), ("o-1", 0)]
    assert waiting[0].last_error
    # Recorded before its start, the entry waits as starting for the delivery to be retried.
    waiting_entries = lab.store.instances_of_customer("o-1")
    assert [(i.status, i.run_id) for i in waiting_entries] == [("starting", None)]

    dispatcher.router = working
    await asyncio.sleep(0.3)  # the first retry's backoff
    assert (await dispatcher.dispatch_once())[0] == 2
    result = await lab.result("journey/abandoned_cart/o-1/c1")
    assert (result.status, result.reason) == ("exited", "purchased")
    assert lab.store.outbox_size() == 0
    [entry] = lab.store.instances_of_customer("o-1")
    assert (entry.status, entry.run_id is not None) == ("exited", True)


def test_an_events_entry_and_end_are_recorded_once_on_either_database(any_store: Store) -> None:
    """The router's bookkeeping: an event stored once (and again only while unrouted), each
    entry of an instance recorded before its start and numbered after the earlier ones, one
    entry per event, and the end written once on the entry its event made."""
    moment = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    assert any_store.record_event("e1", "ana", "Cart Abandoned", {"cart_id": "c1"}, moment, "t")
    assert any_store.record_event("e1", "ana", "Cart Abandoned", {}, moment, "t")  # unrouted
    any_store.event_routed("e1")
    assert not any_store.record_event("e1", "ana", "Cart Abandoned", {}, moment, "t")

    workflow_id = "journey/abandoned_cart/ana/c1"
    assert any_store.get_instance(workflow_id) is None
    entry = ("abandoned_cart", 1, "ana", "c1")
    first, recorded_now = any_store.record_entry(workflow_id, *entry, "e1")
    assert first is not None and recorded_now
    assert (first.entry, first.status, first.run_id) == (1, "starting", None)
    again, recorded_now = any_store.record_entry(workflow_id, *entry, "e1")  # a redelivery
    assert again == first and not recorded_now
    # The workflow's end may come before the start is recorded: it finds the entry by event.
    any_store.instance_ended(
        workflow_id, "run-1", "holdout", None, moment, moment, 80.0, True, "e1"
    )
    any_store.instance_started(workflow_id, "e1", "run-1")
    any_store.instance_ended(
        workflow_id, "run-1", "completed", "late", moment, None, None, False, "e1"
    )  # a repeated end changes nothing

    second, _ = any_store.record_entry(workflow_id, "abandoned_cart", 2, "ana", "c1", "e2")
    assert second is not None and second.entry == 2
    any_store.instance_started(workflow_id, "e2", "run-2")
    refused, _ = any_store.record_entry(workflow_id, "abandoned_cart", 2, "ana", "c1", "e3")
    assert refused is not None and refused.entry == 3
    any_store.entry_refused(workflow_id, "e3")  # Temporal refused its start

    latest = any_store.get_instance(workflow_id)
    assert latest is not None
    assert (latest.run_id, latest.entry, latest.version, latest.status) == (
        "run-2",
        2,
        2,
        "active",
    )
    assert any_store.active_instances("ana", {"abandoned_cart"}) == [latest]
    with any_store.session() as session:
        ended = session.get(JourneyInstance, (workflow_id, 1))
    assert ended is not None
    assert (ended.run_id, ended.holdout, ended.status, ended.revenue) == (
        "run-1",
        True,
        "holdout",
        80.0,
    )
    assert ended.converted_at is not None and ended.ended_at is not None


# ---------------------------------------------------------------- phones in E.164


async def test_phones_arrive_in_any_common_format_and_are_stored_in_e164(store: Store) -> None:
    async with asgi(hilo_app(store)) as api:
        for user, phone in [
            ("u-1", "+1 (415) 555-0100"),
            ("u-2", "00 34 600 000 000"),
            ("u-3", "+44 7700-900123"),
        ]:
            call = {"userId": user, "traits": {"phone": phone, "email": f"{user}@example.com"}}
            assert (await api.post("/v1/identify", json=call, headers=basic("shop-key"))).is_success
        phones = {
            user: (await api.get(f"/profiles/{user}")).json()["traits"]["phone"]
            for user in ("u-1", "u-2", "u-3")
        }
    assert phones == {"u-1": "+14155550100", "u-2": "+34600000000", "u-3": "+447700900123"}


async def test_a_phone_that_is_not_one_is_refused_naming_the_field_and_nothing_is_stored(
    store: Store,
) -> None:
    before = counts(store)
    async with asgi(hilo_app(store)) as api:
        batch = {
            "batch": [
                {"type": "identify", "userId": "u-9", "traits": {"phone": "+34 600"}},
                {"type": "identify", "userId": "u-9", "traits": {"phone": "1" * 400}},
                {
                    "type": "track",
                    "userId": "u-9",
                    "event": "Signed Up",
                    "context": {"traits": {"phone": "call me maybe"}},
                },
            ]
        }
        refused = await api.post("/v1/batch", json=batch, headers=basic("shop-key"))
    assert refused.status_code == 400
    fields = {error["field"] for error in refused.json()["errors"]}
    assert fields == {
        "batch[0].traits.phone",
        "batch[1].traits.phone",
        "batch[2].context.traits.phone",
    }
    assert "country code" in refused.text
    assert counts(store) == before
