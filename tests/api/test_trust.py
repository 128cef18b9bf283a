"""What a write key may do: a client source's key is public, a server source's a secret.

With a client key, a call that would merge two known customers, change an identified
customer's email, take another customer's device or grant consent is stored, but that change
is not applied, and the customer's timeline says so and why. With a server key the same
calls are applied, each on the timeline with its source; consent the customer withdrew
comes back only with the proof the server states. On SQLite and PostgreSQL, through the API.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError
from sqlmodel import col, select

from api.app import create_app
from api.routes.feedback import ONE_CLICK_SOURCE, PREFERENCE_PAGE_SOURCE, feedback_router
from hilo.db.models import ConsentChange, StoredEvent
from hilo.db.store import Store
from hilo.feedback.links import LinkSigner
from hilo.intake.sources import WriteKeySource
from hilo.settings import DEV_WRITE_KEY, Settings
from tests.helpers.feedback import (
    LINK_SECRET,
    PUBLIC,
    TWILIO_TOKEN,
    seed,
    token_of,
    twilio_post,
)

ADMIN_TOKEN = "admin-token-for-trust-tests"
CLIENT, SERVER = "pk-web", "sk-shop"
# The first form (a bare name) beside the second: the bare name is a client source.
WRITE_KEYS: dict[str, Any] = {CLIENT: "web", SERVER: {"name": "shop", "kind": "server"}}
PROOF = "double opt-in confirmed by the link in the welcome email, 2026-12-01"


def basic(write_key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()}


@pytest.fixture
def channels() -> Settings:
    return Settings(
        _env_file=None,
        public_url=PUBLIC,
        link_secret=SecretStr(LINK_SECRET),
        twilio_auth_token=SecretStr(TWILIO_TOKEN),
    )


@pytest.fixture
def signer(channels: Settings) -> LinkSigner:
    return channels.link_signer()


@pytest.fixture
async def api(any_store: Store, channels: Settings) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(_env_file=None, admin_token=ADMIN_TOKEN, write_keys=WRITE_KEYS)
    app = create_app(settings, any_store)
    app.include_router(feedback_router)
    app.state.channel_settings = channels
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url=PUBLIC,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as client:
        yield client


async def send(api: httpx.AsyncClient, key: str, kind: str, **call: Any) -> None:
    response = await api.post(f"/v1/{kind}", json=call, headers=basic(key))
    assert response.status_code == 200, response.text


async def profile(api: httpx.AsyncClient, customer: str) -> dict[str, Any]:
    response = await api.get(f"/profiles/{customer}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def profile_changes(api: httpx.AsyncClient, customer: str) -> set[tuple[str, bool, str]]:
    response = await api.get(f"/profiles/{customer}/timeline")
    assert response.status_code == 200, response.text
    return {
        (entry["summary"], entry["data"]["applied"], entry["source"])
        for entry in response.json()
        if entry["kind"] == "profile_change"
    }


async def vera_and_mal(api: httpx.AsyncClient, signer: LinkSigner) -> None:
    """Vera, a known customer with a push token and an email she left with one click; Mal,
    a customer who has the public key too."""
    await send(
        api,
        SERVER,
        "identify",
        userId="vera",
        traits={"email": "vera@example.com", "first_name": "Vera"},
        context={"device": {"token": "fcm-vera", "type": "ios"}},
    )
    await send(api, SERVER, "identify", userId="mal", traits={"email": "mal@evil.example"})
    token = token_of(signer.unsubscribe_url("msg-vera", "vera", "email"))
    left = await api.post(f"/l/u/{token}", data={"List-Unsubscribe": "One-Click"})
    assert left.status_code == 200


def takeover(prefix: str) -> list[dict[str, Any]]:
    """One batch: page views around the three ways to take Vera over."""
    return [
        {"type": "page", "anonymousId": "anon-1", "name": "Home", "messageId": f"{prefix}-1"},
        {
            "type": "identify",
            "userId": "vera",
            "traits": {
                "email": "vera@evil.example",
                "last_name": "Lopez",
                "consent": {"email": True},
            },
            "messageId": f"{prefix}-2",
        },
        {
            "type": "track",
            "userId": "mal",
            "event": "App Opened",
            "context": {"device": {"token": "fcm-vera"}},
            "messageId": f"{prefix}-3",
        },
        {"type": "alias", "previousId": "vera", "userId": "mal", "messageId": f"{prefix}-4"},
        {"type": "page", "anonymousId": "anon-1", "name": "Cart", "messageId": f"{prefix}-5"},
    ]


def stored_ids(store: Store) -> set[str]:
    with store.session() as session:
        return set(session.exec(select(StoredEvent.message_id)))


async def test_a_client_key_cannot_take_over_a_known_customer(
    api: httpx.AsyncClient, any_store: Store, signer: LinkSigner
) -> None:
    await vera_and_mal(api, signer)
    response = await api.post("/v1/batch", json={"batch": takeover("c")}, headers=basic(CLIENT))
    assert response.status_code == 200, response.text
    # The calls are kept, the page views with them.
    assert {f"c-{n}" for n in range(1, 6)} <= stored_ids(any_store)

    vera = await profile(api, "vera")
    assert vera["customer_id"] == "vera", "merged into the alias's customer"
    assert vera["traits"]["email"] == "vera@example.com"
    assert vera["traits"]["last_name"] == "Lopez"  # enriching is allowed
    assert vera["consent"] == {"email": False}
    assert [device["address"] for device in vera["devices"]] == ["fcm-vera"]
    emails = {i["value"]: i["source"] for i in vera["identities"] if i["kind"] == "email"}
    assert emails == {"vera@example.com": "shop"}
    mal = await profile(api, "mal")
    assert mal["merged_from"] == [] and mal["devices"] == []

    refused = "from client source 'web' not applied: needs a server source"
    assert await profile_changes(api, "vera") == {
        (f"email change {refused}", False, "web"),
        (f"email consent grant {refused}", False, "web"),
        (f"push device move from 'vera' to 'mal' {refused}", False, "web"),
        (f"merge of known customer 'vera' into 'mal' {refused}", False, "web"),
    }

    # What a client source may still do: an anonymous visitor's profile, its address set
    # the first time, merged into the customer who signs in; and withdrawing consent.
    await send(api, CLIENT, "identify", anonymousId="anon-1", traits={"email": "new@example.com"})
    await send(api, CLIENT, "identify", userId="nina", anonymousId="anon-1")
    await send(
        api,
        CLIENT,
        "identify",
        userId="nina",
        traits={"phone": "+15550100", "consent": {"sms": False}},
    )
    nina = await profile(api, "nina")
    assert nina["merged_from"] == ["anon-1"]
    assert (nina["traits"]["email"], nina["traits"]["phone"]) == ("new@example.com", "+15550100")
    assert nina["consent"] == {"sms": False}
    assert await profile_changes(api, "nina") == set()


async def test_a_server_key_may_change_a_known_customer_on_the_record(
    api: httpx.AsyncClient, any_store: Store, signer: LinkSigner
) -> None:
    await vera_and_mal(api, signer)
    response = await api.post("/v1/batch", json={"batch": takeover("s")}, headers=basic(SERVER))
    assert response.status_code == 200, response.text
    assert {f"s-{n}" for n in range(1, 6)} <= stored_ids(any_store)

    # Vera is now Mal's: the alias merged her, after her address changed and her device
    # moved; her email consent stays withdrawn, as no proof came with the grant.
    merged = await profile(api, "vera")
    assert merged["customer_id"] == "mal" and merged["merged_from"] == ["vera"]
    assert merged["traits"]["email"] == "mal@evil.example"  # the known profile's traits win
    assert [device["address"] for device in merged["devices"]] == ["fcm-vera"]
    assert merged["consent"] == {"email": False}
    with any_store.session() as session:
        grants = session.exec(select(ConsentChange).where(col(ConsentChange.granted)))
        assert list(grants) == []

    withdrew = f"{ONE_CLICK_SOURCE}: unsubscribe link in message msg-vera"
    assert await profile_changes(api, "vera") == {
        ("email change by server source 'shop'", True, "shop"),
        ("push device move from 'vera' to 'mal' by server source 'shop'", True, "shop"),
        ("merge of known customer 'vera' into 'mal' by server source 'shop'", True, "shop"),
        (
            "email consent grant from server source 'shop' not applied: the customer withdrew "
            f"it ({withdrew}); state the proof in context.consent.source (1 to 500 characters)",
            False,
            "shop",
        ),
    }


WITHDRAWALS = ["one-click unsubscribe", "preference page", "STOP reply"]


async def withdraw(
    api: httpx.AsyncClient, store: Store, signer: LinkSigner, how: str
) -> tuple[str, str]:
    """Vera withdraws her consent for a channel herself: that channel and the source."""
    if how == "one-click unsubscribe":
        token = token_of(signer.unsubscribe_url("msg-vera", "vera", "email"))
        left = await api.post(f"/l/u/{token}", data={"List-Unsubscribe": "One-Click"})
        assert left.status_code == 200
        return "email", ONE_CLICK_SOURCE
    if how == "preference page":
        token = token_of(signer.preferences_url("vera"))
        left = await api.post(f"/l/p/{token}", data={"frequency": "normal", "opt_out": "yes"})
        assert left.status_code == 200
        return "email", PREFERENCE_PAGE_SOURCE
    seed(store, "sms-vera", customer_id="vera", channel="sms", provider="twilio")
    stop = {"MessageSid": "pm_sms-vera", "MessageStatus": "undelivered", "ErrorCode": "21610"}
    assert (await twilio_post(api, stop)).status_code == 200
    return "sms", "twilio"


@pytest.mark.parametrize("how", WITHDRAWALS)
async def test_withdrawn_consent_comes_back_only_with_the_servers_proof(
    api: httpx.AsyncClient, any_store: Store, signer: LinkSigner, how: str
) -> None:
    # A withdrawal stated as a plain trait is a plain trait's to undo.
    for source, granted in ((SERVER, True), (CLIENT, False), (SERVER, True)):
        sms = {"email": "vera@example.com", "consent": {"sms": granted}}
        await send(api, source, "identify", userId="vera", traits=sms)
    history = [(c["granted"], c["source"]) for c in (await profile(api, "vera"))["consent_history"]]
    assert history == [(True, "shop"), (False, "web"), (True, "shop")]

    channel, withdrawn_by = await withdraw(api, any_store, signer, how)
    assert (await profile(api, "vera"))["consent"][channel] is False

    again = {"consent": {channel: True}}
    await send(api, SERVER, "identify", userId="vera", traits=again, messageId="plain")
    await send(api, CLIENT, "identify", userId="vera", traits=again, messageId="client")
    vera = await profile(api, "vera")
    assert vera["consent"][channel] is False
    assert vera["consent_history"][-1]["source"] == withdrawn_by
    [server, client] = sorted(
        await profile_changes(api, "vera"), key=lambda change: change[2] != "shop"
    )
    assert server[0].startswith(
        f"{channel} consent grant from server source 'shop' not applied: the customer "
        f"withdrew it ({withdrawn_by}"
    )
    assert server[0].endswith("state the proof in context.consent.source (1 to 500 characters)")
    assert server[1:] == (False, "shop")
    assert client == (
        f"{channel} consent grant from client source 'web' not applied: needs a server source",
        False,
        "web",
    )

    # An empty proof is no proof.
    bad = {"consent": {"source": ""}}
    await send(api, SERVER, "identify", userId="vera", traits=again, context=bad)
    assert (await profile(api, "vera"))["consent"][channel] is False

    proof = {"consent": {"source": PROOF}}
    await send(api, SERVER, "identify", userId="vera", traits=again, context=proof)
    vera = await profile(api, "vera")
    assert vera["consent"][channel] is True
    last = vera["consent_history"][-1]
    assert (last["channel"], last["granted"], last["source"], last["detail"]) == (
        channel,
        True,
        "shop",
        PROOF,
    )


def test_write_keys_name_their_source_and_its_kind() -> None:
    settings = Settings(_env_file=None, write_keys=WRITE_KEYS)
    assert settings.sources == {
        CLIENT: WriteKeySource(name="web", kind="client"),
        SERVER: WriteKeySource(name="shop", kind="server"),
    }
    # The development key is a server source, so the dev flow can do everything.
    development = Settings(_env_file=None).sources
    assert development == {DEV_WRITE_KEY: WriteKeySource(name="development", kind="server")}
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, write_keys={"k": {"name": "web", "kind": "public"}})
    assert "write_keys.k.kind" in str(refused.value)
    assert "'client' or 'server'" in str(refused.value)


def test_the_migration_matches_the_table(any_store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    with any_store.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        differences = [
            difference
            for difference in compare_metadata(context, SQLModel.metadata)
            if "profile_changes" in repr(difference)
        ]
    assert differences == []
