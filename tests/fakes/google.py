"""Google: the OAuth2 token endpoint, FCM HTTP v1 and Google Ads Customer Match, served locally."""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.fakes.meta import HEX64
from tests.fakes.server import ProviderServer, Received, Rejected, Reply, unb64url

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
