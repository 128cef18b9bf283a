"""Which provider each channel uses, and its credentials, from ``HILO_*`` environment variables.

Every channel defaults to ``capture`` (messages are recorded, nothing leaves Hilo), so a
fresh install never messages a real customer. Base URLs default to the providers' real
hosts and exist so tests can point them at local servers.

The settings themselves are :class:`hilo.settings.Settings`; this module builds providers
from them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from pydantic import SecretStr

if TYPE_CHECKING:
    from hilo.settings import Settings

from hilo.channels.audiences import (
    GoogleAdsCustomerMatch,
    MetaCustomAudiences,
    oauth_credentials,
)
from hilo.channels.base import ChannelProvider
from hilo.channels.fcm import FcmPush, ServiceAccount
from hilo.channels.sendgrid import SendGridEmail
from hilo.channels.smtp import SmtpEmail
from hilo.channels.twilio import TwilioMessages
from hilo.channels.webhook import SignedWebhook
from hilo.channels.webpush import WebPush
from hilo.channels.whatsapp_cloud import WhatsAppCloud

__all__ = ["build_providers"]


def build_providers(settings: Settings) -> dict[str, ChannelProvider]:
    """The configured real provider per channel; channels left on capture are omitted.

    Raises ValueError naming the HILO_ variables each chosen provider is missing, a line
    per provider.
    """
    builders: dict[str, tuple[str, Callable[[Settings], ChannelProvider]]] = {}
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


def _require(settings: Settings, *fields: str) -> None:
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


def _smtp(settings: Settings) -> ChannelProvider:
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


def _sendgrid(settings: Settings) -> ChannelProvider:
    _require(settings, "sendgrid_api_key", "sendgrid_from")
    return SendGridEmail(
        _secret(settings.sendgrid_api_key),
        sender=settings.sendgrid_from,
        base_url=settings.sendgrid_base_url,
        timeout=settings.provider_timeout_seconds,
    )


def _twilio_sms(settings: Settings) -> ChannelProvider:
    _require(
        settings,
        "twilio_account_sid",
        "twilio_auth_token",
        "twilio_from|twilio_messaging_service_sid",
    )
    return _twilio(settings, "sms", settings.twilio_from)


def _twilio_whatsapp(settings: Settings) -> ChannelProvider:
    _require(
        settings,
        "twilio_account_sid",
        "twilio_auth_token",
        "twilio_whatsapp_from|twilio_messaging_service_sid",
    )
    return _twilio(settings, "whatsapp", settings.twilio_whatsapp_from)


def _twilio(
    settings: Settings, channel: Literal["sms", "whatsapp"], sender: str
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


def _whatsapp_cloud(settings: Settings) -> ChannelProvider:
    _require(settings, "whatsapp_cloud_token", "whatsapp_cloud_phone_number_id")
    return WhatsAppCloud(
        _secret(settings.whatsapp_cloud_token),
        settings.whatsapp_cloud_phone_number_id,
        base_url=settings.whatsapp_cloud_base_url,
        api_version=settings.whatsapp_cloud_api_version,
        timeout=settings.provider_timeout_seconds,
    )


def _fcm(settings: Settings) -> ChannelProvider:
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


def _webpush(settings: Settings) -> ChannelProvider:
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


def _webhook(settings: Settings) -> ChannelProvider:
    _require(settings, "webhook_secret")
    return SignedWebhook(
        settings.webhook_url,
        _secret(settings.webhook_secret),
        timeout=settings.provider_timeout_seconds,
    )


def _meta(settings: Settings) -> ChannelProvider:
    _require(settings, "meta_access_token")
    return MetaCustomAudiences(
        _secret(settings.meta_access_token),
        base_url=settings.meta_base_url,
        api_version=settings.meta_api_version,
        timeout=settings.provider_timeout_seconds,
    )


def _google_ads(settings: Settings) -> ChannelProvider:
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
