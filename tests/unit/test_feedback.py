"""Provider webhooks: real signatures verify, anything else is refused, payloads map right."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hilo.feedback.webhooks import (
    SignatureRejected,
    parse_sendgrid,
    parse_twilio,
    parse_whatsapp,
    twilio_signature,
    verify_sendgrid,
    verify_twilio,
    verify_whatsapp,
    whatsapp_challenge,
)

# --- SendGrid ---------------------------------------------------------------------------------

# The vector in SendGrid's own helper library tests: a key, body and signature made by SendGrid.
SENDGRID_PUBLISHED_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe6"
    "2gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="
)
SENDGRID_PUBLISHED_SIGNATURE = (
    "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15Tl"
    "uLtEZtM="
)
SENDGRID_PUBLISHED_TIMESTAMP = "1600112502"
SENDGRID_PUBLISHED_BODY = (
    b'[{"email":"hello@world.com","event":"dropped","reason":"Bounced Address",'
    b'"sg_event_id":"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",'
    b'"sg_message_id":"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",'
    b'"smtp-id":"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>","timestamp":1600112492}]'
    b"\r\n"
)


def at(timestamp: str | int) -> datetime:
    return datetime.fromtimestamp(int(timestamp), UTC)


class SendGridKeys:
    """A P-256 key pair standing in for the one SendGrid keeps, signing as SendGrid signs."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_b64 = base64.b64encode(der).decode()

    def sign(self, timestamp: str, body: bytes) -> str:
        signature = self.private.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode()


@pytest.fixture(scope="module")
def sendgrid() -> SendGridKeys:
    return SendGridKeys()


def test_sendgrid_published_vector_verifies() -> None:
    verify_sendgrid(
        SENDGRID_PUBLISHED_KEY,
        SENDGRID_PUBLISHED_BODY,
        SENDGRID_PUBLISHED_SIGNATURE,
        SENDGRID_PUBLISHED_TIMESTAMP,
        now=at(SENDGRID_PUBLISHED_TIMESTAMP) + timedelta(seconds=3),
    )
    [event] = parse_sendgrid(SENDGRID_PUBLISHED_BODY)
    assert event.status == "failed"
    assert event.hard_bounce  # dropped because the address bounced before
    assert event.provider_message_id == "LRzXl_NHStOGhQ4kofSm_A"


def test_sendgrid_published_vector_refuses_a_changed_body() -> None:
    with pytest.raises(SignatureRejected, match="does not match"):
        verify_sendgrid(
            SENDGRID_PUBLISHED_KEY,
            SENDGRID_PUBLISHED_BODY.replace(b"dropped", b"delivered"),
            SENDGRID_PUBLISHED_SIGNATURE,
            SENDGRID_PUBLISHED_TIMESTAMP,
            now=at(SENDGRID_PUBLISHED_TIMESTAMP),
        )


def test_sendgrid_signature_from_our_key_pair_verifies(sendgrid: SendGridKeys) -> None:
    body = b'[{"event":"delivered","email":"ana@example.com","timestamp":1767225600}]\r\n'
    timestamp = "1767225600"
    verify_sendgrid(
        sendgrid.public_b64, body, sendgrid.sign(timestamp, body), timestamp, now=at(timestamp)
    )


def test_sendgrid_accepts_the_key_in_pem_form_too(sendgrid: SendGridKeys) -> None:
    pem = sendgrid.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body, timestamp = b"[]", "1767225600"
    verify_sendgrid(
        pem.decode(), body, sendgrid.sign(timestamp, body), timestamp, now=at(timestamp)
    )


SIGNED_BODY, SIGNED_AT = b'[{"event":"delivered"}]', "1767225600"
SIGNED = None  # stands for the genuine value in the cases below


