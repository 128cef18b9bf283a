"""A signed JSON webhook: hand a journey step to Make, n8n, Zapier, a helpdesk or your own code.

Requests follow the Standard Webhooks format (standardwebhooks.com), so receivers verify them
with off-the-shelf code::

    webhook-id: <message id>            also Idempotency-Key: do the work once per id
    webhook-timestamp: 1767225600
    webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">

The signing key is ``HILO_WEBHOOK_SECRET``: a Standard Webhooks secret (``whsec_`` and base64)
is used as it is; any other text is used as its UTF-8 bytes, and receivers are given
:func:`receiver_secret` of it (``whsec_`` + base64 of those bytes). A retry after a timeout
sends the same message again, with the same id.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from hilo.channels.base import (
    DEFAULT_TIMEOUT_SECONDS,
    Delivery,
    PermanentFailure,
    http_client,
    send,
)

__all__ = ["SignedWebhook", "receiver_secret", "signed_headers", "verify_signature"]

SECRET_PREFIX = "whsec_"


def _webhook(secret: str) -> Webhook:
    return Webhook(secret if secret.startswith(SECRET_PREFIX) else secret.encode())


def receiver_secret(secret: str) -> str:
    """The ``whsec_`` secret a receiver's Standard Webhooks library verifies our requests with."""
    if secret.startswith(SECRET_PREFIX):
        return secret
    return SECRET_PREFIX + base64.b64encode(secret.encode()).decode()


def signed_headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers for this message id, moment and body."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": _webhook(secret).sign(message_id, moment, body.decode()),
    }


def verify_signature(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance: int = 300,
    now: float | None = None,
) -> bool:
    """True when the Standard Webhooks ``headers`` sign ``body`` with ``secret`` and the
    timestamp is recent. The signature header may list several signatures (space-separated),
    so a sender can roll its secret over; the tolerance stops a recorded request being
    replayed."""
    lowered = {name.lower(): value for name, value in headers.items()}
    message_id = lowered.get("webhook-id", "")
    timestamp = lowered.get("webhook-timestamp", "")
    if not message_id or not timestamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        return False
    try:
        expected = signed_headers(secret, message_id, int(timestamp), body)["webhook-signature"]
    except (ValueError, WebhookVerificationError):
        return False
    return expected in lowered.get("webhook-signature", "").split()


class SignedWebhook:
    name = "webhook"

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``url``: where steps without a URL of their own (hand-offs) go; may be empty."""
        if url and not url.startswith(("https://", "http://")):
            raise ValueError(f"webhook URL {url!r} must start with https://")
        if not secret:
            raise ValueError("a webhook needs a signing secret")
        self.url = url
        self.secret = secret
        self.clock = clock
        self.client = http_client(timeout)

    def deliver(self, delivery: Delivery) -> str:
        body = json.dumps(self.payload(delivery), separators=(",", ":"), default=str).encode()
        timestamp = int(self.clock())
        # A journey's webhook step names its endpoint; the setting is the default.
        url = delivery.content.get("url") or self.url
        if not url:
            raise PermanentFailure(
                f"webhook: {delivery.step_id} names no url and HILO_WEBHOOK_URL is not set"
            )
        if not url.startswith(("https://", "http://")):
            raise PermanentFailure(f"webhook URL {url!r} must start with https://")
        response = send(
            self.client,
            "POST",
            url,
            provider=self.name,
            content=body,
            headers={
                "Content-Type": "application/json",
                **signed_headers(self.secret, delivery.message_id, timestamp, body),
                "Idempotency-Key": delivery.message_id,
            },
        )
        # A receiver may answer with its own id (a ticket, a run); otherwise ours stands.
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("id"), str | int):
            return str(answer["id"])
        return delivery.message_id

    @staticmethod
    def payload(delivery: Delivery) -> dict[str, Any]:
        return {
            "message": {
                "id": delivery.message_id,
                "channel": delivery.channel,
                "template": delivery.template,
                "category": delivery.category,
            },
            "customer": {"id": delivery.customer_id},
            "journey": {"key": delivery.journey_key},
            "step": {"id": delivery.step_id},
            "content": delivery.content,
            "profile": delivery.profile,
        }

    def close(self) -> None:
        self.client.close()
