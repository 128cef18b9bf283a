"""What a template may do: escape what customers wrote into HTML, sign only its own links,
and cost bounded work (loop and output limits, checked off the API's event loop)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from activities.journey_activities import JourneyActivities
from api.app import create_app
from hilo.channels.smtp import SmtpEmail
from hilo.db.store import Store
from hilo.events import CustomerEvent
from hilo.feedback.links import LinkSigner, rewrite_links
from hilo.intake.routing import EventRouter
from hilo.journeys.definitions import JourneyInvalid
from hilo.journeys.templates import email_parts, render_content
from hilo.journeys.validate import parse_journey
from hilo.settings import Settings
from tests.fakes import FakeSmtpServer
from worker.main import build_worker

TOKEN = "admin-token-for-template-tests"


def journey(*bodies: str, **step: Any) -> dict[str, Any]:
    """A journey of one email step per body."""
    return {
        "key": "heavy",
        "name": "Heavy",
        "trigger": {"event": "Signed Up"},
        "steps": [
            {
                "id": f"email_{index}",
                "type": "send",
                "channel": "email",
                "category": "transactional",
                "template": f"email_{index}",
                "subject": "Hello",
                "body": body,
                **step,
            }
            for index, body in enumerate(bodies)
        ],
    }


def problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(JourneyInvalid) as caught:
        parse_journey(raw)
    return [(problem.path, problem.message) for problem in caught.value.problems]


@pytest.fixture
async def api(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(_env_file=None, admin_token=TOKEN), store)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://hilo",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    ) as client:
        yield client


# --- limits -------------------------------------------------------------------------------------

HUGE_LOOP = "{% for i in (1..5000000) %}{{ i }}{% endfor %}"


@pytest.mark.parametrize("route", ["/journeys/validate", "/journeys"])
async def test_a_huge_loop_fails_fast_naming_the_field_and_the_limit(
    api: httpx.AsyncClient, route: str
) -> None:
    started = time.monotonic()
    response = await api.post(route, json=journey("Hi", HUGE_LOOP))
    elapsed = time.monotonic() - started

    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["path"] == "steps[1] (email_1).body"
    assert "loops would run more than 10,000 times" in problem["message"]
    assert "limit: 50" in problem["message"]  # what would be right
    # Without the limit this took seconds (3.6 s on an idle machine).
    assert elapsed < 1.0, f"took {elapsed:.2f} s"


def test_loops_side_by_side_count_together() -> None:
    # Each loop alone is under the limit, nested or not; together they are not.
    three_loops = "{% for i in (1..4000) %}{% endfor %}" * 3
    assert problems(journey(three_loops)) == [
        (
            "steps[0] (email_0).body",
            "template is too heavy: its loops would run more than 10,000 times in all; "
            "loop over fewer items, e.g. {% for item in items limit: 50 %}",
        )
    ]
    assert parse_journey(journey("{% for i in (1..4000) %}{% endfor %}" * 2)).key == "heavy"


def test_output_and_assigned_variables_are_bounded() -> None:
    line = "x" * 200
    many_lines = "{% for i in (1..6000) %}" + line + "{% endfor %}"
    doubling = (
        '{% assign text = "xxxxxxxxxx" %}{% for i in (1..20) %}'
        "{% assign text = text | append: text %}{% endfor %}{{ text | size }}"
    )
    assert problems(journey(many_lines, doubling)) == [
        (
            "steps[0] (email_0).body",
            "template is too heavy: it renders more than 1,000,000 bytes; a message needs far less",
        ),
        (
            "steps[1] (email_1).body",
            "template is too heavy: its assign and capture variables hold more than "
            "1,000,000 bytes; keep what a template builds small",
        ),
    ]


def test_a_limit_reached_with_the_sample_names_the_sms_field() -> None:
    raw = journey("Hi")
    raw["sample"] = {"profile": {"traits": {"orders": list(range(20_000))}}}
    raw["steps"] = [
        {
            "id": "sms_orders",
            "type": "send",
            "channel": "sms",
            "template": "orders",
            "body": "{% for order in profile.traits.orders %}{{ order }}{% endfor %}",
        }
    ]
    [(path, message)] = problems(raw)
    assert path == "steps[0] (sms_orders).body"
    assert "more than 10,000 times" in message


# --- the API stays responsive -------------------------------------------------------------------

# Just under the limit: 9,900 iterations a step, and eighty steps of it (2 s on an idle machine).
HEAVY_BUT_ALLOWED = "{% for i in (1..99) %}{% for j in (1..99) %}{{ j }}{% endfor %}{% endfor %}"


async def test_health_answers_while_a_heavy_journey_is_checked(api: httpx.AsyncClient) -> None:
    heavy = journey(*[HEAVY_BUT_ALLOWED] * 80)
    latencies: list[float] = []

    async def validate() -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = await api.post("/journeys/validate", json=heavy)
        return response, time.monotonic() - started

    async def probe_health() -> None:
        while not checking.done():
            started = time.monotonic()
            response = await api.get("/health")
            latencies.append(time.monotonic() - started)
            assert response.status_code == 200
            await asyncio.sleep(0.02)

    checking = asyncio.create_task(validate())
    await asyncio.gather(checking, probe_health())
    response, took = checking.result()

    assert response.status_code == 200, response.text
    assert response.json()["steps"] == 80
    assert max(latencies) < 0.5, (
        f"/health took up to {max(latencies):.2f} s while a {took:.2f} s check ran"
    )
    assert took > 1.0, f"the check took only {took:.2f} s: too light to show anything"
    assert len(latencies) >= 5, latencies


# --- a customer's data in an email ---------------------------------------------------------------

EVIL_LINK = '<a href="https://evil.example/x">Claim</a>'
SCRIPT = "<script>alert(1)</script>"
BASE = "https://hilo.shop.example"
signer = LinkSigner("a-link-secret-for-template-tests-0123456789", BASE)
UNSUBSCRIBE = signer.unsubscribe_url("msg_1", "42", "email")

HTML_BODY = (
    "<p>Hi {{ customer.first_name }}, {{ customer.note }}</p>"
    '<p><a href="https://shop.example/cart?id=7&amp;src=mail">Your cart</a></p>'
    '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'
)


class Page(HTMLParser):
    """What a mail client reads: the anchors, the scripts and the text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.scripts = 0
        self.text = ""
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.append(dict(attrs).get("href") or "")
        self.scripts += tag == "script"

    def handle_data(self, data: str) -> None:
        self.text += data