@pytest.mark.parametrize(
    ("body", "signature", "timestamp", "reason"),
    [
        pytest.param(b'[{"event":"open"}]', SIGNED, SIGNED, "does not match", id="altered body"),
        pytest.param(SIGNED, "forged", SIGNED, "does not match", id="signed by another key"),
        pytest.param(SIGNED, "not base64 at all!", SIGNED, "not base64", id="garbage signature"),
        pytest.param(SIGNED, "", SIGNED, "missing", id="no signature"),
        pytest.param(SIGNED, SIGNED, "1767225601", "does not match", id="timestamp swapped"),
        pytest.param(SIGNED, SIGNED, "", "timestamp", id="no timestamp"),
        pytest.param(SIGNED, SIGNED, "yesterday", "timestamp", id="timestamp not a number"),
        pytest.param(SIGNED, SIGNED, "\u0661\u0667\u0666", "timestamp", id="non-ascii digits"),
    ],
)
def test_sendgrid_refuses_what_sendgrid_did_not_sign(
    sendgrid: SendGridKeys,
    body: bytes | None,
    signature: str | None,
    timestamp: str | None,
    reason: str,
) -> None:
    genuine = sendgrid.sign(SIGNED_AT, SIGNED_BODY)
    if signature == "forged":
        signature = SendGridKeys().sign(SIGNED_AT, SIGNED_BODY)
    with pytest.raises(SignatureRejected, match=reason):
        verify_sendgrid(
            sendgrid.public_b64,
            SIGNED_BODY if body is None else body,
            genuine if signature is None else signature,
            SIGNED_AT if timestamp is None else timestamp,
            now=at(SIGNED_AT),
        )


@pytest.mark.parametrize("offset", [301, -301, 86_400], ids=["stale", "future", "a day old"])
def test_sendgrid_refuses_a_replayed_request(sendgrid: SendGridKeys, offset: int) -> None:
    body, timestamp = b'[{"event":"click"}]', "1767225600"
    signature = sendgrid.sign(timestamp, body)
    with pytest.raises(SignatureRejected, match="outside the 300 s window"):
        verify_sendgrid(
            sendgrid.public_b64,
            body,
            signature,
            timestamp,
            now=at(timestamp) + timedelta(seconds=offset),
        )
    # The same request inside the window is fine.
    verify_sendgrid(
        sendgrid.public_b64, body, signature, timestamp, now=at(timestamp) + timedelta(seconds=299)
    )


def test_sendgrid_bad_key_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="SendGrid verification key"):
        verify_sendgrid("bm90IGEga2V5", b"[]", "AAAA", "1767225600")


# Shaped like the Event Webhook reference's example, with our custom_args flattened in.
SENDGRID_EVENTS = [
    {"email": "ana@example.com", "timestamp": 1767225600, "event": "processed",
     "sg_event_id": "p1", "sg_message_id": "14c5d75ce93.filter0001.16648.5515E0B88.0",
     "hilo_message_id": "msg_1"},
    {"email": "ana@example.com", "timestamp": 1767225601, "event": "deferred",
     "response": "400 try again later", "attempt": "5", "sg_event_id": "d1",
     "sg_message_id": "14c5d75ce93.filter0001.16648.5515E0B88.0", "hilo_message_id": "msg_1"},
    {"email": "ana@example.com", "timestamp": 1767225602, "event": "delivered",
     "response": "250 OK", "sg_event_id": "v1",
     "sg_message_id": "14c5d75ce93.filter0001.16648.5515E0B88.0", "hilo_message_id": "msg_1"},
    {"email": "ana@example.com", "timestamp": 1767225603, "event": "open",
     "sg_machine_open": False, "useragent": "Mozilla/5.0", "ip": "255.255.255.255",
     "sg_event_id": "o1", "hilo_message_id": "msg_1"},
    {"email": "ana@example.com", "timestamp": 1767225604, "event": "click",
     "url": "https://shop.example/cart?utm_source=hilo", "url_offset": {"index": 0, "type": "html"},
     "sg_event_id": "c1", "hilo_message_id": "msg_1"},
    {"email": "gone@example.com", "timestamp": 1767225605, "event": "bounce", "type": "bounce",
     "status": "5.1.1", "reason": "550 5.1.1 The email account does not exist",
     "bounce_classification": "Invalid Address", "sg_event_id": "b1", "hilo_message_id": "msg_2"},
    {"email": "busy@example.com", "timestamp": 1767225606, "event": "bounce", "type": "blocked",
     "status": "4.0.0", "reason": "550 Message rejected as spam",
     "bounce_classification": "Content", "sg_event_id": "b2", "hilo_message_id": "msg_3"},
    {"email": "ana@example.com", "timestamp": 1767225607, "event": "dropped",
     "reason": "Invalid SMTPAPI header", "sg_event_id": "x1", "hilo_message_id": "msg_4"},
    {"email": "ana@example.com", "timestamp": 1767225608, "event": "spamreport",
     "sg_event_id": "s1", "hilo_message_id": "msg_1"},
    {"email": "ana@example.com", "timestamp": 1767225609, "event": "unsubscribe",
     "sg_event_id": "u1", "message_id": "msg_old"},
    {"email": "ana@example.com", "timestamp": 1767225610, "event": "group_unsubscribe",
     "asm_group_id": 10, "sg_event_id": "u2"},
    {"email": "ana@example.com", "timestamp": 1767225611, "event": "group_resubscribe",
     "asm_group_id": 10, "sg_event_id": "r1"},
]  # fmt: skip


