"""Browser push straight to the browser's push service (Web Push, RFC 8030).

The payload is encrypted for the subscription with aes128gcm (RFC 8291, RFC 8188) by
``http-ece``, and the request carries a VAPID identity (RFC 8292) signed by ``py-vapid``: an
ES256 JWT for the push service's origin, ``Authorization: vapid t=<jwt>,k=<our public key>``.
Both are the libraries pywebpush is built on; the request itself goes through our httpx
client, with its timeouts and failure mapping. Any push service works: Chrome's, Firefox's,
Apple's, Edge's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import http_ece
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02

from hilo.channels.base import (
    DEFAULT_TIMEOUT_SECONDS,
    Delivery,
    PermanentFailure,
    RetryableFailure,
    error_detail,
    failure_for_response,
    http_client,
    send,
)
from hilo.ids import b64url, b64url_decode

__all__ = [
    "MAX_PLAINTEXT_BYTES",
    "WebPush",
    "encrypt_aes128gcm",
    "load_vapid_private_key",
    "vapid_authorization",
    "vapid_public_key",
]

RECORD_SIZE = 4096
# Push services must take 4096 bytes of body: 86 bytes of header, a 16-byte tag and the
# one-byte padding delimiter leave this much for the notification itself.
MAX_PLAINTEXT_BYTES = RECORD_SIZE - 86 - 16 - 1
VAPID_LIFETIME_SECONDS = 12 * 3600  # RFC 8292 caps it at 24 hours
TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def load_vapid_private_key(value: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 key as PEM, or as the base64url 32-byte scalar web-push tools print."""
    value = value.strip()
    if value.startswith("-----BEGIN"):
        key = serialization.load_pem_private_key(value.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError("the VAPID private key must be a P-256 (prime256v1) key")
        return key
    raw = b64url_decode(value)
    if len(raw) != 32:
        raise ValueError("the VAPID private key must be 32 bytes, base64url, or a PEM P-256 key")
    return ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())


