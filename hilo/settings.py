"""Settings, read once from ``HILO_*`` environment variables and passed down.

One object for every process: :class:`Settings` extends the channel settings (providers,
credentials, links; :mod:`hilo.channels.config`) with where Hilo runs, so the API and the
worker read the same values the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import SettingsConfigDict

from hilo.channels.config import ChannelSettings
from hilo.intake.sources import DEV_SOURCE, WriteKeySource, named_source

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


class Settings(ChannelSettings):
    # An empty variable is no value (compose passes every setting, empty when unset).
    model_config = SettingsConfigDict(
        env_prefix="HILO_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    database_url: str = Field(
        "", description="SQLAlchemy URL; empty means a SQLite file in state_dir."
    )
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
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
