"""Ad audiences for retargeting: add a customer to, or remove one from, an ad platform's list.

Both platforms match on SHA-256 hashes of normalised email addresses and phone numbers;
neither ever sees them in the clear. A step's content names the audience (``audience``)
and the action (``add`` or ``remove``). Adding a member twice or removing one who is not
there changes nothing, so a retry is always safe.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import partial
from typing import Any

import httpx
from google.oauth2.credentials import Credentials

from hilo.channels.base import (
    DEFAULT_TIMEOUT_SECONDS,
    Delivery,
    PermanentFailure,
    RetryableFailure,
    error_detail,
    failure_for_response,
    graph_api_failure,
    http_client,
    send,
)
from hilo.channels.google import GoogleToken

__all__ = [
    "GOOGLE_ADS_SCOPE",
    "GOOGLE_TOKEN_URL",
    "GoogleAdsCustomerMatch",
    "MetaCustomAudiences",
    "normalise_email",
    "oauth_credentials",
    "normalise_phone",
    "sha256_hex",
]


GOOGLE_ADS_SCOPE = "https://www.googleapis.com/auth/adwords"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"


def normalise_email(email: str) -> str:
    """Trimmed and lower-cased, as both platforms hash it."""
    return email.strip().lower()


def normalise_phone(phone: str) -> str:
    """Digits only, country code included: ``+44 7700 900123`` becomes ``447700900123``."""
    return re.sub(r"\D", "", phone)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _action(delivery: Delivery, provider: str) -> tuple[str, str]:
    audience = delivery.content.get("audience", "").strip()
    action = delivery.content.get("action", "add").strip().lower()
    if not audience:
        raise PermanentFailure(f"{provider}: {delivery.step_id} names no audience")
    if action not in ("add", "remove"):
        raise PermanentFailure(
            f"{provider}: {delivery.step_id} action {action!r} is neither 'add' nor 'remove'"
        )
    return audience, action


def _identifiers(delivery: Delivery, provider: str) -> tuple[str, str]:
    """(normalised email, phone digits) from the profile, either may be empty."""
    email = normalise_email(str(delivery.profile.get("email") or ""))
    phone = normalise_phone(str(delivery.profile.get("phone") or ""))
    if "@" not in email:
        email = ""
    if len(phone) < 7:
        phone = ""
    if not email and not phone:
        raise PermanentFailure(
            f"{provider}: customer {delivery.customer_id} has no email or phone to match on"
        )
    return email, phone


class MetaCustomAudiences:
    """Meta Custom Audiences: ``POST`` (add) or ``DELETE`` (remove) ``/{audience_id}/users``."""

    name = "meta"

    def __init__(
        self,
        access_token: str,
        *,
        base_url: str = "https://graph.facebook.com",
        api_version: str = "v25.0",
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.base_url = f"{base_url.rstrip('/')}/{api_version}"
        self.client = http_client(timeout, headers={"Authorization": f"Bearer {access_token}"})

    def deliver(self, delivery: Delivery) -> str:
        audience, action = _action(delivery, self.name)
        response = send(
            self.client,
            "POST" if action == "add" else "DELETE",
            f"{self.base_url}/{audience}/users",
            provider=self.name,
            failure=partial(graph_api_failure, provider=self.name),
            data={"payload": json.dumps(self.payload(delivery), separators=(",", ":"))},
        )
        try:
            body = response.json()
        except ValueError:
            body = {}
        if body.get("num_invalid_entries"):
            raise PermanentFailure(
                f"meta: audience {audience} refused the customer's identifiers: "
                f"{body.get('invalid_entry_samples')}",
                provider_status=response.status_code,
            )
        return str(body.get("session_id") or f"{audience}:{action}:{delivery.message_id}")

    def payload(self, delivery: Delivery) -> dict[str, Any]:
        email, phone = _identifiers(delivery, self.name)
        schema, row = [], []
        if email:
            schema.append("EMAIL")
            row.append(sha256_hex(email))
        if phone:
            schema.append("PHONE")
            row.append(sha256_hex(phone))
        return {"schema": schema, "data": [row]}

    def close(self) -> None:
        self.client.close()


def oauth_credentials(
    client_id: str, client_secret: str, refresh_token: str, token_url: str = GOOGLE_TOKEN_URL
) -> Credentials:
    """OAuth2 user credentials that google-auth refreshes from the refresh token."""
    return Credentials(
        token=None,
        refresh_token=refresh_token,
        client_id=client_id,
        client_secret=client_secret,
        token_uri=token_url,
        scopes=[GOOGLE_ADS_SCOPE],
    )


class GoogleAdsCustomerMatch:
    """Google Ads Customer Match through an offline user data job: create, add, run.

    The API wants an OAuth2 access token, which lives an hour: google-auth refreshes it from
    the refresh token shortly before it expires, and again when the API refuses it early.
    """

    name = "google_ads"

    def __init__(
        self,
        developer_token: str,
        customer_id: str,
        credentials: Credentials,
        *,
        login_customer_id: str | None = None,
        base_url: str = "https://googleads.googleapis.com",
        api_version: str = "v26",
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.customer_id = customer_id.replace("-", "")
        self.base_url = f"{base_url.rstrip('/')}/{api_version}"
        self.credentials = credentials
        headers = {"developer-token": developer_token}
        if login_customer_id:
            # Needed when we reach the account through a manager account.
            headers["login-customer-id"] = login_customer_id.replace("-", "")
        self.client = http_client(timeout, headers=headers)
        # The token endpoint gets none of the Ads headers.
        self.tokens = GoogleToken(
            credentials, http_client(timeout), "google_ads: the OAuth refresh token was refused"
        )

    def deliver(self, delivery: Delivery) -> str:
        audience, action = _action(delivery, self.name)
        operation = {"create" if action == "add" else "remove": self.user_data(delivery)}
        user_list = (
            audience
            if audience.startswith("customers/")
            else f"customers/{self.customer_id}/userLists/{audience}"
        )
        created = self._post(
            f"{self.base_url}/customers/{self.customer_id}/offlineUserDataJobs:create",
            {
                "job": {
                    "type": "CUSTOMER_MATCH_USER_LIST",
                    "customerMatchUserListMetadata": {"userList": user_list},
                }
            },
        )
        job = created.get("resourceName")
        if not isinstance(job, str) or not job:
            raise RetryableFailure("google_ads: job created without a resourceName")
        # A job left behind by a failure here is never run and expires on Google's side.
        self._post(f"{self.base_url}/{job}:addOperations", {"operations": [operation]})
        self._post(f"{self.base_url}/{job}:run", {})
        return job

    def user_data(self, delivery: Delivery) -> dict[str, Any]:
        email, phone = _identifiers(delivery, self.name)
        identifiers: list[dict[str, str]] = []
        if email:
            identifiers.append({"hashedEmail": sha256_hex(email)})
        if phone:
            # Google hashes phone numbers in E.164, with the plus.
            identifiers.append({"hashedPhoneNumber": sha256_hex(f"+{phone}")})
        return {"userIdentifiers": identifiers}

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        token = self.tokens.get()

        def failure(response: httpx.Response) -> PermanentFailure | RetryableFailure:
            refused = _google_ads_failure(response)
            if response.status_code == 401 and "OAUTH_TOKEN" in refused.reason:
                # The access token expired or was revoked before its time: the retry
                # refreshes it. (A bad developer token is a 401 too, and stays permanent.)
                self.tokens.forget(token)
                return RetryableFailure(refused.reason, retry_after=0.0)
            return refused

        response = send(
            self.client,
            "POST",
            url,
            provider=self.name,
            failure=failure,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        )
        try:
            answer = response.json()
        except ValueError:
            return {}
        return answer if isinstance(answer, dict) else {}

    def close(self) -> None:
        self.client.close()
        self.tokens.close()


def _google_ads_failure(response: httpx.Response) -> PermanentFailure | RetryableFailure:
    """google.rpc errors whose details hold a GoogleAdsFailure with per-error messages."""
    retry_after = None
    try:
        error = response.json()["error"]
        messages = []
        for detail in error.get("details") or []:
            for ads_error in detail.get("errors") or []:
                code = ",".join(
                    f"{kind}={value}" for kind, value in (ads_error.get("errorCode") or {}).items()
                )
                messages.append(f"{code}: {ads_error.get('message', '')}")
                delay = ((ads_error.get("details") or {}).get("quotaErrorDetails") or {}).get(
                    "retryDelay"
                )
                if isinstance(delay, str) and delay.endswith("s"):
                    # A quota error says how long to back off, as a protobuf Duration.
                    retry_after = float(delay[:-1])
        detail = "; ".join(messages) or str(error.get("message", ""))
        reason = f"google_ads: HTTP {response.status_code} {error.get('status', '')}: {detail}"
    except (ValueError, KeyError, TypeError, AttributeError):
        reason = f"google_ads: HTTP {response.status_code}: {error_detail(response)}"
    return failure_for_response(response, reason, retry_after=retry_after)
