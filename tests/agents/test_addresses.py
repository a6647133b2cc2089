"""A host name is judged by every address it resolves to (issue 18, point 14).

DNS is the world outside: `socket.getaddrinfo`, which the event loop's resolver calls, answers
here from a table, so a name can resolve to one public and one internal address without any
real DNS. Nothing connects anywhere: only the check that comes before a connection runs."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from agents.addresses import HostRefused, resolve_allowed
from federation.netpolicy import AddressNotAllowed, check_host
from federation.settings import Settings

PUBLIC = "93.184.216.34"
FAKE_DNS = {
    "public.example.test": [PUBLIC, "2606:2800:220:1:248:1893:25c8:1946"],
    "metadata-too.example.test": [PUBLIC, "169.254.169.254"],
    "private-too.example.test": [PUBLIC, "10.1.2.3"],
    "loopback-too.example.test": [PUBLIC, "::1"],
}


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in FAKE_DNS:
            return real(host, port, *args, **kwargs)
        answers = []
        for address in FAKE_DNS[host]:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
            answers.append((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return answers

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


async def test_a_name_resolving_only_to_public_addresses_is_allowed(fake_dns: None) -> None:
    assert await resolve_allowed("public.example.test", 443) == FAKE_DNS["public.example.test"]
    production = Settings(environment="production")
    assert PUBLIC in await check_host("public.example.test", 443, production)


@pytest.mark.parametrize(
    "host", ["metadata-too.example.test", "private-too.example.test", "loopback-too.example.test"]
)
async def test_a_clone_host_resolving_also_to_an_internal_address_is_refused(
    fake_dns: None, host: str
) -> None:
    with pytest.raises(HostRefused):
        await resolve_allowed(host, 443)


@pytest.mark.parametrize(
    "host", ["metadata-too.example.test", "private-too.example.test", "loopback-too.example.test"]
)
async def test_a_peer_url_host_resolving_also_to_an_internal_address_is_refused(
    fake_dns: None, host: str
) -> None:
    with pytest.raises(AddressNotAllowed):
        await check_host(host, 443, Settings(environment="production"))
