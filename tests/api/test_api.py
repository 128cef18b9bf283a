"""The management API over a real store, a real worker and the time-skipping Temporal server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml

from api.app import create_app
from hilo.db.store import Store
from hilo.devtools.simulation import JourneyLab
from hilo.intake.routing import EventRouter
from hilo.settings import Settings
from tests.fakes import free_port
from tests.helpers.api import LabRouter
from tests.helpers.examples import EXAMPLES

TOKEN = "t"
CART_YAML = (EXAMPLES / "journeys" / "abandoned_cart.yaml").read_text()
WORKFLOW_ID = "journey/abandoned_cart/42/c1"
# The shop's own event, which no source has sent to this fresh database yet.
CART_WARNING = (
    "trigger.event: no 'Cart Abandoned' event has reached Hilo yet, and neither Hilo nor "
    "Segment's specs produce one: check the name your sources send"
)


@pytest.fixture
async def api(lab: JourneyLab) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        Settings(admin_token=TOKEN),
        store=lab.store,
        client=lab.client,
        task_queue=lab.router.task_queue,
    )
    router = app.state.router
    assert isinstance(router, EventRouter)
    assert router.store is lab.store and router.task_queue == lab.router.task_queue
    app.state.router = app.state.dispatcher.router = LabRouter(router, lab)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://hilo",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as client:
        yield client


def yaml_body(text: str) -> dict[str, Any]:
    return {"content": text, "headers": {"Content-Type": "application/yaml"}}


async def publish_cart(api: httpx.AsyncClient) -> None:
    response = await api.post("/journeys", **yaml_body(CART_YAML))
    assert response.status_code == 201, response.text


async def cart_abandoned(lab: JourneyLab, message_id: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "name": "Cart Abandoned",
        "customer_id": "42",
        "properties": {"cart_id": "c1", "cart_value": 80, "product_name": "Mug"},
        # The server's clock, which is ahead of ours once earlier tests skipped time.
        "timestamp": (await lab.now()).isoformat(),
    }
    if message_id:
        event["message_id"] = message_id
    return event


async def test_health_and_schema_need_no_token(api: httpx.AsyncClient) -> None:
    del api.headers["Authorization"]
    health = await api.get("/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    schema = await api.get("/journeys/schema")
    assert schema.status_code == 200
    assert schema.json()["title"] == "Hilo journey definition"
    assert "steps" in schema.json()["required"]


async def test_admin_token_is_required(api: httpx.AsyncClient) -> None:
    missing = await api.get("/journeys", headers={"Authorization": ""})
    assert missing.status_code == 401
    assert "missing admin token" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"

    wrong = await api.get("/journeys", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert "wrong admin token" in wrong.json()["detail"]

    basic = await api.post("/events", headers={"Authorization": "Basic dDp0"}, json={})
    assert basic.status_code == 401  # refused before the body is even looked at

    accepted = await api.get("/journeys")
    assert (accepted.status_code, accepted.json()) == (200, [])


async def test_validate_reports_every_problem_by_path(api: httpx.AsyncClient) -> None:
    ok = await api.post("/journeys/validate", **yaml_body(CART_YAML))
    assert ok.status_code == 200, ok.text
    assert ok.json() == {
        "valid": True,
        "key": "abandoned_cart",
        "steps": 12,
        "warnings": [CART_WARNING],
    }

    as_json = await api.post("/journeys/validate", json=yaml.safe_load(CART_YAML))
    assert as_json.json()["key"] == "abandoned_cart"

    broken = {
        "key": "broken",
        "name": "Broken",
        "trigger": {"event": "Signed Up"},
        "steps": [{"id": "x", "type": "wait"}],
    }
    invalid = await api.post("/journeys/validate", json=broken)
    assert invalid.status_code == 422
    problems = invalid.json()["detail"]
    assert [p["path"] for p in problems] == ["steps[0] (x)"]
    assert "exactly one of 'duration'" in problems[0]["message"]

    not_yaml = await api.post("/journeys/validate", **yaml_body("key: [unclosed"))
    assert not_yaml.status_code == 422
    assert "not valid YAML" in not_yaml.json()["detail"][0]["message"]

    not_json = await api.post(
        "/journeys/validate", content="{", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 422
    assert not_json.json()["detail"][0]["path"] == "line 1, column 2"

    text = await api.post("/journeys/validate", content=CART_YAML)
    assert text.status_code == 415
    assert "application/yaml" in text.json()["detail"]

    # Nothing was published by validating.
    assert (await api.get("/journeys")).json() == []


async def test_validate_refuses_what_publish_refuses(api: httpx.AsyncClient) -> None:
    no_link = CART_YAML.replace("Unsubscribe: {{ unsubscribe_url }}", "Bye")
    validated = await api.post("/journeys/validate", **yaml_body(no_link))
    published = await api.post("/journeys", **yaml_body(no_link))
    assert (validated.status_code, published.status_code) == (422, 422)
    assert validated.json() == published.json()
    assert "steps[5] (second_reminder).body" in [p["path"] for p in validated.json()["detail"]]
    assert (await api.get("/journeys")).json() == []


async def test_publish_versions_list_and_get(api: httpx.AsyncClient) -> None:
    first = await api.post("/journeys", **yaml_body(CART_YAML))
    assert (first.status_code, first.json()) == (
        201,
        {"key": "abandoned_cart", "version": 1, "created": True, "warnings": [CART_WARNING]},
    )
    same = await api.post("/journeys", **yaml_body(CART_YAML))
    assert (same.status_code, same.json()["version"], same.json()["created"]) == (200, 1, False)

    changed = yaml.safe_load(CART_YAML) | {"name": "Abandoned cart, v2"}
    second = await api.post("/journeys", json=changed)
    assert (second.status_code, second.json()["version"]) == (201, 2)

    invalid = await api.post("/journeys", json=changed | {"steps": []})
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["path"] == "steps"

    listed = await api.get("/journeys")
    assert listed.json() == [
        {
            "key": "abandoned_cart",
            "name": "Abandoned cart, v2",
            "status": "active",
            "latest_version": 2,
        }
    ]

    detail = (await api.get("/journeys/abandoned_cart")).json()
    assert detail["latest_version"] == 2
    assert detail["definition"]["name"] == "Abandoned cart, v2"
    assert [v["version"] for v in detail["versions"]] == [1, 2]
    assert all(len(v["checksum"]) == 64 and v["published_at"] for v in detail["versions"])

    v1 = await api.get("/journeys/abandoned_cart/versions/1")
    assert v1.status_code == 200
    assert v1.json()["definition"]["name"] == "Abandoned cart"

    unknown = await api.get("/journeys/no_such_journey")
    assert unknown.status_code == 404
    assert "no_such_journey" in unknown.json()["detail"]
    no_version = await api.get("/journeys/abandoned_cart/versions/9")
    assert no_version.status_code == 404
    assert "no version 9" in no_version.json()["detail"]
    assert (await api.get("/journeys/no_such_journey/versions/1")).status_code == 404
    assert (await api.post("/journeys/no_such_journey/pause")).status_code == 404


async def test_paused_journey_takes_no_entries_until_resumed(
    api: httpx.AsyncClient, lab: JourneyLab
) -> None:
    await publish_cart(api)
    paused = await api.post("/journeys/abandoned_cart/pause")
    assert paused.json() == {"key": "abandoned_cart", "status": "paused"}

    refused = await api.post("/events", json=await cart_abandoned(lab))
    assert refused.status_code == 202
    assert refused.json()["started"] == []
    assert refused.json()["not_entered"] == {"abandoned_cart": "journey is paused"}

    resumed = await api.post("/journeys/abandoned_cart/resume")
    assert resumed.json() == {"key": "abandoned_cart", "status": "active"}

    entered = await api.post("/events", json=await cart_abandoned(lab))
    assert entered.json()["started"] == [WORKFLOW_ID]
    assert (await lab.result(WORKFLOW_ID)).status == "completed"


async def test_archive_stops_running_instances(api: httpx.AsyncClient, lab: JourneyLab) -> None:
    await publish_cart(api)
    started = await api.post("/events", json=await cart_abandoned(lab))
    assert started.json()["started"] == [WORKFLOW_ID]

    archived = await api.post("/journeys/abandoned_cart/archive")
    assert archived.status_code == 200
    assert archived.json() == {"key": "abandoned_cart", "status": "archived", "stopped": 1}

    result = await lab.result(WORKFLOW_ID)
    assert result.status == "archived"
    instance = lab.store.get_instance(WORKFLOW_ID)
    assert instance is not None and instance.status == "archived"

    resumed = await api.post("/journeys/abandoned_cart/resume")
    assert resumed.status_code == 409
    assert "archived" in resumed.json()["detail"]
    republished = await api.post("/journeys", **yaml_body(CART_YAML))
    assert republished.status_code == 409
    assert "new key" in republished.json()["detail"]

    refused = await api.post("/events", json=await cart_abandoned(lab))
    assert refused.json()["not_entered"] == {"abandoned_cart": "journey is archived"}


async def test_events_start_journeys_once_and_messages_are_listed(
    api: httpx.AsyncClient, lab: JourneyLab
) -> None:
    profile = await api.put(
        "/profiles/42",
        json={
            "traits": {"email": "ana@example.com", "first_name": "Ana"},
            "consent": {"push": True},
            "timezone": "Europe/Madrid",
        },
    )
    assert profile.status_code == 200, profile.text
    assert profile.json()["traits"]["first_name"] == "Ana"
    assert profile.json()["consent"] == {"push": True}
    assert profile.json()["timezone"] == "Europe/Madrid"
    lab.store.register_device("42", "push", "fcm-token-42")  # push needs a device to reach

    merged = await api.put("/profiles/42", json={"traits": {"plan": "pro"}, "locale": "es-ES"})
    assert merged.json()["traits"] == {
        "email": "ana@example.com",
        "first_name": "Ana",
        "plan": "pro",
    }
    assert (merged.json()["timezone"], merged.json()["locale"]) == ("Europe/Madrid", "es-ES")

    await publish_cart(api)
    event = await cart_abandoned(lab, message_id="msg-1")
    first = await api.post("/events", json=event)
    assert first.status_code == 202
    assert first.json() == {
        "duplicate": False,
        "queued": False,
        "started": [WORKFLOW_ID],
        "signalled": [],
        "not_entered": {},
    }
    again = await api.post("/events", json=event)
    assert again.status_code == 202
    assert again.json() == {
        "duplicate": True,
        "queued": False,
        "started": [],
        "signalled": [],
        "not_entered": {},
    }

    assert (await lab.result(WORKFLOW_ID)).status == "completed"
    messages = await api.get("/profiles/42/messages")
    assert messages.status_code == 200
    rows = messages.json()
    assert [(m["template"], m["channel"], m["status"]) for m in rows] == [
        ("cart_reminder_1", "email", "sent"),
        ("cart_push", "push", "sent"),
        ("cart_reminder_2", "email", "sent"),
        ("cart_retargeting", "audience", "sent"),
    ]
    assert all(m["journey_key"] == "abandoned_cart" for m in rows)
    assert rows[0]["step_id"] == "first_reminder"
    assert "Ana" in rows[0]["content"]["body"]
    assert (await api.get("/profiles/nobody/messages")).json() == []


async def test_malformed_input_is_422_naming_the_field(api: httpx.AsyncClient) -> None:
    bad = await api.post(
        "/events",
        json={"name": "Cart Abandoned", "properties": ["not", "a", "map"], "colour": "red"},
    )
    assert bad.status_code == 422
    fields = {tuple(error["loc"]) for error in bad.json()["detail"]}
    assert fields == {("body", "customer_id"), ("body", "properties"), ("body", "colour")}

    blank = await api.post("/events", json={"name": " ", "customer_id": "42"})
    assert blank.status_code == 422
    assert blank.json()["detail"][0]["loc"] == ["body", "name"]

    when = await api.post(
        "/events", json={"name": "X", "customer_id": "42", "timestamp": "yesterday"}
    )
    assert when.status_code == 422
    assert when.json()["detail"][0]["loc"] == ["body", "timestamp"]

    not_json = await api.post(
        "/events", content="name=X", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 422

    zone = await api.put("/profiles/42", json={"timezone": "Mars/Olympus"})
    assert zone.status_code == 422
    assert zone.json()["detail"][0]["loc"] == ["body", "timezone"]
    assert "Mars/Olympus" in json.dumps(zone.json())


async def test_lifespan_opens_the_database_it_was_not_given(
    lab: JourneyLab, tmp_path: Path
) -> None:
    settings = Settings(admin_token=TOKEN, database_url=f"sqlite:///{tmp_path / 'own.db'}")
    app = create_app(settings, client=lab.client, task_queue=lab.router.task_queue)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://hilo",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as api:
            published = await api.post("/journeys", **yaml_body(CART_YAML))
            assert published.status_code == 201
        assert app.state.store is not lab.store
        assert app.state.router.task_queue == lab.router.task_queue
        assert [j.key for j in app.state.store.list_journeys()] == ["abandoned_cart"]
    assert lab.store.list_journeys() == []


@pytest.mark.parametrize("version", ["10000000000000000001", str(2**31), "0", "-1"])
async def test_a_version_out_of_range_is_422_naming_it(any_store: Store, version: str) -> None:
    # Past the version column's range the database itself failed: a 500 on both.
    app = create_app(Settings(admin_token=TOKEN), store=any_store)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://hilo",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as api:
        response = await api.get(f"/journeys/welcome/versions/{version}")
        assert response.status_code == 422, response.text
        [problem] = response.json()["detail"]
        assert problem["loc"] == ["path", "version"]
        assert problem["msg"].startswith("Input should be")
        in_range = await api.get(f"/journeys/welcome/versions/{2**31 - 1}")
        assert in_range.status_code == 404
        assert "no journey with key 'welcome'" in in_range.json()["detail"]


# ---------------------------------------------------------------- the docs pages, offline


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """The app on a real uvicorn server in a thread; no lifespan, so no Temporal needed."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class PageReferences(HTMLParser):
    """Every URL a page loads: script sources, stylesheets, icons, the spec it renders."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and name in ("src", "href", "spec-url"):
                self.urls.append(value)


ASSET_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
    ".json": ("application/json",),
}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_everything_from_the_api_itself(store: Store, page: str) -> None:
    with serving(create_app(Settings(admin_token=TOKEN), store=store)) as url:
        html = httpx.get(url + page)
        assert html.status_code == 200
        # No other host: neither a URL with a scheme nor a protocol-relative one.
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html.text), html.text
        references = PageReferences()
        references.feed(html.text)
        spec = re.search(r"url: '([^']+)'", html.text)
        urls = references.urls + ([spec.group(1)] if spec else [])
        assert any(u.endswith(".js") for u in urls) and any(u.endswith(".json") for u in urls)
        for asset in urls:
            assert asset.startswith("/") and not asset.startswith("//"), asset
            response = httpx.get(url + asset)
            assert response.status_code == 200, asset
            media = response.headers["content-type"].split(";")[0]
            assert media in ASSET_TYPES[Path(asset).suffix], (asset, media)
            assert len(response.content) > 1000, asset


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (make test installs it)")
def test_swagger_ui_renders_the_operations_in_a_browser_without_internet(
    store: Store, tmp_path: Path
) -> None:
    assert CHROMIUM is not None
    offline = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-proxy-server",
        # Every host name fails to resolve: the page gets nothing from the internet.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--virtual-time-budget=20000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    with serving(create_app(Settings(admin_token=TOKEN), store=store)) as url:
        dom = subprocess.run(
            [*offline, "--dump-dom", url + "/docs"], capture_output=True, text=True, timeout=120
        ).stdout
        screenshot = tmp_path / "docs.png"
        subprocess.run(
            [*offline, "--window-size=1280,1400", f"--screenshot={screenshot}", url + "/docs"],
            capture_output=True,
            timeout=120,
        )
    rendered = set(re.findall(r'data-path="([^"]+)"', dom))
    assert {"/health", "/journeys/{key}/versions/{version}", "/v1/track"} <= rendered, dom[:2000]
    assert screenshot.read_bytes().startswith(b"\x89PNG") and screenshot.stat().st_size > 20_000


async def test_publish_knows_the_preference_pages_topics(lab: JourneyLab) -> None:
    from hilo.settings import Settings

    app = create_app(
        Settings(admin_token=TOKEN),
        store=lab.store,
        client=lab.client,
        task_queue=lab.router.task_queue,
    )
    app.state.channel_settings = Settings(
        _env_file=None, preference_topics=[{"key": "news", "name": "News"}]
    )
    cart = yaml.safe_load(CART_YAML)
    cart["steps"][5]["topic"] = "promotions"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://hilo",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as api:
        refused = await api.post("/journeys", json=cart)
        assert refused.status_code == 422, refused.text
        [problem] = refused.json()["detail"]
        assert problem["path"] == "steps[5] (second_reminder).topic"
        known = "'promotions' is not a topic of the preference page (known: news)"
        assert known in problem["message"]
        cart["steps"][5]["topic"] = "news"
        assert (await api.post("/journeys", json=cart)).status_code == 201


# ---------------------------------------------------------------- the contract in /openapi.json


def offline_app(store: Store) -> Any:
    return create_app(Settings(admin_token=TOKEN), store=store)


def admin_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://hilo",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


@pytest.mark.parametrize("path", ["/l/u/some-token", "/l/p/some-token", "/webhooks/whatsapp"])
async def test_a_405_allows_every_method_of_the_path(store: Store, path: str) -> None:
    # GET and POST on one path are two routes; Starlette named only the first one's methods.
    async with admin_client(offline_app(store)) as api:
        response = await api.request("OPTIONS", path)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, POST"


async def test_text_the_database_cannot_store_is_refused_naming_the_field(
    any_store: Store,
) -> None:
    async with admin_client(offline_app(any_store)) as api:
        profile = await api.get("/profiles/a%00b")
        assert profile.status_code == 422
        assert profile.json()["detail"][0]["loc"] == ["path", "customer_id"]

        event = await api.post(
            "/events",
            content=b'{"name": "Cart\\u0000Abandoned", "customer_id": "42"}',
            headers={"Content-Type": "application/json"},
        )
        assert event.status_code == 422
        assert [e["loc"] for e in event.json()["detail"]] == [["body", "name"]]
        assert "NUL" in event.json()["detail"][0]["msg"]

        call = await api.post(
            "/v1/track",
            content=b'{"userId": "4\\u00002", "event": "Order Completed"}',
            headers={"Content-Type": "application/json"},
            auth=("dev-write-key", ""),
        )
        assert call.status_code == 400
        assert call.json()["errors"][0]["field"] == "userId"
        assert "NUL" in call.json()["errors"][0]["message"]

        journey = await api.post(
            "/journeys/validate",
            content=(EXAMPLES / "journeys" / "welcome.yaml").read_text() + 'description: "a\\0b"\n',
            headers={"Content-Type": "application/yaml"},
        )
        assert journey.status_code == 422
        assert journey.json()["detail"] == [
            {"path": "description", "message": journey.json()["detail"][0]["message"]}
        ]
        assert any_store.list_journeys() == []


async def test_the_timeline_takes_a_date_time_not_a_number(store: Store) -> None:
    store.upsert_profile("42")
    async with admin_client(offline_app(store)) as api:
        number = await api.get("/profiles/42/timeline", params={"before": "0.5"})
        assert number.status_code == 422
        assert number.json()["detail"][0]["loc"] == ["query", "before"]
        iso = await api.get("/profiles/42/timeline", params={"before": "2030-01-01T00:00:00Z"})
        assert iso.status_code == 200


def test_the_schema_documents_every_status_and_the_segment_calls(store: Store) -> None:
    schema = offline_app(store).openapi()
    operations = {
        (method.upper(), path): operation
        for path, methods in schema["paths"].items()
        for method, operation in methods.items()
    }
    admin = [key for key, op in operations.items() if {"HTTPBearer": []} in op.get("security", [])]
    assert len(admin) > 20
    assert all("401" in operations[key]["responses"] for key in admin), admin
    assert {"400", "403", "503"} <= set(operations["POST", "/webhooks/sendgrid"]["responses"])
    assert {"404", "503"} <= set(operations["GET", "/l/u/{token}"]["responses"])
    assert "415" in operations["POST", "/journeys"]["responses"]

    track = operations["POST", "/v1/track"]
    assert track["security"] == [{"SegmentWriteKey": []}]
    assert {"400", "401", "413", "415"} <= set(track["responses"])
    body = track["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["event"]
    assert {"userId", "anonymousId", "properties", "context", "timestamp"} <= set(
        body["properties"]
    )
    batch = operations["POST", "/v1/batch"]["requestBody"]["content"]["application/json"]
    calls = batch["schema"]["properties"]["batch"]["items"]["anyOf"]
    assert sorted(call["properties"]["type"]["const"] for call in calls) == sorted(
        ["track", "identify", "page", "screen", "group", "alias"]
    )


async def test_a_date_time_that_leaves_the_calendar_in_utc_is_422_naming_it(
    store: Store,
) -> None:
    # 0001-01-01 at +12:23 is still year 0 in UTC, where Python's datetime cannot go.
    year_zero = "0001-01-01T00:00:00+12:23"
    async with admin_client(offline_app(store)) as api:
        promotion = await api.put(
            "/promotions/welcome",
            json={"code": "W", "valid_from": "2026-01-01T00:00:00Z", "valid_until": year_zero},
        )
        assert promotion.status_code == 422, promotion.text
        assert promotion.json()["detail"][0]["loc"] == ["body", "valid_until"]
        preview = await api.post(
            "/policy/decisions/preview",
            json={
                "message_id": "m",
                "customer_id": "42",
                "journey_key": "welcome",
                "channel": "email",
                "at": year_zero,
            },
        )
        assert preview.status_code == 422, preview.text
        assert preview.json()["detail"][0]["loc"] == ["body", "at"]
        for moment in (year_zero, "9999-12-31T23:59:59-05:00"):
            event = await api.post(
                "/events", json={"name": "Signed Up", "customer_id": "42", "timestamp": moment}
            )
            assert event.status_code == 422, event.text
            assert event.json()["detail"][0]["loc"] == ["body", "timestamp"]


async def test_profile_consent_names_a_known_channel_and_each_change_is_recorded(
    any_store: Store,
) -> None:
    from typing import get_args

    from api.routes.profiles import ConsentChannel
    from hilo.customers.consent import CONSENT_CHANNELS
    from hilo.db.models import ConsentChange

    assert get_args(ConsentChannel) == CONSENT_CHANNELS
    app = create_app(Settings(admin_token=TOKEN), store=any_store)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://hilo",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as api:
        refused = await api.put("/profiles/ana", json={"consent": {"pigeon-post-and-more": True}})
        assert refused.status_code == 422 and "pigeon-post-and-more" in refused.text
        assert any_store.get_profile("ana") is None
        saved = await api.put("/profiles/ana", json={"consent": {"push": True, "sms": False}})
        assert saved.status_code == 200 and saved.json()["consent"] == {"push": True, "sms": False}
    from sqlmodel import col, select

    with any_store.session() as session:
        changes = session.exec(select(ConsentChange).order_by(col(ConsentChange.id))).all()
    assert [(c.channel, c.granted, c.source) for c in changes] == [
        ("push", True, "api"),
        ("sms", False, "api"),
    ]
