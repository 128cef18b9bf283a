"""A signed JSON webhook: hand a journey step to Make, n8n, Zapier, a helpdesk or your own code.

Each request carries::

    X-Hilo-Timestamp: 1767225600
    X-Hilo-Signature: v1=<hex HMAC-SHA256 of "{timestamp}.{body}" with the shared secret>
    Idempotency-Key: <message id>

A receiver checks the signature with :func:`verify_signature` and does the work once per
Idempotency-Key, because a retry after a timeout sends the same message again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

from hilo.channels.base import (
    DEFAULT_TIMEOUT_SECONDS,
    Delivery,
    PermanentFailure,
    http_client,
    send,
)

__all__ = ["SIGNATURE_VERSION", "SignedWebhook", "sign", "verify_signature"]

SIGNATURE_VERSION = "v1"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Hilo-Signature value for this timestamp and body."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={digest.hexdigest()}"


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    tolerance: int = 300,
    now: float | None = None,
) -> bool:
    """True when ``signature`` signs ``body`` at ``timestamp``, and the timestamp is recent.

    ``signature`` may list several comma-separated ``v1=`` values, so a sender can roll
    its secret over; the tolerance in seconds stops a recorded request being replayed.
    """
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent_at) > tolerance:
        return False
    expected = sign(secret, timestamp, body)
    return any(
        hmac.compare_digest(expected, candidate.strip()) for candidate in signature.split(",")
    )


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
        timestamp = str(int(self.clock()))
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
                "X-Hilo-Timestamp": timestamp,
                "X-Hilo-Signature": sign(self.secret, timestamp, body),
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
