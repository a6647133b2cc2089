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
import json
import logging
import uuid
from typing import Any

import asyncpg

from activities.federation import PeerMessenger
from activities.snapshots import WorkspaceSnapshots
from agents.conversation import ConversationState
from federation.envelope import MessageType
from federation.states import LOCAL_REQUESTER
from federation.store import conversations, repos
from federation.store.outage import wait_for_store
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
        patience: float = 0.0,
        snapshots: WorkspaceSnapshots | None = None,
    ) -> None:
        self.pool = pool
        # How long each save waits for a database that is away (the activity heartbeats).
        self.patience = patience
        # The workspace as of each checkpoint, saved with it (a retry elsewhere restores it).
        self.snapshots = snapshots
        # The activity attempt saving: a later attempt's checkpoints are never overwritten.
        self.writer = writer
        self.requester_id = requester_id
        self.agent_id = agent_id
        self.attempt = attempt
        self.transcript_limit = transcript_limit
        self.summary: dict[str, Any] = {"entries": 0, "bytes": 0, "truncated": False}
        # Whether `summary` is the store's (loaded, or returned by a save).
        self.known = False
        self.saved = asyncio.Event()
        # Each list item as this sink last saved it: a save writes only what differs.
        self._stored: dict[str, list[str]] = {}
        self._log = LogPieces()

    async def load(self) -> None:
        self.summary = await wait_for_store(
            lambda: conversations.transcript_summary(self.pool, self.requester_id, self.agent_id),
            what=f"loading the transcript of agent {self.agent_id}",
            patience=self.patience,
        )
        self.known = True

    async def save(self, state: ConversationState, entries: list[dict[str, Any]]) -> None:
        head = {**state.to_json(), "writer": self.writer}
        lists: dict[str, conversations.ListChanges] = {}
        encoded: dict[str, list[str]] = {}
        for name in conversations.ITEM_LISTS:
            items = head.pop(name, None) or []
            encoded[name] = [json.dumps(item, sort_keys=True) for item in items]
            lists[name] = _changes(self._stored.get(name, []), items, encoded[name])
        tail = head.pop("logTail", "")
        head["logTailChars"] = len(tail)
        lists[conversations.LOG], pieces = self._log.changes(tail, state.log_length)
        workspace = None
        if self.snapshots is not None:
            workspace = await wait_for_store(
                self.snapshots.take,
                what=f"saving the workspace of agent {self.agent_id}",
                patience=self.patience,
            )
        summary = await wait_for_store(
            lambda: conversations.save_checkpoint(
                self.pool,
                requester_id=self.requester_id,
                agent_id=self.agent_id,
                attempt=self.attempt,
                state=head,
                turn_count=state.turn_count,
                usage=state.usage,
                tokens=state.tokens,
                entries=entries,
                transcript_limit=self.transcript_limit,
                # Made again after an outage cut it off, a save appends its entries once.
                entries_before=self.summary["entries"] if self.known else None,
                workspace=workspace,
                lists=lists,
            ),
            what=f"saving a checkpoint of agent {self.agent_id}",
            patience=self.patience,
        )
        # Only once saved: what a failed save would have changed is written by the next.
        self._stored = encoded
        self._log.saved(pieces, state.log_length)
        if self.snapshots is not None and workspace is not None:
            self.snapshots.saved(workspace)
        if summary is not None:  # entries were appended
            self.summary, self.known = summary, True
            self.saved.set()


class LogPieces:
    """The log's tail as the pieces each save added to it: a save writes what its step
    appended to the log; the oldest pieces go once the newer ones cover the tail."""

    def __init__(self) -> None:
        self.pieces: list[tuple[int, str]] = []
        self.length = -1  # the log's length at the last save (-1: nothing saved yet)

    def changes(
        self, tail: str, length: int
    ) -> tuple[conversations.ListChanges, list[tuple[int, str]]]:
        added = length - self.length
        if self.length < 0 or added < 0 or added > len(tail):
            pieces = [(0, tail)] if tail else []  # written whole (the first save of this sink)
            changed = pieces
        else:
            pieces = list(self.pieces)
            changed = []
            if added:
                number = pieces[-1][0] + 1 if pieces else 0
                pieces.append((number, tail[len(tail) - added :]))
                changed = [pieces[-1]]
            while len(pieces) > 1 and sum(len(t) for _, t in pieces[1:]) >= len(tail):
                pieces.pop(0)
        change = conversations.ListChanges(
            length=pieces[-1][0] + 1 if pieces else 0,
            first=pieces[0][0] if pieces else 0,
            changed=[(number, {"text": text}) for number, text in changed],
        )
        return change, pieces

    def saved(self, pieces: list[tuple[int, str]], length: int) -> None:
        self.pieces, self.length = pieces, length


def _changes(stored: list[str], items: list[Any], encoded: list[str]) -> conversations.ListChanges:
    """The items of a list that differ from what this sink saved of it (all of them at its
    first save: a resumed try's sink rewrites the list once)."""
    changed = [
        (i, item)
        for i, (item, text) in enumerate(zip(items, encoded, strict=True))
        if i >= len(stored) or stored[i] != text
    ]
    return conversations.ListChanges(length=len(items), changed=changed)


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


def previous_try_note(attempt: int, row: dict[str, Any] | None, *, lost: bool = False) -> str:
    """What the first message of try `attempt` says about the try before it (`lost`: its
    workspace did not follow it to this worker)."""
    before = attempt - 1
    outcome = (row or {}).get("outcome") or {}
    where = (
        "Its changes were lost with the worker that ran it: the workspace starts afresh."
        if lost
        else "Its changes, if any, are still in the workspace."
    )
    if not outcome:
        return f"this is try {attempt} of this task; try {before} ended without a report. {where}"
    verdict = "succeeded" if outcome.get("success") else "failed"
    reason = outcome.get("stopReason") or "unknown"
    summary = str(outcome.get("summary") or outcome.get("error") or "").strip()[:4000]
    return (
        f"this is try {attempt} of this task. Try {before} {verdict} ({reason}) after "
        f"{outcome.get('turns', 0)} turn(s): {summary or '(no summary)'}\n"
        + (where if lost else "Its changes are still in the workspace; continue from there.")
    )
