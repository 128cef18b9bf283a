"""The FastAPI application, built by :func:`create_app` from settings (no import-time state).

Run it with ``uvicorn --factory api.app:app_from_env``.
"""

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from temporalio.client import Client

from api.openapi import method_not_allowed
from api.routes import api_router
from hilo.db.store import Store
from hilo.intake.acceptance import Ingestor
from hilo.intake.dispatcher import Dispatcher
from hilo.intake.routing import EventRouter
from hilo.settings import Settings

DOCS_ASSETS = "/docs/assets"


def create_app(
    settings: Settings,
    store: Store | None = None,
    client: Client | None = None,
    task_queue: str | None = None,
) -> FastAPI:
    """The API over ``store`` and ``client``; whichever is missing is made at startup.

    In production, exits at once (no traceback) naming each setting the API cannot run without.
    """
    settings.refuse_to_start_without("api")
    queue = task_queue or settings.task_queue

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned_store: Store | None = None
        if store is None:
            owned_store = Store(settings.resolved_database_url)
            owned_store.migrate()
            app.state.store = owned_store
        if client is None:
            from worker.main import connect  # imports the workflow code: only when needed

            app.state.client = await connect(settings)
        if store is None or client is None:
            app.state.router = EventRouter(app.state.store, app.state.client, queue)
            app.state.dispatcher = Dispatcher(app.state.store, app.state.router)
            app.state.ingestor = Ingestor(app.state.store)
        # Everything loaded at start lives as long as the process: keep it out of the
        # collector's full passes, which otherwise pause requests for 100+ ms under load.
        gc.freeze()
        dispatcher: Dispatcher = app.state.dispatcher
        if settings.dispatcher:
            dispatcher.start()  # delivers what earlier runs accepted, then new events
        try:
            yield
        finally:
            await dispatcher.stop()
            if owned_store is not None:
                owned_store.dispose()

    # /docs and /redoc load Swagger UI and ReDoc from the installed package, not a CDN,
    # so they work where the API has no internet.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="Hilo",
        summary="Customer journeys as durable Temporal workflows.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    # The links and webhooks read the same settings object (tests may put their own after).
    app.state.channel_settings = settings
    # Set here, not in the lifespan, so the app also works where no lifespan runs
    # (httpx.ASGITransport in tests).
    app.state.store = store
    app.state.client = client
    app.state.router = EventRouter(store, client, queue) if store and client else None
    app.state.dispatcher = Dispatcher(store, app.state.router) if store and client else None
    app.state.ingestor = Ingestor(store) if store else None
    app.include_router(api_router)
    app.add_exception_handler(405, method_not_allowed)
    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn: settings from HILO_* variables."""
    return create_app(Settings())
