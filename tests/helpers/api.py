"""The API over a store (and a journey lab, for tests that run journeys), and the calls
tests make to it: Basic-auth write keys, an in-process client, row counts."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from sqlmodel import func, select

from api.app import create_app
from hilo.db.models import ConsentChange, Device, Identity, OutboxEntry, Profile, StoredEvent
from hilo.db.store import Store
from hilo.devtools.simulation import JourneyLab
from hilo.events import CustomerEvent
from hilo.intake.routing import EventRouter, RouteResult
from hilo.settings import Settings


class LabRouter(EventRouter):
    """The app's router, also handing what it starts to the lab (as JourneyLab.send does),
    so that ``lab.result`` can skip the journey's timers while it waits."""

    def __init__(self, router: EventRouter, lab: JourneyLab) -> None:
        super().__init__(router.store, router.client, router.task_queue)
        self.lab = lab

    async def deliver(self, event: CustomerEvent) -> RouteResult:
        result = await super().deliver(event)
        self.lab.handles.update(result.handles)
        return result


TOKEN = "t"


# The shop's backend holds a secret key; a page and an app ship theirs (client sources).
SOURCES = {"web-key": "web", "ios-key": "ios", "shop-key": {"name": "shop", "kind": "server"}}


ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def basic(write_key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()}


def hilo_app(store: Store, lab: JourneyLab | None = None, dispatcher: bool = False) -> FastAPI:
    """The API over ``store``; with a lab, its Temporal server and a router that hands what
    it starts to the lab (so ``lab.result`` can skip the journey's timers)."""
    app = create_app(
        Settings(admin_token=TOKEN, write_keys=SOURCES, dispatcher=dispatcher),
        store=store,
        client=lab.client if lab else None,
        task_queue=lab.router.task_queue if lab else None,
    )
    if lab is not None:
        app.state.router = app.state.dispatcher.router = LabRouter(app.state.router, lab)
    return app


@asynccontextmanager
async def asgi(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://hilo", headers=ADMIN
    ) as client:
        yield client


def counts(store: Store) -> dict[str, int]:
    with store.session() as session:
        return {
            model.__name__: int(session.exec(select(func.count()).select_from(model)).one())
            for model in (StoredEvent, Profile, Identity, OutboxEntry, ConsentChange, Device)
        }
