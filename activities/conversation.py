"""The executor's side of durable conversations: checkpoints into PostgreSQL, and the transcript
sent to the requester as it grows.

`StoreSink` is the runtime's `ConversationSink`: each save writes the try's conversation and the
step's transcript entries in one transaction. `TranscriptPump` sends new entries to the
requester as signed `agent.transcript` EVENTs, batched (at most one event per interval); an
event that is lost is not resent from here: the requester notices the gap (entries are numbered,
progress events carry the count) and pulls with the `agent.transcript` command.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import asyncpg

from activities.federation import PeerMessenger
from agents.conversation import ConversationState
from federation.envelope import MessageType
from federation.states import LOCAL_REQUESTER
from federation.store import conversations, repos
from federation.trust import require_active

log = logging.getLogger(__name__)
BATCH_BYTES = 256 * 1024


class StoreSink:
    """Checkpoints of one try of one run, in the executor's store."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        requester_id: str,
        agent_id: uuid.UUID,
        attempt: int,
        transcript_limit: int,
        writer: int = 1,
    ) -> None:
        self.pool = pool
        # The activity attempt saving: a later attempt's checkpoints are never overwritten.
        self.writer = writer
        self.requester_id = requester_id
        self.agent_id = agent_id
        self.attempt = attempt
        self.transcript_limit = transcript_limit
        self.summary: dict[str, Any] = {"entries": 0, "bytes": 0, "truncated": False}
        self.saved = asyncio.Event()

    async def load(self) -> None:
        self.summary = await conversations.transcript_summary(
            self.pool, self.requester_id, self.agent_id
        )

    async def save(self, state: ConversationState, entries: list[dict[str, Any]]) -> None:
        summary = await conversations.save_checkpoint(
            self.pool,
            requester_id=self.requester_id,
            agent_id=self.agent_id,
            attempt=self.attempt,
            state={**state.to_json(), "writer": self.writer},
            turn_count=state.turn_count,
            usage=state.usage,
            tokens=state.tokens,
            entries=entries,
            transcript_limit=self.transcript_limit,
        )
        if summary is not None:  # entries were appended
            self.summary = summary
            self.saved.set()


class TranscriptPump:
    """Sends the transcript entries of a run that the requester has not been sent yet."""

    def __init__(
        self,
        messenger: PeerMessenger,
        sink: StoreSink,
        *,
        interval: float,
        sent: int,
        first_delay: float = 0.0,
    ) -> None:
        self.messenger = messenger
        self.sink = sink
        self.interval = interval
        self.sent = sent
        # Nothing is sent before this: a run that ends sooner sends its transcript in one
        # event at its end (`flush`).
        self.first_delay = first_delay

    async def run(self) -> None:
        backoff = self.interval
        await asyncio.sleep(self.first_delay)
        while True:
            await self.sink.saved.wait()
            self.sink.saved.clear()
            try:
                await self.flush(timeout=5.0)
                backoff = self.interval
            except Exception as exc:  # noqa: BLE001 - the requester pulls what it misses
                log.info("transcript of agent %s not delivered: %s", self.sink.agent_id, exc)
                backoff = min(max(backoff * 2, 0.5), 10.0)
                self.sink.saved.set()  # try again after the pause
            await asyncio.sleep(backoff)

    async def flush(self, *, timeout: float) -> None:
        pool = self.sink.pool
        if self.sink.requester_id == LOCAL_REQUESTER:
            return  # a local run: its users read the transcript where it is stored
        connection = require_active(await repos.connection_for_peer(pool, self.sink.requester_id))
        while self.sent < self.sink.summary["entries"]:
            entries = await conversations.transcript_after(
                pool,
                self.sink.requester_id,
                self.sink.agent_id,
                self.sent,
                max_bytes=BATCH_BYTES,
            )
            if not entries:
                return
            await self.messenger.send(
                connection,
                type=MessageType.EVENT,
                command_type="agent.transcript",
                payload={
                    "agentId": str(self.sink.agent_id),
                    "entries": entries,
                    "total": self.sink.summary["entries"],
                },
                agent_id=self.sink.agent_id,
                timeout=timeout,
            )
            self.sent = int(entries[-1]["seq"])


def previous_try_note(attempt: int, row: dict[str, Any] | None) -> str:
    """What the first message of try `attempt` says about the try before it."""
    before = attempt - 1
    outcome = (row or {}).get("outcome") or {}
    if not outcome:
        return (
            f"this is try {attempt} of this task; try {before} ended without a report. "
            "Its changes, if any, are still in the workspace."
        )
    verdict = "succeeded" if outcome.get("success") else "failed"
    reason = outcome.get("stopReason") or "unknown"
    summary = str(outcome.get("summary") or outcome.get("error") or "").strip()[:4000]
    return (
        f"this is try {attempt} of this task. Try {before} {verdict} ({reason}) after "
        f"{outcome.get('turns', 0)} turn(s): {summary or '(no summary)'}\n"
        f"Its changes are still in the workspace; continue from there."
    )
