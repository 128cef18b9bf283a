"""What the feedback tests share: the public URL and secrets they sign with, a sent message in
the ledger, the token of a signed link, a Twilio callback signed as Twilio signs it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from hilo.db.models import Message
from hilo.db.store import Store
from hilo.feedback.webhooks import twilio_signature

PUBLIC = "https://hilo.shop.example"
LINK_SECRET = "a-link-secret-for-tests-only-0123456789"
TWILIO_TOKEN = "twilio-auth-token-for-tests"
SENT_AT = datetime.now(UTC).replace(microsecond=0)


def seed(store: Store, message_id: str, **fields: Any) -> Message:
    row = {
        "message_id": message_id,
        "workflow_id": f"welcome:{fields.get('customer_id', 'cus_ana')}",
        "run_id": "run_1",
        "journey_key": "welcome",
        "journey_version": 1,
        "customer_id": "cus_ana",
        "step_id": "hello",
        "channel": "email",
        "template": "welcome_email",
        "category": "marketing",
        "status": "sent",
        "provider": "sendgrid",
        "provider_message_id": f"pm_{message_id}",
        "recipient": "Ana@Example.com",
        "scheduled_at": SENT_AT,
        "sent_at": SENT_AT,
        **fields,
    }
    return store.record_message(Message(**row))


def token_of(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[-1]


def twilio_post(
    api: httpx.AsyncClient, params: dict[str, str], query: str = "", token: str = TWILIO_TOKEN
) -> Any:
    url = f"{PUBLIC}/webhooks/twilio" + (f"?{query}" if query else "")
    signature = twilio_signature(token, url, params)
    return api.post(
        "/webhooks/twilio" + (f"?{query}" if query else ""),
        data=params,
        headers={"X-Twilio-Signature": signature},
    )
