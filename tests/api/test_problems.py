"""Every error an app meets is answered as problem+json with its stable code (no process)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from temporalio.service import RPCError, RPCStatusCode

from api.problems import PROBLEM, install
from federation.errors import ConnectionNotFound


class Body(BaseModel):
    name: str


def app_raising() -> FastAPI:
    app = FastAPI()
    install(app)
    raised: dict[str, Exception] = {
        "federation": ConnectionNotFound("no such connection"),
        "temporal": RPCError("secret engine words", RPCStatusCode.UNAVAILABLE, b""),
        "deep": RecursionError(),
        "database": asyncpg.PostgresConnectionError("db down"),
        "socket": ConnectionRefusedError(),
        "bug": ZeroDivisionError(),
    }

    @app.get("/raise/{kind}")
    async def raise_(kind: str) -> None:
        raise raised[kind]

    @app.post("/body")
    async def body(body: Body) -> None:
        return None

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_raising(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        yield client


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/raise/federation", 404, "connection_not_found"),
        ("/raise/temporal", 503, "temporal_unavailable"),
        ("/raise/deep", 422, "body_too_deep"),
        ("/raise/database", 503, "database_unavailable"),
        ("/raise/socket", 503, "database_unavailable"),
        ("/raise/bug", 500, "internal_error"),
        ("/nowhere", 404, "not_found"),
    ],
)
async def test_each_error_has_its_code(
    client: httpx.AsyncClient, path: str, status: int, code: str
) -> None:
    answer = await client.get(path)
    assert answer.status_code == status
    assert answer.headers["content-type"] == PROBLEM
    problem = answer.json()
    assert problem["code"] == code
    assert problem["type"] == f"urn:fedagent:problem:{code}"
    assert problem["instance"] == path
    assert "secret engine words" not in answer.text


async def test_a_body_that_does_not_match_names_its_fields(client: httpx.AsyncClient) -> None:
    answer = await client.post("/body", json={"name": 3})
    assert answer.status_code == 422
    assert answer.json()["code"] == "validation_error"
    assert answer.json()["errors"][0]["field"] == "name"
    unreadable = await client.post(
        "/body", content=b"{", headers={"content-type": "application/json"}
    )
    assert unreadable.json()["code"] in ("body_invalid", "validation_error")
