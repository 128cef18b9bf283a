"""Every channel provider against a local server that speaks its provider's API.

Each provider: a delivery the server accepts (and checks field by field), then each way it
can fail: a permanent refusal, a retryable one (with Retry-After where the provider sends
it), and an unreachable or slow server.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from hilo.channels.audiences import (
    GoogleAdsCustomerMatch,
    MetaCustomAudiences,
    normalise_email,
    normalise_phone,
    oauth_credentials,
    sha256_hex,
)
from hilo.channels.base import (
    Delivery,
    PermanentFailure,
    RetryableFailure,
    failure_for_response,
    parse_retry_after,
)
from hilo.channels.fcm import FcmPush, ServiceAccount
from hilo.channels.registry import build_providers
from hilo.channels.sendgrid import SendGridEmail
from hilo.channels.smtp import SmtpEmail
from hilo.channels.twilio import TwilioMessages
from hilo.channels.webhook import (
    SignedWebhook,
    receiver_secret,
    signed_headers,
    verify_signature,
)
from hilo.channels.webpush import (
    WebPush,
    encrypt_aes128gcm,
    load_vapid_private_key,
    vapid_public_key,
)
from hilo.channels.whatsapp_cloud import WhatsAppCloud
from hilo.ids import b64url
from hilo.settings import Settings
from tests.fakes import (
    FakeFirebase,
    FakeGoogleAds,
    FakeMetaGraph,
    FakePushService,
    FakeSendGrid,
    FakeSmtpServer,
    FakeTwilio,
    FakeWebhookReceiver,
    FakeWhatsAppCloud,
    ProviderServer,
    SmtpLogin,
    decrypt_aes128gcm,
    device_token,
    fcm_error,
    free_port,
    google_ads_error,
    graph_error,
    unb64url,
    wait_until,
)

UNSUBSCRIBE_URL = "https://shop.example/u/tok_123"


def delivery(channel: str, recipient: str | None, **content: str) -> Delivery:
    return Delivery(
        message_id=f"msg_{uuid.uuid4().hex}",
        channel=channel,
        customer_id="cus_ana",
        journey_key="abandoned_cart",
        step_id="remind",
        template="cart_reminder",
        category="marketing",
        recipient=recipient,
        content=content,
        profile={"email": " Ana@Example.COM ", "phone": "+44 7700 900123", "first_name": "Ana"},
        unsubscribe_url=UNSUBSCRIBE_URL,
    )


def transactional(item: Delivery) -> Delivery:
    return Delivery(**{**item.__dict__, "category": "transactional"})


def serve(server: ProviderServer) -> Iterator[Any]:
    """Run a fake for one test; afterwards it must have seen no malformed request."""
    server.start()
    yield server
    server.stop()
    assert server.problems == [], server.problems


# One service-account key for every Firebase test: RSA key generation is slow.
FIREBASE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


# The HTTP error mapping, once for all providers ------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, PermanentFailure),
        (401, PermanentFailure),
        (404, PermanentFailure),
        (408, RetryableFailure),
        (429, RetryableFailure),
        (500, RetryableFailure),
        (503, RetryableFailure),
    ],
)
def test_status_codes_map_to_permanent_or_retryable(status: int, kind: type[Exception]) -> None:
    response = httpx.Response(status, request=httpx.Request("POST", "https://provider.test"))
    assert type(failure_for_response(response, "x")) is kind


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    now = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now) == 90
    assert parse_retry_after(format_datetime(now - timedelta(hours=1), usegmt=True), now) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# SMTP -------------------------------------------------------------------------------------


@pytest.fixture
def smtp_server() -> Iterator[FakeSmtpServer]:
    server = FakeSmtpServer().start()
    yield server
    server.stop()


def smtp_mail(server: FakeSmtpServer) -> SmtpEmail:
    return SmtpEmail(
        "127.0.0.1", server.port, sender="Shop <news@shop.example>", starttls=False, timeout=5
    )


def received_email(server: FakeSmtpServer) -> EmailMessage:
    envelope = server.mailbox.envelopes[-1]
    message = message_from_bytes(envelope.original_content or b"", policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_smtp_sends_multipart_mail_with_our_message_id_and_one_click_unsubscribe(
    smtp_server: FakeSmtpServer,
) -> None:
    item = delivery(
        "email", "ana@example.com", subject="Your cart", text="Still there", html="<p>Still</p>"
    )
    provider_id = smtp_mail(smtp_server).deliver(item)

    message = received_email(smtp_server)
    assert provider_id == message["Message-ID"] == f"<{item.message_id}@shop.example>"
    assert smtp_server.mailbox.envelopes[-1].rcpt_tos == ["ana@example.com"]
    assert message["Subject"] == "Your cart"
    assert message["List-Unsubscribe"] == f"<{UNSUBSCRIBE_URL}>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message.get_content_type() == "multipart/alternative"
    parts = {part.get_content_type(): part.get_content() for part in message.iter_parts()}
    assert parts["text/plain"].strip() == "Still there"
    assert parts["text/html"].strip() == "<p>Still</p>"


def test_smtp_transactional_mail_has_no_unsubscribe_header(smtp_server: FakeSmtpServer) -> None:
    item = transactional(delivery("email", "ana@example.com", subject="Receipt", text="Paid"))
    smtp_mail(smtp_server).deliver(item)
    message = received_email(smtp_server)
    assert message["List-Unsubscribe"] is None
    assert message.get_content_type() == "text/plain"


def test_smtp_550_for_the_recipient_is_permanent(smtp_server: FakeSmtpServer) -> None:
    smtp_server.mailbox.replies["gone@example.com"] = "550 5.1.1 <gone@example.com>: no such user"
    with pytest.raises(PermanentFailure, match="no such user") as failure:
        smtp_mail(smtp_server).deliver(delivery("email", "gone@example.com", text="hi"))
    assert failure.value.provider_status == 550


def test_smtp_451_greylisting_is_retryable(smtp_server: FakeSmtpServer) -> None:
    smtp_server.mailbox.replies["later@example.com"] = "451 4.7.1 Greylisted, try again later"
    with pytest.raises(RetryableFailure, match="Greylisted"):
        smtp_mail(smtp_server).deliver(delivery("email", "later@example.com", text="hi"))


def test_smtp_server_down_is_retryable_and_a_bad_address_is_permanent() -> None:
    down = SmtpEmail("127.0.0.1", free_port(), sender="news@shop.example", starttls=False)
    with pytest.raises(RetryableFailure, match="could not talk"):
        down.deliver(delivery("email", "ana@example.com", text="hi"))
    with pytest.raises(PermanentFailure, match="not an email address"):
        down.deliver(delivery("email", "ana.example.com", text="hi"))


def test_smtp_starttls_then_login() -> None:
    login = SmtpLogin("hilo", "s3cret")
    server = FakeSmtpServer(tls=True, login=login).start()
    try:
        mail = SmtpEmail(
            "127.0.0.1",
            server.port,
            sender="news@shop.example",
            username="hilo",
            password="s3cret",
            starttls=True,
            tls_context=server.client_tls_context,
        )
        mail.deliver(delivery("email", "ana@example.com", subject="Hi", text="hello"))
        assert login.logins and len(server.mailbox.envelopes) == 1
        wrong = SmtpEmail(
            "127.0.0.1",
            server.port,
            sender="news@shop.example",
            username="hilo",
            password="wrong",
            tls_context=server.client_tls_context,
        )
        with pytest.raises(PermanentFailure, match="535"):
            wrong.deliver(delivery("email", "ana@example.com", subject="Hi", text="hello"))
    finally:
        server.stop()


# SendGrid ---------------------------------------------------------------------------------


@pytest.fixture
def sendgrid_server() -> Iterator[FakeSendGrid]:
    yield from serve(FakeSendGrid())


@pytest.fixture
def sendgrid(sendgrid_server: FakeSendGrid) -> Iterator[SendGridEmail]:
    provider = SendGridEmail(
        sendgrid_server.api_key, sender="Shop <news@shop.example>", base_url=sendgrid_server.url
    )
    yield provider
    provider.close()


def test_sendgrid_sends_mail_and_returns_x_message_id(
    sendgrid: SendGridEmail, sendgrid_server: FakeSendGrid
) -> None:
    item = delivery("email", "ana@example.com", subject="Your cart", text="t", html="<b>h</b>")
    provider_id = sendgrid.deliver(item)

    mail = sendgrid_server.mail[-1]
    assert provider_id and provider_id != item.message_id
    assert mail["personalizations"] == [{"to": [{"email": "ana@example.com"}]}]
    assert mail["from"] == {"email": "news@shop.example", "name": "Shop"}
    assert [part["type"] for part in mail["content"]] == ["text/plain", "text/html"]
    assert mail["custom_args"]["message_id"] == item.message_id
    assert mail["headers"] == {
        "List-Unsubscribe": f"<{UNSUBSCRIBE_URL}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def test_sendgrid_400_names_the_field_and_is_permanent(
    sendgrid: SendGridEmail, sendgrid_server: FakeSendGrid
) -> None:
    sendgrid_server.fail_next(
        400, FakeSendGrid.errors(("personalizations.0.to", "Does not contain a valid address."))
    )
    with pytest.raises(PermanentFailure, match="personalizations.0.to") as failure:
        sendgrid.deliver(delivery("email", "ana@example.com", subject="s", text="t"))
    assert failure.value.provider_status == 400


def test_sendgrid_rate_limit_and_outage_are_retryable(
    sendgrid: SendGridEmail, sendgrid_server: FakeSendGrid
) -> None:
    sendgrid_server.fail_next(
        429, FakeSendGrid.errors((None, "too many requests")), {"Retry-After": "7"}
    )
    with pytest.raises(RetryableFailure) as failure:
        sendgrid.deliver(delivery("email", "ana@example.com", subject="s", text="t"))
    assert failure.value.retry_after == 7
    sendgrid_server.fail_next(503, b"upstream unavailable")
    with pytest.raises(RetryableFailure, match="503"):
        sendgrid.deliver(delivery("email", "ana@example.com", subject="s", text="t"))
    assert sendgrid_server.mail == []


def test_sendgrid_wrong_key_is_permanent(sendgrid_server: FakeSendGrid) -> None:
    provider = SendGridEmail("SG.wrong", sender="news@shop.example", base_url=sendgrid_server.url)
    with pytest.raises(PermanentFailure, match="authorization grant is invalid"):
        provider.deliver(delivery("email", "ana@example.com", subject="s", text="t"))


# Twilio -----------------------------------------------------------------------------------


@pytest.fixture
def twilio_server() -> Iterator[FakeTwilio]:
    yield from serve(FakeTwilio())


def twilio(server: FakeTwilio, channel: Any = "sms", **options: Any) -> TwilioMessages:
    options.setdefault("sender", "+14155550100")
    return TwilioMessages(
        server.account_sid, server.auth_token, channel=channel, base_url=server.url, **options
    )


def test_twilio_sms_returns_the_message_sid(twilio_server: FakeTwilio) -> None:
    sms = twilio(twilio_server, status_callback_url="https://hilo.example/twilio/status")
    sid = sms.deliver(delivery("sms", "+447700900123", body="Your cart misses you"))
    assert sid.startswith("SM")
    assert twilio_server.messages == [
        {
            "To": "+447700900123",
            "From": "+14155550100",
            "Body": "Your cart misses you",
            "StatusCallback": "https://hilo.example/twilio/status",
        }
    ]


def test_twilio_whatsapp_uses_whatsapp_addresses_and_content_templates(
    twilio_server: FakeTwilio,
) -> None:
    whatsapp = twilio(twilio_server, "whatsapp", sender="+14155238886")
    whatsapp.deliver(
        delivery("whatsapp", "+447700900123", content_sid="HX123", params='["Ana", "3"]')
    )
    sent = twilio_server.messages[-1]
    assert sent["To"] == "whatsapp:+447700900123"
    assert sent["From"] == "whatsapp:+14155238886"
    assert json.loads(sent["ContentVariables"]) == {"1": "Ana", "2": "3"}


def test_twilio_sends_once_per_idempotency_token_even_after_a_timeout(
    twilio_server: FakeTwilio,
) -> None:
    item = delivery("sms", "+447700900123", body="once")
    sms = twilio(twilio_server, timeout=0.2)
    twilio_server.delay_next(0.5)  # Twilio takes the message but answers too late
    with pytest.raises(RetryableFailure, match="no answer in time"):
        sms.deliver(item)
    wait_until(lambda: len(twilio_server.messages) == 1)

    first = sms.deliver(item)  # the activity's retry
    again = sms.deliver(item)
    assert first == again
    assert twilio_server.idempotency_tokens == [item.message_id] * 3
    assert len(twilio_server.messages) == 1


def test_twilio_invalid_number_is_permanent_with_twilio_code(twilio_server: FakeTwilio) -> None:
    twilio_server.unreachable.add("+447700900999")
    with pytest.raises(PermanentFailure, match="21211") as failure:
        twilio(twilio_server).deliver(delivery("sms", "+447700900999", body="x"))
    assert failure.value.provider_status == 400


def test_twilio_local_check_refuses_a_number_that_is_not_e164(twilio_server: FakeTwilio) -> None:
    with pytest.raises(PermanentFailure, match="E.164"):
        twilio(twilio_server).deliver(delivery("sms", "07700 900123", body="x"))
    assert twilio_server.received == []


def test_twilio_429_and_500_are_retryable(twilio_server: FakeTwilio) -> None:
    twilio_server.fail_next(
        429, FakeTwilio.error(429, 20429, "Too Many Requests").body, {"Retry-After": "2"}
    )
    with pytest.raises(RetryableFailure, match="20429") as failure:
        twilio(twilio_server).deliver(delivery("sms", "+447700900123", body="x"))
    assert failure.value.retry_after == 2
    twilio_server.fail_next(500, FakeTwilio.error(500, 20500, "Internal Server Error").body)
    with pytest.raises(RetryableFailure, match="20500"):
        twilio(twilio_server).deliver(delivery("sms", "+447700900123", body="x"))


def test_twilio_wrong_auth_token_is_permanent(twilio_server: FakeTwilio) -> None:
    provider = TwilioMessages(
        twilio_server.account_sid, "wrong", sender="+14155550100", base_url=twilio_server.url
    )
    with pytest.raises(PermanentFailure, match="20003"):
        provider.deliver(delivery("sms", "+447700900123", body="x"))


# WhatsApp Cloud API -----------------------------------------------------------------------


@pytest.fixture
def whatsapp_server() -> Iterator[FakeWhatsAppCloud]:
    yield from serve(FakeWhatsAppCloud())


@pytest.fixture
def whatsapp(whatsapp_server: FakeWhatsAppCloud) -> WhatsAppCloud:
    return WhatsAppCloud(
        whatsapp_server.token, whatsapp_server.phone_number_id, base_url=whatsapp_server.url
    )


def test_whatsapp_cloud_sends_an_approved_template(
    whatsapp: WhatsAppCloud, whatsapp_server: FakeWhatsAppCloud
) -> None:
    item = delivery(
        "whatsapp",
        "+447700900123",
        template_name="cart_reminder",
        language="en_GB",
        params='["Ana", "3 items"]',
    )
    wamid = whatsapp.deliver(item)
    assert wamid.startswith("wamid.")
    sent = whatsapp_server.messages[-1]
    assert sent["template"] == {
        "name": "cart_reminder",
        "language": {"code": "en_GB"},
        "components": [
            {
                "type": "body",
                "parameters": [
                    {"type": "text", "text": "Ana"},
                    {"type": "text", "text": "3 items"},
                ],
            }
        ],
    }
    assert sent["biz_opaque_callback_data"] == item.message_id


def test_whatsapp_cloud_text_inside_the_service_window(
    whatsapp: WhatsAppCloud, whatsapp_server: FakeWhatsAppCloud
) -> None:
    whatsapp.deliver(delivery("whatsapp", "+447700900123", body="Thanks for your reply"))
    assert whatsapp_server.messages[-1]["text"]["body"] == "Thanks for your reply"


def test_whatsapp_cloud_template_errors_are_permanent(
    whatsapp: WhatsAppCloud, whatsapp_server: FakeWhatsAppCloud
) -> None:
    with pytest.raises(PermanentFailure, match="132000"):
        whatsapp.deliver(
            delivery("whatsapp", "+447700900123", template_name="cart_reminder", params='["Ana"]')
        )
    with pytest.raises(PermanentFailure, match="params must be a JSON list"):
        whatsapp.deliver(
            delivery("whatsapp", "+447700900123", template_name="cart_reminder", params="Ana")
        )
    bad_token = WhatsAppCloud("nope", whatsapp_server.phone_number_id, base_url=whatsapp_server.url)
    with pytest.raises(PermanentFailure, match="error 190"):
        bad_token.deliver(delivery("whatsapp", "+447700900123", body="x"))


def test_whatsapp_cloud_throughput_limit_is_retryable_despite_http_400(
    whatsapp: WhatsAppCloud, whatsapp_server: FakeWhatsAppCloud
) -> None:
    whatsapp_server.fail_next(400, graph_error(130429, "(#130429) Rate limit hit"))
    with pytest.raises(RetryableFailure, match="130429"):
        whatsapp.deliver(delivery("whatsapp", "+447700900123", body="x"))
    whatsapp_server.fail_next(500, graph_error(131000, "Something went wrong"))
    with pytest.raises(RetryableFailure, match="131000"):
        whatsapp.deliver(delivery("whatsapp", "+447700900123", body="x"))


# FCM HTTP v1 ------------------------------------------------------------------------------


@pytest.fixture
def fcm_server() -> Iterator[FakeFirebase]:
    yield from serve(FakeFirebase(key=FIREBASE_KEY))


@pytest.fixture
def fcm(fcm_server: FakeFirebase) -> Iterator[FcmPush]:
    account = ServiceAccount.from_info(fcm_server.service_account())
    provider = FcmPush(account, base_url=fcm_server.url)
    yield provider
    provider.close()


def test_fcm_sends_with_a_cached_oauth_token_from_the_service_account(
    fcm: FcmPush, fcm_server: FakeFirebase
) -> None:
    token = device_token()
    item = delivery("push", token, title="Your cart", body="3 items", url="https://shop.example/c")
    name = fcm.deliver(item)
    fcm.deliver(item)

    assert name.startswith(f"projects/{fcm_server.project_id}/messages/")
    assert fcm_server.token_requests == 1  # the RS256 assertion was verified once, then cached
    push = fcm_server.pushes[-1]
    assert push["token"] == token
    assert push["notification"] == {"title": "Your cart", "body": "3 items"}
    assert push["data"]["message_id"] == item.message_id
    assert push["webpush"]["fcm_options"]["link"] == "https://shop.example/c"


def test_fcm_mints_a_new_token_when_the_old_one_nears_expiry(
    fcm: FcmPush, fcm_server: FakeFirebase
) -> None:
    # Inside google-auth's refresh margin (3 min 45 s): every send refreshes.
    fcm_server.token_lifetime = 200
    fcm.deliver(delivery("push", device_token(), title="a", body="b"))
    fcm.deliver(delivery("push", device_token(), title="a", body="b"))
    assert fcm_server.token_requests == 2


def test_fcm_revoked_access_token_is_retried_with_a_fresh_one(
    fcm: FcmPush, fcm_server: FakeFirebase
) -> None:
    item = delivery("push", device_token(), title="a", body="b")
    fcm.deliver(item)
    fcm_server.revoke_tokens()
    with pytest.raises(RetryableFailure, match="UNAUTHENTICATED"):
        fcm.deliver(item)
    fcm.deliver(item)
    assert fcm_server.token_requests == 2


def test_fcm_unregistered_and_invalid_tokens_are_permanent(
    fcm: FcmPush, fcm_server: FakeFirebase
) -> None:
    gone = device_token()
    fcm_server.unregistered.add(gone)
    with pytest.raises(PermanentFailure, match="UNREGISTERED") as failure:
        fcm.deliver(delivery("push", gone, title="a", body="b"))
    assert (failure.value.provider_status, failure.value.recipient_gone) == (404, True)
    with pytest.raises(PermanentFailure, match="INVALID_ARGUMENT") as invalid:
        fcm.deliver(delivery("push", "not-a-token", title="a", body="b"))
    assert invalid.value.recipient_gone
    # INVALID_ARGUMENT about the message, not the token: the device stays.
    fcm_server.fail_next(
        400, fcm_error(400, "INVALID_ARGUMENT", "Invalid JSON payload", "INVALID_ARGUMENT")
    )
    with pytest.raises(PermanentFailure, match="INVALID_ARGUMENT") as ours:
        fcm.deliver(delivery("push", device_token(), title="a", body="b"))
    assert not ours.value.recipient_gone


def test_fcm_unavailable_and_quota_are_retryable(fcm: FcmPush, fcm_server: FakeFirebase) -> None:
    fcm_server.fail_next(
        503,
        fcm_error(503, "UNAVAILABLE", "The service is unavailable.", "UNAVAILABLE"),
        {"Retry-After": "10"},
    )
    with pytest.raises(RetryableFailure, match="UNAVAILABLE") as failure:
        fcm.deliver(delivery("push", device_token(), title="a", body="b"))
    assert failure.value.retry_after == 10
    fcm_server.fail_next(
        429, fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED")
    )
    with pytest.raises(RetryableFailure, match="QUOTA_EXCEEDED"):
        fcm.deliver(delivery("push", device_token(), title="a", body="b"))


def test_fcm_token_endpoint_refuses_an_assertion_signed_with_another_key(
    fcm_server: FakeFirebase,
) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    account = ServiceAccount.from_info(fcm_server.service_account(stranger))
    provider = FcmPush(account, base_url=fcm_server.url)
    with pytest.raises(PermanentFailure, match="invalid_grant"):
        provider.deliver(delivery("push", device_token(), title="a", body="b"))
    assert fcm_server.pushes == []


# Web Push ---------------------------------------------------------------------------------

VAPID_KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def push_server() -> Iterator[FakePushService]:
    yield from serve(FakePushService(vapid_public_key(VAPID_KEY)))


@pytest.fixture
def webpush() -> Iterator[WebPush]:
    provider = WebPush(VAPID_KEY, "mailto:ops@shop.example", ttl_seconds=3600)
    yield provider
    provider.close()


def test_aes128gcm_matches_the_rfc_8291_worked_example() -> None:
    sender = ec.derive_private_key(
        int.from_bytes(unb64url("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"), "big"),
        ec.SECP256R1(),
    )
    body = encrypt_aes128gcm(
        b"When I grow up, I want to be a watermelon",
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
        "BTBZMqHH6r4Tts7J_aSIgg",
        salt=unb64url("DGv6ra1nlYgDCS1FRnbzlw"),
        sender_key=sender,
    )
    assert b64url(body) == (
        "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmY"
        "WAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexS"
        "gSxsj_Qulcy4a-fN"
    )
    # And the fake push service's decryption reads it back with the RFC's receiver key.
    receiver = ec.derive_private_key(
        int.from_bytes(unb64url("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"), "big"),
        ec.SECP256R1(),
    )
    plaintext = decrypt_aes128gcm(body, receiver, unb64url("BTBZMqHH6r4Tts7J_aSIgg"))
    assert plaintext == b"When I grow up, I want to be a watermelon"


def test_webpush_delivers_an_encrypted_vapid_signed_notification(
    webpush: WebPush, push_server: FakePushService
) -> None:
    subscriber = push_server.subscribe()
    item = delivery(
        "webpush",
        subscriber.subscription_json(),
        title="Your cart",
        body="3 items left",
        url="https://shop.example/cart",
    )
    location = webpush.deliver(item)

    assert location.startswith(f"{push_server.url}/message/")
    message = push_server.messages[-1]
    assert message.subscriber is subscriber
    assert message.json() == {
        "title": "Your cart",
        "body": "3 items left",
        "message_id": item.message_id,
        "url": "https://shop.example/cart",
    }
    assert (message.ttl, message.urgency) == (3600, "normal")
    assert message.topic and len(message.topic) <= 32
    webpush.deliver(transactional(item))
    assert push_server.messages[-1].urgency == "high"


def test_webpush_expired_subscription_is_permanent(
    webpush: WebPush, push_server: FakePushService
) -> None:
    subscriber = push_server.subscribe()
    push_server.unsubscribe(subscriber)
    with pytest.raises(PermanentFailure, match="410") as failure:
        webpush.deliver(delivery("webpush", subscriber.subscription_json(), title="a", body="b"))
    assert (failure.value.provider_status, failure.value.recipient_gone) == (410, True)
    unknown = json.loads(push_server.subscribe().subscription_json())
    unknown["endpoint"] = f"{push_server.url}/push/never-existed"
    with pytest.raises(PermanentFailure, match="404") as missing:
        webpush.deliver(delivery("webpush", json.dumps(unknown), title="a", body="b"))
    assert missing.value.recipient_gone


def test_webpush_rate_limit_with_an_http_date_is_retryable(
    webpush: WebPush, push_server: FakePushService
) -> None:
    subscriber = push_server.subscribe()
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    push_server.fail_next(429, "slow down", {"Retry-After": later})
    with pytest.raises(RetryableFailure) as failure:
        webpush.deliver(delivery("webpush", subscriber.subscription_json(), title="a", body="b"))
    assert failure.value.retry_after is not None and 100 < failure.value.retry_after <= 120
    push_server.fail_next(502, "bad gateway")
    with pytest.raises(RetryableFailure, match="502"):
        webpush.deliver(delivery("webpush", subscriber.subscription_json(), title="a", body="b"))


def test_webpush_refuses_a_malformed_subscription_or_an_oversized_payload(
    webpush: WebPush, push_server: FakePushService
) -> None:
    with pytest.raises(PermanentFailure, match="not a push subscription"):
        webpush.deliver(delivery("webpush", '{"endpoint": "https://x"}', title="a", body="b"))
    subscriber = push_server.subscribe()
    with pytest.raises(PermanentFailure, match="at most"):
        webpush.deliver(delivery("webpush", subscriber.subscription_json(), body="x" * 5000))
    assert push_server.received == []


def test_a_vapid_key_loads_from_pem_or_from_its_raw_scalar() -> None:
    pem = VAPID_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    raw = b64url(VAPID_KEY.private_numbers().private_value.to_bytes(32, "big"))
    expected = vapid_public_key(VAPID_KEY)
    assert vapid_public_key(load_vapid_private_key(pem)) == expected
    assert vapid_public_key(load_vapid_private_key(raw)) == expected
    with pytest.raises(ValueError, match="32 bytes"):
        load_vapid_private_key("c2hvcnQ")


# Signed webhook ---------------------------------------------------------------------------


@pytest.fixture
def webhook_server() -> Iterator[FakeWebhookReceiver]:
    yield from serve(FakeWebhookReceiver())


@pytest.fixture
def webhook(webhook_server: FakeWebhookReceiver) -> Iterator[SignedWebhook]:
    provider = SignedWebhook(webhook_server.hook_url, webhook_server.secret, timeout=0.3)
    yield provider
    provider.close()


def test_webhook_posts_a_signed_payload_and_returns_the_receivers_id(
    webhook: SignedWebhook, webhook_server: FakeWebhookReceiver
) -> None:
    item = delivery("webhook", None, subject="VIP left a cart", priority="high")
    assert webhook.deliver(item) == "evt_1"
    event = webhook_server.events[-1]
    assert event["message"]["id"] == item.message_id
    assert event["customer"] == {"id": "cus_ana"}
    assert event["journey"] == {"key": "abandoned_cart"}
    assert event["step"] == {"id": "remind"}
    assert event["content"] == {"subject": "VIP left a cart", "priority": "high"}
    assert event["profile"]["first_name"] == "Ana"


def test_webhook_receiver_acts_once_per_idempotency_key(
    webhook: SignedWebhook, webhook_server: FakeWebhookReceiver
) -> None:
    item = delivery("webhook", None, subject="once")
    webhook_server.fail_next(502, "bad gateway")
    with pytest.raises(RetryableFailure, match="502"):
        webhook.deliver(item)
    first, second = webhook.deliver(item), webhook.deliver(item)
    assert first == second
    assert webhook_server.idempotency_keys == [item.message_id] * 3
    assert len(webhook_server.events) == 1


def test_webhook_refusal_is_permanent_and_silence_is_retryable(
    webhook: SignedWebhook, webhook_server: FakeWebhookReceiver
) -> None:
    webhook_server.fail_next(422, {"error": "unknown step"})
    with pytest.raises(PermanentFailure, match="unknown step"):
        webhook.deliver(delivery("webhook", None, subject="x"))
    webhook_server.delay_next(0.6)
    with pytest.raises(RetryableFailure, match="no answer in time"):
        webhook.deliver(delivery("webhook", None, subject="x"))
    wrong_secret = SignedWebhook(webhook_server.hook_url, "not-the-secret")
    with pytest.raises(PermanentFailure, match="401"):
        wrong_secret.deliver(delivery("webhook", None, subject="x"))
    webhook_server.problems.remove("POST /hooks/hilo: signature")
    nobody = SignedWebhook(f"http://127.0.0.1:{free_port()}/hooks", "s")
    with pytest.raises(RetryableFailure, match="could not reach"):
        nobody.deliver(delivery("webhook", None, subject="x"))


def test_verify_signature_checks_the_secret_the_body_and_the_age() -> None:
    body = b'{"message":{"id":"msg_1"}}'
    headers = signed_headers("a-long-shared-secret", "msg_1", 1767225600, body)
    assert headers["webhook-signature"].startswith("v1,")
    assert verify_signature("a-long-shared-secret", headers, body, now=1767225700)
    assert not verify_signature("other", headers, body, now=1767225700)
    assert not verify_signature("a-long-shared-secret", headers, body + b" ", now=1767225700)
    assert not verify_signature("a-long-shared-secret", headers, body, now=1767226000)
    stale = {**headers, "webhook-timestamp": "not-a-time"}
    assert not verify_signature("a-long-shared-secret", stale, body)
    old = signed_headers("old", "msg_1", 1767225600, body)["webhook-signature"]
    rotated = {**headers, "webhook-signature": f"{old} {headers['webhook-signature']}"}
    assert verify_signature("a-long-shared-secret", rotated, body, now=1767225600)


def test_a_standard_webhooks_library_verifies_what_we_send() -> None:
    """Make, n8n, Zapier and helpdesks verify with off-the-shelf code: the reference library
    accepts our request with the whsec_ secret we give receivers, and refuses a changed one."""
    body = b'{"message":{"id":"msg_1"}}'
    for secret in ("a-long-shared-secret", "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"):
        headers = signed_headers(secret, "msg_1", int(time.time()), body)
        receiver = Webhook(receiver_secret(secret))
        assert receiver.verify(body, headers) == {"message": {"id": "msg_1"}}
        with pytest.raises(WebhookVerificationError):
            receiver.verify(body.replace(b"msg_1", b"msg_2"), headers)


# Ad audiences -----------------------------------------------------------------------------


def test_identifiers_are_normalised_then_hashed_as_the_platforms_expect() -> None:
    assert normalise_email("  Ana@Example.COM ") == "ana@example.com"
    assert normalise_phone("+44 (0)7700-900 123".replace("(0)", "")) == "447700900123"
    assert sha256_hex("test@example.com") == (
        "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"
    )


@pytest.fixture
def meta_server() -> Iterator[FakeMetaGraph]:
    yield from serve(FakeMetaGraph())


@pytest.fixture
def meta(meta_server: FakeMetaGraph) -> MetaCustomAudiences:
    return MetaCustomAudiences(meta_server.access_token, base_url=meta_server.url)


def test_meta_adds_then_removes_the_hashed_customer(
    meta: MetaCustomAudiences, meta_server: FakeMetaGraph
) -> None:
    audience = "23851234567890"
    member = (
        ("EMAIL", hashlib.sha256(b"ana@example.com").hexdigest()),
        ("PHONE", hashlib.sha256(b"447700900123").hexdigest()),
    )
    session = meta.deliver(delivery("audience", None, audience=audience, action="add"))
    assert session.isdigit()
    assert meta_server.members[audience] == {member}
    meta.deliver(delivery("audience", None, audience=audience, action="remove"))
    assert meta_server.members[audience] == set()
    assert [r.method for r in meta_server.received] == ["POST", "DELETE"]


def test_meta_unknown_audience_is_permanent_and_throttling_is_retryable(
    meta: MetaCustomAudiences, meta_server: FakeMetaGraph
) -> None:
    with pytest.raises(PermanentFailure, match="does not exist"):
        meta.deliver(delivery("audience", None, audience="999", action="add"))
    meta_server.fail_next(
        400, graph_error(80003, "(#80003) There have been too many calls", subcode=2446079)
    )
    with pytest.raises(RetryableFailure, match="80003"):
        meta.deliver(delivery("audience", None, audience="23851234567890", action="add"))


def test_audience_steps_need_an_audience_an_action_and_an_identifier(
    meta: MetaCustomAudiences, meta_server: FakeMetaGraph
) -> None:
    with pytest.raises(PermanentFailure, match="names no audience"):
        meta.deliver(delivery("audience", None, action="add"))
    with pytest.raises(PermanentFailure, match="neither 'add' nor 'remove'"):
        meta.deliver(delivery("audience", None, audience="1", action="sync"))
    anonymous = Delivery(**{**delivery("audience", None, audience="1").__dict__, "profile": {}})
    with pytest.raises(PermanentFailure, match="no email or phone"):
        meta.deliver(anonymous)
    assert meta_server.received == []


@pytest.fixture
def ads_server() -> Iterator[FakeGoogleAds]:
    yield from serve(FakeGoogleAds())


def google_ads(server: FakeGoogleAds, **overrides: Any) -> GoogleAdsCustomerMatch:
    options: dict[str, Any] = {
        "developer_token": server.developer_token,
        "customer_id": "123-456-7890",
        "credentials": oauth_credentials(
            server.client_id, server.client_secret, server.refresh_token, server.token_url
        ),
        "login_customer_id": "987-654-3210",
        "base_url": server.url,
    }
    options.update(overrides)
    return GoogleAdsCustomerMatch(**options)


def test_google_ads_customer_match_creates_adds_and_runs_a_job(
    ads_server: FakeGoogleAds,
) -> None:
    user_list = "customers/1234567890/userLists/555000111"
    job = google_ads(ads_server).deliver(
        delivery("audience", None, audience="555000111", action="add")
    )
    assert ads_server.jobs[job]["status"] == "SUCCESS"
    assert ads_server.user_lists[user_list] == {
        ("hashedEmail", hashlib.sha256(b"ana@example.com").hexdigest()),
        ("hashedPhoneNumber", hashlib.sha256(b"+447700900123").hexdigest()),
    }
    assert [r.path.rsplit(":", 1)[-1] for r in ads_server.received] == [
        "/token",
        "create",
        "addOperations",
        "run",
    ]
    google_ads(ads_server).deliver(delivery("audience", None, audience=user_list, action="remove"))
    assert ads_server.user_lists[user_list] == set()


def test_google_ads_quota_error_is_retryable_after_its_retry_delay(
    ads_server: FakeGoogleAds,
) -> None:
    ads_server.fail_next(
        429,
        google_ads_error(
            429,
            "RESOURCE_EXHAUSTED",
            {"quotaError": "RESOURCE_TEMPORARILY_EXHAUSTED"},
            "Too many requests. Retry in 30 seconds.",
            details={"quotaErrorDetails": {"rateScope": "DEVELOPER", "retryDelay": "30s"}},
        ),
    )
    with pytest.raises(RetryableFailure, match="RESOURCE_TEMPORARILY_EXHAUSTED") as failure:
        google_ads(ads_server).deliver(delivery("audience", None, audience="555000111"))
    assert failure.value.retry_after == 30


def test_google_ads_bad_list_or_credentials_are_permanent(ads_server: FakeGoogleAds) -> None:
    with pytest.raises(PermanentFailure, match="INVALID_USER_LIST_ID"):
        google_ads(ads_server).deliver(delivery("audience", None, audience="42"))
    with pytest.raises(PermanentFailure, match="DEVELOPER_TOKEN_INVALID"):
        google_ads(ads_server, developer_token="wrong").deliver(
            delivery("audience", None, audience="555000111")
        )
    with pytest.raises(PermanentFailure, match="USER_PERMISSION_DENIED"):
        google_ads(ads_server, login_customer_id=None).deliver(
            delivery("audience", None, audience="555000111")
        )


def test_google_ads_refreshes_its_access_token_before_it_expires_and_when_refused(
    ads_server: FakeGoogleAds,
) -> None:
    ads = google_ads(ads_server)
    item = delivery("audience", None, audience="555000111", action="add")
    ads.deliver(item)
    ads.deliver(item)
    assert ads_server.token_requests == 1  # one token for six calls while it is fresh
    # An hour later the token is dead: the API refuses it, the retry refreshes it.
    ads_server.expire_tokens()
    with pytest.raises(RetryableFailure, match="OAUTH_TOKEN_EXPIRED") as refused:
        ads.deliver(item)
    assert refused.value.retry_after == 0
    ads.deliver(item)
    assert ads_server.token_requests == 2
    # A token that lives less than google-auth's refresh margin is refreshed before each of
    # a job's three calls.
    ads_server.token_lifetime = 60
    ads.credentials.token = None
    ads.deliver(item)
    ads.deliver(item)
    assert ads_server.token_requests == 2 + 6
    ads.close()


def test_google_ads_revoked_refresh_token_is_permanent(ads_server: FakeGoogleAds) -> None:
    ads = google_ads(
        ads_server,
        credentials=oauth_credentials(
            ads_server.client_id, ads_server.client_secret, "1//revoked", ads_server.token_url
        ),
    )
    with pytest.raises(PermanentFailure, match="invalid_grant"):
        ads.deliver(delivery("audience", None, audience="555000111"))


# Settings ---------------------------------------------------------------------------------


def test_every_channel_stays_on_capture_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HILO_EMAIL_PROVIDER", "HILO_SMS_PROVIDER", "HILO_WEBHOOK_URL"):
        monkeypatch.delenv(name, raising=False)
    assert build_providers(Settings(_env_file=None)) == {}


def test_build_providers_reads_hilo_environment_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, twilio_server: FakeTwilio
) -> None:
    key_file = tmp_path / "firebase.json"
    account = {
        "type": "service_account",
        "project_id": "hilo-shop",
        "private_key_id": "k1",
        "private_key": FIREBASE_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        "client_email": "push@hilo-shop.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    key_file.write_text(json.dumps(account))
    environment = {
        "HILO_EMAIL_PROVIDER": "sendgrid",
        "HILO_SENDGRID_API_KEY": "SG.key",
        "HILO_SENDGRID_FROM": "news@shop.example",
        "HILO_SMS_PROVIDER": "twilio",
        "HILO_TWILIO_ACCOUNT_SID": twilio_server.account_sid,
        "HILO_TWILIO_AUTH_TOKEN": twilio_server.auth_token,
        "HILO_TWILIO_FROM": "+14155550100",
        "HILO_TWILIO_BASE_URL": twilio_server.url,
        "HILO_WHATSAPP_PROVIDER": "whatsapp_cloud",
        "HILO_WHATSAPP_CLOUD_TOKEN": "EAAG",
        "HILO_WHATSAPP_CLOUD_PHONE_NUMBER_ID": "1065",
        "HILO_PUSH_PROVIDER": "fcm",
        "HILO_FCM_SERVICE_ACCOUNT_FILE": str(key_file),
        "HILO_WEBPUSH_PROVIDER": "vapid",
        "HILO_VAPID_PRIVATE_KEY": b64url(
            VAPID_KEY.private_numbers().private_value.to_bytes(32, "big")
        ),
        "HILO_VAPID_SUBJECT": "mailto:ops@shop.example",
        "HILO_WEBHOOK_URL": "https://hooks.example/hilo",
        "HILO_WEBHOOK_SECRET": "whsec",
        "HILO_AUDIENCE_PROVIDER": "google_ads",
        "HILO_GOOGLE_ADS_DEVELOPER_TOKEN": "dev",
        "HILO_GOOGLE_ADS_CUSTOMER_ID": "123-456-7890",
        "HILO_GOOGLE_ADS_CLIENT_ID": "hilo-ads.apps.googleusercontent.com",
        "HILO_GOOGLE_ADS_CLIENT_SECRET": "GOCSPX-secret",
        "HILO_GOOGLE_ADS_REFRESH_TOKEN": "1//refresh",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)
    assert "SG.key" not in repr(settings)  # credentials stay secret in logs

    providers = build_providers(settings)
    assert {channel: provider.name for channel, provider in providers.items()} == {
        "email": "sendgrid",
        "sms": "twilio",
        "whatsapp": "whatsapp_cloud",
        "push": "fcm",
        "webpush": "webpush",
        "webhook": "webhook",
        "audience": "google_ads",
    }
    # The base URL setting reaches the provider: this SMS goes to the local Twilio.
    assert providers["sms"].deliver(delivery("sms", "+447700900123", body="hi")).startswith("SM")


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"email_provider": "smtp"}, "HILO_SMTP_HOST, HILO_SMTP_FROM"),
        (
            {"sms_provider": "twilio", "twilio_account_sid": "AC1"},
            "HILO_TWILIO_AUTH_TOKEN, HILO_TWILIO_FROM or HILO_TWILIO_MESSAGING_SERVICE_SID",
        ),
        ({"whatsapp_provider": "whatsapp_cloud"}, "HILO_WHATSAPP_CLOUD_TOKEN"),
        (
            {"push_provider": "fcm"},
            "HILO_FCM_SERVICE_ACCOUNT_JSON or HILO_FCM_SERVICE_ACCOUNT_FILE",
        ),
        (
            {"push_provider": "fcm", "fcm_service_account_json": "{}"},
            "HILO_FCM_SERVICE_ACCOUNT_JSON",
        ),
        ({"webpush_provider": "vapid", "vapid_subject": "x"}, "HILO_VAPID_PRIVATE_KEY"),
        ({"webhook_url": "https://hooks.example"}, "HILO_WEBHOOK_SECRET"),
        ({"audience_provider": "meta"}, "HILO_META_ACCESS_TOKEN"),
        ({"audience_provider": "google_ads"}, "HILO_GOOGLE_ADS_DEVELOPER_TOKEN"),
    ],
)
def test_a_missing_credential_names_its_hilo_variable(settings: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        build_providers(Settings(_env_file=None, **settings))
