"""Secrets outside and inside production: the link secret a state folder makes for itself, and
write keys compared in constant time."""

from __future__ import annotations

import hmac
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from api import deps
from hilo.db.store import Store
from hilo.feedback.links import LinkRejected, LinkSigner
from hilo.settings import DEV_LINK_SECRET, LINK_SECRET_FILE, Settings
from tests.helpers.api import asgi, basic, hilo_app

# ---------------------------------------------------------------- the link secret

SIGN = (
    "import sys; from hilo.settings import Settings; "
    "print(Settings().link_signer().sign('unsubscribe', message_id='m1', customer_id='42', "
    "channel='email'))"
)


def start_and_sign(state: Path) -> str:
    """A fresh process on ``state``, as an API or worker start would be: the token it signs."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("HILO_")}
    env["HILO_STATE_DIR"] = str(state)
    done = subprocess.run(
        [sys.executable, "-c", SIGN], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_each_state_folder_makes_its_own_link_secret_and_keeps_it(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    token = start_and_sign(first)

    secret_file = first / LINK_SECRET_FILE
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32 and secret != DEV_LINK_SECRET
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600  # the owner's alone

    # A second start reads the same secret: links already sent keep working.
    assert start_and_sign(first) != ""
    assert (first / LINK_SECRET_FILE).read_text().strip() == secret
    again = Settings(_env_file=None, state_dir=first).link_signer()
    assert again.verify(token, "unsubscribe").customer_id == "42"

    # Another state folder has a secret of its own, and the published constant signs nothing.
    start_and_sign(second)
    assert (second / LINK_SECRET_FILE).read_text().strip() != secret
    other = Settings(_env_file=None, state_dir=second).link_signer()
    for signer in (other, LinkSigner(DEV_LINK_SECRET, "http://127.0.0.1:8000")):
        with pytest.raises(LinkRejected):
            signer.verify(token, "unsubscribe")


def test_a_given_link_secret_is_used_and_nothing_is_written(tmp_path: Path) -> None:
    given = "a-random-link-secret-of-at-least-32-chars"
    signer = Settings(_env_file=None, state_dir=tmp_path, link_secret=given).link_signer()
    token = signer.sign("open", message_id="m1")
    assert LinkSigner(given, "http://127.0.0.1:8000").verify(token, "open").message_id == "m1"
    assert not (tmp_path / LINK_SECRET_FILE).exists()


def test_an_unusable_link_secret_file_is_named(tmp_path: Path) -> None:
    (tmp_path / LINK_SECRET_FILE).write_text("short\n")
    with pytest.raises(ValueError, match=f"{LINK_SECRET_FILE} holds no usable link secret"):
        Settings(_env_file=None, state_dir=tmp_path).link_signer()


# ---------------------------------------------------------------- write keys

KEYS = {"web-key": "web", "ios-key": "ios", "srv-key": "server"}


async def test_a_write_key_of_the_right_length_but_wrong_is_refused(store: Store) -> None:
    call = {"userId": "k-1", "event": "Product Viewed"}
    async with asgi(hilo_app(store)) as api:
        accepted = await api.post("/v1/track", json=call, headers=basic("web-key"))
        assert accepted.is_success, accepted.text
        for wrong in ("web-kez", "xeb-key", "WEB-KEY"):  # as long as a real one
            refused = await api.post("/v1/track", json=call, headers=basic(wrong))
            assert refused.status_code == 401, wrong
            assert refused.json()["errors"][0]["field"] == "writeKey"


def test_every_configured_write_key_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def constant_time(given: bytes, expected: bytes) -> bool:
        compared.append((given, expected))
        return compare_digest(given, expected)

    monkeypatch.setattr(deps.hmac, "compare_digest", constant_time)
    for given, source in [("web-key", "web"), ("srv-key", "server"), ("srv-kez", None)]:
        compared.clear()
        assert deps.source_for_write_key(KEYS, given) == source
        # All keys, whichever matches or none: the time taken says nothing about the guess.
        assert [expected for _, expected in compared] == [key.encode() for key in KEYS]
    # A key outside ASCII is compared as bytes rather than raising.
    assert deps.source_for_write_key(KEYS, "wéb-key") is None
