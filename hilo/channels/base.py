"""One interface for every channel provider, and the two ways a delivery can fail.

    Exception
    └── DeliveryFailure
        ├── PermanentFailure   4xx, an invalid address, a rejected message: never retried
        │                      (``recipient_gone`` when the address is dead for good)
        └── RetryableFailure   a timeout, a connection error, 5xx, 429: retried, not before
                               ``retry_after`` seconds when the provider said so

Every HTTP provider goes through :func:`send`, which maps httpx exceptions and error
responses to these two once, so an activity only has to tell them apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parseaddr, parsedate_to_datetime
from typing import Any, Protocol

import httpx

from hilo.clock import utcnow
from hilo.errors import DeliveryFailure
from hilo.ids import b64url

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "ChannelProvider",
    "Delivery",
    "DeliveryFailure",
    "PermanentFailure",
    "RetryableFailure",
    "email_address",
    "encode_jwt",
    "error_detail",
    "failure_for_response",
    "graph_api_failure",
    "http_client",
    "list_unsubscribe_headers",
    "parse_retry_after",
    "phone_number",
    "send",
    "template_params",
]


@dataclass(frozen=True)
class Delivery:
    """One rendered message on its way to one customer through one provider."""

    message_id: str
    channel: str  # email | sms | whatsapp | push | webpush | webhook | audience
    customer_id: str
    journey_key: str
    step_id: str
    template: str
    category: str  # marketing | transactional
    # Email address, E.164 phone, FCM device token, web-push subscription JSON; None for webhooks.
    recipient: str | None
    content: dict[str, str] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    unsubscribe_url: str | None = None


class ChannelProvider(Protocol):
    name: str

    def deliver(self, delivery: Delivery) -> str:
        """Hand the message over; return the provider's id for it.

        Raises PermanentFailure or RetryableFailure.
        """
        ...


class PermanentFailure(DeliveryFailure):
    """The provider will never accept this message as it is: do not retry.

    ``recipient_gone``: the address itself is dead for good (an unregistered push token, an
    expired web-push subscription), so nothing should be sent to it again.
    """

    def __init__(
        self, reason: str, provider_status: int | None = None, *, recipient_gone: bool = False
    ) -> None:
        super().__init__(reason)
        self.provider_status = provider_status
        self.recipient_gone = recipient_gone


class RetryableFailure(DeliveryFailure):
    """The provider could not take the message now: retry, not before ``retry_after`` seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


# 408 Request Timeout, 425 Too Early and 429 Too Many Requests say "later", not "never".
RETRYABLE_STATUSES = frozenset({408, 425, 429})
DEFAULT_TIMEOUT_SECONDS = 10.0