def _uncompressed(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def vapid_public_key(private_key: ec.EllipticCurvePrivateKey) -> str:
    """The ``applicationServerKey`` a page passes to ``pushManager.subscribe``."""
    return b64url(_uncompressed(private_key.public_key()))


def vapid_authorization(
    endpoint: str,
    private_key: ec.EllipticCurvePrivateKey,
    subject: str,
    *,
    now: float | None = None,
    lifetime: int = VAPID_LIFETIME_SECONDS,
) -> str:
    """``vapid t=<ES256 JWT>,k=<public key>`` for the push service behind ``endpoint``."""
    parts = urlsplit(endpoint)
    issued = int(time.time() if now is None else now)
    claims = {"aud": f"{parts.scheme}://{parts.netloc}", "exp": issued + lifetime, "sub": subject}
    return str(Vapid02(private_key).sign(claims)["Authorization"])


def encrypt_aes128gcm(
    plaintext: bytes,
    p256dh: str,
    auth: str,
    *,
    salt: bytes | None = None,
    sender_key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """The RFC 8291 message body for a subscription's ``p256dh`` and ``auth`` keys.

    ``salt`` and ``sender_key`` are fresh per message; pass them only to reproduce a
    known answer.
    """
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise ValueError(f"push payload is {len(plaintext)} bytes, at most {MAX_PLAINTEXT_BYTES}")
    sender_key = sender_key or ec.generate_private_key(ec.SECP256R1())
    body: bytes = http_ece.encrypt(
        plaintext,
        salt=salt or os.urandom(16),
        private_key=sender_key,
        dh=b64url_decode(p256dh),
        auth_secret=b64url_decode(auth),
        version="aes128gcm",
        rs=RECORD_SIZE,
    )
    return body


class WebPush:
    name = "webpush"

    def __init__(
        self,
        vapid_private_key: str | ec.EllipticCurvePrivateKey,
        vapid_subject: str,
        *,
        ttl_seconds: int = 24 * 3600,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not vapid_subject.startswith(("mailto:", "https://")):
            raise ValueError(
                f"VAPID subject {vapid_subject!r} must be a mailto: or https: URL "
                "where the push service can reach us"
            )
        self.private_key = (
            load_vapid_private_key(vapid_private_key)
            if isinstance(vapid_private_key, str)
            else vapid_private_key
        )
        self.subject = vapid_subject
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.client = http_client(timeout)

    def deliver(self, delivery: Delivery) -> str:
        endpoint, p256dh, auth = _subscription(delivery)
        plaintext = json.dumps(self.notification(delivery), separators=(",", ":")).encode()
        try:
            body = encrypt_aes128gcm(plaintext, p256dh, auth)
        except ValueError as error:
            raise PermanentFailure(f"webpush: {error}") from error
        headers = {
            "Authorization": vapid_authorization(
                endpoint, self.private_key, self.subject, now=self.clock()
            ),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": _ttl(delivery, self.ttl_seconds),
            # Marketing waits for a phone on power and Wi-Fi less eagerly than a receipt.
            "Urgency": "high" if delivery.category == "transactional" else "normal",
            "Topic": _topic(delivery),
        }
        response = send(
            self.client,
            "POST",
            endpoint,
            provider=self.name,
            failure=_failure,
            content=body,
            headers=headers,
        )
        # 201 Created; Location names the message at the push service.
        return response.headers.get("Location") or delivery.message_id

    @staticmethod
    def notification(delivery: Delivery) -> dict[str, Any]:
        """What the service worker's push handler reads."""
        content = delivery.content
        notification = {
            "title": content.get("title", ""),
            "body": content.get("body", ""),
            "message_id": delivery.message_id,
        }
        for optional in ("url", "icon", "image"):
            if content.get(optional):
                notification[optional] = content[optional]
        return notification

    def close(self) -> None:
        self.client.close()


def _subscription(delivery: Delivery) -> tuple[str, str, str]:
    """(endpoint, p256dh, auth) from ``PushSubscription.toJSON()`` stored as the recipient."""
    try:
        subscription = json.loads(delivery.recipient or "")
        endpoint = subscription["endpoint"]
        keys = subscription["keys"]
        p256dh, auth = keys["p256dh"], keys["auth"]
        if not (isinstance(endpoint, str) and endpoint.startswith(("https://", "http://"))):
            raise ValueError("endpoint is not a URL")
        if len(b64url_decode(p256dh)) != 65 or len(b64url_decode(auth)) != 16:
            raise ValueError("p256dh must be 65 bytes and auth 16 bytes")
    except (ValueError, KeyError, TypeError) as error:
        raise PermanentFailure(
            "webpush: recipient is not a push subscription like "
            '{"endpoint": "https://...", "keys": {"p256dh": "...", "auth": "..."}}: '
            f"{error}"
        ) from error
    return endpoint, p256dh, auth


def _ttl(delivery: Delivery, default: int) -> str:
    """Seconds the push service keeps the message for an offline browser."""
    ttl = delivery.content.get("ttl", "").strip()
    return ttl if ttl.isdigit() else str(default)


def _topic(delivery: Delivery) -> str:
    """A newer message of the same journey step replaces an undelivered older one."""
    topic = delivery.content.get("topic", "")
    if TOPIC.match(topic):
        return topic
    digest = hashlib.sha256(f"{delivery.journey_key}:{delivery.step_id}".encode()).digest()
    return b64url(digest)[:32]


def _failure(response: httpx.Response) -> PermanentFailure | RetryableFailure:
    status = response.status_code
    if status in (404, 410):
        # RFC 8030 §7.3: the subscription is gone; the push service will never take it again.
        return PermanentFailure(
            f"webpush: HTTP {status}: the subscription has expired or was unsubscribed",
            provider_status=status,
            recipient_gone=True,
        )
    if status == 413:
        return PermanentFailure("webpush: HTTP 413: payload too large", provider_status=status)
    return failure_for_response(response, f"webpush: HTTP {status}: {error_detail(response)}")
