"""The worker: a Temporal client with Hilo's converter and tracing, running journeys."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from typing import Any

from temporalio.client import Client, Interceptor
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.envconfig import ClientConfig, ClientConnectConfig
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities.journey_activities import UNSIGNED_WEBHOOK, JourneyActivities
from hilo.channels.registry import build_providers
from hilo.db.store import Store
from hilo.journeys.definitions import JourneyDefinition, SendStep, walk_steps
from hilo.settings import Settings
from workflows.audiences import LeaveAudiencesWorkflow
from workflows.journey import JourneyWorkflow

WORKFLOWS: Sequence[type] = (JourneyWorkflow, LeaveAudiencesWorkflow)


def connect_config(settings: Settings) -> ClientConnectConfig:
    """Where and how to reach Temporal: the profile Temporal's environment configuration
    gives (its TOML file and TEMPORAL_* variables: address, namespace, TLS and mTLS, API key),
    then the HILO_* settings that are set, which win."""
    config = ClientConfig.load_client_connect_config(
        profile=settings.temporal_profile or None,
        config_file=str(settings.temporal_config_file) if settings.temporal_config_file else None,
    )
    chosen = settings.model_fields_set
    if "temporal_address" in chosen or not config.get("target_host"):
        config["target_host"] = settings.temporal_address
    if "temporal_namespace" in chosen or not config.get("namespace"):
        config["namespace"] = settings.temporal_namespace
    if settings.temporal_api_key is not None:
        config["api_key"] = settings.temporal_api_key.get_secret_value()
    return config


async def connect(settings: Settings) -> Client:
    """A client that speaks pydantic and carries OpenTelemetry context into workflows."""
    interceptors: list[Interceptor] = [TracingInterceptor()]
    return await Client.connect(
        **connect_config(settings),
        data_converter=pydantic_data_converter,
        interceptors=interceptors,
    )


def configured_activities(store: Store, channels: Settings | None = None) -> JourneyActivities:
    """The activities with the providers HILO_* settings choose (capture by default).

    Credentials are read here, in the worker, and never travel in workflow inputs.
    ``channels`` is the process's :class:`Settings` (read from the environment when not given).

    Raises ValueError when a published journey sends webhooks and HILO_WEBHOOK_SECRET is not
    set: those sends would otherwise fail one by one, hours later.
    """
    channels = channels or Settings()
    providers = build_providers(channels)
    if "webhook" not in providers:
        unsigned = [
            f"{journey.key} ({path})"
            for journey, version in store.published_journeys()
            if journey.status != "archived"
            for path in _webhook_steps(JourneyDefinition.model_validate(version.definition))
        ]
        if unsigned:
            raise ValueError(f"{UNSIGNED_WEBHOOK}; webhook steps: {', '.join(unsigned)}")
    return JourneyActivities(
        store, providers=providers, links=channels.link_signer(), signed_webhooks_only=True
    )


def _webhook_steps(definition: JourneyDefinition) -> list[str]:
    return [
        f"{path} ({step.id})"
        for step, path in walk_steps(definition.steps)
        if isinstance(step, SendStep) and step.channel == "webhook"
    ]


def build_worker(
    client: Client,
    store: Store,
    task_queue: str,
    max_concurrent_activities: int = 100,
    activities: JourneyActivities | None = None,
    sandboxed: bool = False,
    **options: Any,
) -> Worker:
    """The worker for journeys.

    ``sandboxed`` runs the interpreter in the SDK's workflow sandbox. Journeys are data and the
    interpreter is the only workflow, so in production the sandbox would guard just our own
    code, at about a quarter of the worker's CPU (it re-imports the workflow module for every
    instance and re-enters itself for every payload). The test suite runs the interpreter
    sandboxed, replays recorded histories, and so keeps that code free of anything the
    sandbox forbids.
    """
    journey_activities = activities or JourneyActivities(store)
    # Activities touch the database synchronously; a thread pool keeps the event loop free.
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrent_activities)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=list(WORKFLOWS),
        activities=journey_activities.all(),
        activity_executor=executor,
        max_concurrent_activities=max_concurrent_activities,
        workflow_runner=SandboxedWorkflowRunner() if sandboxed else UnsandboxedWorkflowRunner(),
        **options,
    )


async def run_worker(settings: Settings) -> None:
    """Run a worker; exits at once (a line per missing setting, no traceback) when it could
    not send: production settings or a chosen provider's credentials missing."""
    settings.refuse_to_start_without("worker")
    store = Store(settings.resolved_database_url)
    try:
        activities = configured_activities(store, settings)
    except ValueError as error:  # build_providers names each missing setting, a line each
        raise SystemExit(str(error)) from None
    store.migrate()
    client = await connect(settings)
    worker = build_worker(
        client,
        store,
        settings.task_queue,
        settings.max_concurrent_activities,
        activities=activities,
        sandboxed=settings.workflow_sandbox,
    )
    await worker.run()


def main() -> None:
    asyncio.run(run_worker(Settings()))
