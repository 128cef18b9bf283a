"""Local stand-ins for the channel providers, speaking each API as the provider documents it.

Every fake is a real HTTP server on 127.0.0.1 and a free port. It checks what the provider
checks (method, path, credentials, headers, body), answers as the provider answers, records
what it received, and can be told to fail the next requests the way the provider fails.
A request the real provider would refuse as malformed lands in ``problems`` as well as
getting the provider's error, so a test sees exactly what was wrong.

The SMTP stand-in is a real ``aiosmtpd`` server.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import json
import re
import secrets
import socket
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from hilo.channels.webhook import receiver_secret


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))


@dataclass
class Reply:
    status: int
    body: Any = b""  # bytes, str, or anything JSON
    headers: dict[str, str] = field(default_factory=dict)


class Rejected(Exception):
    """The provider's answer to a request it refuses; ``problem`` marks a malformed one."""

    def __init__(self, reply: Reply, problem: str | None = None) -> None:
        super().__init__(problem or reply.status)
        self.reply = reply
        self.problem = problem


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    provider: ProviderServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out has gone: writing the late answer fails, and that is fine.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = urlsplit(self.path)
        request = Received(
            method=self.command,
            path=parts.path,
            query=dict(parse_qsl(parts.query)),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
        )
        reply = self.server.provider.dispatch(request)
        headers = dict(reply.headers)
        if isinstance(reply.body, bytes):
            payload = reply.body
        elif isinstance(reply.body, str):
            payload = reply.body.encode()
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        else:
            payload = json.dumps(reply.body).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_response(reply.status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ProviderServer:
    """A threaded local HTTP server; subclasses implement ``handle``."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.problems: list[str] = []
        self._failures: deque[Reply | None] = deque()
        self._delays: deque[float] = deque()
        self._lock = threading.RLock()  # handle() may take failures under it
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.provider = self
        # A short poll interval so stopping a fake between tests is quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ProviderServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.received.clear()
            self.problems.clear()
            self._failures.clear()
            self._delays.clear()

    def fail_next(
        self, status: int, body: Any = b"", headers: dict[str, str] | None = None, times: int = 1
    ) -> None:
        """Answer the next ``times`` well-formed requests with this failure."""
        for _ in range(times):
            self._failures.append(Reply(status, body, headers or {}))

    def pass_next(self, times: int = 1) -> None:
        """Handle the next ``times`` well-formed requests normally, before any failure queued
        after this call."""
        for _ in range(times):
            self._failures.append(None)

    def delay_next(self, seconds: float) -> None:
        """Hold the next request this long before handling it (it is still handled)."""
        self._delays.append(seconds)

    def take_failure(self) -> Reply | None:
        with self._lock:
            return self._failures.popleft() if self._failures else None

    def dispatch(self, request: Received) -> Reply:
        with self._lock:
            self.received.append(request)
            delay = self._delays.popleft() if self._delays else 0.0
        if delay:
            time.sleep(delay)
        try:
            with self._lock:
                return self.handle(request)
        except Rejected as rejected:
            if rejected.problem:
                self.problems.append(f"{request.method} {request.path}: {rejected.problem}")
            return rejected.reply

    def handle(self, request: Received) -> Reply:
        raise NotImplementedError

    # Shared checks ---------------------------------------------------------------------

    @staticmethod
    def bearer(request: Received) -> str | None:
        value = request.headers.get("authorization", "")
        return value[7:] if value.startswith("Bearer ") else None


# SendGrid ----------------------------------------------------------------------------------

SENDGRID_RESERVED_HEADERS = {
    "x-sg-id",
    "x-sg-eid",
    "received",
    "dkim-signature",
    "content-type",
    "content-transfer-encoding",
    "to",
    "from",
    "subject",
    "reply-to",
    "cc",
    "bcc",
}


class FakeSendGrid(ProviderServer):
    """``POST /v3/mail/send``: 202 with X-Message-Id, or ``{"errors": [...]}``."""

    def __init__(self, api_key: str = "SG.test-key.secret") -> None:
        super().__init__()
        self.api_key = api_key
        self.mail: list[dict[str, Any]] = []

    @staticmethod
    def errors(*errors: tuple[str | None, str]) -> dict[str, Any]:
        return {"errors": [{"message": m, "field": f, "help": None} for f, m in errors]}

    def handle(self, request: Received) -> Reply:
        if (request.method, request.path) != ("POST", "/v3/mail/send"):
            raise Rejected(Reply(404, self.errors((None, "Not Found"))), "unknown endpoint")
        if self.bearer(request) != self.api_key:
            raise Rejected(
                Reply(
                    401,
                    self.errors(
                        (None, "The provided authorization grant is invalid, expired, or revoked")
                    ),
                )
            )
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise Rejected(Reply(415, self.errors((None, "Content-Type"))), "not JSON")
        body = request.json()
        errors = self.validate(body)
        if errors:
            raise Rejected(
                Reply(400, self.errors(*errors)), "; ".join(f"{f}: {m}" for f, m in errors)
            )
        if (failure := self.take_failure()) is not None:
            return failure
        self.mail.append(body)
        return Reply(202, b"", {"X-Message-Id": secrets.token_urlsafe(16)})

    @staticmethod
    def validate(body: dict[str, Any]) -> list[tuple[str | None, str]]:
        errors: list[tuple[str | None, str]] = []
        personalizations = body.get("personalizations")
        if not personalizations:
            errors.append(("personalizations", "The personalizations field is required."))
        for index, personalization in enumerate(personalizations or []):
            for to in personalization.get("to") or []:
                if "@" not in str(to.get("email", "")):
                    errors.append(
                        (f"personalizations.{index}.to", "Does not contain a valid address.")
                    )
        if "@" not in str((body.get("from") or {}).get("email", "")):
            errors.append(("from.email", "The from object must be provided for every email."))
        if not body.get("subject"):
            errors.append(("subject", "The subject is required."))
        content = body.get("content") or []
        if not content:
            errors.append(
                ("content", "Unless a valid template_id is provided, content is required.")
            )
        types = [part.get("type") for part in content]
        if "text/plain" in types and types[0] != "text/plain":
            errors.append(("content", "The text/plain content type must be first."))
        if any(not part.get("value") for part in content):
            errors.append(
                ("content.value", "The content value must be a string of at least one character.")
            )
        for name, value in (body.get("custom_args") or {}).items():
            if not isinstance(value, str):
                errors.append((f"custom_args.{name}", "Custom args values must be strings."))
        for name in body.get("headers") or {}:
            if name.lower() in SENDGRID_RESERVED_HEADERS:
                errors.append((f"headers.{name}", "This header is reserved."))
        return errors


# Twilio ------------------------------------------------------------------------------------

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


class FakeTwilio(ProviderServer):
    """``POST /2010-04-01/Accounts/{Sid}/Messages.json`` with an idempotency token."""

    def __init__(
        self, account_sid: str = "AC" + "a1" * 16, auth_token: str = "twilio-auth-token"
    ) -> None:
        super().__init__()
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.messages: list[dict[str, str]] = []  # delivered, once per token
        self.idempotency_tokens: list[str] = []  # every token received, repeats included
        self.unreachable: set[str] = set()
        self._by_token: dict[str, dict[str, Any]] = {}

    @staticmethod
    def error(status: int, code: int, message: str) -> Reply:
        return Reply(
            status,
            {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            },
        )

    def handle(self, request: Received) -> Reply:
        path = f"/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        if (request.method, request.path) != ("POST", path):
            raise Rejected(
                self.error(404, 20404, "The requested resource was not found"), "unknown path"
            )
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {expected}":
            raise Rejected(self.error(401, 20003, "Authenticate"))
        if request.headers.get("content-type") != "application/x-www-form-urlencoded":
            raise Rejected(self.error(400, 20001, "Not form-encoded"), "not form-encoded")
        form = request.form()
        to, sender = form.get("To", ""), form.get("From", "")
        if not to:
            raise Rejected(self.error(400, 21604, "A 'To' phone number is required."), "no To")
        if not sender and not form.get("MessagingServiceSid"):
            raise Rejected(self.error(400, 21603, "A 'From' phone number is required."), "no From")
        if not form.get("Body") and not form.get("ContentSid"):
            raise Rejected(self.error(400, 21602, "Message body is required."), "no Body")
        if sender and to.startswith("whatsapp:") != sender.startswith("whatsapp:"):
            raise Rejected(
                self.error(400, 21910, "Invalid From and To pair."), "mixed WhatsApp addresses"
            )
        number = to.removeprefix("whatsapp:")
        if not E164.match(number) or number in self.unreachable:
            return self.error(400, 21211, f"Invalid 'To' Phone Number: {number}")
        callback = form.get("StatusCallback")
        if callback is not None and not callback.startswith(("https://", "http://")):
            raise Rejected(self.error(400, 21609, "Invalid StatusCallback"), "bad StatusCallback")
        token = request.headers.get("i-twilio-idempotency-token")
        if token:
            self.idempotency_tokens.append(token)
            if token in self._by_token:
                return Reply(201, self._by_token[token])
        if (failure := self.take_failure()) is not None:
            return failure
        sid = "SM" + secrets.token_hex(16)
        resource = {
            "sid": sid,
            "account_sid": self.account_sid,
            "to": to,
            "from": sender or None,
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "body": form.get("Body", ""),
            "status": "accepted" if form.get("MessagingServiceSid") else "queued",
            "num_segments": "1",
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "date_created": format_datetime(datetime.now(UTC), usegmt=True),
            "error_code": None,
            "error_message": None,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }
        self.messages.append(form)
        if token:
            self._by_token[token] = resource
        return Reply(201, resource)


# Meta Graph API: WhatsApp Cloud and Custom Audiences --------------------------------------


def graph_error(
    code: int, message: str, *, subcode: int | None = None, kind: str = "OAuthException"
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "message": message,
        "type": kind,
        "code": code,
        "fbtrace_id": secrets.token_urlsafe(9),
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": error}


class FakeWhatsAppCloud(ProviderServer):
    """``POST /{version}/{phone_number_id}/messages`` for approved templates and text."""

    def __init__(
        self,
        token: str = "EAAG-whatsapp-token",
        phone_number_id: str = "106540352242922",
        api_version: str = "v25.0",
        templates: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.token = token
        self.phone_number_id = phone_number_id
        self.api_version = api_version
        # Approved templates and how many body parameters each takes.
        self.templates = templates if templates is not None else {"cart_reminder": 2}
        self.messages: list[dict[str, Any]] = []

    def handle(self, request: Received) -> Reply:
        if (request.method, request.path) != (
            "POST",
            f"/{self.api_version}/{self.phone_number_id}/messages",
        ):
            raise Rejected(
                Reply(400, graph_error(100, "Unsupported post request.", subcode=33)),
                "unknown path",
            )
        if self.bearer(request) != self.token:
            raise Rejected(
                Reply(401, graph_error(190, "Invalid OAuth access token - Cannot parse token"))
            )
        body = request.json()
        problem = self.validate(body)
        if problem:
            raise Rejected(Reply(400, graph_error(100, f"(#100) {problem}")), problem)
        if body["type"] == "template":
            template = body["template"]
            expected = self.templates.get(template["name"])
            if expected is None:
                return Reply(
                    404,
                    graph_error(
                        132001, "(#132001) Template name does not exist in the translation"
                    ),
                )
            given = sum(
                len(component.get("parameters") or [])
                for component in template.get("components") or []
                if component.get("type") == "body"
            )
            if given != expected:
                return Reply(
                    400,
                    graph_error(
                        132000,
                        "(#132000) Number of parameters does not match the expected number "
                        "of params",
                    ),
                )
        if (failure := self.take_failure()) is not None:
            return failure
        self.messages.append(body)
        return Reply(
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": body["to"], "wa_id": body["to"].lstrip("+")}],
                "messages": [
                    {"id": "wamid." + b64url(secrets.token_bytes(24)), "message_status": "accepted"}
                ],
            },
        )

    @staticmethod
    def validate(body: dict[str, Any]) -> str | None:
        if body.get("messaging_product") != "whatsapp":
            return "The parameter messaging_product is required."
        if not re.match(r"^\+?[1-9]\d{6,14}$", str(body.get("to", ""))):
            return "The parameter to is not a phone number."
        kind = body.get("type")
        if kind == "template":
            template = body.get("template") or {}
            if not template.get("name") or not (template.get("language") or {}).get("code"):
                return "template.name and template.language.code are required."
            for component in template.get("components") or []:
                for parameter in component.get("parameters") or []:
                    if parameter.get("type") != "text" or not isinstance(
                        parameter.get("text"), str
                    ):
                        return "Template parameters must be text."
        elif kind == "text":
            if not (body.get("text") or {}).get("body"):
                return "The parameter text['body'] is required."
        else:
            return f"Unsupported message type {kind!r}."
        return None


HEX64 = re.compile(r"^[0-9a-f]{64}$")
META_KEYS = {"EMAIL", "PHONE", "FN", "LN", "CT", "ST", "ZIP", "COUNTRY", "EXTERN_ID"}


class FakeMetaGraph(ProviderServer):
    """``POST``/``DELETE /{version}/{audience_id}/users`` on Meta Custom Audiences."""

    def __init__(self, access_token: str = "EAAG-marketing-token", api_version: str = "v25.0"):
        super().__init__()
        self.access_token = access_token
        self.api_version = api_version
        self.members: dict[str, set[tuple[tuple[str, str], ...]]] = {"23851234567890": set()}
        self.sessions = itertools.count(7_000_000_000_000)

    def handle(self, request: Received) -> Reply:
        match = re.fullmatch(rf"/{re.escape(self.api_version)}/(\d+)/users", request.path)
        if request.method not in ("POST", "DELETE") or match is None:
            raise Rejected(
                Reply(400, graph_error(100, "Unsupported request.", subcode=33)), "unknown path"
            )
        form = request.form()
        token = self.bearer(request) or form.get("access_token")
        if token != self.access_token:
            raise Rejected(Reply(400, graph_error(190, "Invalid OAuth access token.")))
        audience = match.group(1)
        if audience not in self.members:
            return Reply(
                400,
                graph_error(
                    100,
                    f"Unsupported post request. Object with ID '{audience}' does not exist.",
                    subcode=33,
                    kind="GraphMethodException",
                ),
            )
        try:
            payload = json.loads(form["payload"])
            schema = payload["schema"]
            schema = [schema] if isinstance(schema, str) else list(schema)
            rows = payload["data"]
        except (KeyError, ValueError, TypeError) as error:
            raise Rejected(
                Reply(400, graph_error(100, "(#100) Invalid parameter payload")), str(error)
            ) from error
        if not schema or not set(schema) <= META_KEYS or len(set(schema)) != len(schema):
            raise Rejected(Reply(400, graph_error(100, "(#100) Invalid schema")), str(schema))
        invalid = [
            row
            for row in rows
            if len(row) != len(schema) or not all(HEX64.match(str(value)) for value in row)
        ]
        if (failure := self.take_failure()) is not None:
            return failure
        members = {tuple(zip(schema, row, strict=True)) for row in rows if row not in invalid}
        if request.method == "POST":
            self.members[audience] |= members
        else:
            self.members[audience] -= members
        return Reply(
            200,
            {
                "audience_id": audience,
                "session_id": str(next(self.sessions)),
                "num_received": len(rows),
                "num_invalid_entries": len(invalid),
                "invalid_entry_samples": {str(i): row for i, row in enumerate(invalid[:5])},
            },
        )


# Google: OAuth2 token endpoint and FCM HTTP v1 ---------------------------------------------

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
DEVICE_TOKEN = re.compile(r"^[A-Za-z0-9_:-]{32,}$")


def google_error(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def fcm_error(code: int, status: str, message: str, error_code: str) -> dict[str, Any]:
    return google_error(
        code,
        status,
        message,
        [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}],
    )


def device_token() -> str:
    """What an app's FCM SDK hands out: a long URL-safe string."""
    return secrets.token_urlsafe(24) + ":APA91b" + secrets.token_urlsafe(96)


class FakeFirebase(ProviderServer):
    """Google's OAuth2 token endpoint (JWT-bearer grant) and FCM's ``messages:send``."""

    def __init__(self, project_id: str = "hilo-shop", key: rsa.RSAPrivateKey | None = None):
        super().__init__()
        self.project_id = project_id
        self.private_key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.client_email = f"hilo-push@{project_id}.iam.gserviceaccount.com"
        self.private_key_id = secrets.token_hex(20)
        self.token_lifetime = 3599
        self.token_requests = 0
        self.unregistered: set[str] = set()
        self.pushes: list[dict[str, Any]] = []
        self._issued: dict[str, float] = {}
        self._ids = itertools.count(1_700_000_000_000_000)

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def service_account(self, key: rsa.RSAPrivateKey | None = None) -> dict[str, str]:
        """The JSON key file Firebase lets you download, here pointing at this server."""
        pem = (key or self.private_key).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": pem.decode(),
            "client_email": self.client_email,
            "client_id": "104857600000000000000",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_url,
        }

    def revoke_tokens(self) -> None:
        with self._lock:
            self._issued.clear()

    def handle(self, request: Received) -> Reply:
        if request.path == "/token":
            return self._token(request)
        if request.path == f"/v1/projects/{self.project_id}/messages:send":
            return self._send(request)
        raise Rejected(Reply(404, google_error(404, "NOT_FOUND", "Not found")), "unknown path")

    def _token(self, request: Received) -> Reply:
        def refuse(description: str) -> Rejected:
            return Rejected(
                Reply(400, {"error": "invalid_grant", "error_description": description})
            )

        if request.method != "POST":
            raise Rejected(Reply(405, b""), "token endpoint wants POST")
        form = request.form()
        if form.get("grant_type") != JWT_BEARER:
            raise Rejected(
                Reply(400, {"error": "unsupported_grant_type", "error_description": "grant_type"}),
                f"grant_type {form.get('grant_type')!r}",
            )
        try:
            header_b64, claims_b64, signature_b64 = form["assertion"].split(".")
            header = json.loads(unb64url(header_b64))
            claims = json.loads(unb64url(claims_b64))
        except (KeyError, ValueError) as error:
            raise refuse("Invalid JWT.") from error
        if header.get("alg") != "RS256" or header.get("kid") != self.private_key_id:
            raise refuse("Invalid JWT header.")
        try:
            self.private_key.public_key().verify(
                unb64url(signature_b64),
                f"{header_b64}.{claims_b64}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature as error:
            raise refuse("Invalid JWT Signature.") from error
        now = time.time()
        # Google wants its own token endpoint as the audience, wherever the assertion is posted.
        audience = "https://oauth2.googleapis.com/token"
        if claims.get("iss") != self.client_email or claims.get("aud") != audience:
            raise refuse("Invalid JWT: iss or aud.")
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            raise refuse("Invalid scope.")
        iat, exp = claims.get("iat", 0), claims.get("exp", 0)
        if not (iat <= now + 60 and exp > now and exp - iat <= 3600):
            raise refuse("Invalid JWT: Token must be a short-lived token (60 minutes).")
        self.token_requests += 1
        token = "ya29.fake-" + secrets.token_urlsafe(32)
        self._issued[token] = now + self.token_lifetime
        return Reply(
            200, {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        )

    def _send(self, request: Received) -> Reply:
        if request.method != "POST":
            raise Rejected(Reply(405, b""), "messages:send wants POST")
        token = self.bearer(request)
        if token is None or self._issued.get(token, 0) < time.time():
            raise Rejected(
                Reply(
                    401,
                    google_error(
                        401,
                        "UNAUTHENTICATED",
                        "Request had invalid authentication credentials. Expected OAuth 2 "
                        "access token, login cookie or other valid authentication credential.",
                    ),
                )
            )
        body = request.json()
        message = body.get("message") or {}
        targets = [key for key in ("token", "topic", "condition") if key in message]
        problem = None
        if len(targets) != 1:
            problem = "exactly one of token, topic or condition"
        elif any(not isinstance(value, str) for value in (message.get("data") or {}).values()):
            problem = "data values must be strings"
        elif (message.get("android") or {}).get("priority", "normal") not in ("normal", "high"):
            problem = "android.priority"
        if problem:
            raise Rejected(
                Reply(400, google_error(400, "INVALID_ARGUMENT", f"Invalid value: {problem}")),
                problem,
            )
        device = message.get("token", "")
        if device in self.unregistered:
            return Reply(
                404, fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
            )
        if not DEVICE_TOKEN.match(device):
            # As FCM answers it: the FcmError and a BadRequest naming the field at fault.
            invalid = fcm_error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                "INVALID_ARGUMENT",
            )
            invalid["error"]["details"].append(
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [
                        {"field": "message.token", "description": "Invalid registration token"}
                    ],
                }
            )
            return Reply(400, invalid)
        if (failure := self.take_failure()) is not None:
            return failure
        self.pushes.append(message)
        return Reply(
            200,
            {
                "name": f"projects/{self.project_id}/messages/"
                f"0:{next(self._ids)}%{secrets.token_hex(8)}"
            },
        )


