"""The Temporal connection comes from Temporal's own environment configuration (a TOML
profile, TEMPORAL_* variables), with the HILO_* settings on top when they are set."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from hilo.settings import Settings
from worker.main import connect, connect_config

PROFILES = """
[profile.default]
address = "temporal.internal:7233"
namespace = "shop"

[profile.cloud]
address = "shop.a1b2c.tmprl.cloud:7233"
namespace = "shop.a1b2c"
api_key = "key-from-the-profile"
[profile.cloud.tls]
server_name = "shop.a1b2c.tmprl.cloud"
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "TEMPORAL_API_KEY", "TEMPORAL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "temporal.toml"
    path.write_text(PROFILES)
    return path


def test_a_profile_gives_the_address_and_namespace(config_file: Path) -> None:
    config = connect_config(Settings(_env_file=None, temporal_config_file=config_file))
    assert config["target_host"] == "temporal.internal:7233"
    assert config["namespace"] == "shop"


def test_hilo_settings_that_are_set_win_over_the_profile(config_file: Path) -> None:
    settings = Settings(
        _env_file=None,
        temporal_config_file=config_file,
        temporal_address="127.0.0.1:7999",
        temporal_namespace="hilo",
    )
    config = connect_config(settings)
    assert (config["target_host"], config["namespace"]) == ("127.0.0.1:7999", "hilo")


def test_temporal_cloud_takes_tls_and_an_api_key_from_the_profile_or_hilo(
    config_file: Path,
) -> None:
    cloud = connect_config(
        Settings(_env_file=None, temporal_config_file=config_file, temporal_profile="cloud")
    )
    assert cloud["target_host"] == "shop.a1b2c.tmprl.cloud:7233"
    assert cloud["api_key"] == "key-from-the-profile"
    assert cloud["tls"] is not None and cloud["tls"] is not False
    ours = connect_config(
        Settings(
            _env_file=None,
            temporal_config_file=config_file,
            temporal_profile="cloud",
            temporal_api_key="key-from-hilo",
        )
    )
    assert ours["api_key"] == "key-from-hilo"


def test_temporal_variables_are_read_too(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", "from-env:7233")
    config = connect_config(Settings(_env_file=None, temporal_config_file=config_file))
    assert config["target_host"] == "from-env:7233"


def test_without_any_configuration_it_is_the_local_dev_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "TEMPORAL_API_KEY", "TEMPORAL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None, temporal_config_file=tmp_path / "absent.toml")
    config = connect_config(settings)
    assert (config["target_host"], config["namespace"]) == ("localhost:7233", "default")


async def test_connect_reaches_a_real_server_through_a_profile(
    time_env: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "TEMPORAL_API_KEY", "TEMPORAL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    target = time_env.client.service_client.config.target_host
    path = tmp_path / "temporal.toml"
    path.write_text(f'[profile.default]\naddress = "{target}"\nnamespace = "default"\n')
    client = await connect(Settings(_env_file=None, temporal_config_file=path))
    assert client.namespace == "default"
    assert await client.service_client.check_health()
