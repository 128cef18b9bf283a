"""The public feedback endpoints over HTTP, on SQLite and PostgreSQL: signed webhooks move the
ledger, anything unsigned, stale or replayed changes nothing, and links do only what they say."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr, ValidationError
from sqlalchemy import inspect, text
from sqlmodel import select

from api.app import create_app
from api.routes.feedback import (
    ONE_CLICK_SOURCE,
    PIXEL,
    PREFERENCE_PAGE_SOURCE,
    UNSUBSCRIBE_PAGE_SOURCE,
    feedback_router,
)
from hilo.db.models import ConsentChange, Message, OutboxEntry, StoredEvent, Suppression
from hilo.db.store import Store
from hilo.feedback.deliveries import record_delivery_events
from hilo.feedback.links import LinkRejected, LinkSigner
from hilo.feedback.preferences import Topic
from hilo.feedback.webhooks import parse_sendgrid, twilio_signature
from hilo.settings import DEV_LINK_SECRET, Settings
from tests.helpers.feedback import LINK_SECRET, PUBLIC, TWILIO_TOKEN, seed, token_of, twilio_post

WHATSAPP_SECRET = "whatsapp-app-secret-for-tests"
WHATSAPP_VERIFY = "whatsapp-verify-token-for-tests"
TOPICS = [
    Topic(key="new-arrivals", name="New arrivals"),
    Topic(key="sales", name="Sales", description="Discounts and offers"),
]


class SendGridKeys:
    """A P-256 key pair standing in for SendGrid's, signing as SendGrid signs."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_b64 = base64.b64encode(der).decode()

    def headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = self.private.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "Content-Type": "application/json",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        }


@pytest.fixture(scope="module")
def sendgrid() -> SendGridKeys:
    return SendGridKeys()


@pytest.fixture
def channels(sendgrid: SendGridKeys) -> Settings:
    return Settings(
        _env_file=None,
        public_url=PUBLIC,
        link_secret=SecretStr(LINK_SECRET),
        sendgrid_webhook_public_key=sendgrid.public_b64,
        twilio_auth_token=SecretStr(TWILIO_TOKEN),
        whatsapp_app_secret=SecretStr(WHATSAPP_SECRET),
        whatsapp_verify_token=SecretStr(WHATSAPP_VERIFY),
        preference_topics=TOPICS,
    )


@pytest.fixture
def signer(channels: Settings) -> LinkSigner:
    return channels.link_signer()


@pytest.fixture
async def api(any_store: Store, channels: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(_env_file=None, admin_token="admin-token-for-tests"), any_store)
    app.include_router(feedback_router)
    app.state.channel_settings = channels
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC) as client:
        yield client


NOW = datetime.now(UTC).replace(microsecond=0)


def ledger(store: Store, message_id: str) -> Message:
    with store.session() as session:
        row = session.get(Message, message_id)
    assert row is not None
    return row