def test_sendgrid_events_map_to_ours() -> None:
    events = parse_sendgrid(json.dumps(SENDGRID_EVENTS).encode())
    by_id = {event.raw_id: event for event in events}
    assert set(by_id) == {"d1", "v1", "o1", "c1", "b1", "b2", "x1", "s1", "u1", "u2"}
    assert {e.raw_id: e.status for e in events} == {
        "d1": "deferred",
        "v1": "delivered",
        "o1": "opened",
        "c1": "clicked",
        "b1": "bounced",
        "b2": "bounced",
        "x1": "failed",
        "s1": "complained",
        "u1": "unsubscribed",
        "u2": "unsubscribed",
    }
    assert by_id["v1"].message_id == "msg_1"
    assert by_id["v1"].provider_message_id == "14c5d75ce93"
    assert by_id["v1"].occurred_at == datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC)
    assert by_id["v1"].address == "ana@example.com"
    assert by_id["d1"].reason == "attempt 5: 400 try again later"
    assert by_id["c1"].url == "https://shop.example/cart?utm_source=hilo"
    assert by_id["o1"].url is None
    # A bounce of type "bounce" kills the address; "blocked" only refused this message.
    assert by_id["b1"].hard_bounce and by_id["b1"].reason is not None
    assert by_id["b1"].reason.startswith("5.1.1 550")
    assert not by_id["b2"].hard_bounce
    assert not by_id["x1"].hard_bounce  # our header was wrong, the address is fine
    assert by_id["u1"].message_id == "msg_old"  # the older custom_args key still reads
    assert by_id["u2"].message_id is None
    assert all(event.provider == "sendgrid" for event in events)


def test_sendgrid_event_without_id_still_gets_a_stable_one() -> None:
    body = b'[{"event":"delivered","email":"a@example.com","timestamp":1767225600}]'
    [first] = parse_sendgrid(body)
    [again] = parse_sendgrid(body)
    assert first.raw_id.startswith("sha256:") and first.raw_id == again.raw_id


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b'{"event":"delivered"}', "JSON array"),
        (b'["delivered"]', "event 0"),
        (b'[{"event":"delivered","timestamp":"soon"}]', "timestamp"),
    ],
)
def test_sendgrid_unreadable_body_is_a_value_error(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sendgrid(body)


# --- Twilio ------------------------------------------------------------------------------------

# The worked example of Twilio's webhook security guide (auth token 12345).
TWILIO_DOCS_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_DOCS_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+12349013030",
    "Digits": "1234",
    "From": "+12349013030",
    "To": "+18005551212",
}
TWILIO_DOCS_SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
# The vector of Twilio's Python helper library tests: same URL, other numbers.
TWILIO_LIBRARY_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
    "Caller": "+14158675309",
}
TWILIO_LIBRARY_SIGNATURE = "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def test_twilio_signature_matches_twilios_documented_examples() -> None:
    assert twilio_signature("12345", TWILIO_DOCS_URL, TWILIO_DOCS_PARAMS) == TWILIO_DOCS_SIGNATURE
    assert (
        twilio_signature("12345", TWILIO_DOCS_URL, TWILIO_LIBRARY_PARAMS)
        == TWILIO_LIBRARY_SIGNATURE
    )
    verify_twilio("12345", TWILIO_DOCS_URL, TWILIO_DOCS_PARAMS, TWILIO_DOCS_SIGNATURE)


@pytest.mark.parametrize(
    ("token", "url", "params", "signature"),
    [
        pytest.param(
            "54321", TWILIO_DOCS_URL, TWILIO_DOCS_PARAMS, TWILIO_DOCS_SIGNATURE, id="token"
        ),
        pytest.param(
            "12345",
            TWILIO_DOCS_URL,
            {**TWILIO_DOCS_PARAMS, "Digits": "9999"},
            TWILIO_DOCS_SIGNATURE,
            id="altered param",
        ),
        pytest.param(
            "12345",
            TWILIO_DOCS_URL,
            {**TWILIO_DOCS_PARAMS, "MessageStatus": "delivered"},
            TWILIO_DOCS_SIGNATURE,
            id="added param",
        ),
        pytest.param(
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=3",
            TWILIO_DOCS_PARAMS,
            TWILIO_DOCS_SIGNATURE,
            id="other url",
        ),
        pytest.param(
            "12345", TWILIO_DOCS_URL, TWILIO_DOCS_PARAMS, "0/KCTR6DLpKmkAf8muzZqo1nDgQ", id="cut"
        ),
        pytest.param("12345", TWILIO_DOCS_URL, TWILIO_DOCS_PARAMS, "", id="missing"),
    ],
)
def test_twilio_refuses_what_twilio_did_not_sign(
    token: str, url: str, params: dict[str, str], signature: str
) -> None:
    with pytest.raises(SignatureRejected):
        verify_twilio(token, url, params, signature)


