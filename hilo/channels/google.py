"""Google OAuth2 access tokens for FCM and Google Ads, from google-auth, over our httpx client.

google-auth mints and refreshes the tokens (a service account's signed JWT assertion for
FCM, an OAuth2 refresh token for Google Ads) and refreshes them shortly before they expire;
its HTTP goes through our httpx client, so token requests share the providers' timeouts.
An API that refuses a token early gets a fresh one on the retry (:meth:`GoogleToken.forget`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import httpx
from google.auth import credentials as google_credentials
from google.auth import exceptions as google_exceptions
from google.auth import transport as google_transport

from hilo.channels.base import PermanentFailure, RetryableFailure

__all__ = ["GoogleToken"]


class _HttpxTokenResponse(google_transport.Response):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def data(self) -> bytes:
        return self._response.content


class _HttpxTokenRequest(google_transport.Request):
    """google-auth's transport over our httpx client."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _HttpxTokenResponse:
        try:
            response = self.client.request(
                method, url, content=body, headers=headers, timeout=timeout or self.client.timeout
            )
        except httpx.HTTPError as error:
            raise google_exceptions.TransportError(f"{url}: {error}") from error
        return _HttpxTokenResponse(response)


class GoogleToken:
    """The current access token of ``credentials``, refreshed when google-auth says it is no
    longer valid; shared by the activity threads of one provider."""

    def __init__(
        self, credentials: google_credentials.Credentials, client: httpx.Client, refused: str
    ) -> None:
        self.credentials = credentials
        self._request = _HttpxTokenRequest(client)
        self._refused = refused  # how a refusal of the token endpoint reads, e.g. "fcm: ..."
        self._lock = threading.Lock()

    def get(self) -> str:
        with self._lock:
            if not self.credentials.valid:
                try:
                    self.credentials.refresh(self._request)
                except google_exceptions.TransportError as error:
                    raise RetryableFailure(f"{self._refused}: {error}") from error
                except google_exceptions.RefreshError as error:
                    reason = f"{self._refused}: {error}"
                    if getattr(error, "retryable", False):
                        raise RetryableFailure(reason) from error
                    raise PermanentFailure(reason) from error
            return str(self.credentials.token)

    def close(self) -> None:
        self._request.client.close()

    def forget(self, token: str) -> None:
        """Drop a token the API refused, so the next call refreshes it."""
        with self._lock:
            if self.credentials.token == token:
                self.credentials.token = None
