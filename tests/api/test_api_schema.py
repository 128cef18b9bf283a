"""The API does what its OpenAPI schema says, checked by schemathesis against a real server.

Schemathesis reads ``/openapi.json``, generates requests for every operation (valid ones
and ones the schema forbids), and checks each answer: no server error, a documented
status code and content type, a body matching the documented schema, valid requests
accepted and invalid ones refused, and a correct ``Allow`` header on a 405.

It runs on SQLite and on PostgreSQL. ``make test`` runs a bounded number of cases per
operation with a fixed seed; ``HILO_FUZZ_EXAMPLES=500`` makes a longer run with a new seed
(``HILO_FUZZ_SEED`` repeats one). The run's summary is printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from base64 import b64encode
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from hilo.db.store import Store
from hilo.devtools.simulation import JourneyLab
from hilo.intake.dispatcher import Dispatcher
from hilo.settings import Settings
from tests.fakes import free_port
from tests.helpers.examples import EXAMPLES as EXAMPLE_FILES

TOKEN = "schema-run-admin-token"
WRITE_KEY = "schema-run-write-key"
# Cases per operation in the fuzzing phase (the coverage phase adds its own, about 6,000 in
# all): the bounded run takes about a minute on two cores. It keeps one seed, so that it
# checks the same cases every time; a longer run takes a new seed unless given one.
BOUNDED_EXAMPLES = 25
EXAMPLES = int(os.environ.get("HILO_FUZZ_EXAMPLES", BOUNDED_EXAMPLES))
SEED = os.environ.get("HILO_FUZZ_SEED") or ("20261203" if EXAMPLES == BOUNDED_EXAMPLES else "")
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "positive_data_acceptance",
    "negative_data_rejection",
    "unsupported_method",
    "allow_header_conformance",
)
# Operations whose bodies are checked further than JSON Schema can say (see CONFIG).
SEMANTIC_CHECKS = (
    "validate_journeys_validate_post",
    "publish_journeys_post",
    "replace_policy_policy_put",
    "put_promotions__key__put",
)
# Credentials by the security scheme each operation names in the schema.
CONFIG = f"""
[auth.openapi.HTTPBearer]
bearer = "{TOKEN}"

[auth.openapi.SegmentWriteKey]
username = "{WRITE_KEY}"
password = ""

# Rules JSON Schema cannot state: a journey's graph and templates, a policy's windows, the
# actor in the body or in a header, one date after another. A request the schema admits
# may still be refused there, with a 422 that names what is wrong.
[[operations]]
include-operation-id-regex = "^({"|".join(SEMANTIC_CHECKS)})$"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"
]

# Segment answers 413 to a batch of more than 2,500 calls, as to one over 500 KB.
[checks.negative_data_rejection]
expected-statuses = [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"
]
"""


def _sendgrid_public_key() -> str:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b64encode(der).decode()


@pytest.fixture
async def lab_on_any_store(
    time_env: WorkflowEnvironment, any_store: Store
) -> AsyncIterator[JourneyLab]:
    async with JourneyLab.open(time_env, any_store) as journey_lab:
        yield journey_lab


@pytest.fixture
async def api_url(lab_on_any_store: JourneyLab) -> AsyncIterator[str]:
    """The whole API on a real uvicorn server, on SQLite or PostgreSQL and the time-skipping
    Temporal server, with a journey, a promotion and a customer in it, so that listings and
    lookups answer with data to check against their schemas too."""
    lab = lab_on_any_store
    app = create_app(
        Settings(admin_token=TOKEN, write_keys={WRITE_KEY: "schema-run"}, event_wait_seconds=1),
        store=lab.store,
        client=lab.client,
        task_queue=lab.router.task_queue,
    )
    # Webhooks and links configured, so that requests reach their signature checks.
    app.state.channel_settings = Settings(
        _env_file=None,
        link_secret="schema-run-link-secret-of-some-length",
        sendgrid_webhook_public_key=_sendgrid_public_key(),
        twilio_auth_token="schema-run-twilio",
        whatsapp_app_secret="schema-run-whatsapp",
        whatsapp_verify_token="schema-run-verify",
    )
    dispatcher = app.state.dispatcher
    assert isinstance(dispatcher, Dispatcher)
    dispatcher.start()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), lifespan="off", log_level="error")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), "the API did not start"
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        await _seed(url)
        yield url
    finally:
        server.should_exit = True
        await serving
        await dispatcher.stop()


async def _seed(url: str) -> None:
    admin = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=admin, timeout=30) as api:
        journey = (EXAMPLE_FILES / "journeys" / "welcome.yaml").read_text()
        published = await api.post(
            "/journeys", content=journey, headers={"Content-Type": "application/yaml"}
        )
        assert published.status_code == 201, published.text
        promotion = await api.put(
            "/promotions/winback20",
            json={
                "code": "WINBACK20",
                "valid_from": "2026-01-01T00:00:00Z",
                "valid_until": "2036-01-01T00:00:00Z",
            },
        )
        assert promotion.status_code == 201, promotion.text
        identified = await api.post(
            "/v1/identify",
            json={"userId": "0", "traits": {"email": "ana@example.com"}},
            auth=(WRITE_KEY, ""),
        )
        assert identified.status_code == 200, identified.text


# A longer run takes longer than the suite's five minutes a test.
@pytest.mark.timeout(300 + 4 * EXAMPLES)
async def test_the_api_answers_as_its_openapi_schema_says(api_url: str, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    started = time.monotonic()
    # Schemathesis runs its own process; this one's event loop meanwhile serves the API.
    run = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{api_url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(EXAMPLES),
        *(["--seed", SEED] if SEED else []),
        # One worker: hypothesis's lambda descriptions are not thread-safe on Python 3.11.
        "--workers",
        "1",
        # Text with a NUL is refused (422, naming the field) wherever it would be stored, as
        # PostgreSQL cannot hold it; the schema does not repeat that on every string.
        "--generation-allow-x00",
        "false",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--no-color",
        cwd=tmp_path,  # where it keeps its cache
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await run.communicate()
    text = output.decode(errors="replace")
    elapsed = time.monotonic() - started
    print(text)
    print(f"schemathesis: {EXAMPLES} examples per operation, {elapsed:.0f} s")
    assert run.returncode == 0, text[-20000:]
    # Every operation was tested, and every case passed.
    async with httpx.AsyncClient() as client:
        paths = (await client.get(f"{api_url}/openapi.json")).json()["paths"]
    operations = sum(len(methods) for methods in paths.values())
    assert f"Tested: {operations}" in text, text[-5000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", text)
    assert counts is not None and counts[1] == counts[2] and int(counts[1]) > 1000, text[-5000:]
