"""A Web Push service (RFC 8030/8291/8292) and a browser's subscription, served locally."""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.fakes.server import ProviderServer, Received, Rejected, Reply, b64url, unb64url

# Web Push ----------------------------------------------------------------------------------


@dataclass
class Subscriber:
    """A browser's side of one push subscription: it alone can read the messages."""

    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes

    @property
    def p256dh(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def subscription_json(self) -> str:
        """What ``PushSubscription.toJSON()`` gives a page."""
        return json.dumps(
            {
                "endpoint": self.endpoint,
                "expirationTime": None,
                "keys": {"p256dh": b64url(self.p256dh), "auth": b64url(self.auth)},
            }
        )


def decrypt_aes128gcm(body: bytes, receiver: ec.EllipticCurvePrivateKey, auth: bytes) -> bytes:
    """The user agent's half of RFC 8291: read the RFC 8188 header, derive, decrypt, unpad."""
    salt, record_size, id_length = body[:16], int.from_bytes(body[16:20], "big"), body[20]
    sender_public = body[21 : 21 + id_length]
    ciphertext = body[21 + id_length :]
    if id_length != 65 or len(ciphertext) > record_size:
        raise ValueError("bad aes128gcm header")
    ua_public = receiver.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    shared = receiver.exchange(
        ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), sender_public)
    )
    ikm = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=auth,
        info=b"WebPush: info\x00" + ua_public + sender_public,
    ).derive(shared)
    cek = HKDF(hashes.SHA256(), 16, salt, b"Content-Encoding: aes128gcm\x00").derive(ikm)
    nonce = HKDF(hashes.SHA256(), 12, salt, b"Content-Encoding: nonce\x00").derive(ikm)
    padded = AESGCM(cek).decrypt(nonce, ciphertext, None)
    unpadded = padded.rstrip(b"\x00")
    if not unpadded.endswith(b"\x02"):
        raise ValueError("the last record must end with the 0x02 delimiter")
    return unpadded[:-1]


@dataclass
class PushMessage:
    subscriber: Subscriber
    plaintext: bytes
    ttl: int
    urgency: str
    topic: str | None

    def json(self) -> Any:
        return json.loads(self.plaintext)


class FakePushService(ProviderServer):
    """A browser vendor's push service (RFC 8030) that demands VAPID (RFC 8292)."""

    def __init__(self, application_server_key: str) -> None:
        super().__init__()
        self.application_server_key = application_server_key
        self.subscribers: dict[str, Subscriber] = {}
        self.gone: set[str] = set()
        self.messages: list[PushMessage] = []

    def subscribe(self) -> Subscriber:
        name = secrets.token_urlsafe(16)
        subscriber = Subscriber(
            endpoint=f"{self.url}/push/{name}",
            private_key=ec.generate_private_key(ec.SECP256R1()),
            auth=secrets.token_bytes(16),
        )
        self.subscribers[name] = subscriber
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.gone.add(subscriber.endpoint.rsplit("/", 1)[1])

    def handle(self, request: Received) -> Reply:
        match = re.fullmatch(r"/push/([A-Za-z0-9_-]+)", request.path)
        if request.method != "POST" or match is None:
            raise Rejected(Reply(404, b""), "unknown path")
        name = match.group(1)
        if name in self.gone:
            return Reply(410, "push subscription has unsubscribed or expired.")
        if name not in self.subscribers:
            return Reply(404, "no such subscription")
        self._check_vapid(request)
        headers = request.headers
        if not headers.get("ttl", "").isdigit():
            raise Rejected(Reply(400, "TTL header required"), "no TTL")
        urgency = headers.get("urgency", "normal")
        if urgency not in ("very-low", "low", "normal", "high"):
            raise Rejected(Reply(400, "bad Urgency"), f"Urgency {urgency!r}")
        topic = headers.get("topic")
        if topic is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", topic):
            raise Rejected(Reply(400, "bad Topic"), f"Topic {topic!r}")
        if headers.get("content-encoding") != "aes128gcm":
            raise Rejected(Reply(415, "aes128gcm only"), "Content-Encoding")
        if len(request.body) > 4096:
            return Reply(413, "payload too large")
        subscriber = self.subscribers[name]
        try:
            plaintext = decrypt_aes128gcm(request.body, subscriber.private_key, subscriber.auth)
        except (ValueError, InvalidTag) as error:
            raise Rejected(Reply(400, "could not decrypt"), f"decryption: {error!r}") from error
        if (failure := self.take_failure()) is not None:
            return failure
        self.messages.append(
            PushMessage(subscriber, plaintext, int(headers["ttl"]), urgency, topic)
        )
        return Reply(201, b"", {"Location": f"{self.url}/message/{secrets.token_urlsafe(12)}"})

    def _check_vapid(self, request: Received) -> None:
        match = re.fullmatch(
            r"vapid t=([\w-]+\.[\w-]+\.[\w-]+),\s*k=([\w-]+)",
            request.headers.get("authorization", ""),
        )
        if match is None:
            raise Rejected(Reply(401, "VAPID authorization required"), "no VAPID header")
        token, key = match.groups()
        if key != self.application_server_key:
            # The subscription was made for another application server key.
            raise Rejected(Reply(403, "key mismatch"), "VAPID k is not the subscription's key")
        header_b64, claims_b64, signature_b64 = token.split(".")
        header, claims = json.loads(unb64url(header_b64)), json.loads(unb64url(claims_b64))
        signature = unb64url(signature_b64)
        public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(key))
        try:
            if header.get("alg") != "ES256" or len(signature) != 64:
                raise InvalidSignature
            public_key.verify(
                encode_dss_signature(
                    int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
                ),
                f"{header_b64}.{claims_b64}".encode(),
                ec.ECDSA(hashes.SHA256()),
            )
        except InvalidSignature as error:
            raise Rejected(Reply(401, "bad VAPID signature"), "VAPID signature") from error
        now = time.time()
        if claims.get("aud") != self.url:
            raise Rejected(Reply(401, "bad aud"), f"VAPID aud {claims.get('aud')!r}")
        if not now < claims.get("exp", 0) <= now + 24 * 3600:
            raise Rejected(Reply(401, "bad exp"), "VAPID exp outside the next 24 hours")
        if not str(claims.get("sub", "")).startswith(("mailto:", "https:")):
            raise Rejected(Reply(401, "bad sub"), "VAPID sub")
