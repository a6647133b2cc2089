"""The requester's copy of an agent's transcript: kept from events, pulled when events are lost.

Entries arrive as signed `agent.transcript` EVENTs while the run goes on. They are numbered, so
a lost event shows as a gap (or as a count in a progress event or the result that is above what
is stored); then the requester pulls the missing entries with the signed `agent.transcript`
COMMAND (`after` the last entry it holds), page by page. Pulls of one agent never overlap.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import asyncpg
import httpx

from federation.envelope import MessageType
from federation.errors import FederationError, PeerResponseInvalid
from federation.identity import load_identity
from federation.keystore import KeyCipher
from federation.models import TranscriptPullReply
from federation.peer import PeerLink
from federation.settings import Settings
from federation.states import TERMINAL_STATES
from federation.store import conversations, repos
from federation.trust import require_active

log = logging.getLogger(__name__)
PAGE = 500
MAX_PAGES = 200


def reported_total(row: dict[str, Any] | None) -> int | None:
    """How many entries the executor said the run's transcript has (result, else progress)."""
    if row is None:
        return None
    result = row.get("result") or {}
    transcript = result.get("transcript") if isinstance(result, dict) else None
    if isinstance(transcript, dict) and isinstance(transcript.get("entries"), int):
        return int(transcript["entries"])
    progress = row.get("progress") or {}
    value = progress.get("transcriptEntries") if isinstance(progress, dict) else None
    return int(value) if isinstance(value, int) else None


def _page(reply: dict[str, Any], agent_id: uuid.UUID, *, after: int) -> TranscriptPullReply:
    """The executor's page, checked: for this agent, numbered above `after`, in order, each
    entry well-formed and bounded (PeerResponseInvalid if not: nothing of it is kept)."""
    try:
        page = TranscriptPullReply.model_validate(reply)
        page.check_answers(agent_id, after, PAGE)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise PeerResponseInvalid(
            f"the executor's transcript page is invalid: {str(exc)[:500]}"
        ) from None
    return page


class TranscriptPuller:
    def __init__(
        self,
        pool: asyncpg.Pool,
        http: httpx.AsyncClient,
        settings: Settings,
        cipher: KeyCipher | None = None,
    ) -> None:
        self.pool = pool
        self.http = http
        self.settings = settings
        self.cipher = cipher
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._waiting: set[uuid.UUID] = set()

    def kick(self, agent_id: uuid.UUID) -> None:
        """Pull in the background (after an event showed a gap)."""
        lock = self._locks.get(agent_id)
        if lock is not None and lock.locked():
            return  # a pull is under way; it reads up to the end
        task = asyncio.create_task(self.pull(agent_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def kick_if_behind(self, agent_id: uuid.UUID, total: int, *, delay: float = 0.0) -> None:
        """Pull if, after `delay` seconds, fewer than `total` entries are stored."""
        if agent_id in self._waiting:
            return
        self._waiting.add(agent_id)

        async def check() -> None:
            try:
                await asyncio.sleep(delay)
                have = await conversations.received_count(self.pool, agent_id)
            finally:
                self._waiting.discard(agent_id)
            if have < total:
                await self.pull(agent_id)

        task = asyncio.create_task(check())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def pull(self, agent_id: uuid.UUID, *, timeout: float | None = None) -> int:
        """Pull what is missing; return the entries stored. Failures are logged, not raised."""
        lock = self._locks.setdefault(agent_id, asyncio.Lock())
        try:
            async with lock:
                return await self._pull(agent_id, timeout)
        except (FederationError, OSError, httpx.HTTPError, asyncpg.PostgresError) as exc:
            log.info("transcript of agent %s not pulled: %s", agent_id, exc)
            return await conversations.received_count(self.pool, agent_id)
        finally:
            if not lock.locked() and self._locks.get(agent_id) is lock:
                self._locks.pop(agent_id, None)

    async def _pull(self, agent_id: uuid.UUID, timeout: float | None) -> int:
        row = await repos.get_requested_agent(self.pool, agent_id)
        have = await conversations.received_count(self.pool, agent_id)
        if row is None or await conversations.received_full(self.pool, agent_id):
            return have
        # Once the run has ended, its final says how many entries there are: no more is kept.
        upto = reported_total(row) if row["state"] in TERMINAL_STATES else None
        connection = require_active(await repos.get_connection(self.pool, row["connection_id"]))
        if connection["kind"] == "a2a":
            return have  # an A2A agent gives no transcript
        link = PeerLink.of(
            connection,
            http=self.http,
            identity=await load_identity(self.pool, self.cipher),
            settings=self.settings,
            timeout=timeout,
        )
        for _ in range(MAX_PAGES):
            _, reply = await link.send(
                MessageType.COMMAND,
                "agent.transcript",
                {"agentId": str(agent_id), "after": have, "limit": PAGE},
            )
            page = _page(reply, agent_id, after=have)
            if not page.entries:
                return have
            received = await conversations.store_received(
                self.pool,
                agent_id,
                [e.kept() for e in page.entries],
                max_entries=self.settings.transcript_max_entries,
                max_bytes=self.settings.transcript_limit,
                upto=upto,
            )
            if received.stored == have or received.full or received.stored >= page.total:
                return received.stored  # no progress, the copy is full, or it is all here
            have = received.stored
        return have

    async def complete(self, agent_id: uuid.UUID, row: dict[str, Any] | None) -> bool:
        """Whether the stored transcript has every entry the executor reported; pulls once if
        not (when the run has ended, so the count is final)."""
        total = reported_total(row)
        if total is None:
            return row is not None and row["state"] in TERMINAL_STATES
        have = await conversations.received_count(self.pool, agent_id)
        if have < total and not await conversations.received_full(self.pool, agent_id):
            have = await self.pull(agent_id, timeout=10.0)
        return have >= total or await conversations.received_full(self.pool, agent_id)
