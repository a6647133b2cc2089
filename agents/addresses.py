"""Which hosts a clone may reach: the agent runtime's part of the outbound address policy.

A repository URL comes from a peer, so its host is resolved here and every address it
resolves to must be global (not loopback, private, link-local, the cloud metadata address,
multicast, reserved or unspecified) unless the executor allows it: `allow_private` (an
instance with FEDAGENT_ENVIRONMENT=dev) or an allowlist entry (a host name, an address or a
CIDR network; FEDAGENT_OUTBOUND_ALLOWLIST). The addresses checked are the ones the clone is
pinned to, so a second DNS answer cannot send it elsewhere.

This module does not import `federation` (whose own policy covers the HTTP fetches of cards
and events): the runtime configuration hands it the allowlist and the dev flag.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence

from agents.errors import AgentSetupError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class HostRefused(AgentSetupError):
    """The host is not one this executor may reach (or does not resolve)."""

    def __init__(self, host: str) -> None:
        # One message whatever the reason, so that a peer cannot map the executor's network.
        super().__init__(
            f"the repository host {host!r} is not one this executor may reach "
            "(a public address, or one named in FEDAGENT_OUTBOUND_ALLOWLIST)",
            invalid=True,
        )
        self.host = host


def _plain(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def allowed_address(
    address: Address, host: str, allowlist: Sequence[str], allow_private: bool
) -> bool:
    """Whether a clone may connect to `address` (which `host` resolved to)."""
    address = _plain(address)
    if address.is_global and not address.is_multicast:
        return True
    if allow_private:
        return not address.is_unspecified and not address.is_multicast
    for entry in allowlist:
        entry = entry.strip().lower().rstrip(".")
        if not entry:
            continue
        if entry == host:
            return True
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            continue
        if address.version == network.version and address in network:
            return True
    return False


async def resolve_allowed(
    host: str, port: int, *, allowlist: Sequence[str] = (), allow_private: bool = False
) -> list[str]:
    """The addresses of `host` a clone may be pinned to; HostRefused if any of them (or the
    name itself) is not allowed."""
    host = host.lower().rstrip(".")
    try:
        literal: Address | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                ),
                10.0,
            )
        except (OSError, TimeoutError, UnicodeError):
            raise HostRefused(host) from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses or not all(
        allowed_address(a, host, allowlist, allow_private) for a in addresses
    ):
        raise HostRefused(host)
    return list(dict.fromkeys(str(_plain(a)) for a in addresses))
