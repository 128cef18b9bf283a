"""Settings, read once from ``HILO_*`` environment variables and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_ADMIN_TOKEN = "dev-admin-token"
DEV_WRITE_KEY = "dev-write-key"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class WriteKeySource(BaseModel):
    """The source a write key stands for. A client source's key ships in a page or an app,
    so anyone may send with it; a server source's key is a secret of the brand's backend."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=100, examples=["web"])
    kind: Literal["client", "server"] = "client"


def _named_source(value: object) -> object:
    # The first form named the source only: it gets the kind that can do least.
    return {"name": value} if isinstance(value, str) else value


DEV_SOURCE = WriteKeySource(name="development", kind="server")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HILO_", env_file=".env", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    state_dir: Path = Field(Path(".hilo"), description="Where `hilo dev` keeps its files.")
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
    write_keys: dict[str, Annotated[WriteKeySource, BeforeValidator(_named_source)]] = Field(
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

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Settings:
        if self.environment == "production" and self.admin_token == DEV_ADMIN_TOKEN:
            raise ValueError(
                "HILO_ADMIN_TOKEN is the development placeholder; set a secret token for production"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'hilo.db').resolve()}"