def http_client(
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    *,
    headers: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Client:
    """The one long-lived client a provider reuses; connection set-up is capped lower."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        headers={"User-Agent": "hilo-channels/1", **(headers or {})},
        **kwargs,
    )


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or utcnow())).total_seconds())


def failure_for_response(
    response: httpx.Response, reason: str, retry_after: float | None = None
) -> PermanentFailure | RetryableFailure:
    """5xx, 408, 425 and 429 are retryable; any other non-2xx answer is permanent."""
    status = response.status_code
    if status >= 500 or status in RETRYABLE_STATUSES:
        if retry_after is None:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return RetryableFailure(reason, retry_after=retry_after)
    return PermanentFailure(reason, provider_status=status)


def error_detail(response: httpx.Response, limit: int = 300) -> str:
    """The start of an error body, for a reason a person reads."""
    text = response.text.strip().replace("\n", " ")
    return text[:limit] or response.reason_phrase


def send(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    provider: str,
    failure: Callable[[httpx.Response], PermanentFailure | RetryableFailure] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """Make one request; return a 2xx response or raise the matching failure.

    ``failure`` reads the provider's own error body; by default the status decides.
    """
    try:
        response = client.request(method, url, **kwargs)
    except httpx.TimeoutException as error:
        # The provider may have accepted the message before the timeout: only an
        # idempotency key on the provider's side makes the retry safe.
        raise RetryableFailure(f"{provider}: no answer in time ({type(error).__name__})") from error
    except (httpx.NetworkError, httpx.ProtocolError, httpx.ProxyError) as error:
        raise RetryableFailure(f"{provider}: could not reach {url}: {error}") from error
    except httpx.HTTPError as error:
        # An unsupported scheme or a malformed URL is configuration; a retry would not help.
        raise PermanentFailure(f"{provider}: request to {url} failed: {error}") from error
    if response.is_success:
        return response
    if failure is not None:
        raise failure(response)
    raise failure_for_response(
        response, f"{provider}: HTTP {response.status_code}: {error_detail(response)}"
    )


# Graph API error codes that mean "slow down" or "try again" even when the status is 400:
# 1/2 unknown or service error, 4/17/32/613/80003/80004 rate limits, 341 app limit,
# 130429/131048/131056 WhatsApp throughput/spam/pair limits, 131000/133004 WhatsApp outages.
GRAPH_TRANSIENT_CODES = frozenset(
    {1, 2, 4, 17, 32, 341, 613, 80003, 80004, 130429, 131000, 131048, 131056, 133004}
)


def graph_api_failure(
    response: httpx.Response, provider: str
) -> PermanentFailure | RetryableFailure:
    """Meta's Graph API error body: ``{"error": {"message", "code", "error_subcode", ...}}``."""
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict) or not error:
        return failure_for_response(
            response, f"{provider}: HTTP {response.status_code}: {error_detail(response)}"
        )
    code = error.get("code")
    detail = error.get("error_user_msg") or error.get("message") or response.reason_phrase
    reason = f"{provider}: error {code}"
    if error.get("error_subcode"):
        reason += f"/{error['error_subcode']}"
    reason += f": {detail}"
    if error.get("is_transient") or code in GRAPH_TRANSIENT_CODES:
        return RetryableFailure(
            reason, retry_after=parse_retry_after(response.headers.get("Retry-After"))
        )
    return failure_for_response(response, reason)


E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def phone_number(delivery: Delivery, provider: str) -> str:
    """The recipient as an E.164 number, or a permanent failure naming what is wrong."""
    number = (delivery.recipient or "").strip()
    if not E164.match(number):
        raise PermanentFailure(
            f"{provider}: recipient {number!r} is not an E.164 phone number like +14155550123"
        )
    return number


def email_address(delivery: Delivery, provider: str) -> str:
    _, address = parseaddr(delivery.recipient or "")
    if "@" not in address or address.startswith("@") or address.endswith("@"):
        raise PermanentFailure(
            f"{provider}: recipient {delivery.recipient!r} is not an email address"
        )
    return address


def list_unsubscribe_headers(delivery: Delivery) -> dict[str, str]:
    """RFC 2369 List-Unsubscribe, plus RFC 8058 one-click for marketing mail over https."""
    url = delivery.unsubscribe_url
    if delivery.category != "marketing" or not url:
        return {}
    headers = {"List-Unsubscribe": f"<{url}>"}
    # RFC 8058 one-click needs an https URL the mailbox provider can POST to.
    if url.startswith("https://"):
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return headers


def template_params(delivery: Delivery, provider: str) -> list[str]:
    """Template parameters, rendered as a JSON list of strings in ``content["params"]``."""
    raw = delivery.content.get("params") or "[]"
    try:
        params = json.loads(raw)
    except ValueError:
        params = None
    if not isinstance(params, list):
        raise PermanentFailure(
            f'{provider}: {delivery.step_id} params must be a JSON list like ["Ana", "3"], '
            f"got {raw[:80]!r}"
        )
    return [str(param) for param in params]


def encode_jwt(
    header: Mapping[str, Any], claims: Mapping[str, Any], sign: Callable[[bytes], bytes]
) -> str:
    """A compact JWS; ``sign`` turns the signing input into the raw signature."""
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    ).encode("ascii")
    return f"{signing_input.decode('ascii')}.{b64url(sign(signing_input))}"