def context(**traits: Any) -> dict[str, Any]:
    return {
        "customer": traits,
        "profile": {"traits": traits},
        "trigger": {"properties": {}},
        "unsubscribe_url": UNSUBSCRIBE,
    }


def sent_email(body: str, **traits: Any) -> dict[str, str]:
    """The parts a marketing email goes out with, as the send activity builds them."""
    content = {"subject": "Hi {{ customer.first_name }}", "body": body}
    parts = email_parts(render_content("email", "t", content, context(**traits)), content)
    if "html" in parts:
        parts["html"] = rewrite_links(parts["html"], "msg_1", signer, template=body)
    return parts


def click_targets(html: str) -> list[str]:
    return [
        signer.click_target(href.rsplit("/", 1)[1])
        for href in Page(html).hrefs
        if href.startswith(f"{BASE}/l/c/")
    ]


def test_a_customers_markup_is_text_in_the_html_and_its_link_is_not_signed() -> None:
    parts = sent_email(HTML_BODY, first_name=EVIL_LINK, note=SCRIPT)
    page = Page(parts["html"])

    assert "&lt;a href=&#34;https://evil.example/x&#34;&gt;Claim&lt;/a&gt;" in parts["html"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in parts["html"]
    assert page.scripts == 0 and "https://evil.example/x" not in page.hrefs
    assert f"Hi {EVIL_LINK}, {SCRIPT}" in page.text  # what the customer sees: the name as typed
    # The template's link is tracked, the signed unsubscribe link works as it is, and the
    # customer's link is signed nowhere.
    assert click_targets(parts["html"]) == ["https://shop.example/cart?id=7&src=mail"]
    assert page.hrefs[1] == UNSUBSCRIBE
    assert "evil.example" not in "".join(
        signer.verify(href.rsplit("/", 1)[1], "click").target_url or ""
        for href in page.hrefs
        if href.startswith(f"{BASE}/l/c/")
    )
    # The text part and the subject are plain: the name as typed, no entities.
    assert parts["text"].startswith(f"Hi {EVIL_LINK}, {SCRIPT}")
    assert parts["subject"] == f"Hi {EVIL_LINK}"


def test_a_plain_text_body_stays_text_whatever_the_name_holds() -> None:
    body = (
        "Hi {{ customer.first_name }}, your cart: https://shop.example/cart\n{{ unsubscribe_url }}"
    )
    parts = sent_email(body, first_name=EVIL_LINK)
    assert "html" not in parts
    assert parts["text"].startswith(f"Hi {EVIL_LINK}, your cart")


@pytest.mark.parametrize(
    ("channel", "content"),
    [
        ("sms", {"body": "Hi {{ customer.first_name }}"}),
        ("push", {"title": "Hi {{ customer.first_name }}", "body": "{{ customer.first_name }}"}),
        ("whatsapp", {"body": "Hi {{ customer.first_name }}"}),
    ],
)
def test_messages_other_than_html_email_are_not_escaped(
    channel: str, content: dict[str, str]
) -> None:
    name = 'Tom & "Jerry" <3'
    rendered = render_content(channel, "t", content, context(first_name=name))
    assert all(name in value for value in rendered.values()), rendered


def test_only_links_whose_host_the_template_writes_are_tracked() -> None:
    body = (
        '<a href="https://shop.example/p/{{ customer.product_id }}">Product</a>'
        '<a href="{{ customer.product_url }}">Product page</a>'
        '<a href="https://{{ customer.shop }}/">Shop</a>'
        '<a href="https://shop.example{{ customer.path }}">Path</a>'
        "<p>{{ customer.fragment | safe }}</p>"
    )
    parts = sent_email(
        body,
        product_id='7?a="b"',
        product_url="https://evil.example/p",
        shop="evil.example",
        path=".evil.example/x",
        fragment='<a href="https://evil.example/safe">Trusted fragment</a>',
    )
    # The written host is tracked, with the customer's part escaped into the href.
    assert click_targets(parts["html"]) == ['https://shop.example/p/7?a="b"']
    # Hosts from data stay as they are, unsigned; so does a link in a `safe` fragment.
    assert Page(parts["html"]).hrefs[1:] == [
        "https://evil.example/p",
        "https://evil.example/",
        "https://shop.example.evil.example/x",
        "https://evil.example/safe",
    ]


# --- the same through a real send ----------------------------------------------------------------

WELCOME_HTML = """
key: html_welcome
name: HTML welcome
trigger:
  event: Signed Up
sample:
  profile:
    traits: {first_name: Ana, email: ana@example.com}
    consent: {email: true}
steps:
  - id: welcome_email
    type: send
    channel: email
    template: welcome_html
    subject: "Welcome, {{ profile.traits.first_name }}"
    body: >-
      <html><body><p>Hi {{ profile.traits.first_name }}!</p>
      <p><a href="https://shop.example/new">New arrivals</a></p>
      <p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p></body></html>
"""


async def test_an_email_sent_over_smtp_escapes_the_name_and_signs_only_its_links(
    time_env: WorkflowEnvironment, store: Store
) -> None:
    from hilo.catalog import JourneyCatalog
    from hilo.journeys.validate import load_journey_yaml

    smtp = FakeSmtpServer().start()
    queue = f"template-safety-{uuid.uuid4().hex[:8]}"
    activities = JourneyActivities(
        store,
        providers={
            "email": SmtpEmail(
                "127.0.0.1", smtp.port, sender="Shop <news@shop.example>", starttls=False
            )
        },
        links=signer,
    )
    try:
        JourneyCatalog(store).publish(load_journey_yaml(WELCOME_HTML))
        store.upsert_profile(
            "42",
            traits={"email": "ana@example.com", "first_name": f"{EVIL_LINK}{SCRIPT}"},
            consent={"email": True},
        )
        router = EventRouter(store, time_env.client, queue)
        async with build_worker(time_env.client, store, queue, activities=activities):
            route = await router.route(
                CustomerEvent(
                    name="Signed Up", customer_id="42", timestamp=await time_env.get_current_time()
                )
            )
            [handle] = route.handles.values()
            await handle.result()
    finally:
        smtp.stop()

    [envelope] = smtp.mailbox.envelopes
    mail = message_from_bytes(envelope.original_content or b"", policy=policy.default)
    assert isinstance(mail, EmailMessage)
    parts = {part.get_content_type(): str(part.get_content()) for part in mail.iter_parts()}
    html, text = parts["text/html"], parts["text/plain"]

    page = Page(html)
    assert "&lt;a href=&#34;https://evil.example/x&#34;&gt;" in html
    assert page.scripts == 0 and "<script>" not in html
    assert click_targets(html) == ["https://shop.example/new"]
    assert not any("evil.example" in href for href in page.hrefs)
    assert sum(href.startswith(f"{BASE}/l/u/") for href in page.hrefs) == 1
    assert f"Hi {EVIL_LINK}{SCRIPT}!" in text
    assert str(mail["Subject"]).strip() == f"Welcome, {EVIL_LINK}{SCRIPT}"  # folded
