"""PostgreSQL LISTEN/NOTIFY between the processes of one instance.

Channels: `fedagent_agent_state` (a trigger fires it when a run's state changes; the
executor's long-polled `agent.status` waits on it), `fedagent_kill` (the executor's API sends
it when a peer's kill is accepted; the worker running that agent stops its sandbox at once
instead of waiting for the next heartbeat to carry Temporal's cancellation),
`fedagent_agent_news` (triggers fire it with the agent's id when its event log or its
transcript copy grows; event streams wait on it) and `fedagent_token` (a trigger fires it with
the token's id when an API token is revoked or its expiry changes; event streams re-check it).
Notifications are hints: every waiter also re-reads the store on a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any

import asyncpg

log = logging.getLogger(__name__)
AGENT_STATE = "fedagent_agent_state"
KILL = "fedagent_kill"
AGENT_NEWS = "fedagent_agent_news"
TOKEN = "fedagent_token"


def agent_key(role: str, peer_instance_id: str, agent_id: object) -> str:
    return f"{role}/{peer_instance_id}/{agent_id}"


async def send(db: Any, channel: str, key: str) -> None:
    await db.execute("SELECT pg_notify($1, $2)", channel, key)


class Listener:
    """One LISTEN connection per process; `wait(channel, key, timeout)` wakes on a NOTIFY."""

    def __init__(self, dsn: str, channels: tuple[str, ...]) -> None:
        self.dsn = dsn
        self.channels = channels
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._waiters: dict[tuple[str, str], set[asyncio.Event]] = defaultdict(set)

    async def start(self) -> None:
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return
            try:
                self._conn = await asyncpg.connect(self.dsn)
                for channel in self.channels:
                    await self._conn.add_listener(channel, self._on_notify)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("LISTEN not available (waiters fall back to re-reading): %r", exc)
                self._conn = None

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        for event in self._waiters.get((channel, payload), ()):
            event.set()

    @property
    def listening(self) -> bool:
        """Whether notifications arrive now (else waiters only re-read on their bound)."""
        return self._conn is not None and not self._conn.is_closed()

    def watch(self, channel: str, key: str, event: asyncio.Event | None = None) -> asyncio.Event:
        """An event set when `key` is notified on `channel` (`event`, to wake one waiter on
        several keys); `unwatch` it when done."""
        event = event or asyncio.Event()
        self._waiters[(channel, key)].add(event)
        return event

    def unwatch(self, channel: str, key: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get((channel, key))
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                self._waiters.pop((channel, key), None)

    async def wait(self, channel: str, key: str, timeout: float) -> bool:
        await self.start()
        event = self.watch(channel, key)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
            return event.is_set()
        finally:
            self.unwatch(channel, key, event)

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
