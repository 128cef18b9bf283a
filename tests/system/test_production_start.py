"""A production API or worker missing a setting refuses to start, one line per setting.

The entry points run as subprocesses, as a container would run them, with nothing else set
(no ``.env``): what they print is what an operator reads in ``docker compose logs``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hilo.devtools.devserver import free_port
from hilo.settings import Settings

ENTRY_POINTS = {
    "hilo api": ["-m", "hilo.cli", "api"],
    "uvicorn factory": ["-m", "uvicorn", "--factory", "api.app:app_from_env"],
    "hilo worker": ["-m", "hilo.cli", "worker"],
    "worker.main": ["-c", "from worker.main import main; main()"],
}
ROLE = {
    "hilo api": "api",
    "uvicorn factory": "api",
    "hilo worker": "worker",
    "worker.main": "worker",
}
COMPLETE = {
    "HILO_ADMIN_TOKEN": "kQ3v-8xZp_T1mWb7Rj2LcY9sNfH4aGdE",
    "HILO_WRITE_KEYS": '{"wk-web-0123456789": "web"}',
    "HILO_PUBLIC_URL": "https://hilo.shop.example",
    "HILO_LINK_SECRET": "a-random-link-secret-of-at-least-32-chars",
}
# What each role cannot start without, and the start of the line that says so.
NEEDED = {
    "api": {
        "HILO_ADMIN_TOKEN": "HILO_ADMIN_TOKEN is not set",
        "HILO_WRITE_KEYS": "HILO_WRITE_KEYS is not set",
        "HILO_PUBLIC_URL": "HILO_PUBLIC_URL is not set",
        "HILO_LINK_SECRET": "HILO_LINK_SECRET is not set",
    },
    "worker": {
        "HILO_PUBLIC_URL": "HILO_PUBLIC_URL is not set",
        "HILO_LINK_SECRET": "HILO_LINK_SECRET is not set",
    },
}


def start(entry: str, given: dict[str, str], folder: Path) -> tuple[int, list[str], float]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("HILO_")}
    env |= {
        "HILO_ENVIRONMENT": "production",
        "HILO_DATABASE_URL": f"sqlite:///{folder / 'hilo.db'}",
        "HILO_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",  # nothing there: never reached
        "HILO_API_PORT": str(free_port()),
        **given,
    }
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, *ENTRY_POINTS[entry]],
        env=env,
        cwd=folder,  # no .env file here
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"{entry} did not refuse to start:\n{output}") from None
    return process.returncode, output.strip().splitlines(), time.monotonic() - started


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_production_refuses_to_start_without_its_settings(entry: str, tmp_path: Path) -> None:
    returncode, lines, _ = start(entry, {}, tmp_path)
    needed = NEEDED[ROLE[entry]]
    assert returncode != 0
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    assert len(lines) == len(needed), "\n".join(lines)
    for variable, line in zip(needed, lines, strict=True):
        assert line.startswith(needed[variable]), f"{variable}: {line}"


@pytest.mark.parametrize(
    ("entry", "missing"),
    [
        (entry, variable)
        for entry in ("hilo api", "hilo worker")
        for variable in NEEDED[ROLE[entry]]
    ],
)
def test_each_missing_setting_has_its_line(entry: str, missing: str, tmp_path: Path) -> None:
    given = {name: value for name, value in COMPLETE.items() if name != missing}
    returncode, lines, elapsed = start(entry, given, tmp_path)
    assert returncode != 0
    assert len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith(NEEDED[ROLE[entry]][missing]), lines[0]
    assert elapsed < 30


RULE = "at least 32 characters with at least 8 different ones"


@pytest.mark.parametrize("token", ["a", ""])
def test_a_weak_admin_token_is_refused_with_the_rule(token: str, tmp_path: Path) -> None:
    returncode, lines, _ = start("hilo api", {**COMPLETE, "HILO_ADMIN_TOKEN": token}, tmp_path)
    assert returncode != 0
    assert len(lines) == 1, "\n".join(lines)
    # Empty is no value (compose passes unset settings empty): the token is not set at all.
    assert lines[0].startswith(
        "HILO_ADMIN_TOKEN is too easy to guess" if token else "HILO_ADMIN_TOKEN is not set"
    ), lines[0]
    assert RULE in lines[0], lines[0]


@pytest.mark.parametrize(
    "token",
    [
        "a" * 64,  # long, one character
        "ab" * 32,  # long, two characters
        "0123456789abcdefghijklmnopqrstu",  # 31 different characters, one short
    ],
)
def test_admin_tokens_too_easy_to_guess(token: str) -> None:
    settings = Settings(_env_file=None, environment="production", admin_token=token)
    assert [line for line in settings.production_problems("api") if "ADMIN" in line] == [
        f"HILO_ADMIN_TOKEN is too easy to guess; use {RULE}, for example from "
        "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    ]


def test_random_admin_tokens_pass() -> None:
    import secrets

    for token in [secrets.token_urlsafe(32), secrets.token_hex(16), COMPLETE["HILO_ADMIN_TOKEN"]]:
        settings = Settings(_env_file=None, environment="production", admin_token=token)
        assert not [line for line in settings.production_problems("api") if "ADMIN" in line]


def test_a_loopback_public_url_is_refused(tmp_path: Path) -> None:
    given = {**COMPLETE, "HILO_PUBLIC_URL": "http://127.0.0.1:8000"}
    returncode, lines, _ = start("hilo worker", given, tmp_path)
    assert returncode != 0
    assert lines == [
        "HILO_PUBLIC_URL is http://127.0.0.1:8000, which only this machine can reach; set the "
        "URL customers and providers reach Hilo at"
    ]


def test_a_worker_missing_its_providers_settings_says_which(tmp_path: Path) -> None:
    given = {**COMPLETE, "HILO_EMAIL_PROVIDER": "sendgrid", "HILO_SMS_PROVIDER": "twilio"}
    returncode, lines, _ = start("hilo worker", given, tmp_path)
    assert returncode != 0
    assert lines == [
        "HILO_EMAIL_PROVIDER=sendgrid needs HILO_SENDGRID_API_KEY, HILO_SENDGRID_FROM; "
        "set it or choose capture",
        "HILO_SMS_PROVIDER=twilio needs HILO_TWILIO_ACCOUNT_SID, HILO_TWILIO_AUTH_TOKEN, "
        "HILO_TWILIO_FROM or HILO_TWILIO_MESSAGING_SERVICE_SID; set it or choose capture",
    ]


def test_one_check_for_both_roles() -> None:
    settings = Settings(_env_file=None, environment="production")
    api = settings.production_problems("api")
    worker = settings.production_problems("worker")
    assert [line.split(" ", 1)[0] for line in api] == list(NEEDED["api"])
    assert worker == [line for line in api if line.split(" ", 1)[0] in NEEDED["worker"]]
    assert Settings(_env_file=None).production_problems("api") == []  # development