def snapshot(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table: equal snapshots mean nothing changed at all."""
    tables = [name for name in inspect(store.engine).get_table_names() if name != "alembic_version"]
    with store.engine.connect() as connection:
        return {
            name: sorted(
                (
                    tuple(str(value) for value in row)
                    for row in connection.execute(text(f"SELECT * FROM {name}"))
                ),
            )
            for name in tables
        }


def consent_changes(store: Store, customer_id: str) -> list[ConsentChange]:
    with store.session() as session:
        return list(
            session.exec(
                select(ConsentChange)
                .where(ConsentChange.customer_id == customer_id)
                .order_by(ConsentChange.id)  # type: ignore[arg-type]
            )
        )


def events_of(store: Store, customer_id: str) -> list[StoredEvent]:
    with store.session() as session:
        return list(session.exec(select(StoredEvent).where(StoredEvent.customer_id == customer_id)))


def suppressions(store: Store) -> list[Suppression]:
    with store.session() as session:
        return list(session.exec(select(Suppression)))


def sendgrid_event(event: str, message_id: str, event_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "email": "ana@example.com",
        "event": event,
        "sg_event_id": event_id,
        "sg_message_id": f"pm_{message_id}.filterdrecv-1",
        "timestamp": int(NOW.timestamp()),
        "hilo_message_id": message_id,
        **extra,
    }


async def post_sendgrid(
    api: httpx.AsyncClient, keys: SendGridKeys, events: list[dict[str, Any]], **kwargs: Any
) -> httpx.Response:
    body = json.dumps(events).encode()
    return await api.post("/webhooks/sendgrid", content=body, headers=keys.headers(body, **kwargs))


# --- SendGrid ------------------------------------------------------------------------------


async def test_sendgrid_events_move_the_ledger_forward_only(
    api: httpx.AsyncClient, any_store: Store, sendgrid: SendGridKeys
) -> None:
    seed(any_store, "msg_1")
    events = [
        sendgrid_event("delivered", "msg_1", "ev_delivered"),
        sendgrid_event("open", "msg_1", "ev_open"),
        sendgrid_event("click", "msg_1", "ev_click", url="https://shop.example/sale"),
    ]
    response = await post_sendgrid(api, sendgrid, events)
    assert response.status_code == 200, response.text
    assert response.json() == {"received": 3, "recorded": 3, "duplicates": 0, "unmatched": 0}
    row = ledger(any_store, "msg_1")
    assert row.status == "clicked"
    assert row.delivered_at and row.opened_at and row.clicked_at

    # A late "delivered" (its own event id) records, and moves nothing back.
    late = [sendgrid_event("delivered", "msg_1", "ev_delivered_again")]
    assert (await post_sendgrid(api, sendgrid, late)).json()["recorded"] == 1
    assert ledger(any_store, "msg_1").status == "clicked"

    # Opens and clicks are the customer's engagement, queued for their journeys; the
    # delivery too, once (the late one moved nothing), under Segment's Email spec names.
    engagement = {event.name: event for event in events_of(any_store, "cus_ana")}
    assert len(events_of(any_store, "cus_ana")) == 3
    assert set(engagement) == {"Email Delivered", "Email Opened", "Email Link Clicked"}
    clicked = engagement["Email Link Clicked"]
    assert clicked.message_id == "fb:ev_click"
    assert clicked.source == "sendgrid" and clicked.type == "track"
    assert clicked.properties["url"] == "https://shop.example/sale"
    assert clicked.properties["message_id"] == "msg_1"
    with any_store.session() as session:
        queued = {entry.message_id for entry in session.exec(select(OutboxEntry))}
    assert queued == {"fb:ev_delivered", "fb:ev_open", "fb:ev_click"}

    # Without our id in the event, the provider's message id finds the row.
    seed(any_store, "msg_2")
    event = sendgrid_event("delivered", "msg_2", "ev_by_provider_id")
    del event["hilo_message_id"]
    body = (await post_sendgrid(api, sendgrid, [event])).json()
    assert body["unmatched"] == 0
    assert ledger(any_store, "msg_2").status == "delivered"
    stranger = sendgrid_event("delivered", "msg_unknown", "ev_2")
    assert (await post_sendgrid(api, sendgrid, [stranger])).json()["unmatched"] == 1

    # Callbacks racing for one message, each twice: recorded once, the furthest status wins.
    seed(any_store, "msg_3")
    racing = parse_sendgrid(
        json.dumps(
            [
                sendgrid_event(name, "msg_3", f"ev_race_{n}_{name}")
                for n in range(3)
                for name in ("click", "open", "delivered")
            ]
        ).encode()
    )
    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(
            pool.map(lambda event: record_delivery_events(any_store, [event]), racing * 2)
        )
    assert sum(len(outcome.recorded) for outcome in outcomes) == len(racing)
    assert ledger(any_store, "msg_3").status == "clicked"


async def test_hard_bounce_and_complaint_suppress_and_revoke_consent(
    api: httpx.AsyncClient, any_store: Store, sendgrid: SendGridKeys
) -> None:
    any_store.upsert_profile("cus_ana", traits={"email": "Ana@Example.com"})
    seed(any_store, "msg_1")
    bounce = sendgrid_event(
        "bounce", "msg_1", "ev_bounce", type="bounce", status="5.1.1", reason="no such user"
    )
    assert (await post_sendgrid(api, sendgrid, [bounce])).status_code == 200
    row = ledger(any_store, "msg_1")
    assert row.status == "bounced" and row.reason == "5.1.1 no such user"
    [suppression] = suppressions(any_store)
    assert (suppression.channel, suppression.address) == ("email", "ana@example.com")
    assert suppression.source == "sendgrid" and "hard bounce" in suppression.reason
    profile = any_store.get_profile("cus_ana")
    assert profile is not None and profile.consent["email"] is False
    [change] = consent_changes(any_store, "cus_ana")
    assert (change.channel, change.granted, change.source) == ("email", False, "sendgrid")
    assert change.detail is not None and "5.1.1 no such user" in change.detail

    # Bounced always wins over what a straggler says.
    straggler = [sendgrid_event("open", "msg_1", "ev_open")]
    assert (await post_sendgrid(api, sendgrid, straggler)).status_code == 200
    assert ledger(any_store, "msg_1").status == "bounced"

    seed(any_store, "msg_blocked", customer_id="cus_ben", recipient="ben@example.com")
    seed(any_store, "msg_spam", customer_id="cus_cleo", recipient="cleo@example.com")
    events = [
        # "blocked" refuses this message, not the address: no suppression, consent kept.
        sendgrid_event(
            "bounce", "msg_blocked", "ev_b", email="ben@example.com", type="blocked", reason="IP"
        ),
        sendgrid_event("spamreport", "msg_spam", "ev_s", email="cleo@example.com"),
    ]
    assert (await post_sendgrid(api, sendgrid, events)).status_code == 200
    assert ledger(any_store, "msg_blocked").status == "bounced"
    assert ledger(any_store, "msg_spam").status == "complained"
    assert [(s.address, s.source) for s in suppressions(any_store)] == [
        ("ana@example.com", "sendgrid"),
        ("cleo@example.com", "sendgrid"),
    ]
    assert consent_changes(any_store, "cus_ben") == []
    [change] = consent_changes(any_store, "cus_cleo")
    assert not change.granted and change.detail and "spam complaint" in change.detail


async def test_forged_stale_or_replayed_sendgrid_requests_change_nothing(
    api: httpx.AsyncClient, any_store: Store, sendgrid: SendGridKeys
) -> None:
    seed(any_store, "msg_1")
    before = snapshot(any_store)
    events = [sendgrid_event("bounce", "msg_1", "ev_1", type="bounce")]
    body = json.dumps(events).encode()
    impostor = SendGridKeys()
    attempts = [
        (body, impostor.headers(body)),  # someone else's key
        (body.replace(b"bounce", b"spamreport", 1), sendgrid.headers(body)),  # body changed
        (body, {"Content-Type": "application/json"}),  # unsigned
        (body, sendgrid.headers(body, timestamp=int(time.time()) - 600)),  # stale: a replay
        (body, sendgrid.headers(body, timestamp=int(time.time()) + 600)),
    ]
    for content, headers in attempts:
        response = await api.post("/webhooks/sendgrid", content=content, headers=headers)
        assert response.status_code == 403, response.text
    assert "outside the 300 s window" in response.json()["detail"]
    assert snapshot(any_store) == before

    # The same request again: 200, so the provider stops retrying, and nothing changes.
    events = [
        sendgrid_event("open", "msg_1", "ev_open"),
        sendgrid_event("spamreport", "msg_1", "ev_spam"),
    ]
    body = json.dumps(events).encode()
    headers = sendgrid.headers(body)
    first = await api.post("/webhooks/sendgrid", content=body, headers=headers)
    assert first.json()["recorded"] == 2
    before = snapshot(any_store)
    again = await api.post("/webhooks/sendgrid", content=body, headers=headers)
    assert again.status_code == 200
    assert again.json() == {"received": 2, "recorded": 0, "duplicates": 2, "unmatched": 0}
    assert snapshot(any_store) == before


# --- Twilio --------------------------------------------------------------------------------


async def test_twilio_status_callbacks(api: httpx.AsyncClient, any_store: Store) -> None:
    any_store.upsert_profile("cus_ana", consent={"sms": True})
    seed(any_store, "sms_1", channel="sms", provider="twilio", provider_message_id="SM1")
    seed(
        any_store,
        "sms_2",
        customer_id="cus_ben",
        channel="sms",
        provider="twilio",
        provider_message_id="SM2",
        recipient="+34600000002",
    )
    delivered = {"MessageSid": "SM1", "MessageStatus": "delivered", "To": "+34600000001"}
    response = await twilio_post(api, delivered)
    assert response.status_code == 200, response.text
    assert ledger(any_store, "sms_1").status == "delivered"

    # An unknown handset: the message failed and the number is suppressed.
    dead = {
        "MessageSid": "SM2",
        "MessageStatus": "undelivered",
        "ErrorCode": "30005",
        "To": "+34600000002",
    }
    assert (await twilio_post(api, dead, query="message_id=sms_2")).status_code == 200
    row = ledger(any_store, "sms_2")
    assert row.status == "failed" and row.reason and row.reason.startswith("30005")
    assert [(s.channel, s.address, s.source) for s in suppressions(any_store)] == [
        ("sms", "+34600000002", "twilio")
    ]
    [change] = consent_changes(any_store, "cus_ben")
    assert (change.channel, change.granted, change.source) == ("sms", False, "twilio")

    before = snapshot(any_store)
    forged = {"MessageSid": "SM1", "MessageStatus": "undelivered", "ErrorCode": "30005"}
    assert (await twilio_post(api, forged, token="not-the-auth-token")).status_code == 403
    # Signed for another URL: the signature covers the query too.
    url = f"{PUBLIC}/webhooks/twilio"
    response = await api.post(
        "/webhooks/twilio?message_id=sms_1",
        data=forged,
        headers={"X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, url, forged)},
    )
    assert response.status_code == 403
    assert (await twilio_post(api, delivered)).json()["duplicates"] == 1
    assert snapshot(any_store) == before

    # The customer replied STOP: Twilio says so, and their SMS consent goes.
    stop = {"MessageSid": "SM1", "MessageStatus": "undelivered", "ErrorCode": "21610"}
    assert (await twilio_post(api, stop)).status_code == 200
    assert ledger(any_store, "sms_1").status == "unsubscribed"
    profile = any_store.get_profile("cus_ana")
    assert profile is not None and profile.consent["sms"] is False
    assert len(suppressions(any_store)) == 1


# --- WhatsApp ------------------------------------------------------------------------------


def whatsapp_body(status: str, wamid: str, message_id: str | None) -> bytes:
    item: dict[str, Any] = {
        "id": wamid,
        "status": status,
        "timestamp": str(int(NOW.timestamp())),
        "recipient_id": "34600000001",
    }
    if message_id:
        item["biz_opaque_callback_data"] = message_id
    payload = {"entry": [{"changes": [{"value": {"statuses": [item]}}]}]}
    return json.dumps(payload).encode()


def whatsapp_headers(body: bytes, secret: str = WHATSAPP_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"}


async def test_whatsapp_handshake_and_statuses(api: httpx.AsyncClient, any_store: Store) -> None:
    query = {"hub.mode": "subscribe", "hub.verify_token": WHATSAPP_VERIFY, "hub.challenge": "42"}
    answer = await api.get("/webhooks/whatsapp", params=query)
    assert (answer.status_code, answer.text) == (200, "42")
    wrong = await api.get("/webhooks/whatsapp", params={**query, "hub.verify_token": "guess"})
    assert wrong.status_code == 403

    seed(any_store, "wa_1", channel="whatsapp", provider="whatsapp", provider_message_id="wamid.1")
    read = whatsapp_body("read", "wamid.1", "wa_1")
    response = await api.post("/webhooks/whatsapp", content=read, headers=whatsapp_headers(read))
    assert response.status_code == 200, response.text
    assert ledger(any_store, "wa_1").status == "opened"
    assert [e.name for e in events_of(any_store, "cus_ana")] == ["WhatsApp Message Read"]

    before = snapshot(any_store)
    failed = whatsapp_body("failed", "wamid.1", "wa_1")
    forged = whatsapp_headers(failed, secret="someone-elses-app-secret")
    assert (await api.post("/webhooks/whatsapp", content=failed, headers=forged)).status_code == 403
    again = await api.post("/webhooks/whatsapp", content=read, headers=whatsapp_headers(read))
    assert again.status_code == 200 and again.json()["duplicates"] == 1
    assert snapshot(any_store) == before


async def test_unconfigured_endpoints_answer_503_naming_the_setting(store: Store) -> None:
    app = create_app(Settings(_env_file=None, admin_token="admin-token-for-tests"), store)
    app.include_router(feedback_router)
    app.state.channel_settings = Settings(
        _env_file=None, environment="production", public_url=PUBLIC
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC) as client:
        webhooks = [
            ("/webhooks/sendgrid", "HILO_SENDGRID_WEBHOOK_PUBLIC_KEY"),
            ("/webhooks/twilio", "HILO_TWILIO_AUTH_TOKEN"),
            ("/webhooks/whatsapp", "HILO_WHATSAPP_APP_SECRET"),
        ]
        for path, setting in webhooks:
            response = await client.post(path, content=b"[]")
            assert response.status_code == 503
            assert setting in response.json()["detail"]
        # Production without its own link secret makes and accepts no links.
        response = await client.get("/l/o/v1.any.token")
        assert response.status_code == 503
        assert "HILO_LINK_SECRET is not set" in response.json()["detail"]


# --- click and open tracking ---------------------------------------------------------------


async def test_click_and_open_tracking(
    api: httpx.AsyncClient, any_store: Store, signer: LinkSigner
) -> None:
    seed(any_store, "msg_1")
    before = snapshot(any_store)
    token = token_of(signer.click_url("msg_1", "https://shop.example/sale?x=1"))
    version, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["u"] = "https://evil.example/"
    evil = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    open_token = token_of(signer.open_pixel_url("msg_1"))
    for bad in [f"{version}.{evil}.{signature}", open_token, "v1.nothing.here"]:
        response = await api.get(f"/l/c/{bad}")
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("text/html")
        assert "location" not in response.headers
    assert snapshot(any_store) == before

    response = await api.get(f"/l/c/{token}")
    assert response.status_code == 302
    assert response.headers["location"] == "https://shop.example/sale?x=1"
    assert "no-store" in response.headers["cache-control"]
    row = ledger(any_store, "msg_1")
    assert row.status == "clicked" and row.clicked_at is not None
    [clicked] = events_of(any_store, "cus_ana")
    assert (clicked.name, clicked.source) == ("Email Link Clicked", "tracking")

    # The same link again still redirects, and counts once.
    after_first = snapshot(any_store)
    assert (await api.get(f"/l/c/{token}")).status_code == 302
    assert snapshot(any_store) == after_first

    # The open pixel: a GIF that is never cached, and an open on the ledger.
    seed(any_store, "msg_2")
    response = await api.get(f"/l/o/{token_of(signer.open_pixel_url('msg_2'))}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    assert "no-store" in response.headers["cache-control"]
    assert response.content == PIXEL and response.content.startswith(b"GIF89a\x01\x00\x01\x00")
    row = ledger(any_store, "msg_2")
    assert row.status == "opened" and row.opened_at is not None
    assert sorted(e.name for e in events_of(any_store, "cus_ana")) == [
        "Email Link Clicked",
        "Email Opened",
    ]
    click_token = token_of(signer.click_url("msg_2", "https://shop.example/"))
    assert (await api.get(f"/l/o/{click_token}")).status_code == 404


# --- unsubscribe ---------------------------------------------------------------------------


async def test_one_click_unsubscribe_revokes_consent(
    api: httpx.AsyncClient, any_store: Store, signer: LinkSigner
) -> None:
    seed(any_store, "msg_1")
    token = token_of(signer.unsubscribe_url("msg_1", "cus_ana", "email"))

    # A mail scanner fetching the link changes nothing; a person sees the page and a button.
    before = snapshot(any_store)
    page = await api.get(f"/l/u/{token}")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "no-store" in page.headers["cache-control"]
    assert '<form method="post"' in page.text and 'name="opt_out" value="yes"' in page.text
    assert snapshot(any_store) == before

    response = await api.post(f"/l/u/{token}", data={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 200
    profile = any_store.get_profile("cus_ana")
    assert profile is not None and profile.consent["email"] is False
    [change] = consent_changes(any_store, "cus_ana")
    assert (change.channel, change.granted, change.topic) == ("email", False, None)
    assert change.source == ONE_CLICK_SOURCE
    assert ledger(any_store, "msg_1").status == "unsubscribed"

    # Mailbox providers may post multipart; a second unsubscribe records nothing new.
    again = await api.post(f"/l/u/{token}", files={"List-Unsubscribe": (None, "One-Click")})
    assert again.status_code == 200
    assert len(consent_changes(any_store, "cus_ana")) == 1

    assert (await api.post(f"/l/u/{token}", data={"something": "else"})).status_code == 400
    forged = LinkSigner("someone-elses-secret-of-enough-length-00", PUBLIC)
    other = token_of(forged.unsubscribe_url("msg_1", "cus_ben", "email"))
    before = snapshot(any_store)
    refused = await api.post(f"/l/u/{other}", data={"List-Unsubscribe": "One-Click"})
    assert refused.status_code == 404
    assert snapshot(any_store) == before


async def test_topic_unsubscribe_and_the_page_button(
    api: httpx.AsyncClient, any_store: Store, signer: LinkSigner
) -> None:
    seed(any_store, "msg_1")
    token = token_of(signer.unsubscribe_url("msg_1", "cus_ana", "email", topic="sales"))
    assert (await api.post(f"/l/u/{token}", data={"List-Unsubscribe": "One-Click"})).is_success
    profile = any_store.get_profile("cus_ana")
    assert profile is not None and "email" not in profile.consent
    assert profile.traits["preferences"]["topics"] == ["new-arrivals"]
    [change] = consent_changes(any_store, "cus_ana")
    assert (change.topic, change.granted, change.source) == ("sales", False, ONE_CLICK_SOURCE)

    # The page's button says "all marketing": it leaves the channel, whatever the topic.
    form = {"frequency": "normal", "pause": "no", "topic:sales": "yes", "opt_out": "yes"}
    response = await api.post(f"/l/u/{token}", data=form)
    assert response.status_code == 200
    assert "You're unsubscribed" in response.text
    [_topic, change] = consent_changes(any_store, "cus_ana")
    assert (change.channel, change.granted, change.topic) == ("email", False, None)
    assert change.source == UNSUBSCRIBE_PAGE_SOURCE


# --- preferences ---------------------------------------------------------------------------


async def test_preference_page_and_form(
    api: httpx.AsyncClient, any_store: Store, signer: LinkSigner
) -> None:
    any_store.upsert_profile("cus_ana", traits={"first_name": "Ana"})
    token = token_of(signer.preferences_url("cus_ana"))
    page = await api.get(f"/l/p/{token}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Never chosen: every topic is ticked.
    assert 'name="topic:sales" value="yes" checked' in page.text
    assert 'name="topic:new-arrivals" value="yes" checked' in page.text

    form = {"frequency": "weekly", "pause": "30d", "topic:new-arrivals": "yes"}
    saved = await api.post(f"/l/p/{token}", data=form)
    assert saved.status_code == 200, saved.text
    assert "taking a break until" in saved.text
    assert "at most once a week" in saved.text
    profile = any_store.get_profile("cus_ana")
    assert profile is not None
    preferences = profile.traits["preferences"]
    assert preferences["frequency"] == "weekly"
    assert preferences["topics"] == ["new-arrivals"]
    pause_until = datetime.fromisoformat(preferences["pause_until"])
    assert timedelta(days=29, hours=23) < pause_until - datetime.now(UTC) <= timedelta(days=30)
    assert profile.traits["first_name"] == "Ana"
    [change] = consent_changes(any_store, "cus_ana")
    assert (change.topic, change.granted, change.source) == (
        "sales",
        False,
        PREFERENCE_PAGE_SOURCE,
    )

    # A form we cannot read shows the page again, saying what was wrong, and changes nothing.
    before = snapshot(any_store)
    wrong = await api.post(f"/l/p/{token}", data={"frequency": "daily", "topic:crypto": "yes"})
    assert wrong.status_code == 400
    assert "is not one of normal, weekly or monthly" in wrong.text
    assert "not a topic we send" in wrong.text
    assert snapshot(any_store) == before

    # The page shows what was saved; opting out revokes consent, saving again restores it.
    assert 'name="frequency" value="weekly" checked' in (await api.get(f"/l/p/{token}")).text
    left = await api.post(f"/l/p/{token}", data={"frequency": "weekly", "opt_out": "yes"})
    assert left.status_code == 200 and "You're unsubscribed" in left.text
    profile = any_store.get_profile("cus_ana")
    assert profile is not None and profile.consent["email"] is False
    back = await api.post(f"/l/p/{token}", data={"frequency": "monthly", "topic:sales": "yes"})
    assert back.status_code == 200
    profile = any_store.get_profile("cus_ana")
    assert profile is not None and profile.consent["email"] is True
    assert profile.traits["preferences"]["pause_until"] is None
    changes = [(c.topic, c.granted) for c in consent_changes(any_store, "cus_ana")]
    assert changes == [
        ("sales", False),
        (None, False),
        (None, True),
        ("new-arrivals", False),
        ("sales", True),
    ]


async def test_expired_or_foreign_preference_links_are_refused(
    api: httpx.AsyncClient, any_store: Store, signer: LinkSigner
) -> None:
    expired = token_of(signer.preferences_url("cus_ana", now=NOW - timedelta(days=61)))
    unsubscribe_token = token_of(signer.unsubscribe_url("msg_1", "cus_ana", "email"))
    before = snapshot(any_store)
    for token in [expired, unsubscribe_token]:
        assert (await api.get(f"/l/p/{token}")).status_code == 404
        response = await api.post(f"/l/p/{token}", data={"frequency": "weekly"})
        assert response.status_code == 404
        assert "This link doesn't work" in response.text
    assert snapshot(any_store) == before


# --- settings ------------------------------------------------------------------------------


def test_link_secret_settings(tmp_path: Path) -> None:
    development = Settings(_env_file=None, state_dir=tmp_path)
    token = development.link_signer().sign("open", message_id="msg_1")
    assert development.link_signer().verify(token, "open").message_id == "msg_1"
    with pytest.raises(LinkRejected):  # not the constant earlier versions signed with
        LinkSigner(DEV_LINK_SECRET, PUBLIC).verify(token, "open")
    assert development.link_signer().base_url == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="HILO_LINK_SECRET is not set"):
        Settings(_env_file=None, environment="production", public_url=PUBLIC).link_signer()
    loopback = Settings(
        _env_file=None, environment="production", link_secret=SecretStr(LINK_SECRET)
    )
    with pytest.raises(ValueError, match="only this machine can reach"):
        loopback.link_signer()
    for environment in ("production", "development"):
        with pytest.raises(ValidationError, match="placeholder published in Hilo's source"):
            Settings(
                _env_file=None, environment=environment, link_secret=SecretStr(DEV_LINK_SECRET)
            )
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(_env_file=None, link_secret=SecretStr("short"))
    with pytest.raises(ValidationError, match="not an http"):
        Settings(_env_file=None, public_url="hilo.shop.example")
    production = Settings(
        _env_file=None,
        environment="production",
        public_url=PUBLIC + "/",
        link_secret=SecretStr(LINK_SECRET),
    )
    assert production.link_signer().unsubscribe_url("m", "c", "email").startswith(PUBLIC + "/l/u/")


async def test_the_preference_page_and_unsubscribes_emit_their_events(
    api: httpx.AsyncClient, any_store: Store, signer: LinkSigner
) -> None:
    any_store.upsert_profile("cus_ana", traits={"first_name": "Ana"})
    # The pause link is the preference page at its pause choices: a GET changes nothing.
    pause = signer.pause_url("cus_ana")
    assert pause == signer.preferences_url("cus_ana") + "#pause"
    page = await api.get(pause.removeprefix(PUBLIC).split("#")[0])
    assert page.status_code == 200 and '<fieldset id="pause">' in page.text
    assert events_of(any_store, "cus_ana") == []

    token = token_of(signer.preferences_url("cus_ana"))
    form = {"frequency": "monthly", "pause": "30d", "topic:sales": "yes"}
    assert (await api.post(f"/l/p/{token}", data=form)).status_code == 200
    [updated] = events_of(any_store, "cus_ana")
    assert updated.name == "Preferences Updated" and updated.type == "track"
    assert updated.properties["frequency"] == "monthly"
    assert updated.properties["topics"] == ["sales"]
    assert updated.properties["pause_until"] is not None
    with any_store.session() as session:
        queued = {entry.message_id for entry in session.exec(select(OutboxEntry))}
    assert updated.message_id in queued  # on its way to the customer's journeys

    # Leaving on the page, then by an unsubscribe link: Segment's "Unsubscribed", each once.
    assert (
        await api.post(f"/l/p/{token}", data={"frequency": "monthly", "opt_out": "yes"})
    ).is_success
    seed(any_store, "msg_9", customer_id="cus_ben")
    link = token_of(signer.unsubscribe_url("msg_9", "cus_ben", "email"))
    for _ in range(2):
        assert (await api.post(f"/l/u/{link}", data={"List-Unsubscribe": "One-Click"})).is_success
    names = [event.name for event in events_of(any_store, "cus_ana")]
    assert sorted(names) == ["Preferences Updated", "Unsubscribed"]
    [left] = events_of(any_store, "cus_ben")
    assert left.name == "Unsubscribed"
    assert left.properties | {"source": None} == {
        "channel": "email",
        "source": None,
        "message_id": "msg_9",
        "journey_key": "welcome",
    }


# --- Signed bodies of an unexpected shape: 400 naming it, and nothing recorded ------------


async def test_signed_webhooks_of_an_unexpected_shape_are_refused_with_400(
    api: httpx.AsyncClient, any_store: Store, sendgrid: SendGridKeys
) -> None:
    seed(any_store, "msg_1")
    seed(any_store, "wa_1", channel="whatsapp", provider="whatsapp", provider_message_id="wamid.1")
    good = sendgrid_event("delivered", "msg_1", "ev_good")
    status = json.loads(whatsapp_body("read", "wamid.1", "wa_1"))["entry"][0]["changes"][0]
    status = status["value"]["statuses"][0]
    before = snapshot(any_store)

    async def refused(path: str, body: bytes, headers: dict[str, str], named: str) -> None:
        response = await api.post(path, content=body, headers=headers)
        assert response.status_code == 400, (body[:80], response.text)
        assert named in response.json()["detail"], response.text

    sendgrid_cases = [
        ([{**good, "email": {"a": 1}}], "event 0.email must be text, not an object"),
        ([good, {"email": {"a": 1}}], "event 1.event is missing"),
        ([good, {**good, "sg_event_id": ["x"]}], "event 1.sg_event_id must be text"),
        ([{**good, "hilo_message_id": {"id": "msg_1"}}], "event 0.hilo_message_id"),
        ([{**good, "timestamp": 10**30}], "event 0.timestamp"),
        ([{**good, "event": "bounce", "status": [5]}], "event 0.status"),
    ]
    nan = json.dumps([good]).replace(f'"timestamp": {good["timestamp"]}', '"timestamp": NaN')
    await refused(
        "/webhooks/sendgrid", nan.encode(), sendgrid.headers(nan.encode()), "0.timestamp: NaN"
    )
    for events, named in sendgrid_cases:
        body = json.dumps(events).encode()
        await refused("/webhooks/sendgrid", body, sendgrid.headers(body), named)
    deep = b"[" * 100_000 + b"]" * 100_000
    await refused("/webhooks/sendgrid", deep, sendgrid.headers(deep), "nests too deeply")

    def whatsapp(*statuses: Any) -> dict[str, Any]:
        return {"entry": [{"changes": [{"value": {"statuses": list(statuses)}}]}]}

    whatsapp_cases = [
        ({"entry": [1]}, "entry[0] must be an object, not a number"),
        ({"entry": {"a": 1}}, "entry must be an array, not an object"),
        ({"entry": [{"changes": "x"}]}, "entry[0].changes must be an array, not text"),
        ({"entry": [{"changes": [{"value": []}]}]}, "changes[0].value must be an object"),
        (whatsapp(status, 7), "statuses[1] must be an object"),
        (whatsapp({**status, "id": {"a": 1}}), "statuses[0].id must be text"),
        (whatsapp({**status, "errors": [{"code": {}}]}), "statuses[0].errors[0].code"),
        (whatsapp({**status, "errors": {"code": 1}}), "statuses[0].errors must be an array"),
        (whatsapp({**status, "timestamp": "soon"}), "statuses[0].timestamp"),
    ]
    for payload, named in whatsapp_cases:
        body = json.dumps(payload).encode()
        await refused("/webhooks/whatsapp", body, whatsapp_headers(body), named)
    assert snapshot(any_store) == before

    # The well-formed events of the same requests still go through when sent alone.
    assert (await post_sendgrid(api, sendgrid, [good])).json()["recorded"] == 1
    body = json.dumps(whatsapp(status)).encode()
    response = await api.post("/webhooks/whatsapp", content=body, headers=whatsapp_headers(body))
    assert response.json()["recorded"] == 1


@pytest.mark.parametrize("odd", [{"a": 1}, [1], True, 1e308, -1, "x" * 5000, None, ""])
async def test_any_odd_value_in_a_signed_sendgrid_event_is_200_or_a_400_that_changes_nothing(
    api: httpx.AsyncClient, any_store: Store, sendgrid: SendGridKeys, odd: Any
) -> None:
    seed(any_store, "msg_1")
    fields = ["event", "email", "timestamp", "sg_event_id", "sg_message_id", "hilo_message_id"]
    fields += ["message_id", "reason", "response", "url", "status", "type", "attempt"]
    for event in ("delivered", "bounce", "dropped", "deferred", "click"):
        for name in fields:
            before = snapshot(any_store)
            payload = {**sendgrid_event(event, "msg_1", f"ev_{event}_{name}"), name: odd}
            response = await post_sendgrid(api, sendgrid, [payload])
            assert response.status_code in (200, 400), (event, name, response.text)
            if response.status_code == 400:
                assert name in response.json()["detail"] or "event 0" in response.json()["detail"]
                assert snapshot(any_store) == before
