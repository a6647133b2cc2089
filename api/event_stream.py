"""An agent's event stream (SSE): its state, progress and transcript until it ends.

Each event's `id` is one cursor over this instance's log of the agent and its transcript
(`log id << 20 | transcript entry number`), increasing along the stream; reconnecting with
`Last-Event-ID` resumes after it, with no entry missed or repeated.

A stream reads the store a page at a time and otherwise sleeps until PostgreSQL says the
agent has news (NOTIFY `fedagent_agent_news`), re-reading on a bound in case a notification is
lost. Each API token holds at most `FEDAGENT_SSE_MAX_STREAMS_PER_TOKEN` streams at once (a
lease row each, shared by every API process); a stream ends when its token is revoked
(NOTIFY `fedagent_token`) or found expired (checked every `FEDAGENT_SSE_TOKEN_CHECK_INTERVAL`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
from fastapi.responses import StreamingResponse

from federation.errors import InvalidRequest, TooManyStreams
from federation.states import TERMINAL_STATES
from federation.store import conversations, notifications, repos, streams
from federation.users import User
from operations import Services, agents

# Bits of an SSE event id that number transcript entries (the rest is the agent's log id).
CURSOR_BITS = 20
PAGE = 500
# Notifications are hints: a stream re-reads the store at least this often anyway (more often
# while the process's LISTEN connection is down).
REREAD_SECONDS = 5.0
REREAD_UNLISTENED_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0


def _sse(event: dict[str, Any], agent_id: uuid.UUID, event_id: int, kind: str) -> str:
    data = {
        "agentId": str(agent_id),
        "seq": event["seq"],
        "state": event["state"],
        "progress": event["progress"],
        "error": event["error"],
        "attempt": event["attempt"],
        "at": event["at"].isoformat(),
    }
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"


def _sse_transcript(entry: dict[str, Any], agent_id: uuid.UUID, event_id: int) -> str:
    data = {"agentId": str(agent_id), **entry}
    return f"id: {event_id}\nevent: transcript\ndata: {json.dumps(data)}\n\n"


def _when(item: dict[str, Any]) -> datetime:
    """When an entry or event happened (an entry the executor dated oddly sorts last)."""
    at = item.get("at")
    if not isinstance(at, datetime):
        try:
            at = datetime.fromisoformat(str(at))
        except ValueError:
            return datetime.max.replace(tzinfo=UTC)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _cursor(last_event_id: str | None) -> int:
    try:
        after = int(last_event_id) if last_event_id else 0
        if after < 0:
            raise ValueError
    except ValueError:
        raise InvalidRequest("Last-Event-ID must be an event id from this stream") from None
    return after


class AgentLog:
    """One stream's reading position in an agent's log and transcript, read page by page."""

    def __init__(self, services: Services, agent_id: uuid.UUID, after: int) -> None:
        self.pool = services.pool
        self.transcripts = services.transcripts
        self.agent_id = agent_id
        self.cursor, self.entry_no = after >> CURSOR_BITS, after & ((1 << CURSOR_BITS) - 1)
        self.last_state: str | None = None
        self.pulled = False
        self.row: dict[str, Any] = {"role": "requester", "agent_id": agent_id}
        self.local = False  # a local run: its transcript is the executor's own

    async def start(self) -> None:
        row = await repos.get_user_agent(self.pool, self.agent_id)
        if row is not None:
            self.row = row
        self.local = self.row["role"] == "executor"
        # `event: state` for each change of state, `progress` for news within one state.
        if self.cursor:
            seen = await repos.agent_events_after(self.pool, self.agent_id, self.cursor - 1, 1)
            if seen and seen[0]["id"] == self.cursor:
                self.last_state = seen[0]["state"]

    async def ended_before(self) -> bool:
        """Whether the stream resumed after the final event: nothing more will come."""
        row = await repos.get_user_agent(self.pool, self.agent_id)
        return row is not None and row["state"] in TERMINAL_STATES

    async def _entries(self, limit: int = PAGE) -> list[dict[str, Any]]:
        return await conversations.entries_of(self.pool, self.row, self.entry_no, limit)

    async def next_page(self) -> tuple[list[str], bool]:
        """SSE messages of what is new (a page of entries and of events, merged by time), and
        whether the final state is among them (the stream ends with it)."""
        entries = await self._entries()
        events = await repos.agent_events_after(self.pool, self.agent_id, self.cursor, PAGE)
        events_page_full = len(events) == PAGE
        final = next((e for e in events if e["state"] in TERMINAL_STATES), None)
        if final is not None:
            # Everything the run said comes before its final state: what events did not
            # bring is pulled once, before the final goes out.
            events = events[: events.index(final) + 1]
            if not self.pulled and not self.local:
                self.pulled = True
                row = await repos.get_requested_agent(self.pool, self.agent_id)
                await self.transcripts.complete(self.agent_id, row)
                entries = await self._entries()
        out: list[str] = []
        more_entries: bool | None = None
        while entries or events:
            if not entries:
                # The entries page ran out: later entries may come before the next event.
                if more_entries is None:
                    more_entries = bool(await self._entries(1))
                if more_entries:
                    return out, False
            elif not events and events_page_full and final is None:
                return out, False  # later events may come before the next entry
            take_entry = bool(entries) and (
                not events or events[0] is final or _when(entries[0]) <= _when(events[0])
            )
            if take_entry:
                entry = entries.pop(0)
                self.entry_no = int(entry["seq"])
                out.append(_sse_transcript(entry, self.agent_id, self._id()))
                continue
            event = events.pop(0)
            self.cursor = event["id"]
            kind = "progress" if event["state"] == self.last_state else "state"
            self.last_state = event["state"]
            out.append(_sse(event, self.agent_id, self._id(), kind))
            if event is final:
                return out, True
        return out, False

    def _id(self) -> int:
        return self.cursor << CURSOR_BITS | self.entry_no


class Lease:
    """The stream's place among its token's open streams, kept while the token is valid."""

    def __init__(self, services: Services, user: User, stream_id: uuid.UUID | None) -> None:
        self.pool = services.pool
        self.token_id = user.token_id
        self.stream_id = stream_id
        self.interval = services.settings.sse_token_check_interval
        self.next_check = asyncio.get_running_loop().time() + self.interval

    @classmethod
    async def take(cls, services: Services, user: User, agent_id: uuid.UUID) -> Lease:
        if user.token_id is None:  # not a token (no one to count against)
            return cls(services, user, None)
        settings = services.settings
        stream_id = await streams.open_stream(
            services.pool,
            token_id=user.token_id,
            agent_id=agent_id,
            limit=settings.sse_max_streams_per_token,
            lease_seconds=3 * settings.sse_token_check_interval,
        )
        if stream_id is None:
            raise TooManyStreams(
                f"this API token holds {settings.sse_max_streams_per_token} event streams open"
                " already; close one first",
                limit=settings.sse_max_streams_per_token,
            )
        return cls(services, user, stream_id)

    def due(self, now: float) -> bool:
        return now >= self.next_check

    async def still_valid(self) -> bool:
        """Whether the token still holds (renewing the lease); the stream ends if not."""
        self.next_check = asyncio.get_running_loop().time() + self.interval
        if self.stream_id is None or self.token_id is None:
            return True
        return await streams.renew_stream(
            self.pool, self.stream_id, self.token_id, 3 * self.interval
        )

    async def release(self) -> None:
        if self.stream_id is not None:
            # Runs while the client's disconnect cancels the stream: shielded, so it happens.
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await streams.close_stream(self.pool, self.stream_id)


async def event_stream(
    services: Services, user: User, agent_id: uuid.UUID, last_event_id: str | None
) -> StreamingResponse:
    """The agent's event stream (the REST route's and the console's live pages')."""
    await agents.get(services, user, agent_id)
    log = AgentLog(services, agent_id, _cursor(last_event_id))
    lease = await Lease.take(services, user, agent_id)
    return StreamingResponse(
        _stream(services, log, lease),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(services: Services, log: AgentLog, lease: Lease) -> AsyncIterator[str]:
    listener = services.listener
    # `wake`: any news (the agent's or the token's); `token_news`: the token changed.
    wake, token_news = asyncio.Event(), asyncio.Event()
    watches = [(notifications.AGENT_NEWS, str(log.agent_id), wake)]
    if lease.token_id is not None:
        token = str(lease.token_id)
        watches += [(notifications.TOKEN, token, wake), (notifications.TOKEN, token, token_news)]
    loop = asyncio.get_running_loop()
    try:
        if listener is not None:
            await listener.start()
            for channel, key, event in watches:
                listener.watch(channel, key, event)
        await log.start()
        yield "retry: 1000\n\n"
        quiet_since = loop.time()
        while True:
            wake.clear()
            # The token first: what the agent said after a revocation is never read for it.
            if token_news.is_set() or lease.due(loop.time()):
                token_news.clear()
                if not await lease.still_valid():
                    return  # the token was revoked or has expired
            messages, ended = await log.next_page()
            for message in messages:
                yield message
            if ended:
                return
            if messages:
                quiet_since = loop.time()
                continue  # there may be more pages
            if await log.ended_before():
                return
            await _wait(wake, listener, lease, quiet_since + KEEPALIVE_SECONDS - loop.time())
            if loop.time() - quiet_since >= KEEPALIVE_SECONDS:
                quiet_since = loop.time()
                yield ": keep-alive\n\n"
    finally:
        if listener is not None:
            for channel, key, event in watches:
                listener.unwatch(channel, key, event)
        await lease.release()


async def _wait(
    wake: asyncio.Event,
    listener: notifications.Listener | None,
    lease: Lease,
    until_keepalive: float,
) -> None:
    """Until news, the next token check, the next keep-alive or the re-read bound."""
    listening = listener is not None and listener.listening
    bound = REREAD_SECONDS if listening else REREAD_UNLISTENED_SECONDS
    until_check = lease.next_check - asyncio.get_running_loop().time()
    timeout = max(0.0, min(bound, until_keepalive, until_check))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout)
