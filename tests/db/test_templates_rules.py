"""Per-channel template rules, the brand playbook and promotions, checked at publish."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from api.routes.promotions import router as promotions_router
from hilo.catalog import JourneyCatalog
from hilo.db.store import Store
from hilo.journeys.definitions import JourneyInvalid, JourneyProblem, Sample
from hilo.journeys.templates import (
    SAMPLE_UNSUBSCRIBE_URL,
    check_templates,
    render,
    render_content,
    sample_gaps,
    sample_messages,
)
from hilo.journeys.validate import parse_journey
from hilo.playbook import Playbook, PlaybookInvalid, check_playbook, load_playbook
from hilo.promotions import (
    PromotionIn,
    list_promotions,
    promotion_context,
    promotions_used,
    send_blockers,
    template_context_extras,
    unusable_promotions,
    upsert_promotion,
)
from hilo.settings import Settings
from tests.helpers.examples import EXAMPLES, example

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
TOKEN = "promotions-test-token"
Raw = dict[str, Any]

WHATSAPP_BODY = """\
language: es_AR
text: "Hola {{1}}, tu {{2}} te espera."
params: ["{{ profile.traits.first_name }}", "{{ trigger.properties.product_name }}"]
"""

# A valid journey with one step of each channel; each case breaks one thing in a copy.
BASE: Raw = {
    "key": "rules",
    "name": "Rules",
    "trigger": {"event": "Cart Abandoned"},
    "sample": {
        "profile": {"traits": {"first_name": "Ana"}},
        "trigger": {"properties": {"product_name": "Taza"}},
    },
    "steps": [
        {
            "id": "reminder",
            "type": "send",
            "channel": "email",
            "template": "cart_reminder",
            "subject": "Hola {{ profile.traits.first_name }}",
            "body": "Tu {{ trigger.properties.product_name }} te espera. "
            '<a href="{{ unsubscribe_url }}">Darte de baja</a>',
        },
        {
            "id": "nudge",
            "type": "send",
            "channel": "sms",
            "template": "cart_sms",
            "body": "Hilo: tu carrito te espera. STOP para no recibir más.",
        },
        {
            "id": "push_reminder",
            "type": "send",
            "channel": "push",
            "template": "cart_push",
            "title": "¿Lo pensaste?",
            "body": "Tu carrito sigue aquí.",
        },
        {
            "id": "whatsapp_reminder",
            "type": "send",
            "channel": "whatsapp",
            "template": "cart_reminder",
            "body": WHATSAPP_BODY,
        },
    ],
}

PLAYBOOK = Playbook.model_validate(
    {
        "brand": "Hilo",
        "forbidden_words": {"all": ["garantizado"], "es": ["gratis", "última oportunidad"]},
        "required_elements": {"sms": [{"any_of": ["Hilo", "STOP"], "category": "marketing"}]},
        "max_exclamation_marks": 1,
    }
)


def _changed(index: int, **changes: Any) -> Raw:
    raw = copy.deepcopy(BASE)
    raw["steps"][index].update(changes)
    return raw


def _publish(store: Store, raw: Raw, playbook: Playbook | None = PLAYBOOK) -> int:
    return JourneyCatalog(store, playbook).publish(parse_journey(raw), now=NOW)


def _received(store: Store, name: str) -> None:
    store.record_event(f"evt-{name}", "42", name, {}, NOW, "api")


def _refused(store: Store, raw: Raw, playbook: Playbook | None = PLAYBOOK) -> list[JourneyProblem]:
    with pytest.raises(JourneyInvalid) as refused:
        _publish(store, raw, playbook)
    return refused.value.problems


def _promotion(key: str = "winback20", **terms: Any) -> PromotionIn:
    values: dict[str, Any] = {
        "key": key,
        "code": key.upper(),
        "description": "20% off your next order",
        "discount": "20%",
        "valid_from": NOW - timedelta(days=10),
        "valid_until": NOW + timedelta(days=10),
    }
    return PromotionIn.model_validate(values | terms)


def test_the_base_journey_publishes_under_the_playbook(store: Store) -> None:
    assert _publish(store, BASE) == 1


LONG_SPANISH = "Tu pedido está listo y te espera en la tienda de siempre. " * 5  # 290 chars

CASES = [
    pytest.param(
        _changed(1, body="Hilo: " + LONG_SPANISH),
        "steps[1] (nudge).body",
        # Fits 2 GSM-7 segments, but 'á' makes it UCS-2: 67 characters a segment.
        "5 segments; keep it to 4 segments",
        id="sms-ucs2-over-segment-limit",
    ),
    pytest.param(
        _changed(
            2,
            title="Tu carrito sigue aquí y te espera desde el martes por la tarde, "
            "{{ profile.traits.first_name }}",
        ),
        "steps[2] (push_reminder).title",
        "push title is 67 characters; keep it to 65",
        id="push-title-too-long",
    ),
    pytest.param(
        _changed(3, body=WHATSAPP_BODY.replace(', "{{ trigger.properties.product_name }}"', "")),
        "steps[3] (whatsapp_reminder).body.params",
        "the template text has 2 placeholders but params has 1",
        id="whatsapp-params-mismatch",
    ),
    pytest.param(
        _changed(3, body=WHATSAPP_BODY.replace("{{2}}", "{{3}}")),
        "steps[3] (whatsapp_reminder).body.text",
        "placeholders must be numbered from {{1}} without gaps; got {{1}}, {{3}}",
        id="whatsapp-placeholder-gap",
    ),
    pytest.param(
        _changed(3, body=WHATSAPP_BODY.replace("first_name", "nickname")),
        "steps[3] (whatsapp_reminder).body.params[0]",
        "profile.traits.nickname is undefined",
        id="whatsapp-param-does-not-render",
    ),
    pytest.param(
        _changed(3, body=WHATSAPP_BODY.replace("language: es_AR\n", "")),
        "steps[3] (whatsapp_reminder).body.language",
        "'language' is required",
        id="whatsapp-without-language",
    ),
    pytest.param(
        _changed(0, body="Tu {{ trigger.properties.product_name }} te espera."),
        "steps[0] (reminder).body",
        "a marketing email must link to the customer's unsubscribe page",
        id="marketing-email-without-unsubscribe",
    ),
    pytest.param(
        _changed(0, subject="Envío GRATIS para ti"),
        "steps[0] (reminder).subject",
        "'gratis' is forbidden by the Hilo playbook",
        id="forbidden-word",
    ),
    pytest.param(
        _changed(2, body="¡Tu carrito sigue aquí! ¡No lo pierdas!"),
        "steps[2] (push_reminder).body",
        "body has 2 exclamation marks; the Hilo playbook allows at most 1",
        id="too-many-exclamation-marks",
    ),
    pytest.param(
        _changed(1, body="Tu carrito te espera."),
        "steps[1] (nudge).body",
        "the Hilo playbook requires 'Hilo' or 'STOP' in every marketing sms message",
        id="missing-required-element",
    ),
    pytest.param(
        _changed(2, body="Usa {{ promotions.spring10.code }} hoy."),
        "steps[2] (push_reminder).body",
        "promotion 'spring10' does not exist",
        id="unknown-promotion",
    ),
]


@pytest.mark.parametrize(("raw", "path", "message"), CASES)
def test_each_rule_is_refused_at_publish_with_the_step_path(
    store: Store, raw: Raw, path: str, message: str
) -> None:
    problems = _refused(store, raw)
    assert [problem.path for problem in problems] == [path], problems
    assert message in problems[0].message
    assert store.get_journey("rules") is None


def test_a_transactional_email_needs_no_unsubscribe_link(store: Store) -> None:
    raw = _changed(0, body="Tu pedido está confirmado.", category="transactional")
    assert _publish(store, raw) == 1


def test_forbidden_words_are_whole_words_in_the_journeys_language(store: Store) -> None:
    # 'gratistas' is not 'gratis'; a product named so in the customer's data is not the
    # brand's word; the Spanish list does not apply to an English journey.
    raw = _changed(0, subject="Gratistas {{ trigger.properties.product_name }}")
    raw["sample"]["trigger"]["properties"]["product_name"] = "Taza gratis"
    assert _publish(store, raw) == 1
    english = _changed(0, subject="Gratis means free in Spanish")
    english["sample"]["profile"]["locale"] = "en-GB"
    assert _publish(store, english) == 2
    # Quoted text inside Liquid is the brand's.
    quoted = _changed(0, subject="{{ profile.traits.first_name | default: 'Envío gratis' }}")
    [problem] = _refused(store, quoted)
    assert "'gratis' is forbidden" in problem.message


def test_every_problem_is_reported_at_once(store: Store) -> None:
    raw = _changed(0, subject="Última oportunidad, garantizado", body="Sin enlace.")
    problems = _refused(store, raw)
    assert {(problem.path, problem.message.split(" ")[0]) for problem in problems} == {
        ("steps[0] (reminder).body", "a"),
        ("steps[0] (reminder).subject", "'garantizado',"),
    }


def test_no_playbook_means_no_playbook_rules(store: Store) -> None:
    assert _publish(store, _changed(0, subject="¡¡Gratis!!"), playbook=None) == 1


# ---------------------------------------------------------------- promotions at publish and send


def test_expired_promotion_warns_at_publish_and_skips_the_send(store: Store) -> None:
    upsert_promotion(
        store,
        _promotion(
            valid_from=datetime(2026, 10, 1, tzinfo=UTC),
            valid_until=datetime(2026, 11, 1, tzinfo=UTC),
        ),
    )
    raw = _changed(2, body="Vuelve con {{ promotions.winback20.code }}.")
    _received(store, "Cart Abandoned")  # its trigger is a name Hilo knows: no warning for it
    catalog = JourneyCatalog(store, PLAYBOOK)
    version = catalog.publish(parse_journey(raw), now=NOW)
    assert version == 1
    [warning] = version.warnings
    assert warning.startswith("steps[2] (push_reminder).body: promotion 'winback20' (WINBACK20)")
    assert "expired on 2026-11-01 00:00 UTC" in warning
    again = catalog.publish_if_changed(parse_journey(raw), now=NOW)
    assert (again.version, again.created, again.warnings) == (1, False, [warning])

    content = {"title": "¿Lo pensaste?", "body": raw["steps"][2]["body"]}
    assert send_blockers(store, content, NOW, "push") == (
        "promotion winback20 (WINBACK20) expired on 2026-11-01 00:00 UTC"
    )
    assert send_blockers(store, content, datetime(2026, 10, 15, tzinfo=UTC), "push") is None
    assert send_blockers(store, {"body": "Sin promoción"}, NOW, "push") is None


def test_promotion_not_offered_on_the_channel_is_refused(store: Store) -> None:
    upsert_promotion(store, _promotion(channels=["email"]))
    [problem] = _refused(store, _changed(1, body="Hilo: usa {{ promotions['winback20'].code }}"))
    assert problem.path == "steps[1] (nudge).body"
    assert "promotion 'winback20' is not offered on sms (only email)" in problem.message


def test_promotion_context_renders_in_templates(store: Store) -> None:
    upsert_promotion(store, _promotion())
    upsert_promotion(store, _promotion("email_only", channels=["email"]))
    context = template_context_extras(store, NOW, "push")
    assert set(context["promotions"]) == {"winback20"}
    source = "{{ promotions.winback20.code }}: {{ promotions.winback20.discount }} off"
    assert render(source, context) == "WINBACK20: 20% off"
    [promotion] = context["promotions"].values()
    assert promotion["active"] is True
    assert promotion["valid_until"] == "2026-11-25T12:00:00+00:00"
    later = promotion_context(store, NOW + timedelta(days=30), "push")
    assert later["winback20"]["active"] is False


def test_promotions_used_finds_literal_references_only() -> None:
    sources = [
        "{{ promotions.winback20.code }} {% if promotions['spring'].active %}y{% endif %}",
        "{{ promotions[trigger.properties.offer].code }} {{ trigger.properties.promotions }}",
        "{{ promotions.broken.code ",  # does not parse: found by its text
    ]
    assert promotions_used(sources) == {"winback20", "spring", "broken"}


def test_promotions_on_sqlite_and_postgresql(any_store: Store) -> None:
    first = upsert_promotion(any_store, _promotion(channels=["email", "push"]))
    assert first.valid_until == NOW + timedelta(days=10)
    assert first.valid_until.tzinfo is not None
    replaced = upsert_promotion(any_store, _promotion(code="WINBACK25", discount="25%"))
    upsert_promotion(any_store, _promotion("autumn", valid_from=NOW + timedelta(days=1)))
    [autumn, winback] = list_promotions(any_store)
    assert (autumn.key, winback.key, winback.code, winback.channels) == (
        "autumn",
        "winback20",
        "WINBACK25",
        [],
    )
    assert winback.created_at == first.created_at <= replaced.updated_at
    assert unusable_promotions(any_store, ["winback20", "autumn", "gone"], NOW, "sms") == {
        "autumn": "promotion autumn (AUTUMN) is not valid before 2026-11-16 12:00 UTC",
        "gone": "promotion gone does not exist",
    }


def test_the_migration_matches_the_table(any_store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    with any_store.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        differences = [
            difference
            for difference in compare_metadata(context, SQLModel.metadata)
            if "promotions" in repr(difference)
        ]
    assert differences == []


@pytest.mark.parametrize(
    ("terms", "field", "message"),
    [
        ({"valid_from": "2026-11-01T00:00:00"}, "valid_from", "timezone"),
        ({"valid_until": NOW - timedelta(days=30)}, None, "must be after valid_from"),
        ({"key": "Winback-20"}, "key", "String should match pattern"),
        ({"channels": ["email", "fax"]}, "channels", "'email', 'sms'"),
        ({"code": "WIN BACK"}, "code", "String should match pattern"),
    ],
)
def test_promotion_errors_name_the_field(terms: Raw, field: str | None, message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        _promotion(**terms)
    [error] = refused.value.errors()
    assert (str(error["loc"][0]) if error["loc"] else None) == field
    assert message in error["msg"]


@pytest.fixture
async def api(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.state.settings = Settings(admin_token=TOKEN)
    app.state.store = store
    app.include_router(promotions_router)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://hilo",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as client:
        yield client


async def test_the_promotions_api(api: httpx.AsyncClient) -> None:
    terms = {
        "code": "WINBACK20",
        "discount": "20%",
        "valid_from": "2026-11-01T00:00:00-03:00",
        "valid_until": "2026-12-01T00:00:00-03:00",
        "channels": ["email"],
    }
    created = await api.put("/promotions/winback20", json=terms)
    assert created.status_code == 201, created.text
    assert created.json()["valid_from"] == "2026-11-01T03:00:00Z"
    replaced = await api.put("/promotions/winback20", json=terms | {"discount": "25%"})
    assert replaced.status_code == 200
    listed = (await api.get("/promotions")).json()
    assert [(p["key"], p["discount"]) for p in listed] == [("winback20", "25%")]
    naive = await api.put("/promotions/spring", json=terms | {"valid_until": "2026-12-01T00:00:00"})
    assert naive.status_code == 422
    assert naive.json()["detail"][0]["loc"] == ["body", "valid_until"]
    assert (await api.put("/promotions/Bad-Key", json=terms)).status_code == 422
    assert (await api.get("/promotions/spring")).status_code == 404
    anonymous = await api.get("/promotions", headers={"Authorization": ""})
    assert anonymous.status_code == 401


# ---------------------------------------------------------------- WhatsApp and the playbook file


def test_whatsapp_template_renders_as_providers_read_it() -> None:
    context = {"profile": {"traits": {"first_name": "Ana"}}, "trigger": {"properties": {}}}
    context["trigger"]["properties"]["product_name"] = "Taza"
    content = render_content("whatsapp", "cart_reminder", {"body": WHATSAPP_BODY}, context)
    assert content == {
        "template_name": "cart_reminder",
        "language": "es_AR",
        "params": '["Ana", "Taza"]',
        "body": "Hola Ana, tu Taza te espera.",
    }
    assert json.loads(content["params"]) == ["Ana", "Taza"]
    # Any other body is a text message, rendered as Liquid.
    text = render_content(
        "whatsapp", "reply", {"body": "Hola: {{ profile.traits.first_name }}"}, context
    )
    assert text == {"body": "Hola: Ana"}


def test_the_sample_context_has_the_unsubscribe_url_and_customer(store: Store) -> None:
    raw = _changed(
        0,
        body="Hola {{ customer.first_name }}, baja: {{ unsubscribe_url }} "
        "({{ message.id }}, v{{ journey.version }})",
    )
    assert _publish(store, raw) == 1
    assert SAMPLE_UNSUBSCRIBE_URL.startswith("https://")


def test_the_example_playbook_loads_and_the_example_journeys_keep_it() -> None:
    playbook = load_playbook(EXAMPLES / "playbook.yaml")
    assert playbook is not None and playbook.brand
    for path in sorted((EXAMPLES / "journeys").glob("*.yaml")):
        assert check_playbook(example(path.stem), playbook) == [], path.name
    assert load_playbook(None) is None


def test_an_invalid_playbook_names_its_fields() -> None:
    text = """
