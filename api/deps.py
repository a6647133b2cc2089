"""FastAPI dependencies as Annotated aliases."""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
import httpx
from fastapi import Depends, Request
from temporalio.client import Client

from federation.errors import Forbidden, Unauthenticated
from federation.identity import Identity, load_identity
from federation.keystore import KeyCipher
from federation.peer import CardKeyRefresher
from federation.settings import Settings
from federation.store import repos
from federation.users import User
from operations import Services


def _pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.pool
    return pool


def _temporal(request: Request) -> Client:
    client: Client = request.app.state.temporal
    return client


def _http(request: Request) -> httpx.AsyncClient:
    http: httpx.AsyncClient = request.app.state.http
    return http


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _cipher(request: Request) -> KeyCipher:
    cipher: KeyCipher = request.app.state.cipher
    return cipher


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


async def _identity(request: Request) -> Identity:
    # Loaded per request: a rotated key signs from the next request on, in every process.
    return await load_identity(request.app.state.pool, request.app.state.cipher)


def _key_refresher(request: Request) -> CardKeyRefresher:
    settings: Settings = request.app.state.settings
    return CardKeyRefresher(
        request.app.state.key_pool, request.app.state.http, settings.key_refresh_interval
    )


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
    return await user_for_token(request.app.state.pool, token)


def require_admin(user: User) -> User:
    if not user.is_admin:
        raise Forbidden("this needs an admin token")
    return user


async def _admin_user(user: Annotated[User, Depends(_current_user)]) -> User:
    return require_admin(user)


PoolDep = Annotated[asyncpg.Pool, Depends(_pool)]
TemporalDep = Annotated[Client, Depends(_temporal)]
HttpDep = Annotated[httpx.AsyncClient, Depends(_http)]
SettingsDep = Annotated[Settings, Depends(_settings)]
IdentityDep = Annotated[Identity, Depends(_identity)]
CipherDep = Annotated[KeyCipher, Depends(_cipher)]
KeyRefresherDep = Annotated[CardKeyRefresher, Depends(_key_refresher)]
CurrentUser = Annotated[User, Depends(_current_user)]
AdminUser = Annotated[User, Depends(_admin_user)]
ServicesDep = Annotated[Services, Depends(services_for)]