# Google Ads Customer Match -----------------------------------------------------------------


def google_ads_error(
    code: int,
    status: str,
    error_code: dict[str, str],
    message: str,
    *,
    api_version: str = "v26",
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    ads_error: dict[str, Any] = {"errorCode": error_code, "message": message}
    if details:
        ads_error["details"] = details
    return google_error(
        code,
        status,
        "Request contains an invalid argument." if code == 400 else message,
        [
            {
                "@type": "type.googleapis.com/google.ads.googleads."
                f"{api_version}.errors.GoogleAdsFailure",
                "errors": [ads_error],
                "requestId": secrets.token_urlsafe(12),
            }
        ],
    )


class FakeGoogleAds(ProviderServer):
    """OfflineUserDataJobService over REST (``:create``, ``:addOperations``, ``:run``), and
    Google's OAuth2 token endpoint (``/token``, refresh-token grant) whose access tokens the
    API accepts until they expire."""

    def __init__(
        self,
        developer_token: str = "ads-developer-token",
        customer_id: str = "1234567890",
        login_customer_id: str | None = "9876543210",
        api_version: str = "v26",
        client_id: str = "hilo-ads.apps.googleusercontent.com",
        client_secret: str = "GOCSPX-ads-client-secret",
        refresh_token: str = "1//ads-refresh-token",
    ) -> None:
        super().__init__()
        self.developer_token = developer_token
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.token_lifetime = 3599
        self.token_requests = 0
        self._issued: dict[str, float] = {}
        self.customer_id = customer_id
        self.login_customer_id = login_customer_id
        self.api_version = api_version
        self.user_lists: dict[str, set[tuple[str, str]]] = {
            f"customers/{customer_id}/userLists/555000111": set()
        }
        self.jobs: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(880_000_001)

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def expire_tokens(self) -> None:
        """Every access token issued so far dies now, as they do an hour after issue."""
        with self._lock:
            self._issued = dict.fromkeys(self._issued, 0.0)

    def error(self, code: int, status: str, error_code: dict[str, str], message: str) -> Reply:
        return Reply(
            code, google_ads_error(code, status, error_code, message, api_version=self.api_version)
        )

    def _token(self, request: Received) -> Reply:
        form = request.form()
        if request.method != "POST" or form.get("grant_type") != "refresh_token":
            raise Rejected(
                Reply(400, {"error": "unsupported_grant_type"}), f"grant {form.get('grant_type')}"
            )
        if (form.get("client_id"), form.get("client_secret")) != (
            self.client_id,
            self.client_secret,
        ):
            return Reply(401, {"error": "invalid_client", "error_description": "Unauthorized"})
        if form.get("refresh_token") != self.refresh_token:
            return Reply(
                400, {"error": "invalid_grant", "error_description": "Token has been revoked."}
            )
        self.token_requests += 1
        token = "ya29.ads-" + secrets.token_urlsafe(24)
        self._issued[token] = time.time() + self.token_lifetime
        return Reply(
            200,
            {
                "access_token": token,
                "expires_in": self.token_lifetime,
                "scope": form.get("scope", ""),
                "token_type": "Bearer",
            },
        )

    def handle(self, request: Received) -> Reply:
        if request.path == "/token":
            return self._token(request)
        expires = self._issued.get(self.bearer(request) or "")
        if expires is None or expires < time.time():
            raise Rejected(
                self.error(
                    401,
                    "UNAUTHENTICATED",
                    {
                        "authenticationError": "OAUTH_TOKEN_INVALID"
                        if expires is None
                        else "OAUTH_TOKEN_EXPIRED"
                    },
                    "Oauth token is invalid." if expires is None else "Oauth token is expired.",
                )
            )
        if request.headers.get("developer-token") != self.developer_token:
            raise Rejected(
                self.error(
                    401,
                    "UNAUTHENTICATED",
                    {"authenticationError": "DEVELOPER_TOKEN_INVALID"},
                    "The developer token is not valid.",
                )
            )
        if (
            self.login_customer_id
            and request.headers.get("login-customer-id") != self.login_customer_id
        ):
            raise Rejected(
                self.error(
                    403,
                    "PERMISSION_DENIED",
                    {"authorizationError": "USER_PERMISSION_DENIED"},
                    "User doesn't have permission to access customer. Note: If you're accessing "
                    "a client customer, the manager's customer id must be set in the "
                    "'login-customer-id' header.",
                )
            )
        prefix = f"/{self.api_version}/customers/{self.customer_id}/offlineUserDataJobs"
        if request.method != "POST" or not request.path.startswith(prefix):
            raise Rejected(Reply(404, google_error(404, "NOT_FOUND", "Not found")), "unknown path")
        body = request.json()
        if request.path == f"{prefix}:create":
            return self._create(body)
        match = re.fullmatch(rf"{re.escape(prefix)}/(\d+):(addOperations|run)", request.path)
        if match is None:
            raise Rejected(Reply(404, google_error(404, "NOT_FOUND", "Not found")), "unknown path")
        job = f"customers/{self.customer_id}/offlineUserDataJobs/{match.group(1)}"
        if job not in self.jobs:
            return self.error(
                400,
                "INVALID_ARGUMENT",
                {"offlineUserDataJobError": "INVALID_JOB_ID"},
                "The job id is invalid.",
            )
        if match.group(2) == "addOperations":
            return self._add(job, body)
        return self._run(job)

    def _create(self, body: dict[str, Any]) -> Reply:
        job = body.get("job") or {}
        user_list = (job.get("customerMatchUserListMetadata") or {}).get("userList")
        if job.get("type") != "CUSTOMER_MATCH_USER_LIST" or not user_list:
            raise Rejected(
                self.error(
                    400,
                    "INVALID_ARGUMENT",
                    {"fieldError": "REQUIRED"},
                    "job.type and customerMatchUserListMetadata.userList are required",
                ),
                "incomplete job",
            )
        if user_list not in self.user_lists:
            return self.error(
                400,
                "INVALID_ARGUMENT",
                {"offlineUserDataJobError": "INVALID_USER_LIST_ID"},
                "The user list id is invalid.",
            )
        if (failure := self.take_failure()) is not None:
            return failure
        name = f"customers/{self.customer_id}/offlineUserDataJobs/{next(self._ids)}"
        self.jobs[name] = {"userList": user_list, "status": "PENDING", "operations": []}
        return Reply(200, {"resourceName": name})

    def _add(self, job: str, body: dict[str, Any]) -> Reply:
        if self.jobs[job]["status"] != "PENDING":
            return self.error(
                400,
                "INVALID_ARGUMENT",
                {"offlineUserDataJobError": "INVALID_JOB_STATUS"},
                "Operations can only be added to a job that has not run.",
            )
        operations = body.get("operations") or []
        problem = None if operations else "no operations"
        for operation in operations:
            kinds = [kind for kind in ("create", "remove", "removeAll") if kind in operation]
            if len(kinds) != 1:
                problem = f"operation needs exactly one of create/remove: {operation}"
                break
            identifiers = (operation[kinds[0]] or {}).get("userIdentifiers") or []
            for identifier in identifiers:
                values = [identifier.get("hashedEmail"), identifier.get("hashedPhoneNumber")]
                if sum(value is not None for value in values) != 1 or not all(
                    HEX64.match(value) for value in values if value is not None
                ):
                    problem = f"userIdentifier must hold one SHA-256 hex hash: {identifier}"
            if not identifiers and kinds[0] != "removeAll":
                problem = "no userIdentifiers"
        if problem:
            raise Rejected(
                self.error(
                    400,
                    "INVALID_ARGUMENT",
                    {"offlineUserDataJobError": "INVALID_SHA256_FORMAT"},
                    problem,
                ),
                problem,
            )
        if (failure := self.take_failure()) is not None:
            return failure
        self.jobs[job]["operations"].extend(operations)
        return Reply(200, {})

    def _run(self, job: str) -> Reply:
        state = self.jobs[job]
        if state["status"] != "PENDING" or not state["operations"]:
            raise Rejected(
                self.error(
                    400,
                    "INVALID_ARGUMENT",
                    {"offlineUserDataJobError": "INVALID_JOB_STATUS"},
                    "The job has already run or has no operations.",
                ),
                "run on a job that ran or is empty",
            )
        if (failure := self.take_failure()) is not None:
            return failure
        members = self.user_lists[state["userList"]]
        for operation in state["operations"]:
            for kind in ("create", "remove"):
                for identifier in (operation.get(kind) or {}).get("userIdentifiers") or []:
                    member = next(iter(identifier.items()))
                    if kind == "create":
                        members.add(member)
                    else:
                        members.discard(member)
        state["status"] = "SUCCESS"
        return Reply(200, {"name": f"customers/{self.customer_id}/operations/{next(self._ids)}"})


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


# Signed webhooks ---------------------------------------------------------------------------


class FakeWebhookReceiver(ProviderServer):
    """An automation tool's catch hook that checks our signature and honours Idempotency-Key."""

    def __init__(self, secret: str = "whsec-test-secret", tolerance: int = 300) -> None:
        super().__init__()
        self.secret = secret
        self.tolerance = tolerance
        self.idempotency_keys: list[str] = []  # every key received, repeats included
        self.events: list[dict[str, Any]] = []  # acted on, once per key
        self._answers: dict[str, Reply] = {}

    @property
    def hook_url(self) -> str:
        return f"{self.url}/hooks/hilo"

    def handle(self, request: Received) -> Reply:
        if (request.method, request.path) != ("POST", "/hooks/hilo"):
            raise Rejected(Reply(404, "not found"), "unknown path")
        if request.headers.get("content-type") != "application/json":
            raise Rejected(Reply(415, "JSON only"), "not JSON")
        # Verified as a receiver would: the Standard Webhooks library, our whsec_ secret.
        try:
            Webhook(receiver_secret(self.secret)).verify(request.body, dict(request.headers))
        except WebhookVerificationError as error:
            raise Rejected(Reply(401, "invalid signature"), "signature") from error
        if request.headers.get("webhook-id") != request.headers.get("idempotency-key"):
            raise Rejected(Reply(400, "webhook-id and Idempotency-Key differ"), "ids")
        key = request.headers.get("idempotency-key")
        if not key:
            raise Rejected(Reply(400, "Idempotency-Key required"), "no Idempotency-Key")
        self.idempotency_keys.append(key)
        if key in self._answers:
            return self._answers[key]
        if (failure := self.take_failure()) is not None:
            return failure
        self.events.append(request.json())
        answer = Reply(200, {"id": f"evt_{len(self.events)}", "status": "accepted"})
        self._answers[key] = answer
        return answer


# SMTP --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Mailbox:
    """aiosmtpd handler: accepts mail, or answers a chosen reply for chosen recipients."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.replies: dict[str, str] = {}  # recipient → SMTP reply, e.g. "550 5.1.1 ..."

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.replies:
            return self.replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 Ok: queued"


@dataclass
class SmtpLogin:
    username: str
    password: str
    logins: list[str] = field(default_factory=list)

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == self.username
            and auth_data.password.decode() == self.password
        ):
            self.logins.append(mechanism)
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


class FakeSmtpServer:
    """A real SMTP server (aiosmtpd) on a free port, optionally with STARTTLS and AUTH."""

    def __init__(
        self,
        *,
        tls: bool = False,
        login: SmtpLogin | None = None,
    ) -> None:
        self.mailbox = Mailbox()
        self.port = free_port()
        self.login = login
        self.client_tls_context: ssl.SSLContext | None = None
        kwargs: dict[str, Any] = {}
        if tls:
            server_context, self.client_tls_context = _self_signed_tls("localhost")
            kwargs.update(tls_context=server_context, require_starttls=True)
        if login is not None:
            kwargs.update(authenticator=login, auth_require_tls=tls)
        self.controller = Controller(
            self.mailbox,
            hostname="127.0.0.1",
            port=self.port,
            server_hostname="localhost",
            **kwargs,
        )

    def start(self) -> FakeSmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


def _self_signed_tls(host: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only this server's certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:
        certificate_file, key_file = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        certificate_file.write_bytes(certificate_pem)
        key_file.write_bytes(key_pem)
        server.load_cert_chain(certificate_file, key_file)
    client = ssl.create_default_context(cadata=certificate_pem.decode())
    return server, client


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
