"""Event names: what Hilo emits (one list, documented), what journeys listen to, and the
links and traits a journey shares with the preference page and the contact policy."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from api.app import create_app
from api.routes.feedback import feedback_router
from hilo.catalog import JourneyCatalog
from hilo.cli.app import app as cli
from hilo.clock import utcnow
from hilo.db.models import Message
from hilo.db.store import Store
from hilo.devtools.simulation import JourneyLab
from hilo.events import EMITTED_EVENTS, PREFERENCES_UPDATED, UNSUBSCRIBED
from hilo.feedback.deliveries import (
    DELIVERY_EVENTS,
    ENGAGEMENT_EVENTS,
    ENGAGEMENT_FALLBACK,
    current_preferences,
)
from hilo.feedback.links import LinkSigner
from hilo.intake.acceptance import EVENT_NAMES
from hilo.intake.dispatcher import Dispatcher
from hilo.journeys.validate import parse_journey
from hilo.policy import ContactPolicyService, SendIntent
from hilo.settings import DEV_LINK_SECRET, PROJECT_ROOT, Settings
from tests.helpers.examples import EXAMPLES, example

# Where the workers of a lab sign their links (no settings: the development secret).
LAB_LINKS = "http://127.0.0.1:8000"


# ---------------------------------------------------------------- one list, documented


def test_docs_list_exactly_the_events_hilo_emits() -> None:
    text = (PROJECT_ROOT / "docs" / "events.md").read_text()
    table = text.split("| Event | When |\n|---|---|\n", 1)[1].split("\n\n", 1)[0]
    rows = [re.fullmatch(r"\| (.+?) \| (.+) \|", line) for line in table.splitlines()]
    assert all(rows), table
    assert {row[1]: row[2] for row in rows if row} == EMITTED_EVENTS


def test_every_event_hilo_produces_is_in_the_list() -> None:
    produced = {
        *ENGAGEMENT_EVENTS.values(),
        *ENGAGEMENT_FALLBACK.values(),
        *DELIVERY_EVENTS.values(),
        *EVENT_NAMES.values(),
        UNSUBSCRIBED,
        PREFERENCES_UPDATED,
    }
    assert produced == EMITTED_EVENTS.keys()
    # Segment's Email spec, word for word.
    assert {"Email Delivered", "Email Opened", "Email Link Clicked", "Email Bounced"} <= produced
    assert {"Email Marked as Spam", "Unsubscribed"} <= produced


# ---------------------------------------------------------------- the publish warning

WAITS_FOR_OTHER_NAMES = {
    "key": "names",
    "name": "Names",
    "trigger": {"event": "Cart Abandoned"},
    "exit": [{"event": "Order Completed"}],
    "sample": {"profile": {"traits": {"email": "ana@example.com"}}},
    "steps": [
        {
            "id": "reply",
            "type": "wait_for",
            "timeout": "1d",
            "events": [
                {"event": "Email Clicked"},
                {"event": "App Opened"},
                {"event": "Email Link Clicked"},
                {"event": "Preferences Updated"},
            ],
        }
    ],
}


def test_publish_warns_about_event_names_nothing_produces(store: Store) -> None:
    catalog = JourneyCatalog(store)
    definition = parse_journey(WAITS_FOR_OTHER_NAMES)
    assert [str(warning) for warning in catalog.check(definition).warnings] == [
        "trigger.event: no 'Cart Abandoned' event has reached Hilo yet, and neither Hilo nor "
        "Segment's specs produce one: check the name your sources send",
        "steps[0] (reply).events[0].event: no 'Email Clicked' event has reached Hilo yet, and "
        "neither Hilo nor Segment's specs produce one: check the name your sources send; "
        "Segment's spec names it 'Email Link Clicked'",
        "steps[0] (reply).events[1].event: no 'App Opened' event has reached Hilo yet, and "
        "neither Hilo nor Segment's specs produce one: check the name your sources send; "
        "Segment's spec names it 'Application Opened'",
    ]
    # Once a source has sent one, the name is known.
    store.record_event("evt-1", "42", "Cart Abandoned", {}, utcnow(), "api")
    published = catalog.publish_if_changed(definition)
    assert published.created
    assert [w.split(":", 1)[0] for w in published.warnings] == [
        "steps[0] (reply).events[0].event",
        "steps[0] (reply).events[1].event",
    ]


def test_journeys_validate_prints_the_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HILO_STATE_DIR", str(tmp_path / "state"))
    text = (EXAMPLES / "journeys" / "win_back.yaml").read_text()
    journey = tmp_path / "win_back.yaml"
    journey.write_text(text.replace("event: Application Opened", "event: App Opened"))
    result = CliRunner().invoke(cli, ["journeys", "validate", str(journey)])
    assert result.exit_code == 0, result.output
    assert "warning: steps[2] (first_reply).on_timeout[1] (second_reply).events[2].event: " in (
        result.output
    )
    assert "Segment's spec names it 'Application Opened'" in result.output


def test_the_examples_listen_only_to_names_something_produces(store: Store) -> None:
    warned = {
        re.search(r"no '([^']+)' event", warning)[1]  # type: ignore[index]
        for published in JourneyCatalog(store).publish_folder(EXAMPLES / "journeys")
        for warning in published.warnings
    }
    # The shop's and the help desk's own events, and segments (not in Hilo yet): no
    # misspelt spec name, no name only another tool sends.
    assert warned == {
        "Cart Abandoned",
        "Order Delivered",
        "Ticket Closed",
        "Ticket Reopened",
        "Survey Answered",
        "Segment Entered",
    }


# ---------------------------------------------------------------- journeys on Hilo's own events


@pytest.fixture
async def links_api(lab: JourneyLab) -> AsyncIterator[httpx.AsyncClient]:
    """Hilo's public link routes over the lab's store, signing as the lab's workers do."""
    api = create_app(Settings(_env_file=None, admin_token="t"), lab.store)
    api.include_router(feedback_router)
    api.state.channel_settings = Settings(_env_file=None)
    api.state.link_signer = LinkSigner(DEV_LINK_SECRET, LAB_LINKS)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api), base_url=LAB_LINKS
    ) as client:
        yield client


