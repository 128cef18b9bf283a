"""What endpoints depend on, read from ``app.state`` so nothing is built at import time."""

import hmac
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Response, status
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from temporalio.client import Client

from hilo import strict_json
from hilo.catalog import JourneyCatalog
from hilo.channels.config import ChannelSettings
from hilo.dispatcher import Dispatcher
from hilo.ingest import Ingestor
from hilo.playbook import load_playbook
from hilo.routing import EventRouter
from hilo.settings import Settings
from hilo.storage import Store

# auto_error=False so a missing token gets our message rather than FastAPI's.
bearer = HTTPBearer(auto_error=False, description="The admin token (HILO_ADMIN_TOKEN).")


def _state(request: Request, name: str) -> object:
    value = getattr(request.app.state, name, None)
    if value is None:
        # Only when the app was built without a store or client and its lifespan never ran.
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Hilo is not ready: no {name}")
    return value


def get_settings(request: Request) -> Settings:
    settings = _state(request, "settings")
    assert isinstance(settings, Settings)
    return settings


def get_store(request: Request) -> Store:
    store = _state(request, "store")
    assert isinstance(store, Store)
    return store


def get_client(request: Request) -> Client:
    client = _state(request, "client")
    assert isinstance(client, Client)
    return client


def get_router(request: Request) -> EventRouter:
    router = _state(request, "router")
    assert isinstance(router, EventRouter)
    return router


def get_ingestor(request: Request) -> Ingestor:
    ingestor = getattr(request.app.state, "ingestor", None)
    if ingestor is None:
        ingestor = request.app.state.ingestor = Ingestor(get_store(request))
    assert isinstance(ingestor, Ingestor)
    return ingestor


def get_dispatcher(request: Request) -> Dispatcher | None:
    """The app's dispatcher; None only before a lifespan that makes the client has run."""
    dispatcher = getattr(request.app.state, "dispatcher", None)
    return dispatcher if isinstance(dispatcher, Dispatcher) else None


SettingsDep = Annotated[Settings, Depends(get_settings)]
IngestorDep = Annotated[Ingestor, Depends(get_ingestor)]
StoreDep = Annotated[Store, Depends(get_store)]
ClientDep = Annotated[Client, Depends(get_client)]
RouterDep = Annotated[EventRouter, Depends(get_router)]


def get_channel_settings(request: Request) -> ChannelSettings:
    """``HILO_*`` channel settings, read once per app (tests put their own on app.state)."""
    settings = getattr(request.app.state, "channel_settings", None)
    if settings is None:
        try:
            settings = ChannelSettings()
        except ValidationError as error:
            # Names the variables only: the input values may be secrets.
            problems = "; ".join(
                f"HILO_{'_'.join(str(part) for part in problem['loc']).upper() or 'SETTINGS'}: "
                f"{problem['msg']}"
                for problem in error.errors()
            )
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, f"channel settings are invalid: {problems}"
            ) from None
        request.app.state.channel_settings = settings
    assert isinstance(settings, ChannelSettings)
    return settings


ChannelSettingsDep = Annotated[ChannelSettings, Depends(get_channel_settings)]


def get_catalog(
    request: Request, store: StoreDep, settings: SettingsDep, channels: ChannelSettingsDep
) -> JourneyCatalog:
    # The playbook file is read once per app.
    if not hasattr(request.app.state, "playbook"):
        request.app.state.playbook = load_playbook(settings.playbook_file)
    topics = [topic.key for topic in channels.preference_topics]
    return JourneyCatalog(store, request.app.state.playbook, topics=topics)


CatalogDep = Annotated[JourneyCatalog, Depends(get_catalog)]


def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing admin token: send 'Authorization: Bearer <HILO_ADMIN_TOKEN>'",
            headers=challenge,
        )
    # Constant-time, so response timing does not reveal how much of a guess was right.
    if not hmac.compare_digest(credentials.credentials.encode(), settings.admin_token.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "wrong admin token: it must equal HILO_ADMIN_TOKEN",
            headers=challenge,
        )


AdminDep = Annotated[None, Depends(require_admin)]
# For APIRouter(dependencies=...): every route added to such a router is admin-only by default.
ADMIN_ONLY = [Depends(require_admin)]


class StrictJSONRequest(Request):
    """A request whose JSON body is read by :func:`hilo.strict_json.loads`, as /v1's is."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = strict_json.loads(await self.body())
            except strict_json.NotStorableJSON as error:
                # Shaped as FastAPI's own validation errors, so clients read one format.
                detail = [
                    {"type": "value_error", "loc": ["body", *error.path], "msg": error.message}
                ]
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """The route class of every router whose routes take a JSON body: one JSON policy."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
