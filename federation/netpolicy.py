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
`stranger_client(settings)` is one of its own, small and quick to give up, for the cards of
strangers (connection requests), so they can never hold what peers' traffic needs;
`check_host(host, port, settings)` is the same check for other tools (git clone).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from agents.addresses import AddressRule
from federation.errors import ConnectBusy, FederationError, PeerResponseInvalid, PeerUnreachable
from federation.settings import Settings

CARD_MAX_BYTES = 64 * 1024


class AddressNotAllowed(FederationError):
    code = "address_not_allowed"
    status = 403
    title = "The address is not one this instance connects to"


class AddressPolicy(AddressRule):
    """The address rule of agents/addresses.py (the same for clones) with this instance's
    settings, and what fetching a peer's URL adds: http(s) only, https outside dev."""

    def __init__(
        self, *, dev: bool, allowlist: Iterable[str] = (), resolver: BoundedResolver | None = None
    ) -> None:
        super().__init__(
            tuple(allowlist), allow_private=dev, lookup=resolver.lookup if resolver else None
        )
        self.dev = dev
        self.resolver = resolver

    @classmethod
    def from_settings(
        cls, settings: Settings, resolver: BoundedResolver | None = None
    ) -> AddressPolicy:
        return cls(
            dev=settings.environment == "dev",
            allowlist=settings.outbound_allowlist,
            resolver=resolver,
        )

    def check_url(self, url: str) -> tuple[str, int]:
        """(host, port) of a URL a peer named, or AddressNotAllowed."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AddressNotAllowed("only http(s) URLs with a host are fetched")
        if parts.username is not None or parts.password is not None:
            raise AddressNotAllowed("URLs with credentials are not fetched")
        if parts.scheme == "http" and not (self.dev or self.listed(parts.hostname)):
            raise AddressNotAllowed("peer URLs must be https outside environment=dev")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise AddressNotAllowed("the URL's port is not a number") from exc
        return parts.hostname, port

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of `host` this policy allows; AddressNotAllowed if any is refused."""
        try:
            allowed = await super().resolve(host, port)
        except OSError as exc:
            raise PeerUnreachable("the peer's host name does not resolve") from exc
        if allowed is None:
            raise AddressNotAllowed(
                "the peer's address is not public (loopback, private, link-local or reserved);"
                " FEDAGENT_OUTBOUND_ALLOWLIST can allow it"
            )
        return allowed


class BoundedResolver:
    """Name lookups in threads of their own, at most `threads` at once.

    A lookup whose caller gave up keeps its thread until the DNS answers, so it is counted
    until then; past the bound a lookup is refused at once (503 `connect_busy`) instead of
    queueing, and the process's own resolver threads are never used."""

    def __init__(
        self, threads: int, getaddrinfo: Callable[..., list[Any]] = socket.getaddrinfo
    ) -> None:
        self.threads = threads
        self.busy = 0
        self._getaddrinfo = getaddrinfo
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dns")

    async def lookup(self, host: str, port: int) -> list[Any]:
        if self.busy >= self.threads:
            raise ConnectBusy("too many name lookups for connection requests are under way")
        self.busy += 1
        loop = asyncio.get_running_loop()
        future = self._executor.submit(
            self._getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._done))
        return await asyncio.wrap_future(future)

    def _done(self) -> None:
        self.busy -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


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


def _our_refusal(exc: BaseException) -> FederationError | None:
    """A refusal of the policy (address, busy resolver) that httpcore wrapped, if it was one."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, (AddressNotAllowed, ConnectBusy)):
        cause = cause.__context__
    return cause if isinstance(cause, FederationError) else None


class PolicyTransport(httpx.AsyncHTTPTransport):
    def __init__(self, policy: AddressPolicy, *, stranger: bool = False, **kwargs: Any) -> None:
        super().__init__(trust_env=False, **kwargs)  # no proxy from the environment
        self.stranger = stranger
        pool: Any = self._pool
        pool._network_backend = _PolicyBackend(policy, pool._network_backend)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # Checked before httpcore sees it, so a refusal keeps its own error type.
        self._policy_check(request)
        try:
            return await super().handle_async_request(request)
        except httpx.ConnectError as exc:
            cause = _our_refusal(exc)
            if cause is not None:
                raise cause from None
            raise
        except httpx.PoolTimeout as exc:
            if self.stranger:
                raise ConnectBusy("too many strangers' cards are being read") from exc
            raise

    async def aclose(self) -> None:
        await super().aclose()
        policy: AddressPolicy = self._pool._network_backend.policy  # type: ignore[attr-defined]
        if policy.resolver is not None:
            policy.resolver.close()

    def _policy_check(self, request: httpx.Request) -> None:
        policy: AddressPolicy = self._pool._network_backend.policy  # type: ignore[attr-defined]
        policy.check_url(str(request.url))


def peer_client(settings: Settings, **kwargs: Any) -> httpx.AsyncClient:
    """The httpx client for peers: policy at connect time, no redirects, no env proxies."""
    transport = PolicyTransport(AddressPolicy.from_settings(settings))
    return httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False, **kwargs)


def stranger_client(settings: Settings) -> httpx.AsyncClient:
    """The client for strangers' cards: the same policy, its own few connections (none kept
    open), its own resolver threads, and a short wait for a free connection (503
    `connect_busy` past it)."""
    resolver = BoundedResolver(settings.stranger_dns_threads)
    transport = PolicyTransport(
        AddressPolicy.from_settings(settings, resolver),
        stranger=True,
        limits=httpx.Limits(
            max_connections=settings.stranger_fetch_concurrency, max_keepalive_connections=0
        ),
    )
    return httpx.AsyncClient(
        transport=transport,
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(settings.stranger_fetch_timeout, pool=1.0),
    )


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
    failed here, never what the other side answered. The answer is asked for uncompressed and
    a compressed one is refused: `max_bytes` would otherwise bound only what one decompressed
    chunk adds, and a few KiB of gzip make hundreds of MiB.
    """
    headers = {**(kwargs.pop("headers", None) or {}), "Accept-Encoding": "identity"}
    try:
        async with asyncio.timeout(deadline):
            async with http.stream(
                method, url, follow_redirects=False, headers=headers, **kwargs
            ) as response:
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise PeerResponseInvalid(
                        "the peer's answer is compressed although it was asked for uncompressed"
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():  # identity: as sent
                    body += chunk
                    if len(body) > max_bytes:
                        raise PeerResponseInvalid(
                            f"the peer's answer is larger than {max_bytes} bytes"
                        )
                return response.status_code, bytes(body)
    except TimeoutError as exc:
        raise PeerUnreachable(f"timeout: no complete answer within {deadline:g} s") from exc
    except (AddressNotAllowed, ConnectBusy):
        raise
    except httpx.HTTPError as exc:
        cause = _our_refusal(exc)
        if cause is not None:
            raise cause from None
        raise PeerUnreachable(f"could not reach the peer: {exc.__class__.__name__}") from exc