async def sent(store: Store, customer_id: str, template: str) -> Message:
    for _ in range(200):
        found = [m for m in store.messages(customer_id=customer_id) if m.template == template]
        if found and found[0].status == "sent":
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {template} sent to {customer_id}")


async def test_win_back_offer_follows_hilos_own_click(
    lab: JourneyLab, links_api: httpx.AsyncClient
) -> None:
    customer = "names.win_back_click"
    lab.store.upsert_profile(customer, traits={"first_name": "Ana", "email": "ana@example.com"})
    lab.publish(example("win_back"))
    begin = await lab.now()
    [workflow_id] = (await lab.send("Segment Entered", customer, segment="inactive_90d")).started
    email = await sent(lab.store, customer, "win_back_we_miss_you")

    # The customer follows a tracked link of that email: Hilo's click route records the
    # click, and the dispatcher takes the event it became to the waiting journey.
    signer = LinkSigner(DEV_LINK_SECRET, LAB_LINKS)
    click = signer.click_url(email.message_id, "https://shop.example/new")
    response = await links_api.get(click.removeprefix(LAB_LINKS))
    assert response.status_code == 302
    delivered, _due = await Dispatcher(lab.store, lab.router).dispatch_once()
    assert delivered == 1

    result = await lab.result(workflow_id)
    assert result.status == "completed"
    assert lab.timeline(customer, begin) == [
        "+0s email win_back_we_miss_you clicked",
        "+1d email win_back_offer",
        "+1d end completed",
    ]


