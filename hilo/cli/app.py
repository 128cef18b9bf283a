"""The ``hilo`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from hilo.cli.policy import policy_app
from hilo.journeys.definitions import JourneyDefinition, JourneyInvalid, journey_json_schema
from hilo.journeys.validate import load_journey_yaml
from hilo.settings import Settings

app = typer.Typer(help="Hilo: every channel, one conversation.", no_args_is_help=True)
journeys_app = typer.Typer(help="Validate, publish and manage journeys.", no_args_is_help=True)
app.add_typer(journeys_app, name="journeys")
app.add_typer(policy_app, name="policy")
events_app = typer.Typer(
    help="Deliveries that failed for good (dead letters): list, retry, drop.",
    no_args_is_help=True,
)
app.add_typer(events_app, name="events")


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as error:
        typer.secho(f"settings: {error}", fg="red", err=True)
        raise typer.Exit(2) from None


def _preference_topics() -> list[str]:
    """The preference page's topic keys (HILO_PREFERENCE_TOPICS): what a send's topic may be."""
    from hilo.settings import Settings

    try:
        return [topic.key for topic in Settings().preference_topics]
    except Exception as error:
        typer.secho(f"settings: {error}", fg="red", err=True)
        raise typer.Exit(2) from None


def _load(path: Path) -> JourneyDefinition:
    if not path.is_file():
        typer.secho(f"{path}: no such file", fg="red", err=True)
        raise typer.Exit(2)
    try:
        return load_journey_yaml(path.read_text(), source=str(path))
    except JourneyInvalid as error:
        typer.secho(str(error), fg="red", err=True)
        raise typer.Exit(1) from None


def _store(settings: Settings) -> Any:
    from hilo.db.store import Store

    store = Store(settings.resolved_database_url)
    store.migrate()
    return store


# ---------------------------------------------------------------- running


@app.command()
def dev(
    no_examples: Annotated[
        bool, typer.Option("--no-examples", help="Do not publish the example journeys.")
    ] = False,
) -> None:
    """Temporal dev server, worker, API and example journeys on this machine."""
    from hilo.cli.dev import run_dev

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_dev(_settings(), publish_examples=not no_examples))


@app.command()
def worker() -> None:
    """Run a worker: executes journey workflows and their activities."""
    from worker.main import run_worker

    asyncio.run(run_worker(_settings()))


@app.command()
def api() -> None:
    """Run the HTTP API."""
    import uvicorn

    from api.app import create_app

    settings = _settings()
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port)


# ---------------------------------------------------------------- journeys


def _catalog() -> Any:
    from hilo.catalog import JourneyCatalog
    from hilo.playbook import load_playbook

    settings = _settings()
    return JourneyCatalog(
        _store(settings), load_playbook(settings.playbook_file), topics=_preference_topics()
    )


def _warn(warnings: list[Any]) -> None:
    for warning in warnings:
        typer.secho(f"  warning: {warning}", fg="yellow")


@journeys_app.command("validate")
def journeys_validate(files: list[Path]) -> None:
    """Check definitions as publishing would; exit 1 on the first invalid file."""
    catalog = _catalog()
    for path in files:
        definition = _load(path)
        # The publish checks themselves: a file that validates is a file that publishes.
        checked = catalog.check(definition)
        if checked.problems:
            typer.secho(str(JourneyInvalid(checked.problems, str(path))), fg="red", err=True)
            raise typer.Exit(1)
        typer.echo(f"{path}: ok ({definition.key}, {len(definition.steps)} top-level steps)")
        _warn(checked.warnings)


@journeys_app.command("publish")
def journeys_publish(files: list[Path]) -> None:
    """Publish each definition; a definition equal to the latest version stays that version."""
    definitions = [_load(path) for path in files]  # all valid, or none published
    catalog = _catalog()
    for definition in definitions:
        try:
            published = catalog.publish_if_changed(definition)
        except ValueError as error:  # JourneyInvalid included: it names each step
            typer.secho(str(error), fg="red", err=True)
            raise typer.Exit(1) from None
        if published.created:
            typer.echo(f"published {definition.key} v{published.version}")
        else:
            typer.echo(f"unchanged {definition.key} v{published.version}: nothing published")
        _warn(published.warnings)


@journeys_app.command("list")
def journeys_list() -> None:
    """Every journey with its status and latest version."""
    from hilo.catalog import JourneyCatalog

    rows = JourneyCatalog(_store(_settings())).list()
    if not rows:
        typer.echo("no journeys published yet")
    for journey in rows:
        typer.echo(
            f"{journey.key:<24} v{journey.latest_version:<4} {journey.status:<9} {journey.name}"
        )


def _set_status(key: str, action: str) -> None:
    from hilo.catalog import JourneyCatalog

    settings = _settings()
    catalog = JourneyCatalog(_store(settings))
    try:
        if action == "archive":
            from worker.main import connect

            async def archive() -> tuple[Any, int]:
                return await catalog.archive(key, await connect(settings))

            journey, stopped = asyncio.run(archive())
            typer.echo(f"{key}: archived, {stopped} running instance(s) stopped")
            return
        journey = catalog.pause(key) if action == "pause" else catalog.resume(key)
    except KeyError:
        typer.secho(f"no journey '{key}'; `hilo journeys list` shows them", fg="red", err=True)
        raise typer.Exit(1) from None
    except ValueError as error:
        typer.secho(str(error), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{key}: {journey.status}")


@journeys_app.command("pause")
def journeys_pause(key: str) -> None:
    """Stop new entries; running instances go on."""
    _set_status(key, "pause")


@journeys_app.command("resume")
def journeys_resume(key: str) -> None:
    """Take new entries again."""
    _set_status(key, "resume")


@journeys_app.command("archive")
def journeys_archive(key: str) -> None:
    """Stop new entries and end every running instance."""
    _set_status(key, "archive")


@journeys_app.command("schema")
def journeys_schema(
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
) -> None:
    """Print (or write) the JSON Schema of journey definitions, for editors."""
    text = json.dumps(journey_json_schema(), indent=2)
    if output:
        output.write_text(text + "\n")
        typer.echo(f"wrote {output}")
    else:
        typer.echo(text)


# ---------------------------------------------------------------- events and simulation


def _parse_property(raw: str) -> tuple[str, Any]:
    if "=" not in raw:
        raise typer.BadParameter(f"'{raw}' is not key=value (e.g. cart_value=80)")
    key, value = raw.split("=", 1)
    try:
        return key, json.loads(value)  # numbers and booleans stay typed
    except json.JSONDecodeError:
        return key, value


@app.command("send-event")
def send_event(
    name: Annotated[str, typer.Argument(help="Event name, e.g. 'Cart Abandoned'.")],
    customer: Annotated[str, typer.Option("--customer", "-c", help="Customer id.")],
    prop: Annotated[
        list[str] | None, typer.Option("--property", "-p", help="key=value, repeatable.")
    ] = None,
    api_url: Annotated[str | None, typer.Option("--api", help="Hilo API base URL.")] = None,
) -> None:
    """Send an event through the API, as a service would."""
    from hilo.client import HiloClient
    from hilo.errors import HiloError

    settings = _settings()
    url = api_url or f"http://{settings.api_host}:{settings.api_port}"
    properties = dict(_parse_property(raw) for raw in prop or [])
    try:
        with HiloClient(url, settings.admin_token) as client:
            result = client.send_event(name, customer, properties)
    except HiloError as error:
        typer.secho(str(error), fg="red", err=True)
        raise typer.Exit(1) from None
    except Exception as error:
        typer.secho(f"could not reach Hilo at {url}: {error}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(result, indent=2))


@events_app.command("dead-letters")
def events_dead_letters(
    dropped: Annotated[
        bool, typer.Option("--dropped", help="Also those dropped (the record).")
    ] = False,
) -> None:
    """Deliveries parked because they failed for good, oldest first, with why."""
    letters = _store(_settings()).dead_letters(dropped=dropped)
    waiting = sum(1 for letter in letters if letter.dropped_at is None)
    counted = f"{waiting} dead letter(s)"
    typer.echo(counted + (f", {len(letters) - waiting} dropped" if dropped else ""))
    for letter in letters:
        assert letter.parked_at is not None
        state = "dropped" if letter.dropped_at is not None else "parked"
        typer.echo(
            f"{letter.message_id}  {letter.kind:<9} customer {letter.customer_id}  {state} "
            f"{letter.parked_at:%Y-%m-%d %H:%M:%S} after {letter.attempts} attempt(s)\n"
            f"    {letter.last_error}"
        )


def _settle(message_id: str, action: str) -> None:
    store = _store(_settings())
    letter = (
        store.retry_dead_letter(message_id)
        if action == "retry"
        else store.drop_dead_letter(message_id)
    )
    if letter is None:
        typer.secho(
            f"no dead letter '{message_id}'; `hilo events dead-letters` lists them",
            fg="red",
            err=True,
        )
        raise typer.Exit(1)
    if action == "retry":
        typer.echo(f"{message_id}: back in customer {letter.customer_id}'s queue")
    else:
        typer.echo(f"{message_id}: dropped; `hilo events dead-letters --dropped` keeps it listed")


@events_app.command("retry")
def events_retry(
    message_id: Annotated[str, typer.Argument(help="The entry's message id, as listed.")],
) -> None:
    """Put a dead letter back in its customer's queue (after fixing what made it fail)."""
    _settle(message_id, "retry")


