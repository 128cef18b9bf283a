"""Mobile push through Firebase Cloud Messaging HTTP v1 (``POST /v1/projects/{p}/messages:send``).

FCM wants an OAuth2 access token. We mint it ourselves from the service-account key: an
RS256-signed JWT assertion posted to the account's ``token_uri`` (the OAuth2 JWT-bearer
grant), kept until shortly before it expires.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hilo.channels.base import (
    DEFAULT_TIMEOUT_SECONDS,
    Delivery,
    PermanentFailure,
    RetryableFailure,
    encode_jwt,
    error_detail,
    failure_for_response,
    http_client,
    send,
)

__all__ = ["FcmPush", "GoogleAccessToken", "ServiceAccount"]

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Refresh this long before expiry so a token never dies between minting and use.
REFRESH_MARGIN_SECONDS = 300.0


@dataclass(frozen=True)
class ServiceAccount:
    client_email: str
    private_key: rsa.RSAPrivateKey
    private_key_id: str
    project_id: str
    token_uri: str

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ServiceAccount:
        missing = [
            key for key in ("client_email", "private_key", "project_id") if not info.get(key)
        ]
        if missing:
            raise ValueError(f"service-account JSON lacks {', '.join(missing)}")
        key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("service-account private_key is not an RSA key")
        return cls(
            client_email=info["client_email"],
            private_key=key,
            private_key_id=info.get("private_key_id", ""),
            project_id=info["project_id"],
            token_uri=info.get("token_uri") or "https://oauth2.googleapis.com/token",
        )

    @classmethod
    def from_json(cls, text: str) -> ServiceAccount:
        return cls.from_info(json.loads(text))

    @classmethod
    def from_file(cls, path: Path) -> ServiceAccount:
        return cls.from_json(path.read_text())


class GoogleAccessToken:
    """OAuth2 access tokens for a service account, minted on demand and cached."""

    def __init__(
        self,
        account: ServiceAccount,
        client: httpx.Client,
        *,
        scope: str = FCM_SCOPE,
        token_url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.account = account
        self.client = client
        self.scope = scope
        self.token_url = token_url or account.token_uri
        self.clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = threading.Lock()  # activities share one provider across threads

    def get(self) -> str:
        with self._lock:
            if self._token is None or self.clock() >= self._refresh_at:
                self._token, lifetime = self._mint()
                self._refresh_at = self.clock() + max(0.0, lifetime - REFRESH_MARGIN_SECONDS)
            return self._token

    def forget(self, token: str) -> None:
        """Drop a token the API refused, so the next call mints a fresh one."""
        with self._lock:
            if self._token == token:
                self._token = None

    def assertion(self) -> str:
        now = int(self.clock())
        header = {"alg": "RS256", "typ": "JWT", "kid": self.account.private_key_id}
        claims = {
            "iss": self.account.client_email,
            "scope": self.scope,
            "aud": self.token_url,
            "iat": now,
            "exp": now + 3600,  # the longest Google accepts
        }
        key = self.account.private_key
        return encode_jwt(
            header, claims, lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        )

    def _mint(self) -> tuple[str, float]:
        response = send(
            self.client,
            "POST",
            self.token_url,
            provider="fcm",
            failure=_token_failure,
            data={"grant_type": JWT_BEARER, "assertion": self.assertion()},
        )
        try:
            body = response.json()
            return str(body["access_token"]), float(body.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError) as error:
            raise RetryableFailure(
                f"fcm: token endpoint answered without an access_token: {error_detail(response)}"
            ) from error


class FcmPush:
    name = "fcm"

    def __init__(
        self,
        account: ServiceAccount,
        *,
        project_id: str | None = None,
        base_url: str = "https://fcm.googleapis.com",
        token_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = http_client(timeout)
        self.tokens = GoogleAccessToken(account, self.client, token_url=token_url, clock=clock)
        project = project_id or account.project_id
        self.url = f"{base_url.rstrip('/')}/v1/projects/{project}/messages:send"

    def deliver(self, delivery: Delivery) -> str:
        device_token = (delivery.recipient or "").strip()
        if not device_token:
            raise PermanentFailure("fcm: no device token for the customer")
        access_token = self.tokens.get()

        def failure(response: httpx.Response) -> PermanentFailure | RetryableFailure:
            return _send_failure(response, self.tokens, access_token)

        response = send(
            self.client,
            "POST",
            self.url,
            provider=self.name,
            failure=failure,
            json={"message": self.message(delivery, device_token)},
            headers={"Authorization": f"Bearer {access_token}"},
        )
        try:
            return str(response.json()["name"])
        except (ValueError, KeyError, TypeError) as error:
            raise PermanentFailure(
                f"fcm: accepted but answered without a message name: {error_detail(response)}",
                provider_status=response.status_code,
            ) from error

    @staticmethod
    def message(delivery: Delivery, device_token: str) -> dict[str, Any]:
        content = delivery.content
        urgent = delivery.category == "transactional"
        # Data values must be strings; the app uses them to open the right screen.
        data = {"message_id": delivery.message_id, "journey_key": delivery.journey_key}
        if content.get("url"):
            data["url"] = content["url"]
        message: dict[str, Any] = {
            "token": device_token,
            "notification": {"title": content.get("title", ""), "body": content.get("body", "")},
            "data": data,
            "android": {"priority": "high" if urgent else "normal"},
            "apns": {"headers": {"apns-priority": "10" if urgent else "5"}},
        }
        if content.get("url", "").startswith("https://"):
            message["webpush"] = {"fcm_options": {"link": content["url"]}}
        return message

    def close(self) -> None:
        self.client.close()


def _fcm_error(response: httpx.Response) -> tuple[str, str, set[str]]:
    """(FCM error code, message, fields at fault) from a google.rpc error body."""
    try:
        error = response.json()["error"]
        code = str(error.get("status", ""))
        fields: set[str] = set()
        for detail in error.get("details") or []:
            kind = str(detail.get("@type", ""))
            if kind.endswith("google.firebase.fcm.v1.FcmError"):
                code = str(detail.get("errorCode") or code)
            elif kind.endswith("google.rpc.BadRequest"):
                fields.update(
                    str(violation.get("field", ""))
                    for violation in detail.get("fieldViolations") or []
                )
        return code, str(error.get("message", "")), fields
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", error_detail(response), set()


def _send_failure(
    response: httpx.Response, tokens: GoogleAccessToken, access_token: str
) -> PermanentFailure | RetryableFailure:
    code, message, fields = _fcm_error(response)
    reason = f"fcm: HTTP {response.status_code} {code or response.reason_phrase}: {message}"
    if code == "UNREGISTERED":
        # The app was uninstalled or the token expired: it never works again.
        return PermanentFailure(reason, provider_status=response.status_code, recipient_gone=True)
    if code == "SENDER_ID_MISMATCH":
        # Usually our project setting, not the device: retiring would switch off every token.
        return PermanentFailure(reason, provider_status=response.status_code)
    if code == "INVALID_ARGUMENT":
        # Also what FCM says about a malformed message of ours: only a violation on the token
        # itself condemns the device.
        gone = "message.token" in fields
        return PermanentFailure(reason, provider_status=response.status_code, recipient_gone=gone)
    if response.status_code == 401 and code != "THIRD_PARTY_AUTH_ERROR":
        # Our access token expired or was revoked early: the retry mints a new one.
        tokens.forget(access_token)
        return RetryableFailure(reason, retry_after=0.0)
    return failure_for_response(response, reason)


def _token_failure(response: httpx.Response) -> PermanentFailure | RetryableFailure:
    """OAuth2 token errors: ``{"error": "invalid_grant", "error_description": "..."}``."""
    try:
        body = response.json()
        detail = f"{body['error']}: {body.get('error_description', '')}"
    except (ValueError, KeyError, TypeError):
        detail = error_detail(response)
    return failure_for_response(
        response, f"fcm: token endpoint refused the service account: {detail}"
    )
