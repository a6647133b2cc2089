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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from agents.errors import AgentSetupError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Lookup = Callable[[str, int], Awaitable[list[Any]]]


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


# IPv6 ranges whose last 32 bits name an IPv4 host that a connection ends up reaching: NAT64
# (RFC 6052), IPv4-translated (RFC 2765, `::ffff:0:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`,
# which also holds `::` and `::1`). An address there is as allowed as the IPv4 address it embeds.
EMBEDDING_IPV4 = tuple(
    ipaddress.IPv6Network(n) for n in ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96")
)
# Local-use NAT64 (RFC 8215): which IPv4 network it translates to is the operator's secret.
LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def _plain(address: Address) -> Address:
    """The address to connect to: an IPv4-mapped address is its IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def judged(address: Address) -> Address | None:
    """The address the policy judges: the IPv4 host an IPv6 address embeds (mapped, NAT64,
    translated, compatible, 6to4), else the address itself; None for one nobody can judge."""
    address = _plain(address)
    if not isinstance(address, ipaddress.IPv6Address):
        return address
    if address in LOCAL_NAT64:
        return None
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in EMBEDDING_IPV4):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


class AddressRule:
    """The one rule for addresses a peer made this instance reach (cards, events, clones):
    global unicast addresses, plus what `allowlist` names (host names, addresses, CIDRs);
    `allow_private` (environment=dev) lets anything but unspecified or multicast through."""

    def __init__(
        self,
        allowlist: Sequence[str] = (),
        *,
        allow_private: bool = False,
        lookup: Lookup | None = None,
    ) -> None:
        self.allow_private = allow_private
        # Name lookups (getaddrinfo's answer); default: the event loop's resolver threads.
        self.lookup = lookup
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: set[str] = set()
        for entry in allowlist:
            entry = entry.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry)

    def listed(self, host: str) -> bool:
        """Whether the allowlist names this host (by name, or an address in a listed network)."""
        host = host.lower().rstrip(".").strip("[]")
        if host in self.hosts:
            return True
        try:
            return self._in_networks(ipaddress.ip_address(host))
        except ValueError:
            return False

    def _in_networks(self, address: Address) -> bool:
        candidates = [a for a in (_plain(address), judged(address)) if a is not None]
        return any(a in n for a in candidates for n in self.networks if n.version == a.version)

    def allows(self, host: str, address: Address) -> bool:
        """Whether a connection to `address` (which `host` resolved to) may be made."""
        seen = judged(address)
        if seen is not None and (seen.is_unspecified or seen.is_multicast):
            return False
        if self.allow_private or (seen is not None and seen.is_global):
            return True
        return self.listed(host) or self._in_networks(address)

    async def addresses(self, host: str, port: int, timeout: float = 10.0) -> list[Address]:
        """What `host` resolves to (itself, for an address); OSError when it does not."""
        host = host.lower().rstrip(".")
        try:
            return [ipaddress.ip_address(host.strip("[]"))]
        except ValueError:
            pass
        if self.lookup is not None:
            query = self.lookup(host, port)
        else:
            query = asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        try:
            infos = await asyncio.wait_for(query, timeout)
        except (TimeoutError, UnicodeError) as exc:
            raise OSError(f"{host} does not resolve") from exc
        found = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        if not found:
            raise OSError(f"{host} does not resolve")
        return found

    async def resolve(self, host: str, port: int) -> list[str] | None:
        """The addresses of `host` to connect to, None if any of them is not allowed (a name
        that also resolves to an internal address is refused); OSError if it does not resolve."""
        found = await self.addresses(host, port)
        if not all(self.allows(host, a) for a in found):
            return None
        return list(dict.fromkeys(str(_plain(a)) for a in found))


class PlaintextRefused(AgentSetupError):
    """A clone over a scheme without TLS from a host the executor did not name."""

    def __init__(self, host: str, scheme: str) -> None:
        super().__init__(
            f"the repository host {host!r} is reached over plain {scheme}://, which this executor"
            " clones only from hosts named in FEDAGENT_OUTBOUND_ALLOWLIST; use https://",
            invalid=True,
        )


# Anyone on the path can rewrite what these carry: only for hosts the executor names (or dev).
PLAINTEXT_SCHEMES = ("http", "git")


async def resolve_allowed(
    host: str,
    port: int,
    *,
    allowlist: Sequence[str] = (),
    allow_private: bool = False,
    scheme: str = "https",
) -> list[str]:
    """The addresses of `host` a clone may be pinned to; HostRefused if any of them (or the
    name itself) is not allowed, PlaintextRefused for http:// or git:// from a host the
    allowlist does not name (outside dev)."""
    rule = AddressRule(allowlist, allow_private=allow_private)
    try:
        allowed = await rule.resolve(host, port)
    except OSError:
        raise HostRefused(host) from None
    if allowed is None:
        raise HostRefused(host)
    if scheme in PLAINTEXT_SCHEMES and not (allow_private or rule.listed(host)):
        raise PlaintextRefused(host, scheme)
    return allowed
