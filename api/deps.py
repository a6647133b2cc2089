"""FastAPI dependencies as Annotated aliases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import asyncpg
import httpx
from fastapi import Depends, Request
from temporalio.client import Client

from api.limits import RefusalLimiter, StrangerFetches
from federation.errors import Forbidden, Unauthenticated
from federation.identity import Identity, load_identity
from federation.keystore import KeyCipher
from federation.peer import CardKeyRefresher
from federation.settings import Settings
from federation.store import repos
from federation.users import User
from operations import Services

T = TypeVar("T")


def _state(name: str, kind: type[T]) -> Callable[[Request], T]:
    """A dependency that hands on what the lifespan (`api.main`) opened as `app.state.<name>`."""

    def dependency(request: Request) -> T:
        value: T = getattr(request.app.state, name)
        return value

    dependency.__name__ = f"app_state_{name}"
    return dependency


app_pool = _state("pool", asyncpg.Pool)
_temporal = _state("temporal", Client)
_http = _state("http", httpx.AsyncClient)
app_settings = _state("settings", Settings)
_cipher = _state("cipher", KeyCipher)
# Key refreshes run while a request holds a connection of the main pool: their own.
_key_pool = _state("key_pool", asyncpg.Pool)
# Strangers' cards are read through their own client (own limits, own address policy).
_stranger_http = _state("stranger_http", httpx.AsyncClient)
_refusal_limiter = _state("refusal_limiter", RefusalLimiter)
_stranger_fetches = _state("stranger_fetches", StrangerFetches)


def services_for(request: Request) -> Services:
    """The instance's `Services`, as every face (REST routes, console pages) hands them on."""
    state = request.app.state
    return Services(
        pool=state.pool,
        http=state.http,
        temporal=state.temporal,
        settings=state.settings,
        starter=state.spawner,
        transcripts=state.transcripts,
        cipher=state.cipher,
        listener=state.agent_state_listener,
    )


async def _identity(
    pool: Annotated[asyncpg.Pool, Depends(app_pool)], cipher: Annotated[KeyCipher, Depends(_cipher)]
) -> Identity:
    # Loaded per request: a rotated key signs from the next request on, in every process.
    return await load_identity(pool, cipher)


def _key_refresher(
    key_pool: Annotated[asyncpg.Pool, Depends(_key_pool)],
    http: Annotated[httpx.AsyncClient, Depends(_http)],
    settings: Annotated[Settings, Depends(app_settings)],
) -> CardKeyRefresher:
    return CardKeyRefresher(key_pool, http, settings.key_refresh_interval)


async def user_for_token(pool: asyncpg.Pool, token: str) -> User:
    """The local user an API token names (a bearer header or the console's cookie)."""
    row: dict[str, Any] | None = await repos.find_token(pool, token.strip())
    if row is None:
        raise Unauthenticated("the API token is not valid")
    return User(row["name"], row["role"], row["workspace"], token_id=row["id"])


async def _current_user(request: Request) -> User:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("send 'Authorization: Bearer <token>'")
    return await user_for_token(app_pool(request), token)


def require_admin(user: User) -> User:
    if not user.is_admin:
        raise Forbidden("this needs an admin token")
    return user


async def _admin_user(user: Annotated[User, Depends(_current_user)]) -> User:
    return require_admin(user)


PoolDep = Annotated[asyncpg.Pool, Depends(app_pool)]
TemporalDep = Annotated[Client, Depends(_temporal)]
HttpDep = Annotated[httpx.AsyncClient, Depends(_http)]
StrangerHttpDep = Annotated[httpx.AsyncClient, Depends(_stranger_http)]
RefusalLimiterDep = Annotated[RefusalLimiter, Depends(_refusal_limiter)]
StrangerFetchesDep = Annotated[StrangerFetches, Depends(_stranger_fetches)]
SettingsDep = Annotated[Settings, Depends(app_settings)]
IdentityDep = Annotated[Identity, Depends(_identity)]
CipherDep = Annotated[KeyCipher, Depends(_cipher)]
KeyRefresherDep = Annotated[CardKeyRefresher, Depends(_key_refresher)]
CurrentUser = Annotated[User, Depends(_current_user)]
AdminUser = Annotated[User, Depends(_admin_user)]
ServicesDep = Annotated[Services, Depends(services_for)]
