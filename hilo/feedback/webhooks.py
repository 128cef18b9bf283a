"""What providers tell us after a send: verified webhooks turned into :class:`DeliveryEvent`.

    Exception
    ├── SignatureRejected   the request is not provably from the provider: answer 403, keep nothing
    └── ValueError          a verified body we cannot read: answer 400, the provider retries

Verify first, parse second: every ``parse_*`` trusts its input. Providers retry and replay,
so every event carries ``raw_id``, a stable key to store each event once.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hilo.clock import utcnow
from hilo.errors import Rejected
from hilo.intake import strict_json

__all__ = [
    "DeliveryEvent",
    "DeliveryStatus",
    "SignatureRejected",
    "parse_sendgrid",
    "parse_twilio",
    "parse_whatsapp",
    "twilio_signature",
    "verify_sendgrid",
    "verify_twilio",
    "verify_whatsapp",
    "whatsapp_challenge",
]

DeliveryStatus = Literal[
    "delivered",
    "opened",
    "clicked",
    "bounced",
    "complained",
    "failed",
    "unsubscribed",
    "deferred",
]

# The key our sends put in SendGrid's custom_args; "message_id" is the older spelling.
SENDGRID_MESSAGE_ID_KEYS = ("hilo_message_id", "message_id")


@dataclass(frozen=True)
class DeliveryEvent:
    """One thing that happened to one message after the provider took it."""

    message_id: str | None  # ours, when the provider echoes it back
    provider: str
    provider_message_id: str | None
    status: DeliveryStatus
    occurred_at: datetime  # UTC
    address: str | None
    reason: str | None
    hard_bounce: bool  # the address will never work: suppress it
    url: str | None  # the link a click went to
    raw_id: str  # stable across provider retries: store each event once


class SignatureRejected(Rejected):
    """A webhook request that is not provably from the provider."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _from_unix(value: Any, field: str) -> datetime:
    try:
        return datetime.fromtimestamp(int(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError) as error:
        shown = str(value)[:40]
        raise ValueError(f"{field}: {shown!r} is not a unix timestamp in seconds") from error


def _json(payload: bytes, provider: str) -> Any:
    try:
        return strict_json.loads(payload)
    except strict_json.NotStorableJSON as error:
        raise ValueError(f"{provider}: {error}") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{provider}: the webhook body is not JSON: {error}") from error
    except RecursionError:
        raise ValueError(f"{provider}: the webhook body nests too deeply to be an event") from None


# A verified body is still only as well-formed as the provider's code: each value we read is
# checked for its type, so an odd one is a 400 naming it rather than a crash.


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if value is None or isinstance(value, bool):
        return "null" if value is None else "a boolean"
    return "text" if isinstance(value, str) else "a number"


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object, not {_json_type(value)}")
    return value


def _objects(value: Any, where: str) -> list[dict[str, Any]]:
    """An array of objects; absent is empty."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where} must be an array, not {_json_type(value)}")
    return [_object(item, f"{where}[{index}]") for index, item in enumerate(value)]


def _text(container: dict[str, Any], key: str, where: str) -> str | None:
    """A text value (numbers are read as their text); absent, null or empty is None."""
    value = container.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}.{key} must be text, not {_json_type(value)}")


# --- SendGrid Signed Event Webhook -------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _sendgrid_key(public_key_b64: str) -> ec.EllipticCurvePublicKey:
    text = public_key_b64.strip()
    try:
        if "BEGIN PUBLIC KEY" in text:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        else:
            key = serialization.load_der_public_key(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, UnicodeEncodeError) as error:
        raise ValueError(
            "SendGrid verification key: expected the base64 public key from the Signed Event "
            f"Webhook settings ({error})"
        ) from error
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("SendGrid verification key: expected an ECDSA P-256 public key")
    return key


def verify_sendgrid(
    public_key_b64: str,
    payload: bytes,
    signature_b64: str,
    timestamp: str,
    *,
    now: datetime | None = None,
    tolerance_seconds: int = 300,
) -> None:
    """Check ``X-Twilio-Email-Event-Webhook-Signature`` over timestamp + raw body.

    ``payload`` must be the body exactly as received: re-serialised JSON will not verify.
    A bad key is our configuration, so it raises ValueError rather than SignatureRejected.
    """
    key = _sendgrid_key(public_key_b64)
    timestamp = (timestamp or "").strip()
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise SignatureRejected("sendgrid: timestamp header is missing or not unix seconds")
    sent_at = int(timestamp)
    current = (now or utcnow()).timestamp()
    # The signature covers the timestamp, so an old timestamp means a replayed request.
    if abs(current - sent_at) > tolerance_seconds:
        raise SignatureRejected(
            f"sendgrid: timestamp is {int(current - sent_at)} s from now, "
            f"outside the {tolerance_seconds} s window"
        )
    try:
        signature = base64.b64decode(signature_b64 or "", validate=True)
    except (binascii.Error, ValueError) as error:
        raise SignatureRejected("sendgrid: signature header is not base64") from error
    if not signature:
        raise SignatureRejected("sendgrid: signature header is missing")
    try:
        key.verify(signature, timestamp.encode("ascii") + payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as error:
        raise SignatureRejected("sendgrid: signature does not match the body") from error


# SendGrid event name -> ours; "processed" and "group_resubscribe" say nothing we act on.
_SENDGRID_STATUS: dict[str, DeliveryStatus] = {
    "delivered": "delivered",
    "open": "opened",
    "click": "clicked",
    "bounce": "bounced",
    "dropped": "failed",
    "spamreport": "complained",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
    "deferred": "deferred",
}
# Drop reasons that mean the address itself is dead ("Invalid SMTPAPI header" is ours).
_SENDGRID_DEAD_ADDRESS_DROPS = frozenset({"bounced address", "invalid"})


def parse_sendgrid(payload: bytes) -> list[DeliveryEvent]:
    """The events of one (verified) Event Webhook POST, a JSON array of up to ~1000 events."""
    events = _json(payload, "sendgrid")
    if not isinstance(events, list):
        raise ValueError("sendgrid: expected a JSON array of events")
    parsed = []
    for index, event in enumerate(events):
        where = f"sendgrid: event {index}"
        if not isinstance(event, dict):
            raise ValueError(f"{where} is not an object")
        name = _text(event, "event", where)
        if name is None:
            raise ValueError(f"{where}.event is missing: SendGrid names every event")
        status = _SENDGRID_STATUS.get(name)
        if status is None:
            continue
        parsed.append(_sendgrid_event(event, status, where))
    return parsed


def _sendgrid_event(event: dict[str, Any], status: DeliveryStatus, where: str) -> DeliveryEvent:
    name = event["event"]
    reason = _text(event, "reason", where) or _text(event, "response", where)
    hard = False
    if name == "bounce":
        # "bounce" is the receiving server refusing the address; "blocked" refuses this message.
        hard = (_text(event, "type", where) or "bounce") == "bounce"
        bounce_status = _text(event, "status", where)
        if bounce_status:
            reason = f"{bounce_status} {reason or ''}".strip()
    elif name == "dropped":
        hard = (reason or "").strip().lower() in _SENDGRID_DEAD_ADDRESS_DROPS
    elif name == "deferred":
        attempt = _text(event, "attempt", where)
        if attempt:
            reason = f"attempt {attempt}: {reason or ''}".rstrip(": ")
    sg_message_id = _text(event, "sg_message_id", where)
    raw_id = _text(event, "sg_event_id", where)
    if not raw_id:
        # Every documented event has sg_event_id; a hash of the event still dedupes retries.
        canonical = json.dumps(event, sort_keys=True, separators=(",", ":"))
        raw_id = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    message_id = next(
        (text for key in SENDGRID_MESSAGE_ID_KEYS if (text := _text(event, key, where))), None
    )
    return DeliveryEvent(
        message_id=message_id,
        provider="sendgrid",
        # The part before the first dot is the X-Message-Id the send answered with.
        provider_message_id=sg_message_id.split(".", 1)[0] if sg_message_id else None,
        status=status,
        occurred_at=_from_unix(event.get("timestamp"), f"{where}.timestamp"),
        address=_text(event, "email", where),
        reason=reason,
        hard_bounce=hard,
        url=_text(event, "url", where) if name == "click" else None,
        raw_id=raw_id,
    )


# --- Twilio status callbacks ---------------------------------------------------------------
#
# Twilio signs the URL and the form parameters but no timestamp, so a captured callback
# verifies forever: replay protection is storing each (MessageSid, status) once.


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """``X-Twilio-Signature``: base64 HMAC-SHA1 over the URL then each key+value, sorted by key."""
    data = url + "".join(key + params[key] for key in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _url_variants(url: str) -> Iterator[str]:
    """The URL as given, without its port, and with the scheme's default port.

    Twilio signs the URL as configured, while a proxy in front of us may add or drop the
    port; Twilio's own validators try these same forms.
    """
    yield url
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    if default is None or not parts.hostname:
        return
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    for netloc in (f"{prefix}{host}", f"{prefix}{host}:{default}"):
        if netloc != parts.netloc:
            yield urlunsplit(parts._replace(netloc=netloc))


def verify_twilio(auth_token: str, url: str, params: Mapping[str, str], signature: str) -> None:
    """Check ``X-Twilio-Signature`` for the full callback URL (with query) and its POST form."""
    if not signature:
        raise SignatureRejected("twilio: X-Twilio-Signature header is missing")
    given = signature.encode()
    for candidate in _url_variants(url):
        if hmac.compare_digest(twilio_signature(auth_token, candidate, params).encode(), given):
            return
    raise SignatureRejected("twilio: signature does not match the URL and parameters")


_TWILIO_STATUS: dict[str, DeliveryStatus] = {
    "delivered": "delivered",
    "read": "opened",  # WhatsApp and RCS read receipts through Twilio
    "undelivered": "failed",
    "failed": "failed",
}
# Twilio error codes that mean the number itself will not take messages; a wrong "hard"
# suppresses a good customer for good, so anything that may pass stays soft.
TWILIO_HARD_ERRORS: dict[str, str] = {
    "21211": "invalid 'To' phone number",
    "21614": "'To' number is not a valid mobile number",
    "30003": "unreachable destination handset",
    "30005": "unknown destination handset",
    "30006": "landline or unreachable carrier",
}
TWILIO_SOFT_ERRORS: dict[str, str] = {
    "21612": "the 'To' number cannot be reached from this sender",
    "30001": "queue overflow",
    "30002": "account suspended",
    "30004": "message blocked",
    "30007": "message filtered by the carrier",
    "30008": "unknown error",
    "30034": "sender not registered for A2P 10DLC",
}
# The recipient replied STOP: Twilio refuses every later message to them from this sender.
TWILIO_OPTED_OUT = "21610"


def parse_twilio(
    params: Mapping[str, str], *, message_id: str | None = None, now: datetime | None = None
) -> DeliveryEvent | None:
    """One (verified) status callback; None for the in-flight ones (queued, sending, sent ...).

    Twilio echoes nothing of ours, so ``message_id`` is whatever our callback URL carried.
    Callbacks carry no event time: ``occurred_at`` is when we received it.
    """
    raw_status = (params.get("MessageStatus") or params.get("SmsStatus") or "").lower()
    sid = params.get("MessageSid") or params.get("SmsSid")
    error_code = (params.get("ErrorCode") or "").strip()
    status = _TWILIO_STATUS.get(raw_status)
    if status is None or not sid:
        return None
    reason = None
    hard = False
    if error_code == TWILIO_OPTED_OUT:
        status, reason = "unsubscribed", f"{error_code}: recipient replied STOP"
    elif error_code in TWILIO_HARD_ERRORS:
        reason, hard = f"{error_code}: {TWILIO_HARD_ERRORS[error_code]}", True
    elif error_code and error_code != "0":
        reason = f"{error_code}: {TWILIO_SOFT_ERRORS.get(error_code, 'see Twilio error reference')}"
    elif status == "failed":
        reason = raw_status
    return DeliveryEvent(
        message_id=message_id,
        provider="twilio",
        provider_message_id=sid,
        status=status,
        occurred_at=now or utcnow(),
        # Twilio's WhatsApp numbers read "whatsapp:+1..."; the customer's number is the rest.
        address=(params.get("To") or "").removeprefix("whatsapp:") or None,
        reason=reason,
        hard_bounce=hard,
        url=None,
        raw_id=f"{sid}:{raw_status}",
    )


# --- WhatsApp Cloud API webhooks -----------------------------------------------------------
#
# Meta signs the raw body with the app secret and no timestamp: as with Twilio, replay
# protection is storing each (wamid, status, timestamp) once.


def verify_whatsapp(app_secret: str, payload: bytes, signature_header: str | None) -> None:
    """Check ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>``."""
    scheme, _, given = (signature_header or "").strip().partition("=")
    if scheme.lower() != "sha256" or not given:
        raise SignatureRejected("whatsapp: X-Hub-Signature-256 header is missing or not sha256=")
    expected = hmac.new(app_secret.encode(), payload, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), given.strip().lower().encode()):
        raise SignatureRejected("whatsapp: signature does not match the body")


def whatsapp_challenge(
    mode: str | None, token: str | None, challenge: str | None, verify_token: str
) -> str | None:
    """The GET handshake: echo ``hub.challenge`` only for our own ``hub.verify_token``."""
    if mode != "subscribe" or not token or not challenge or not verify_token:
        return None
    if not hmac.compare_digest(token.encode(), verify_token.encode()):
        return None
    return challenge


_WHATSAPP_STATUS: dict[str, DeliveryStatus] = {
    "delivered": "delivered",
    "read": "opened",
    "failed": "failed",
}
# 131026: the number is not on WhatsApp (or cannot receive from businesses).
WHATSAPP_HARD_ERRORS = frozenset({131026})
# 131050: the customer turned off marketing messages from us in WhatsApp.
WHATSAPP_OPTED_OUT = 131050


def parse_whatsapp(payload: bytes) -> list[DeliveryEvent]:
    """Status updates of one (verified) webhook; incoming messages and "sent" are skipped."""
    body = _json(payload, "whatsapp")
    if not isinstance(body, dict):
        raise ValueError("whatsapp: expected a JSON object with entry[]")
    events = []
    for entry_index, entry in enumerate(_objects(body.get("entry"), "whatsapp: entry")):
        where = f"whatsapp: entry[{entry_index}].changes"
        for change_index, change in enumerate(_objects(entry.get("changes"), where)):
            value = _object(change.get("value"), f"{where}[{change_index}].value")
            statuses = f"{where}[{change_index}].value.statuses"
            for index, item in enumerate(_objects(value.get("statuses"), statuses)):
                event = _whatsapp_event(item, f"{statuses}[{index}]")
                if event is not None:
                    events.append(event)
    return events


def _whatsapp_event(item: dict[str, Any], where: str) -> DeliveryEvent | None:
    raw_status = _text(item, "status", where) or ""
    status = _WHATSAPP_STATUS.get(raw_status)
    wamid = _text(item, "id", where)
    if status is None or not wamid:
        return None
    reason = None
    hard = False
    errors = _objects(item.get("errors"), f"{where}.errors")
    if errors:
        error, at = errors[0], f"{where}.errors[0]"
        code_text = _text(error, "code", at)
        code = int(code_text) if code_text and code_text.isdigit() else code_text
        details = _text(_object(error.get("error_data"), f"{at}.error_data"), "details", at)
        title = _text(error, "title", at) or _text(error, "message", at) or ""
        reason = f"{code_text}: {title}".rstrip(": ")
        if details:
            reason = f"{reason} ({details})"
        if code == WHATSAPP_OPTED_OUT:
            status = "unsubscribed"
        hard = code in WHATSAPP_HARD_ERRORS
    timestamp = _text(item, "timestamp", where)
    return DeliveryEvent(
        # Our sends set biz_opaque_callback_data to our message id; Meta echoes it back.
        message_id=_text(item, "biz_opaque_callback_data", where),
        provider="whatsapp",
        provider_message_id=wamid,
        status=status,
        occurred_at=_from_unix(timestamp, f"{where}.timestamp"),
        address=_text(item, "recipient_id", where) or _text(item, "recipient_user_id", where),
        reason=reason,
        hard_bounce=hard,
        url=None,
        raw_id=f"{wamid}:{raw_status}:{timestamp}",
    )
