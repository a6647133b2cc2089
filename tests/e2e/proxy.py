"""A loopback HTTP proxy the tests control: forward, refuse some paths, or be down.

Each request is forwarded on its own upstream connection with `Connection: close`, so every
request passes the rules, even when the client keeps its connection alive.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class ProxyRules:
    # Requests whose path ends with one of these get a 503 and never reach the upstream.
    refuse_paths: set[str] = field(default_factory=set)
    # Everything is refused: the peer looks down.
    down: bool = False
    # Connections are cut before any answer: the network drops requests.
    drop: bool = False
    # The next request whose path ends with this reaches the upstream twice and gets the second
    # answer (the first is lost), as when a balancer sends a request again to another replica
    # after the first died before answering; then the rule clears.
    repeat_next: str | None = None
    # Requests reach the upstream, but their connection is cut before the answer: the network
    # drops answers.
    lose_answers: bool = False


class ControlledProxy:
    def __init__(self, listen_port: int, upstream_port: int) -> None:
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        self.rules = ProxyRules()
        self.refused: list[str] = []
        self.forwarded: list[str] = []
        self.repeated: list[str] = []
        self._server: asyncio.Server | None = None
        # Requests being forwarded: a long-poll can hold one open when the proxy stops.
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    async def _forward(self, request: bytes) -> bytes:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port
        )
        try:
            upstream_writer.write(request)
            await upstream_writer.drain()
            return await upstream_reader.read()
        finally:
            upstream_writer.close()
            with contextlib.suppress(ConnectionError):
                await upstream_writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, _, rest = head.partition(b"\r\n")
                parts = request_line.decode(errors="replace").split()
                method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("?", "?")
                length = 0
                headers = []
                for line in rest.split(b"\r\n"):
                    if not line:
                        continue
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                    if name.strip().lower() == b"connection":
                        continue
                    headers.append(line)
                body = await reader.readexactly(length) if length else b""
                what = f"{method} {path}"
                if self.rules.drop:
                    self.refused.append(what)
                    return
                if self.rules.down or any(path.endswith(p) for p in self.rules.refuse_paths):
                    self.refused.append(what)
                    writer.write(
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                        b"connection: close\r\n\r\n"
                    )
                    await writer.drain()
                    return
                self.forwarded.append(what)
                request = (
                    request_line
                    + b"\r\n"
                    + b"\r\n".join([*headers, b"connection: close"])
                    + b"\r\n\r\n"
                    + body
                )
                repeat = self.rules.repeat_next
                if repeat is not None and path.endswith(repeat):
                    self.rules.repeat_next = None
                    self.repeated.append(what)
                    await self._forward(request)  # its answer is lost
                response = await self._forward(request)
                if self.rules.lose_answers:
                    self.refused.append(what)
                    return
                writer.write(response)
                await writer.drain()
                return  # the response said connection: close
        except asyncio.CancelledError:
            return  # the proxy is stopping
        finally:
            self._handlers.discard(task)
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.close()
                await writer.wait_closed()
