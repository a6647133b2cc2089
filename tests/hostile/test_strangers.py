"""Strangers at the federation boundary (issue 18, points 8 and 12): their connection requests
are bounded before anything is fetched, their cards are read through a client of their own,
and their requests cannot hold the admin's list for ever."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import uuid
from collections.abc import AsyncIterator

import pytest

from federation.errors import ConnectBusy
from federation.netpolicy import AddressPolicy, BoundedResolver, peer_client, stranger_client
from federation.peer import fetch_card
from federation.settings import Settings
from tests.conftest import Instance
from tests.hostile.conftest import RogueFactory, connected, connection_rows
from tests.hostile.rogue import Rogue, RogueKey, endorse


class Tarpit:
    """A loopback server that accepts every connection and never says a word."""

    def __init__(self) -> None:
        self.accepted = 0
        self._held: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Tarpit:
        self.server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self._held:
            writer.close()

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._held.append(writer)


async def _until(condition: object, what: str, seconds: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


def _production(**kw: object) -> Settings:
    return Settings(environment="production", outbound_allowlist=["127.0.0.1"], **kw)  # type: ignore[arg-type]


# --- point 8: a separate, bounded pool for what strangers cause ------------------------------


async def test_strangers_naming_a_silent_url_cannot_starve_the_instances_own_calls(
    spoke: Instance, rogue: Rogue
) -> None:
    cid = await connected(rogue, spoke)  # a real peer, whose card spoke will need to read
    # More requests than the API's shared client has connections, each from its own address.
    count = 120
    try:
        async with Tarpit() as tarpit:
            strangers = [Rogue() for _ in range(count)]  # keys and ids only: no card server

            async def ask(n: int) -> int:
                request = strangers[n].connection_request(spoke.id, url=tarpit.url)
                source = f"127.0.1.{n + 1}"
                response = await strangers[n].post(spoke.url, "connect", request, source=source)
                return response.status_code

            flood = [asyncio.create_task(ask(n)) for n in range(count)]
            await _until(
                lambda: tarpit.accepted >= 100 or sum(t.done() for t in flood) >= count - 8,
                "the flood never got under way",
            )
            # Meanwhile the peer rotates its key and says so: spoke must read its card (a key
            # refresh gives up after 5 s) to accept the notice.
            new = RogueKey()
            endorsed = {
                **new.card_entry(),
                "endorsement": endorse(rogue.key, rogue.instance_id, new),
            }
            rogue.card_overrides = {"keys": [rogue.key.card_entry(), endorsed]}
            notice = rogue.envelope(
                "CONNECT",
                spoke.id,
                {"connectionId": cid},
                command_type="connection.keys_changed",
                sign_with=new,
                keyId=new.key_id,
            )
            response = await rogue.post(spoke.url, "connect", notice)
            assert response.status_code == 200, response.text
            codes = await asyncio.gather(*flood)
            assert set(codes) <= {429, 502, 503}, codes
            # Per named host, at most two cards were ever being read at once.
            assert tarpit.accepted <= 2
        assert (
            await spoke.fetch("SELECT 1 FROM connections WHERE remote_url = $1", tarpit.url) == []
        )
    finally:
        await spoke.call("POST", f"/connections/{cid}/disconnect")


async def test_the_strangers_client_refuses_at_once_when_its_connections_are_all_held() -> None:
    settings = _production(stranger_fetch_concurrency=2, stranger_fetch_timeout=3.0)
    peer = await Rogue().start()
    try:
        async with Tarpit() as tarpit, stranger_client(settings) as strangers:
            held = [
                asyncio.create_task(fetch_card(strangers, tarpit.url, timeout=3.0))
                for _ in range(2)
            ]
            await _until(lambda: tarpit.accepted == 2, "the tarpit was never reached")
            with pytest.raises(ConnectBusy):
                await fetch_card(strangers, tarpit.url, timeout=3.0)
            assert tarpit.accepted == 2
            # The client peers' traffic uses is another one: it still reaches a real card.
            async with peer_client(settings) as peers:
                assert (await fetch_card(peers, peer.url))["instanceId"] == peer.instance_id
            for task in held:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
    finally:
        await peer.stop()


async def test_slow_name_lookups_for_strangers_hold_a_bounded_number_of_threads() -> None:
    # Stands in for a DNS server that takes its time: the lookup blocks until released.
    release = threading.Event()
    asked: list[str] = []

    def slow_dns(host: str, port: int, **kw: object) -> list[object]:
        asked.append(host)
        release.wait(30)
        return socket.getaddrinfo("127.0.0.1", port, **kw)  # type: ignore[arg-type]

    resolver = BoundedResolver(2, slow_dns)
    policy = AddressPolicy(dev=False, allowlist=["127.0.0.1"], resolver=resolver)
    try:
        waiting = [asyncio.create_task(policy.resolve(f"slow{n}.test", 443)) for n in range(2)]
        await _until(lambda: len(asked) == 2, "the lookups never started")
        with pytest.raises(ConnectBusy):
            await policy.resolve("third.test", 443)
        # A caller that gives up does not free the thread still waiting for the answer.
        for task in waiting:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with pytest.raises(ConnectBusy):
            await policy.resolve("fourth.test", 443)
        assert asked == ["slow0.test", "slow1.test"]
        release.set()
        await _until(lambda: resolver.busy == 0, "the threads never came back")
        assert await policy.resolve("late.test", 443) == ["127.0.0.1"]
    finally:
        release.set()
        resolver.close()


# --- point 12: per-source and per-host caps, and expiry of pending requests -----------------


@pytest.fixture
async def edge_cleanup(edge: Instance) -> AsyncIterator[None]:
    yield
    for row in await edge.fetch(
        "SELECT connection_id FROM connections WHERE direction = 'inbound' AND status = 'PENDING'"
    ):
        await edge.call("POST", f"/connections/{row['connection_id']}/reject")


async def _ask(edge: Instance, rogue: Rogue, source: str) -> tuple[int, str]:
    response = await rogue.post(
        edge.url, "connect", rogue.connection_request(edge.id), source=source
    )
    return response.status_code, response.json().get("code", "")


async def test_one_card_server_cannot_hold_every_pending_slot(
    edge: Instance, make_rogue: RogueFactory, edge_cleanup: None
) -> None:
    # edge keeps at most 3 requests naming one host; each of these asks from its own address.
    answers = []
    for n in range(4):
        rogue = await make_rogue(host="127.0.0.130")
        answers.append(await _ask(edge, rogue, f"127.0.0.{70 + n}"))
    assert answers[:3] == [(200, "")] * 3, answers
    assert answers[3] == (429, "too_many_pending_for_host")
    assert rogue.requests == []  # refused before its card was read
    assert await connection_rows(edge, rogue.instance_id) == []
    other_host = await make_rogue(host="127.0.0.131")
    assert await _ask(edge, other_host, "127.0.0.74") == (200, "")


async def test_one_sender_address_cannot_hold_every_pending_slot(
    edge: Instance, make_rogue: RogueFactory, edge_cleanup: None
) -> None:
    answers = []
    for n in range(4):
        rogue = await make_rogue(host=f"127.0.0.{140 + n}")
        answers.append(await _ask(edge, rogue, "127.0.0.80"))
    assert answers[:3] == [(200, "")] * 3, answers
    assert answers[3] == (429, "too_many_pending_from_source")
    assert rogue.requests == []
    # Hopping to another address of the same IPv4 sender's neighbours is another source; an
    # IPv6 sender is counted by its /64 (tests/hostile/test_floods.py).
    assert await _ask(edge, rogue, "127.0.0.81") == (200, "")


async def test_a_request_nobody_answered_expires_and_frees_its_slot(
    edge: Instance, make_rogue: RogueFactory, edge_cleanup: None
) -> None:
    first = []
    for n in range(3):
        rogue = await make_rogue(host="127.0.0.150")
        request = rogue.connection_request(edge.id)
        response = await rogue.post(edge.url, "connect", request, source=f"127.0.0.{90 + n}")
        assert response.status_code == 200, response.text
        first.append(uuid.UUID(request["payload"]["connectionId"]))
    late = await make_rogue(host="127.0.0.150")
    assert await _ask(edge, late, "127.0.0.93") == (429, "too_many_pending_for_host")
    # A week passes (FEDAGENT_PENDING_REQUEST_TTL) without the admin answering the first one.
    conn = await edge.db()
    try:
        await conn.execute(
            "UPDATE connections SET created_at = now() - interval '8 days'"
            " WHERE connection_id = $1",
            first[0],
        )
    finally:
        await conn.close()
    assert await _ask(edge, late, "127.0.0.93") == (200, "")
    rows = await edge.fetch("SELECT status FROM connections WHERE connection_id = $1", first[0])
    assert rows[0]["status"] == "DISCONNECTED"
    expired = await edge.fetch(
        "SELECT 1 FROM audit_log WHERE action = 'connection.request_expired'"
        " AND details->>'connectionId' = $1",
        str(first[0]),
    )
    assert len(expired) == 1
