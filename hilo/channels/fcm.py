"""Mobile push through Firebase Cloud Messaging HTTP v1 (``POST /v1/projects/{p}/messages:send``).

FCM wants an OAuth2 access token: google-auth mints it from the service-account key (an
RS256-signed JWT assertion posted to the account's ``token_uri``) and refreshes it shortly
before it expires (:mod:`hilo.channels.google`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from google.oauth2 import service_account

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
from hilo.channels.google import GoogleToken

__all__ = ["FcmPush", "ServiceAccount"]

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"


@dataclass(frozen=True)
class ServiceAccount:
    """A service-account key as Google's JSON gives it, checked for what FCM needs."""

    info: Mapping[str, Any]
    project_id: str

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ServiceAccount:
        missing = [
            key for key in ("client_email", "private_key", "project_id") if not info.get(key)
        ]
        if missing:
            raise ValueError(f"service-account JSON lacks {', '.join(missing)}")
        account = cls(
            info={"token_uri": GOOGLE_TOKEN_URI, **info}, project_id=str(info["project_id"])
        )
        account.credentials()  # a key google-auth cannot load is refused here, not at a send
        return account

    @classmethod
    def from_json(cls, text: str) -> ServiceAccount:
        return cls.from_info(json.loads(text))

    @classmethod
    def from_file(cls, path: Path) -> ServiceAccount:
        return cls.from_json(path.read_text())

    def credentials(self, token_url: str | None = None) -> service_account.Credentials:
        info = {**self.info, "token_uri": token_url} if token_url else self.info
        return service_account.Credentials.from_service_account_info(info, scopes=[FCM_SCOPE])


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
    ) -> None:
        self.client = http_client(timeout)
        self.tokens = GoogleToken(
            account.credentials(token_url),
            http_client(timeout),
            "fcm: token endpoint refused the service account",
        )
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
        self.tokens.close()


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
    response: httpx.Response, tokens: GoogleToken, access_token: str
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
