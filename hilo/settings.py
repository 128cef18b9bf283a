"""Settings, read once from ``HILO_*`` environment variables and passed down.

One object for every process, the API, the worker and the command line alike: where Hilo
runs (database, Temporal, the API), who may send (write keys, the admin token), each channel's
provider and credentials (built into providers by :mod:`hilo.channels.registry`), and the
links (public URL, signing secrets). Variables are flat ``HILO_*`` names, as deployments and
the compose file set them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hilo.channels.audiences import GOOGLE_TOKEN_URL
from hilo.channels.base import DEFAULT_TIMEOUT_SECONDS
from hilo.feedback.links import MIN_SECRET_LENGTH, LinkSigner
from hilo.feedback.preferences import Topic
from hilo.intake.sources import DEV_SOURCE, WriteKeySource, named_source

# Signs links in simulations and tests, which run without settings. Published, so anyone
# could mint links with it: refused as HILO_LINK_SECRET in every environment.
DEV_LINK_SECRET = "dev-only-link-secret-refused-in-production"
# Outside production, without HILO_LINK_SECRET: a random secret made on first start.
LINK_SECRET_FILE = "link-secret"

DEV_ADMIN_TOKEN = "dev-admin-token"
DEV_WRITE_KEY = "dev-write-key"
# What production asks of the admin token: a guess at it reaches every customer's data.
MIN_ADMIN_TOKEN_LENGTH = 32
MIN_ADMIN_TOKEN_DISTINCT = 8
ADMIN_TOKEN_RULE = (
    f"at least {MIN_ADMIN_TOKEN_LENGTH} characters with at least {MIN_ADMIN_TOKEN_DISTINCT} "
    "different ones, for example from python -c 'import secrets; print(secrets.token_urlsafe(32))'"
)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    # An empty variable is no value (compose passes every setting, empty when unset).
    model_config = SettingsConfigDict(
        env_prefix="HILO_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    # Production refuses dev secrets .
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
        description="Signs every webhook (Standard Webhooks: a whsec_ secret, or any text). "
        "Webhook steps need it: without "
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
    def _no_dev_link_secret(self) -> Settings:
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

    database_url: str = Field(
        "", description="SQLAlchemy URL; empty means a SQLite file in state_dir."
    )
    # The Temporal connection: a profile of Temporal's own environment configuration (TOML
    # profiles and TEMPORAL_* variables: address, namespace, TLS, mTLS, API key), with these
    # HILO_* values on top when they are set.
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_profile: str = Field(
        "", description="Profile of Temporal's config file to connect with; empty: 'default'."
    )
    temporal_config_file: Path | None = Field(
        None, description="Temporal's TOML config file; unset: TEMPORAL_CONFIG_FILE or its home."
    )
    temporal_api_key: SecretStr | None = Field(
        None, description="API key for Temporal Cloud (or TEMPORAL_API_KEY / the profile's)."
    )
    temporal_ui_port: int = 8233
    task_queue: str = "hilo-journeys"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    admin_token: str = DEV_ADMIN_TOKEN
    examples_dir: Path = PROJECT_ROOT / "examples" / "journeys"
    max_concurrent_activities: int = 100
    workflow_sandbox: bool = Field(
        False,
        description="Run the journey interpreter in Temporal's workflow sandbox: a guard for "
        "changes to the interpreter itself, at about a quarter of the worker's CPU.",
    )
    write_keys: dict[str, Annotated[WriteKeySource, BeforeValidator(named_source)]] = Field(
        default_factory=dict,
        description="Segment write key -> source, as JSON: "
        '{"k3y": {"name": "web", "kind": "client"}, "s3cret": {"name": "shop", "kind": '
        '"server"}}; a bare name ({"k3y": "web"}) is a client source. Development adds '
        "dev-write-key -> development, a server source.",
    )
    dispatcher: bool = Field(
        True, description="Run the outbox dispatcher in the API process (one holds the lease)."
    )
    playbook_file: Path | None = Field(
        None,
        description="Brand playbook (YAML) every journey must keep at publish; none by default.",
    )
    event_wait_seconds: float = Field(
        5.0, description="How long POST /events waits for its routing before answering 202."
    )

    @property
    def sources(self) -> dict[str, WriteKeySource]:
        """Write key -> source."""
        if self.environment != "production" and not self.write_keys:
            return {DEV_WRITE_KEY: DEV_SOURCE}
        return dict(self.write_keys)

    @property
    def api_url(self) -> str:
        """Where the API answers on this machine (a wildcard host means the loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
            self.api_host, self.api_host
        )
        if ":" in host:  # an IPv6 address goes in brackets in a URL
            host = f"[{host}]"
        return f"http://{host}:{self.api_port}"

    def production_problems(self, role: Literal["api", "worker"]) -> list[str]:
        """One line per setting ``role`` cannot run without in production; empty elsewhere.

        The API needs its admin token and Segment write keys; both make links, so both need
        the public URL and the link secret.
        """
        if self.environment != "production":
            return []
        problems = []
        if role == "api":
            if self.admin_token == DEV_ADMIN_TOKEN:
                problems.append(
                    "HILO_ADMIN_TOKEN is not set (or is the development placeholder); the admin "
                    f"routes need a secret bearer token of your own: {ADMIN_TOKEN_RULE}"
                )
            elif weak_token(self.admin_token):
                problems.append(f"HILO_ADMIN_TOKEN is too easy to guess; use {ADMIN_TOKEN_RULE}")
            if not self.write_keys:
                problems.append(
                    "HILO_WRITE_KEYS is not set; every Segment call would be refused: give each "
                    'source its write key and kind, as JSON: {"<write key>": {"name": "web", '
                    '"kind": "client"}}'
                )
        return problems + self.link_problems()

    def refuse_to_start_without(self, role: Literal["api", "worker"]) -> None:
        """Exit with :meth:`production_problems`, a line each and no traceback, if any.

        For a process's start, before it serves or polls anything: an API that says ok on
        /health and then refuses every call is worse than one that does not start.
        """
        problems = self.production_problems(role)
        if problems:
            raise SystemExit("\n".join(problems))

    @model_validator(mode="after")
    def _links_follow_the_api(self) -> Settings:
        # Outside production, links point at this machine's API unless HILO_PUBLIC_URL says
        # otherwise: a fixed :8000 would make every link dead on another HILO_API_PORT.
        if self.environment != "production" and "public_url" not in self.model_fields_set:
            self.public_url = self.api_url
            self.model_fields_set.discard("public_url")  # still derived, not given
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'hilo.db').resolve()}"


def weak_token(token: str) -> bool:
    """Shorter than :data:`MIN_ADMIN_TOKEN_LENGTH`, or of fewer than
    :data:`MIN_ADMIN_TOKEN_DISTINCT` different characters (``aaaa…``, ``abab…``, ``1234…``).
    A random token passes: 32 hex digits show fewer than 8 of the 16 about once in 30 million."""
    return len(token) < MIN_ADMIN_TOKEN_LENGTH or len(set(token)) < MIN_ADMIN_TOKEN_DISTINCT


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


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""
