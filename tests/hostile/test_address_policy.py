"""The outbound address policy for every URL a peer names (issue 12, point 2).

The policy is exercised through the same httpx client the API and the worker use, against
real loopback servers: 127.0.0.1 is on this test's allowlist, 127.0.0.2 is not."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest

from federation.errors import PeerResponseInvalid, PeerUnreachable
from federation.netpolicy import (
    AddressNotAllowed,
    check_host,
    peer_client,
    request_bounded,
)
from federation.peer import fetch_card
from federation.settings import Settings
from tests.hostile.rogue import Rogue


def production(**kw: object) -> Settings:
    return Settings(environment="production", outbound_allowlist=["127.0.0.1"], **kw)  # type: ignore[arg-type]


class Raw:
    """A loopback server answering every request with the same raw bytes (after a delay)."""

    def __init__(self, host: str, answer: bytes, delay: float = 0.0) -> None:
        self.host, self.answer, self.delay = host, answer, delay
        self.hits = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> Raw:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.hits += 1
        self.requests.append(await reader.readuntil(b"\r\n\r\n"))
        await asyncio.sleep(self.delay)
        writer.write(self.answer)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()


async def test_loopback_outside_the_allowlist_is_never_connected_to() -> None:
    rogue = await Rogue("127.0.0.2").start()
    try:
        async with peer_client(production()) as http:
            with pytest.raises(AddressNotAllowed):
                await fetch_card(http, rogue.url)
        assert rogue.requests == []
    finally:
        await rogue.stop()


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "https://10.0.0.1/",
        "https://192.168.1.1/",
        "https://[::1]/",
        "https://[fd00:ec2::254]/",
        "https://[::ffff:127.0.0.2]/",
        "https://0.0.0.0/",
        "file:///etc/passwd",
        "http://user:pw@127.0.0.1/",
    ],
)
async def test_private_link_local_and_metadata_addresses_are_refused(url: str) -> None:
    async with peer_client(production()) as http:
        with pytest.raises(AddressNotAllowed):
            await request_bounded(http, "GET", url, max_bytes=1024, deadline=5)


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata address
        "64:ff9b::7f00:2",  # NAT64 of loopback
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b:1::a00:1",  # local-use NAT64: nobody here can tell what it reaches
        "::ffff:0:7f00:2",  # IPv4-translated loopback
        "::ffff:0:a9fe:a9fe",
        "::7f00:2",  # IPv4-compatible loopback
        "::a9fe:a9fe",
        "2002:a9fe:a9fe::1",  # 6to4 of the metadata address
    ],
)
async def test_ipv6_forms_of_internal_ipv4_addresses_are_refused(address: str) -> None:
    with pytest.raises(AddressNotAllowed):
        await check_host(address, 443, production())
    async with peer_client(production()) as http:
        with pytest.raises(AddressNotAllowed):
            await request_bounded(http, "GET", f"https://[{address}]/", max_bytes=1024, deadline=5)


async def test_ipv6_forms_of_a_public_ipv4_address_stay_allowed() -> None:
    # Only checked (nothing is sent): judged by the IPv4 address they embed, which is public.
    for address in ("64:ff9b::808:808", "::ffff:0:808:808", "2002:808:808::1"):
        assert await check_host(address, 443, production()) == [address]


async def test_plain_http_to_a_public_name_is_refused_outside_dev() -> None:
    async with peer_client(production()) as http:
        with pytest.raises(AddressNotAllowed, match="https"):
            await fetch_card(http, "http://example.com")


async def test_dev_allows_loopback() -> None:
    rogue = await Rogue("127.0.0.2").start()
    try:
        async with peer_client(Settings(environment="dev")) as http:
            card = await fetch_card(http, rogue.url)
        assert card["instanceId"] == rogue.instance_id
    finally:
        await rogue.stop()


async def test_a_host_name_is_checked_by_the_addresses_it_resolves_to() -> None:
    # `localhost` is not on the allowlist by name: what it resolves to decides.
    with pytest.raises(AddressNotAllowed):
        await check_host("localhost", 80, Settings(environment="production"))
    both = Settings(environment="production", outbound_allowlist=["127.0.0.1", "::1"])
    assert "127.0.0.1" in await check_host("localhost", 80, both)


async def test_redirects_are_not_followed() -> None:
    async with Raw("127.0.0.2", b"") as target:
        answer = (
            f"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.2:{target.port}/\r\n"
            "content-length: 0\r\nconnection: close\r\n\r\n"
        ).encode()
        async with Raw("127.0.0.1", answer) as redirector:
            async with peer_client(production()) as http:
                with pytest.raises(PeerUnreachable) as caught:
                    await fetch_card(http, f"http://127.0.0.1:{redirector.port}")
        assert "302" not in caught.value.detail
        assert target.hits == 0


async def test_a_card_larger_than_64_kib_is_not_read_to_the_end() -> None:
    body = json.dumps({"instanceId": "big", "keys": [], "pad": "x" * 200_000}).encode()
    answer = (
        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body
    async with Raw("127.0.0.1", answer) as server:
        async with peer_client(production()) as http:
            with pytest.raises(PeerResponseInvalid, match="larger"):
                await fetch_card(http, f"http://127.0.0.1:{server.port}")


async def test_a_compressed_answer_is_refused_before_it_is_inflated() -> None:
    # 10 MiB of zeros in about 10 KiB of gzip: the cap must not count the inflated bytes late.
    body = gzip.compress(json.dumps({"pad": "0" * (10 << 20)}).encode())
    answer = (
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body
    async with Raw("127.0.0.1", answer) as server:
        async with peer_client(production()) as http:
            with pytest.raises(PeerResponseInvalid, match="compressed"):
                await request_bounded(
                    http, "GET", f"http://127.0.0.1:{server.port}/", max_bytes=64 << 20, deadline=5
                )
    assert server.requests and b"accept-encoding: identity" in server.requests[0].lower()


async def test_a_peer_that_answers_slowly_hits_one_total_deadline() -> None:
    async with Raw("127.0.0.1", b"HTTP/1.1 200 OK\r\n", delay=10) as server:
        async with peer_client(production()) as http:
            with pytest.raises(PeerUnreachable, match="within"):
                await fetch_card(http, f"http://127.0.0.1:{server.port}", timeout=1.0)
