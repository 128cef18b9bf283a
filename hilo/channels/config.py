"""Which provider each channel uses, and its credentials, from ``HILO_*`` environment variables.

Every channel defaults to ``capture`` (messages are recorded, nothing leaves Hilo), so a
fresh install never messages a real customer. Base URLs default to the providers' real
hosts and exist so tests can point them at local servers.

The feedback side lives here too: the public URL providers and customers reach Hilo at, the
secret that signs our links, and what verifies each provider's webhooks.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hilo.channels.audiences import (
    GOOGLE_TOKEN_URL,
    GoogleAdsCustomerMatch,
    MetaCustomAudiences,
    oauth_credentials,
)
from hilo.channels.base import DEFAULT_TIMEOUT_SECONDS, ChannelProvider
from hilo.channels.fcm import FcmPush, ServiceAccount
from hilo.channels.sendgrid import SendGridEmail
from hilo.channels.smtp import SmtpEmail
from hilo.channels.twilio import TwilioMessages
from hilo.channels.webhook import SignedWebhook
from hilo.channels.webpush import WebPush
from hilo.channels.whatsapp_cloud import WhatsAppCloud
from hilo.feedback.links import MIN_SECRET_LENGTH, LinkSigner
from hilo.feedback.preferences import Topic

__all__ = ["DEV_LINK_SECRET", "ChannelSettings", "build_providers", "state_link_secret"]

# Signs links in simulations and tests, which run without settings. Published, so anyone
# could mint links with it: refused as HILO_LINK_SECRET in every environment.
DEV_LINK_SECRET = "dev-only-link-secret-refused-in-production"
# Outside production, without HILO_LINK_SECRET: a random secret made on first start.
LINK_SECRET_FILE = "link-secret"


class ChannelSettings(BaseSettings):
    # An empty variable is no value (compose passes every setting, empty when unset).
    model_config = SettingsConfigDict(
        env_prefix="HILO_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    # Production refuses dev secrets (hilo.settings.Settings extends this class).
    environment: Literal["development", "test", "production"] = "development"
    state_dir: Path = Field(
        Path(".hilo"),
        description="Where `hilo dev` keeps its files, and where the link secret is made "
        "outside production when HILO_LINK_SECRET is not set.",
    )
    public_url: str = Field(
        "http://127.0.0.1:8000",
        description="Where providers and customers reach Hilo's public endpoints (webhooks, "
        "links); Twilio signs its callbacks over this URL. Required in production; elsewhere "
        "Settings makes it the API's own address (HILO_API_HOST, HILO_API_PORT).",
    )
    link_secret: SecretStr | None = Field(
        None,
        description=f"Signs unsubscribe, preference, click and open links; at least "
        f"{MIN_SECRET_LENGTH} characters. Required in production; elsewhere a random secret is "
        f"made in state_dir/{LINK_SECRET_FILE} on first start and kept.",
    )
    link_previous_secrets: list[SecretStr] = Field(
        default_factory=list,
        description="Earlier link secrets, as JSON, still accepted after a rotation.",
    )
    preference_topics: list[Topic] = Field(
        default_factory=list,
        description="What the preference page offers, as JSON: "
        '[{"key": "new-arrivals", "name": "New arrivals"}].',
    )

    email_provider: Literal["capture", "smtp", "sendgrid"] = "capture"
    sms_provider: Literal["capture", "twilio"] = "capture"
    whatsapp_provider: Literal["capture", "twilio", "whatsapp_cloud"] = "capture"
    push_provider: Literal["capture", "fcm"] = "capture"
    webpush_provider: Literal["capture", "vapid"] = "capture"
    audience_provider: Literal["capture", "meta", "google_ads"] = "capture"
    provider_timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS

    smtp_host: str = ""
    smtp_port: int = 587
    smtp_username: str = ""
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = True
    smtp_from: str = ""

    sendgrid_api_key: SecretStr | None = None
    sendgrid_base_url: str = "https://api.sendgrid.com"
    sendgrid_from: str = ""
    # "Verification Key" of SendGrid's Signed Event Webhook: a public key, not a secret.
    sendgrid_webhook_public_key: str = ""

    twilio_account_sid: str = ""
    twilio_auth_token: SecretStr | None = None
    twilio_from: str = ""
    twilio_whatsapp_from: str = ""
    twilio_messaging_service_sid: str = ""
    twilio_base_url: str = "https://api.twilio.com"
    twilio_status_callback_url: str = ""

    whatsapp_cloud_token: SecretStr | None = None
    whatsapp_cloud_phone_number_id: str = ""
    whatsapp_cloud_base_url: str = "https://graph.facebook.com"
    whatsapp_cloud_api_version: str = "v25.0"
    whatsapp_app_secret: SecretStr | None = None  # signs Meta's webhook bodies
    whatsapp_verify_token: SecretStr | None = None  # ours, echoed by Meta's GET handshake

    fcm_service_account_file: Path | None = None
    fcm_service_account_json: SecretStr | None = None
    fcm_project_id: str = ""  # empty: the service account's project
    fcm_base_url: str = "https://fcm.googleapis.com"
    fcm_token_url: str = ""  # empty: the service account's token_uri

    vapid_private_key: SecretStr | None = None
    vapid_subject: str = ""
    webpush_ttl_seconds: int = 24 * 3600

    webhook_url: str = Field(
        "",
        description="Where hand-offs go by webhook; a webhook step posts to its own url.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Signs every webhook (X-Hilo-Signature). Webhook steps need it: without "
        "it the worker refuses to start while a published journey has one, and refuses "
        "such a send rather than sending it unsigned.",
    )

    meta_access_token: SecretStr | None = None
    meta_base_url: str = "https://graph.facebook.com"
    meta_api_version: str = "v25.0"

    google_ads_developer_token: SecretStr | None = None
    google_ads_customer_id: str = ""
    google_ads_login_customer_id: str = ""
    # OAuth2 client and refresh token: access tokens last an hour and are refreshed from it.
    google_ads_client_id: str = ""
    google_ads_client_secret: SecretStr | None = None
    google_ads_refresh_token: SecretStr | None = None
    google_ads_token_url: str = GOOGLE_TOKEN_URL
    google_ads_base_url: str = "https://googleads.googleapis.com"
    google_ads_api_version: str = "v26"

    @field_validator("public_url")
    @classmethod
    def _web_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{value!r} is not an http(s) URL; give the base URL customers and providers "
                "reach Hilo at, e.g. https://hilo.example.com"
            )
        return value.rstrip("/")

    @field_validator("link_secret", "link_previous_secrets")
    @classmethod
    def _long_enough(cls, value: SecretStr | list[SecretStr] | None) -> Any:
        for secret in value if isinstance(value, list) else [value]:
            if secret is not None and len(secret.get_secret_value()) < MIN_SECRET_LENGTH:
                raise ValueError(
                    f"needs at least {MIN_SECRET_LENGTH} characters of random text, for "
                    "example from python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        return value

    @model_validator(mode="after")
    def _no_dev_link_secret(self) -> ChannelSettings:
        secret = self.link_secret.get_secret_value() if self.link_secret else None
        if secret == DEV_LINK_SECRET:
            raise ValueError(
                "HILO_LINK_SECRET is a placeholder published in Hilo's source; set a random "
                "secret of your own, or leave it unset outside production"
            )
        return self

    def link_problems(self) -> list[str]:
        """In production, one line per link setting missing: links made without them would
        not work for anyone who receives them. Empty elsewhere."""
        if self.environment != "production":
            return []
        problems = []
        host = urlsplit(self.public_url).hostname or ""
        if "public_url" not in self.model_fields_set:
            problems.append(
                "HILO_PUBLIC_URL is not set; links and webhooks would point at "
                f"{self.public_url}, which only this machine can reach: set the https URL "
                "customers and providers reach Hilo at"
            )
        elif host in ("localhost", "::1") or host.startswith("127."):
            problems.append(
                f"HILO_PUBLIC_URL is {self.public_url}, which only this machine can reach; "
                "set the URL customers and providers reach Hilo at"
            )
        if not _secret(self.link_secret):
            problems.append(
                "HILO_LINK_SECRET is not set; production signs its unsubscribe and tracking "
                f"links with a secret of its own, at least {MIN_SECRET_LENGTH} characters"
            )
        return problems

    def link_signer(self) -> LinkSigner:
        """Signs and checks our links under ``public_url``.

        Raises ValueError with :meth:`link_problems`, one line each, when there are any.
        """
        problems = self.link_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return LinkSigner(
            _secret(self.link_secret) or state_link_secret(self.state_dir),
            self.public_url,
            previous_secrets=[_secret(old) for old in self.link_previous_secrets],
        )


def state_link_secret(state_dir: Path) -> str:
    """The link secret kept in ``state_dir``, made on first use: random, readable by its
    owner only, and the same on every later start so links already sent keep working."""
    path = state_dir / LINK_SECRET_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        draft = state_dir / f".{LINK_SECRET_FILE}.{os.getpid()}"
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(draft, path)  # whole or absent: an API and a worker may start together
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                draft.unlink()
    secret = path.read_text().strip()
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"{path} holds no usable link secret (under {MIN_SECRET_LENGTH} characters); "
            "delete it to make a new one (links already sent stop working) or set HILO_LINK_SECRET"
        )
    return secret


def build_providers(settings: ChannelSettings) -> dict[str, ChannelProvider]:
    """The configured real provider per channel; channels left on capture are omitted.

    Raises ValueError naming the HILO_ variables each chosen provider is missing, a line
    per provider.
    """
    builders: dict[str, tuple[str, Callable[[ChannelSettings], ChannelProvider]]] = {}
    if settings.email_provider == "smtp":
        builders["email"] = ("HILO_EMAIL_PROVIDER=smtp", _smtp)
    elif settings.email_provider == "sendgrid":
        builders["email"] = ("HILO_EMAIL_PROVIDER=sendgrid", _sendgrid)
    if settings.sms_provider == "twilio":
        builders["sms"] = ("HILO_SMS_PROVIDER=twilio", _twilio_sms)
    if settings.whatsapp_provider == "twilio":
        builders["whatsapp"] = ("HILO_WHATSAPP_PROVIDER=twilio", _twilio_whatsapp)
    elif settings.whatsapp_provider == "whatsapp_cloud":
        builders["whatsapp"] = ("HILO_WHATSAPP_PROVIDER=whatsapp_cloud", _whatsapp_cloud)
    if settings.push_provider == "fcm":
        builders["push"] = ("HILO_PUSH_PROVIDER=fcm", _fcm)
    if settings.webpush_provider == "vapid":
        builders["webpush"] = ("HILO_WEBPUSH_PROVIDER=vapid", _webpush)
    if settings.webhook_url or settings.webhook_secret:
        builders["webhook"] = ("HILO_WEBHOOK_URL", _webhook)
    if settings.audience_provider == "meta":
        builders["audience"] = ("HILO_AUDIENCE_PROVIDER=meta", _meta)
    elif settings.audience_provider == "google_ads":
        builders["audience"] = ("HILO_AUDIENCE_PROVIDER=google_ads", _google_ads)

    providers: dict[str, ChannelProvider] = {}
    problems: list[str] = []
    for channel, (choice, build) in builders.items():
        try:
            providers[channel] = build(settings)
        except _Missing as missing:
            problems.append(f"{choice} needs {', '.join(missing.names)}; set it or choose capture")
        except ValueError as error:
            problems.append(f"{choice}: {error}")
    if problems:
        for provider in providers.values():
            close = getattr(provider, "close", None)
            if close is not None:
                close()
        raise ValueError("\n".join(problems))
    return providers


class _Missing(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


def _require(settings: ChannelSettings, *fields: str) -> None:
    """Fail with every missing field at once; ``a|b`` means either will do."""
    missing = []
    for field in fields:
        alternatives = field.split("|")
        if not any(getattr(settings, name) for name in alternatives):
            missing.append(" or ".join(f"HILO_{name.upper()}" for name in alternatives))
    if missing:
        raise _Missing(missing)


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value else ""


def _smtp(settings: ChannelSettings) -> ChannelProvider:
    _require(settings, "smtp_host", "smtp_from")
    return SmtpEmail(
        settings.smtp_host,
        settings.smtp_port,
        sender=settings.smtp_from,
        username=settings.smtp_username or None,
        password=_secret(settings.smtp_password) or None,
        starttls=settings.smtp_starttls,
        timeout=settings.provider_timeout_seconds,
    )


def _sendgrid(settings: ChannelSettings) -> ChannelProvider:
    _require(settings, "sendgrid_api_key", "sendgrid_from")
    return SendGridEmail(
        _secret(settings.sendgrid_api_key),
        sender=settings.sendgrid_from,
        base_url=settings.sendgrid_base_url,
        timeout=settings.provider_timeout_seconds,
    )


def _twilio_sms(settings: ChannelSettings) -> ChannelProvider:
    _require(
        settings,
        "twilio_account_sid",
        "twilio_auth_token",
        "twilio_from|twilio_messaging_service_sid",
    )
    return _twilio(settings, "sms", settings.twilio_from)


def _twilio_whatsapp(settings: ChannelSettings) -> ChannelProvider:
    _require(
        settings,
        "twilio_account_sid",
        "twilio_auth_token",
        "twilio_whatsapp_from|twilio_messaging_service_sid",
    )
    return _twilio(settings, "whatsapp", settings.twilio_whatsapp_from)


def _twilio(
    settings: ChannelSettings, channel: Literal["sms", "whatsapp"], sender: str
) -> ChannelProvider:
    return TwilioMessages(
        settings.twilio_account_sid,
        _secret(settings.twilio_auth_token),
        channel=channel,
        sender=sender or None,
        messaging_service_sid=settings.twilio_messaging_service_sid or None,
        status_callback_url=settings.twilio_status_callback_url or None,
        base_url=settings.twilio_base_url,
        timeout=settings.provider_timeout_seconds,
    )


def _whatsapp_cloud(settings: ChannelSettings) -> ChannelProvider:
    _require(settings, "whatsapp_cloud_token", "whatsapp_cloud_phone_number_id")
    return WhatsAppCloud(
        _secret(settings.whatsapp_cloud_token),
        settings.whatsapp_cloud_phone_number_id,
        base_url=settings.whatsapp_cloud_base_url,
        api_version=settings.whatsapp_cloud_api_version,
        timeout=settings.provider_timeout_seconds,
    )


def _fcm(settings: ChannelSettings) -> ChannelProvider:
    _require(settings, "fcm_service_account_json|fcm_service_account_file")
    try:
        if settings.fcm_service_account_json:
            account = ServiceAccount.from_json(_secret(settings.fcm_service_account_json))
        else:
            assert settings.fcm_service_account_file is not None  # _require saw one of the two
            account = ServiceAccount.from_file(settings.fcm_service_account_file)
    except (OSError, ValueError) as error:
        raise ValueError(
            "HILO_FCM_SERVICE_ACCOUNT_JSON or HILO_FCM_SERVICE_ACCOUNT_FILE is not a usable "
            f"service-account key (the JSON file Firebase lets you download): {error}"
        ) from error
    return FcmPush(
        account,
        project_id=settings.fcm_project_id or None,
        base_url=settings.fcm_base_url,
        token_url=settings.fcm_token_url or None,
        timeout=settings.provider_timeout_seconds,
    )


def _webpush(settings: ChannelSettings) -> ChannelProvider:
    _require(settings, "vapid_private_key", "vapid_subject")
    try:
        return WebPush(
            _secret(settings.vapid_private_key),
            settings.vapid_subject,
            ttl_seconds=settings.webpush_ttl_seconds,
            timeout=settings.provider_timeout_seconds,
        )
    except ValueError as error:
        raise ValueError(f"HILO_VAPID_PRIVATE_KEY or HILO_VAPID_SUBJECT: {error}") from error


def _webhook(settings: ChannelSettings) -> ChannelProvider:
    _require(settings, "webhook_secret")
    return SignedWebhook(
        settings.webhook_url,
        _secret(settings.webhook_secret),
        timeout=settings.provider_timeout_seconds,
    )


def _meta(settings: ChannelSettings) -> ChannelProvider:
    _require(settings, "meta_access_token")
    return MetaCustomAudiences(
        _secret(settings.meta_access_token),
        base_url=settings.meta_base_url,
        api_version=settings.meta_api_version,
        timeout=settings.provider_timeout_seconds,
    )


def _google_ads(settings: ChannelSettings) -> ChannelProvider:
    _require(
        settings,
        "google_ads_developer_token",
        "google_ads_customer_id",
        "google_ads_client_id",
        "google_ads_client_secret",
        "google_ads_refresh_token",
    )
    return GoogleAdsCustomerMatch(
        _secret(settings.google_ads_developer_token),
        settings.google_ads_customer_id,
        oauth_credentials(
            settings.google_ads_client_id,
            _secret(settings.google_ads_client_secret),
            _secret(settings.google_ads_refresh_token),
            settings.google_ads_token_url,
        ),
        login_customer_id=settings.google_ads_login_customer_id or None,
        base_url=settings.google_ads_base_url,
        api_version=settings.google_ads_api_version,
        timeout=settings.provider_timeout_seconds,
    )
