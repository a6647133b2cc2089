"""Refusal floods cannot fill the disk (issue 12, hole c, point 5)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from api.limits import BodySizeLimit, RefusalLimiter
from tests.conftest import Instance
from tests.hostile.conftest import RogueFactory, connection_rows
from tests.hostile.rogue import Rogue, RogueKey


async def test_refused_message_with_huge_fields_leaves_a_small_audit_row(
    spoke: Instance, rogue: Rogue
) -> None:
    marker = f"flood-{uuid.uuid4().hex}"
    since = (await spoke.fetch("SELECT now() AS at"))[0]["at"]
    body = rogue.envelope("COMMAND", spoke.id, {"marker": marker}, command_type="agent.status")
    body["messageId"] = [marker + "x" * 1950 for _ in range(200)]
    body["commandType"] = {"nested": ["y" * 1999] * 50}
    response = await rogue.post(spoke.url, "command", body, source="127.0.0.21")
    assert response.status_code == 422, response.text
    rows = await spoke.fetch(
        "SELECT octet_length(details::text) AS size, details FROM audit_log"
        " WHERE outcome = 'refused' AND action = 'incoming.command' AND at >= $1"
        " ORDER BY size DESC LIMIT 1",
        since,
    )
    assert rows, "the refusal is audited"
    assert rows[0]["size"] <= 2048
    assert marker not in str(rows[0]["details"])


async def test_a_flood_of_refusals_is_answered_429_and_only_counted(
    edge: Instance, rogue: Rogue
) -> None:
    source = "127.0.0.22"
    forged = RogueKey()

    async def audited() -> int:
        rows = await edge.fetch(
            "SELECT count(*) AS n FROM audit_log WHERE details->>'source' = $1", source
        )
        return int(rows[0]["n"])

    async def limited_metric() -> float:
        text = (await edge.http.get(f"{edge.url}/metrics")).text
        found = re.search(r"^fedagent_refusals_rate_limited_total (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    before = await limited_metric()
    codes: list[int] = []

    async def one() -> int:
        request = rogue.connection_request(edge.id, sign_with=forged)
        return (await rogue.post(edge.url, "connect", request, source=source)).status_code

    # In concurrent batches, so they arrive faster than the bucket refills even on a slow box.
    while codes.count(429) < 5 and len(codes) < 2000:
        codes += await asyncio.gather(*(one() for _ in range(40)))
    assert set(codes) == {401, 429}, codes
    assert codes.count(401) >= 60  # the burst (FEDAGENT_REFUSAL_BURST) is let through
    response = await rogue.post(
        edge.url, "connect", rogue.connection_request(edge.id, sign_with=forged), source=source
    )
    codes.append(response.status_code)
    if response.status_code == 429:
        assert response.json()["code"] == "rate_limited"
    # Every 401 was audited, no 429 was: the audit log grows no faster than the refill rate.
    assert await audited() == codes.count(401)
    assert await limited_metric() >= before + codes.count(429)
    # Another address is not held back by this one.
    other = await rogue.post(
        edge.url,
        "connect",
        rogue.connection_request(edge.id, sign_with=forged),
        source="127.0.0.23",
    )
    assert other.status_code == 401


async def test_audit_days_past_retention_are_dropped_and_recent_rows_stay_append_only(
    spoke: Instance,
) -> None:
    conn = await spoke.db()
    try:
        old_day = await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date - 400")
        await conn.execute("SELECT audit_log_ensure_days($1, $1)", old_day)
        await conn.execute(
            "INSERT INTO audit_log (at, actor, action) VALUES ($1::date + time '12:00', 'old',"
            " 'hostile.retention')",
            old_day,
        )
        await conn.execute(
            "INSERT INTO audit_log (actor, action) VALUES ('recent', 'hostile.retention')"
        )
        # What the API runs every hour, with the default FEDAGENT_AUDIT_RETENTION_DAYS=365.
        dropped = [r[0] for r in await conn.fetch("SELECT audit_log_drop_expired(365)")]
        assert f"audit_log_d{old_day:%Y%m%d}" in dropped
        actors = await conn.fetch("SELECT actor FROM audit_log WHERE action = 'hostile.retention'")
        assert [r["actor"] for r in actors] == ["recent"]
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM audit_log WHERE action = 'hostile.retention'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE audit_log SET actor = 'x' WHERE actor = 'recent'")
        today = await conn.fetchval(
            "SELECT 'audit_log_d' || to_char((now() AT TIME ZONE 'UTC')::date, 'YYYYMMDD')"
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f'TRUNCATE "{today}"')
        assert await conn.fetch("SELECT audit_log_drop_expired(1)") is not None
        assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE actor = 'recent'") == 1
    finally:
        await conn.close()


async def test_strangers_cannot_fill_the_admins_list_with_connection_requests(
    edge: Instance, make_rogue: RogueFactory
) -> None:
    # edge keeps at most 20 requests waiting; each stranger mints its own key, card and id, and
    # asks from an address of its own with its card on a host of its own.
    waiting: list[str] = []
    try:
        for n in range(21):
            rogue = await make_rogue(host=f"127.0.0.{200 + n}")
            request = rogue.connection_request(edge.id)
            response = await rogue.post(edge.url, "connect", request, source=f"127.0.0.{30 + n}")
            if response.status_code != 200:
                break
            waiting.append(request["payload"]["connectionId"])
        assert response.status_code == 429, response.text
        assert response.json()["code"] == "too_many_pending_requests"
        assert await connection_rows(edge, rogue.instance_id) == []
        pending = await edge.fetch(
            "SELECT count(*) AS n FROM connections WHERE direction = 'inbound'"
            " AND status = 'PENDING'"
        )
        assert pending[0]["n"] <= 20
        # Once the admin deals with one, a stranger may ask again.
        rejected = await edge.call("POST", f"/connections/{waiting.pop()}/reject")
        assert rejected.status_code == 200, rejected.text
        again = await rogue.post(
            edge.url, "connect", rogue.connection_request(edge.id), source="127.0.0.60"
        )
        assert again.status_code == 200, again.text
    finally:
        for row in await edge.fetch(
            "SELECT connection_id FROM connections WHERE direction = 'inbound'"
            " AND status = 'PENDING'"
        ):
            await edge.call("POST", f"/connections/{row['connection_id']}/reject")


async def _declared_too_large(instance_url: str, path: str, source: str) -> int:
    """One request that only says its body is huge (sent over a raw socket: no body follows)."""
    url = httpx.URL(instance_url)
    reader, writer = await asyncio.open_connection(url.host, url.port, local_addr=(source, 0))
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 999999999\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_bodies_refused_for_their_size_are_rate_limited_like_other_refusals(
    edge: Instance,
) -> None:
    source = "127.0.0.24"
    path = f"/api/v1/federation/incoming/{'p' * 4000}"

    async def audited() -> list[Any]:
        return await edge.fetch(
            "SELECT action FROM audit_log WHERE details->>'remoteAddr' = $1", source
        )

    codes: list[int] = []
    while codes.count(429) < 5 and len(codes) < 2000:
        codes += await asyncio.gather(
            *(_declared_too_large(edge.url, path, source) for _ in range(40))
        )
    assert set(codes) == {413, 429}, codes
    rows = await audited()
    # Only the refusals let through were audited; the sender's path is not kept as it is.
    assert len(rows) == codes.count(413)
    assert {row["action"] for row in rows} == {"incoming.other"}


def _limited_app() -> FastAPI:
    """The API's body-size middleware and refusal limiter on an app of their own (no store:
    nothing is audited), burst 3, refilled once in 1000 s."""
    app = FastAPI()
    app.state.refusal_limiter = RefusalLimiter(3, 0.001)
    app.add_middleware(BodySizeLimit, max_bytes=1024)
    return app


async def _oversized_from(app: FastAPI, address: str) -> int:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
        response = await client.post("/api/v1/federation/incoming/connect", content=b"x" * 2048)
        return response.status_code


async def test_a_sender_hopping_through_one_ipv6_64_gets_one_burst_of_refusals() -> None:
    app = _limited_app()
    hops = [f"2001:db8:1:2::{n:x}" for n in range(1, 9)]
    codes = [await _oversized_from(app, address) for address in hops]
    assert codes == [413] * 3 + [429] * 5
    # Another /64 (another subscriber) and an IPv4 sender have budgets of their own.
    assert await _oversized_from(app, "2001:db8:1:3::1") == 413
    assert await _oversized_from(app, "192.0.2.7") == 413
    # The IPv4-mapped form of an IPv4 sender is that sender.
    for _ in range(2):
        await _oversized_from(app, "192.0.2.7")
    assert await _oversized_from(app, "::ffff:192.0.2.7") == 429