def test_twilio_tolerates_a_proxy_adding_or_dropping_the_default_port() -> None:
    # Twilio's library vectors: the signature over the URL with :443 written out.
    with_port = "kvajT1Ptam85bY51eRf/AJRuM3w="
    verify_twilio("12345", TWILIO_DOCS_URL, TWILIO_LIBRARY_PARAMS, with_port)
    verify_twilio(
        "12345",
        "https://mycompany.com:443/myapp.php?foo=1&bar=2",
        TWILIO_LIBRARY_PARAMS,
        TWILIO_LIBRARY_SIGNATURE,
    )
    with pytest.raises(SignatureRejected):  # another host is never a variant
        verify_twilio(
            "12345", "https://evil.example/myapp.php?foo=1&bar=2", TWILIO_LIBRARY_PARAMS, with_port
        )


def twilio_callback(status: str, **extra: str) -> dict[str, str]:
    return {
        "AccountSid": "AC00000000000000000000000000000000",
        "ApiVersion": "2010-04-01",
        "From": "+15017122661",
        "MessageSid": "SM1f0e8ae6ade43cb3c0ce4525424e404f",
        "MessageStatus": status,
        "SmsSid": "SM1f0e8ae6ade43cb3c0ce4525424e404f",
        "SmsStatus": status,
        "To": "+15558675310",
        **extra,
    }


NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


def test_twilio_delivered_callback() -> None:
    event = parse_twilio(twilio_callback("delivered"), message_id="msg_7", now=NOW)
    assert event is not None
    assert (event.status, event.message_id, event.occurred_at) == ("delivered", "msg_7", NOW)
    assert event.provider_message_id == "SM1f0e8ae6ade43cb3c0ce4525424e404f"
    assert event.raw_id == "SM1f0e8ae6ade43cb3c0ce4525424e404f:delivered"
    assert event.address == "+15558675310" and not event.hard_bounce


@pytest.mark.parametrize(
    ("status", "code", "expected", "hard"),
    [
        ("undelivered", "30003", "failed", True),
        ("undelivered", "30005", "failed", True),
        ("failed", "30006", "failed", True),
        ("failed", "21211", "failed", True),
        ("undelivered", "30007", "failed", False),
        ("undelivered", "30008", "failed", False),
        ("failed", "21610", "unsubscribed", False),
        ("read", "", "opened", False),
    ],
)
def test_twilio_error_codes(status: str, code: str, expected: str, hard: bool) -> None:
    extra = {"ErrorCode": code} if code else {}
    event = parse_twilio(twilio_callback(status, **extra), now=NOW)
    assert event is not None
    assert (event.status, event.hard_bounce) == (expected, hard)
    if code:
        assert event.reason is not None and event.reason.startswith(code)


@pytest.mark.parametrize("status", ["accepted", "queued", "sending", "sent", "scheduled", ""])
def test_twilio_in_flight_statuses_are_not_events(status: str) -> None:
    assert parse_twilio(twilio_callback(status), now=NOW) is None


def test_twilio_whatsapp_address_is_the_bare_number() -> None:
    event = parse_twilio(twilio_callback("read", To="whatsapp:+15558675310"), now=NOW)
    assert event is not None and event.address == "+15558675310"


# --- WhatsApp Cloud API ------------------------------------------------------------------------

APP_SECRET = "6d2b0c3a4e5f60718293a4b5c6d7e8f9"