async def test_template_links_render_and_verify(
    lab: JourneyLab, links_api: httpx.AsyncClient
) -> None:
    customer = "names.links"
    lab.store.upsert_profile(customer, traits={"first_name": "Ana", "email": "ana@example.com"})
    lab.publish(example("win_back"))
    [workflow_id] = (await lab.send("Segment Entered", customer, segment="inactive_90d")).started
    email = await sent(lab.store, customer, "win_back_we_miss_you")
    await lab.client.get_workflow_handle(workflow_id).terminate("test done")

    body = email.content["body"]
    preferences = re.search(r"how often: (\S+)", body)
    pause = re.search(r"Pause us for a month: (\S+)", body)
    assert preferences and pause, body
    signer = LinkSigner(DEV_LINK_SECRET, LAB_LINKS)
    for url in (preferences[1], pause[1]):
        path = url.removeprefix(LAB_LINKS + "/l/p/")
        token = path.split("#", 1)[0]
        assert signer.verify(token, "preferences").customer_id == customer
    assert pause[1].endswith("#pause")
    page = await links_api.get(pause[1].removeprefix(LAB_LINKS).split("#", 1)[0])
    assert page.status_code == 200 and '<fieldset id="pause">' in page.text


async def test_win_back_writes_the_preferences_the_contact_policy_reads(
    lab: JourneyLab,
) -> None:
    customer = "names.win_back_silent"
    lab.store.upsert_profile(
        customer,
        traits={"email": "ana@example.com", "preferences": {"topics": ["sales"]}},
        consent={"push": True},
    )
    lab.publish(example("win_back"))
    begin = await lab.now()
    [workflow_id] = (await lab.send("Segment Entered", customer, segment="inactive_90d")).started
    result = await lab.result(workflow_id)
    assert result.reason == "no response, monthly from now on"
    # The customer's own topics stay; the frequency is one the page offers.
    assert current_preferences(lab.store, customer).frequency == "monthly"
    assert current_preferences(lab.store, customer).topics == ["sales"]

    # The next marketing email within the month is skipped for that reason.
    decision = ContactPolicyService(lab.store).decide(
        SendIntent(
            message_id="names.next_campaign",
            customer_id=customer,
            journey_key="newsletter",
            channel="email",
            category="marketing",
            address="ana@example.com",
        ),
        begin + timedelta(days=15),
    )
    assert (decision.outcome, decision.rule) == ("skip", "preferences.frequency")
    assert "the customer chose monthly email" in decision.reason


def test_a_journey_writes_only_preferences_the_policy_reads(store: Store) -> None:
    raw = {
        "key": "lower",
        "name": "Lower",
        "trigger": {"event": "Order Completed"},
        "steps": [
            {
                "id": "lower",
                "type": "update_profile",
                "set": {"preferences.frequency": "low", "preferences": {"paused": True}},
            }
        ],
    }
    problems = JourneyCatalog(store).check(parse_journey(raw)).problems
    assert [str(problem) for problem in problems] == [
        "steps[0] (lower).set.preferences.frequency: 'low' is not a frequency the contact "
        "policy knows; use one of normal, weekly, monthly",
        "steps[0] (lower).set.preferences.paused: the contact policy reads no preference "
        "'paused'; a journey may set preferences.frequency (normal, weekly, monthly) or "
        "preferences.topics",
    ]


def test_a_send_signs_only_the_links_its_templates_name() -> None:
    signer = LinkSigner(DEV_LINK_SECRET, LAB_LINKS)
    plain = signer.message_links("m1", "42", "email", templates=["Bye {{ unsubscribe_url }}"])
    assert list(plain) == ["unsubscribe_url"]
    both = signer.message_links("m1", "42", "email", templates=["{{ pause_url }}"])
    assert list(both) == ["unsubscribe_url", "pause_url"]
    assert list(signer.message_links("m1", "42", "email")) == [
        "unsubscribe_url",
        "preferences_url",
        "pause_url",
    ]