@events_app.command("drop")
def events_drop(
    message_id: Annotated[str, typer.Argument(help="The entry's message id, as listed.")],
) -> None:
    """Give up on a dead letter; it is kept, marked dropped, as the record."""
    _settle(message_id, "drop")


def _journey_to_simulate(journey: str) -> JourneyDefinition:
    """A file, else the latest published version of that key, else the example of that key."""
    path = Path(journey)
    if path.is_file():
        return _load(path)
    settings = _settings()
    published = _published(settings, journey)
    if published is not None:
        return published
    example = settings.examples_dir / f"{journey}.yaml"
    if example.is_file():
        return _load(example)
    typer.secho(
        f"{journey}: no such file, no published journey with that key "
        f"(`hilo journeys list` shows them) and no example {example.name}",
        fg="red",
        err=True,
    )
    raise typer.Exit(2)


def _published(settings: Settings, key: str) -> JourneyDefinition | None:
    from sqlalchemy.engine import make_url

    from hilo.journeys.validate import parse_journey

    url = make_url(settings.resolved_database_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        return None  # nothing published here yet; do not create a database to find that out
    latest = _store(settings).latest_version(key)
    if latest is None:
        return None
    typer.echo(f"{key}: published version {latest.version}")
    try:
        return parse_journey(latest.definition, source=f"{key} v{latest.version}")
    except JourneyInvalid as error:
        typer.secho(str(error), fg="red", err=True)
        raise typer.Exit(1) from None


@app.command()
def simulate(
    journey: Annotated[
        str,
        typer.Argument(
            help="A journey file, or a key: the latest published version, else the example."
        ),
    ],
    scenario: Annotated[Path, typer.Option("--scenario", "-s", help="Scenario YAML file.")],
) -> None:
    """Run a journey against a scripted customer on Temporal's time-skipping server."""
    from hilo.devtools.simulation import Scenario, simulate_sync

    definition = _journey_to_simulate(journey)
    if not scenario.is_file():
        typer.secho(f"{scenario}: no such file", fg="red", err=True)
        raise typer.Exit(2)
    try:
        script = Scenario.from_yaml(scenario.read_text(), source=str(scenario))
    except ValueError as error:
        typer.secho(str(error), fg="red", err=True)
        raise typer.Exit(2) from None
    report = simulate_sync(definition, script)
    typer.echo(f"{definition.key} · {script.name or scenario.name}")
    for line in report.timeline:
        typer.echo(f"  {line}")
    if report.expected is None:
        return
    if report.matches:
        typer.secho("expectations met", fg="green")
        return
    typer.secho("expectations NOT met:", fg="red", err=True)
    typer.echo(report.mismatch(), err=True)
    raise typer.Exit(1)