forbidden_words: {spanish: [gratis]}
required_elements:
  fax: [STOP]
  sms: [{any_of: []}]
max_exclamation_marks: -1
"""
    with pytest.raises(PlaybookInvalid) as refused:
        Playbook.from_yaml(text, source="playbook.yaml")
    fields = [problem.split(":", 1)[0] for problem in refused.value.problems]
    assert fields == [
        "forbidden_words",
        "required_elements.fax",
        "required_elements.sms[0].any_of",
        "max_exclamation_marks",
    ]
    assert "'spanish' is not a language" in refused.value.problems[0]
    assert str(refused.value).startswith("playbook.yaml: brand playbook is invalid")


def test_publish_folder_publishes_the_examples_with_their_unsubscribe_links(store: Store) -> None:
    published = JourneyCatalog(store).publish_folder(EXAMPLES / "journeys")
    assert [p.created for p in published] == [True] * 5
    # Warned of nothing but the shop's own event names, which no event has carried yet.
    warnings = [w for p in published for w in p.warnings]
    assert warnings and all("event has reached Hilo yet" in w for w in warnings)


# Segment's e-commerce spec, "Order Completed" as its documentation shows it.
SEGMENT_ORDER_COMPLETED: Raw = {
    "checkout_id": "fksdjfsdjfisjf9sdfjsd9f",
    "order_id": "50314b8e9bcf000000000000",
    "affiliation": "Google Store",
    "total": 27.50,
    "subtotal": 22.50,
    "revenue": 25.00,
    "shipping": 3,
    "tax": 2,
    "discount": 2.5,
    "coupon": "hasbros",
    "currency": "USD",
    "products": [
        {
            "product_id": "507f1f77bcf86cd799439011",
            "sku": "45790-32",
            "name": "Monopoly: 3rd Edition",
            "price": 19,
            "quantity": 1,
            "category": "Games",
            "url": "https://www.example.com/product/path",
            "image_url": "https:///www.example.com/product/path.jpg",
        },
        {
            "product_id": "505bd76785ebb509fc183733",
            "sku": "46493-32",
            "name": "Uno Card Game",
            "price": 3,
            "quantity": 2,
            "category": "Games",
        },
    ],
}


def test_the_post_purchase_emails_render_segments_order_completed_in_full() -> None:
    definition = example("post_purchase")
    spec_shaped = definition.model_copy(
        update={
            "sample": Sample(
                profile={"traits": {"first_name": "Ana", "email": "ana@example.com"}},
                trigger={"name": "Order Completed", "properties": SEGMENT_ORDER_COMPLETED},
            )
        }
    )
    # Rendered strictly, every variable each template reads is in Segment's event ...
    assert check_templates(spec_shaped) == []
    # ... including those on paths this event does not take.
    assert sample_gaps(spec_shaped) == []
    rendered = {m.step.id: m.rendered for m in sample_messages(spec_shaped)}
    assert set(rendered) >= {"order_confirmation", "usage_tips", "review_request"}
    confirmation = rendered["order_confirmation"]
    assert confirmation["subject"] == "Order 50314b8e9bcf000000000000 is confirmed"
    for line in (
        "1 x Monopoly: 3rd Edition: 19 USD",
        "2 x Uno Card Game: 3 USD",
        "Total: 27.5 USD",
        "https://shop.example/orders/50314b8e9bcf000000000000",
    ):
        assert line in confirmation["body"], confirmation["body"]
    assert rendered["usage_tips"]["subject"] == "Getting the most out of your Monopoly: 3rd Edition"
    assert "https://www.example.com/product/path#reviews" in rendered["review_request"]["body"]
    for step_id, fields in rendered.items():
        for field, text in fields.items():
            # A blank variable leaves "your ?", ": USD" or an empty line behind.
            assert "your ?" not in text and ":  " not in text and ": USD" not in text, (
                step_id,
                field,
                text,
            )


def test_publish_warns_about_variables_the_sample_does_not_have(store: Store) -> None:
    raw = _changed(
        0,
        body="{% if trigger.properties.coupon %}Code: {{ trigger.properties.coupon_code }}"
        "{% endif %} {{ unsubscribe_url }} {{ profile.traits.first_name }}",
    )
    raw["sample"]["trigger"]["properties"]["coupon"] = False
    _received(store, "Cart Abandoned")
    published = JourneyCatalog(store).publish_if_changed(parse_journey(raw), now=NOW)
    assert published.created
    assert published.warnings == [
        "steps[0] (reminder).body: reads trigger.properties.coupon_code, which the sample "
        "does not have (it renders blank for an event or profile without it); add them to "
        "the journey's sample as your events and profiles carry them"
    ]
    # The same warning from validate's check, and one for a journey with no sample at all.
    unsampled = {key: value for key, value in raw.items() if key != "sample"}
    unsampled["steps"] = [
        step | {"body": "Hola {{ profile.traits.first_name }} {{ unsubscribe_url }}"}
        for step in unsampled["steps"][:1]
    ]
    checked = JourneyCatalog(store).check(parse_journey(unsampled), now=NOW)
    assert checked.problems == []
    assert [str(w) for w in checked.warnings] == [
        "steps[0] (reminder).subject: reads profile.traits.first_name, which the sample does "
        "not have (it renders blank for an event or profile without it); the journey has no "
        "sample: add one shaped as your events and profiles",
        "steps[0] (reminder).body: reads profile.traits.first_name, which the sample does not "
        "have (it renders blank for an event or profile without it); the journey has no "
        "sample: add one shaped as your events and profiles",
    ]
