"""The outbound address policy: every URL this instance fetches because a peer named it.

A peer names URLs (its card's URL in a connection request, the URL we notify, a repository to
clone). Fetched blindly, that makes this instance a proxy into its own network (SSRF). So every
such fetch goes through one policy:

- only http(s); outside `environment=dev`, https unless the host is on the allowlist;
- the host is resolved and every address checked: loopback, private, link-local (cloud
  metadata), shared, multicast, reserved and unspecified addresses are refused unless
  `environment=dev` or `FEDAGENT_OUTBOUND_ALLOWLIST` names them (CIDRs or host names);
- the connection goes to the address that was checked (no second lookup: no DNS rebinding);
- no redirects, one total deadline, and bodies read with a cap.

`peer_client(settings)` is the httpx client that enforces it at connect time;
`check_host(host, port, settings)` is the same check for other tools (git clone).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from federation.errors import FederationError, PeerResponseInvalid, PeerUnreachable
from federation.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CARD_MAX_BYTES = 64 * 1024

# Not covered by `is_global` in every Python version, or worth naming: cloud metadata.
_ALWAYS_REFUSED = [
    ipaddress.ip_network("169.254.169.254/32"),
    ipaddress.ip_network("fd00:ec2::254/128"),
]


class AddressNotAllowed(FederationError):
    code = "address_not_allowed"
    status = 403
    title = "The address is not one this instance connects to"


class AddressPolicy:
    def __init__(self, *, dev: bool, allowlist: Iterable[str] = ()) -> None:
        self.dev = dev
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: set[str] = set()
        for entry in allowlist:
            entry = entry.strip()
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))

    @classmethod
    def from_settings(cls, settings: Settings) -> AddressPolicy:
        return cls(dev=settings.environment == "dev", allowlist=settings.outbound_allowlist)

    def host_listed(self, host: str) -> bool:
        host = host.lower().rstrip(".").strip("[]")
        if host in self.hosts:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return self.address_listed(ip)

    def address_listed(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.networks if net.version == ip.version)

    def address_allowed(self, host: str, ip: IPAddress) -> bool:
        if self.dev or self.host_listed(host) or self.address_listed(ip):
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return self.address_allowed(host, ip.ipv4_mapped)
        if any(ip in net for net in _ALWAYS_REFUSED if net.version == ip.version):
            return False
        return ip.is_global and not ip.is_multicast

    def check_url(self, url: str) -> tuple[str, int]:
        """(host, port) of a URL a peer named, or AddressNotAllowed."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AddressNotAllowed("only http(s) URLs with a host are fetched")
        if parts.username is not None or parts.password is not None:
            raise AddressNotAllowed("URLs with credentials are not fetched")
        if parts.scheme == "http" and not (self.dev or self.host_listed(parts.hostname)):
            raise AddressNotAllowed("peer URLs must be https outside environment=dev")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise AddressNotAllowed("the URL's port is not a number") from exc
        return parts.hostname, port

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of `host` this policy allows; AddressNotAllowed if any is refused."""
        try:
            literal: IPAddress | None = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                raise PeerUnreachable("the peer's host name does not resolve") from exc
            addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        if not addresses:
            raise PeerUnreachable("the peer's host name does not resolve")
        # Every address must pass: a name that also resolves to an internal one is refused.
        if not all(self.address_allowed(host, ip) for ip in addresses):
            raise AddressNotAllowed(
                "the peer's address is not public (loopback, private, link-local or reserved);"
                " FEDAGENT_OUTBOUND_ALLOWLIST can allow it"
            )
        return list(dict.fromkeys(str(ip) for ip in addresses))


async def check_host(host: str, port: int, settings: Settings) -> list[str]:
    """For tools outside httpx (git clone): the checked addresses of `host`, or a refusal."""
    return await AddressPolicy.from_settings(settings).resolve(host, port)


class _PolicyBackend(httpcore.AsyncNetworkBackend):
    """Resolves and checks at connect time, then connects to the address that was checked."""

    def __init__(self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend) -> None:
        self.policy = policy
        self.inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.policy.resolve(host, port)
        return await self.inner.connect_tcp(
            addresses[0],
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise AddressNotAllowed("unix sockets are not peer addresses")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class PolicyTransport(httpx.AsyncHTTPTransport):
    def __init__(self, policy: AddressPolicy, **kwargs: Any) -> None:
        super().__init__(trust_env=False, **kwargs)  # no proxy from the environment
        pool: Any = self._pool
        pool._network_backend = _PolicyBackend(policy, pool._network_backend)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # Checked before httpcore sees it, so a refusal keeps its own error type.
        self._policy_check(request)
        try:
            return await super().handle_async_request(request)
        except httpx.ConnectError as exc:
            cause = exc.__context__
            while cause is not None and not isinstance(cause, AddressNotAllowed):
                cause = cause.__context__
            if isinstance(cause, AddressNotAllowed):
                raise cause from None
            raise

    def _policy_check(self, request: httpx.Request) -> None:
        policy: AddressPolicy = self._pool._network_backend.policy  # type: ignore[attr-defined]
        policy.check_url(str(request.url))


def peer_client(settings: Settings, **kwargs: Any) -> httpx.AsyncClient:
    """The httpx client for peers: policy at connect time, no redirects, no env proxies."""
    transport = PolicyTransport(AddressPolicy.from_settings(settings))
    return httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False, **kwargs)


async def request_bounded(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    max_bytes: int,
    deadline: float,
    **kwargs: Any,
) -> tuple[int, bytes]:
    """(status, body) of one request, within `deadline` seconds in total and `max_bytes`.

    A redirect is never followed (it is an answer like any other status). Errors say what
    failed here, never what the other side answered.
    """
    try:
        async with asyncio.timeout(deadline):
            async with http.stream(method, url, follow_redirects=False, **kwargs) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise PeerResponseInvalid(
                            f"the peer's answer is larger than {max_bytes} bytes"
                        )
                return response.status_code, bytes(body)
    except TimeoutError as exc:
        raise PeerUnreachable(f"timeout: no complete answer within {deadline:g} s") from exc
    except AddressNotAllowed:
        raise
    except httpx.HTTPError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, AddressNotAllowed):
            cause = cause.__context__
        if isinstance(cause, AddressNotAllowed):
            raise cause from None
        raise PeerUnreachable(f"could not reach the peer: {exc.__class__.__name__}") from exc