def meta_signature(body: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_whatsapp_signature_verifies() -> None:
    body = b'{"object":"whatsapp_business_account","entry":[]}'
    verify_whatsapp(APP_SECRET, body, meta_signature(body))
    verify_whatsapp(APP_SECRET, body, meta_signature(body).upper().replace("SHA256", "sha256"))


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(meta_signature(b'{"entry":[]}', "another app's secret"), id="other secret"),
        pytest.param(meta_signature(b'{"entry":[{}]}'), id="altered body"),
        pytest.param("sha1=" + hashlib.sha1(b"x").hexdigest(), id="sha1"),
        pytest.param("sha256=", id="empty"),
        pytest.param(None, id="missing"),
    ],
)
def test_whatsapp_refuses_what_meta_did_not_sign(header: str | None) -> None:
    with pytest.raises(SignatureRejected):
        verify_whatsapp(APP_SECRET, b'{"entry":[]}', header)


def test_whatsapp_verification_handshake() -> None:
    assert whatsapp_challenge("subscribe", "our-token", "1158201444", "our-token") == "1158201444"
    assert whatsapp_challenge("subscribe", "guess", "1158201444", "our-token") is None
    assert whatsapp_challenge("unsubscribe", "our-token", "1158201444", "our-token") is None
    assert whatsapp_challenge("subscribe", None, "1158201444", "our-token") is None
    assert whatsapp_challenge("subscribe", "", "1158201444", "") is None


def whatsapp_status(status: str, timestamp: str, **extra: object) -> dict[str, object]:
    return {
        "id": "wamid.HBgLMTY1MDUwNzY1MjAVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA",
        "status": status,
        "timestamp": timestamp,
        "recipient_id": "16505076520",
        "biz_opaque_callback_data": "msg_9",
        **extra,
    }


# Shaped like the status messages webhook reference: statuses under entry[].changes[].value.
WHATSAPP_BODY = {
    "object": "whatsapp_business_account",
    "entry": [
        {
            "id": "102290129340398",
            "changes": [
                {
                    "field": "messages",
                    "value": {
                        "messaging_product": "whatsapp",
                        "metadata": {
                            "display_phone_number": "15550783881",
                            "phone_number_id": "106540352242922",
                        },
                        "statuses": [
                            whatsapp_status(
                                "sent",
                                "1767225600",
                                conversation={"id": "c1", "origin": {"type": "marketing"}},
                                pricing={"billable": True, "category": "marketing"},
                            ),
                            whatsapp_status("delivered", "1767225601"),
                            whatsapp_status("read", "1767225660"),
                        ],
                    },
                },
                {
                    "field": "messages",
                    "value": {
                        "messaging_product": "whatsapp",
                        "contacts": [{"profile": {"name": "Sheena"}, "wa_id": "16505551234"}],
                        "messages": [{"from": "16505551234", "id": "wamid.in", "type": "text"}],
                    },
                },
            ],
        },
        {
            "id": "102290129340398",
            "changes": [
                {
                    "field": "messages",
                    "value": {
                        "statuses": [
                            whatsapp_status(
                                "failed",
                                "1767225700",
                                id="wamid.dead",
                                errors=[
                                    {
                                        "code": 131026,
                                        "title": "Message undeliverable",
                                        "message": "Message undeliverable",
                                        "error_data": {"details": "Receiver is not on WhatsApp"},
                                    }
                                ],
                            ),
                            whatsapp_status(
                                "failed",
                                "1767225701",
                                id="wamid.stop",
                                errors=[{"code": 131050, "title": "User stopped marketing"}],
                            ),
                            whatsapp_status(
                                "failed",
                                "1767225702",
                                id="wamid.window",
                                errors=[{"code": 131047, "title": "Re-engagement message"}],
                            ),
                        ]
                    },
                }
            ],
        },
    ],
}


def test_whatsapp_statuses_map_to_ours() -> None:
    events = parse_whatsapp(json.dumps(WHATSAPP_BODY).encode())
    sent = "wamid.HBgLMTY1MDUwNzY1MjAVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA"
    assert [(e.provider_message_id, e.status, e.hard_bounce) for e in events] == [
        (sent, "delivered", False),
        (sent, "opened", False),
        ("wamid.dead", "failed", True),
        ("wamid.stop", "unsubscribed", False),
        ("wamid.window", "failed", False),
    ]
    delivered = events[0]
    assert delivered.message_id == "msg_9"
    assert delivered.occurred_at == datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert delivered.address == "16505076520"
    assert delivered.raw_id.endswith(":delivered:1767225601")
    assert events[2].reason == "131026: Message undeliverable (Receiver is not on WhatsApp)"
    assert len({event.raw_id for event in events}) == len(events)


def test_whatsapp_unreadable_body_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        parse_whatsapp(b"<html>")
    with pytest.raises(ValueError, match="entry"):
        parse_whatsapp(b"[]")
