"""Retention of what ended runs leave in the store: counted, or deleted in batches.

Each kind is one or more tables and the rule that says a row has expired. A row that belongs to
a run is kept while that run is open (any state but a terminal one) and for its retention
period after it ended; only then is it deleted. Artifact content is shared between runs (it is
keyed by its sha256): it goes only once no run refers to it (`agent_artifacts`) and it was not
stored again within the grace period (a run stores the content, then links it).

`expired` counts what `delete_expired` would delete, with the same rules, so a dry run reports
what a real run deletes.
"""

from __future__ import annotations

from dataclasses import dataclass

from federation.states import KILL_DELIVERY_SECONDS, TERMINAL_STATES
from federation.store.repos import Executor


# A run whose rows are kept: open, or ended less than $1 seconds ago ($2: the terminal states).
def _kept_run(seconds: str = "$1") -> str:
    return (
        "(a.state <> ALL($2::text[])"
        f" OR coalesce(a.finished_at, a.updated_at) >= now() - make_interval(secs => {seconds}))"
    )


_OLDER = "{column} < now() - make_interval(secs => $1)"
# Content stored again (or first) within this many seconds is never deleted: it is being linked.
CONTENT_GRACE_MAX = 3600.0


@dataclass(frozen=True, kw_only=True)
class Part:
    """One table of a kind: which rows have expired (`where`, over alias x) and their size."""

    table: str
    where: str
    size: str = "octet_length(x.*::text)"
    batch: int = 2000


@dataclass(frozen=True, kw_only=True)
class Retention:
    """Seconds each kind is kept after its run ended."""

    run_data: float
    artifacts: float
    runs: float

    def seconds(self, kind: str) -> float:
        if kind == "artifacts":
            return self.artifacts
        if kind == "artifact_content":
            return min(self.artifacts, CONTENT_GRACE_MAX)
        if kind == "runs":
            return self.runs
        return self.run_data


@dataclass(frozen=True, kw_only=True)
class Amount:
    rows: int
    bytes: int


def _not_kept(role: str | None, *keys: str, seconds: str = "$1") -> str:
    match = " AND ".join(keys)
    role_match = f"a.role = '{role}' AND " if role else ""
    return f"NOT EXISTS (SELECT 1 FROM agents a WHERE {role_match}{match} AND {_kept_run(seconds)})"


_RUN_OF_LINK = (
    "a.role = x.role",
    "a.peer_instance_id = x.peer_instance_id",
    "a.agent_id = x.agent_id",
)
# A link (agent_artifacts, alias l) that the `artifacts` kind keeps ($3: its retention): content
# it refers to stays, in a dry run too (where the expired links are still there).
_LINK_KEPT = (
    "(l.created_at >= now() - make_interval(secs => $3) OR NOT "
    + _not_kept(None, *(k.replace("x.", "l.") for k in _RUN_OF_LINK), seconds="$3")
    + ")"
)


# In the order they are deleted: a run's own record last.
KINDS: dict[str, tuple[Part, ...]] = {
    "messages": (
        # What users sent through `POST /federation/command`, with the peer's answer.
        Part(table="commands", where=_OLDER.format(column="x.created_at")),
        Part(
            table="messages",
            where=_OLDER.format(column="x.created_at")
            + " AND (x.agent_id IS NULL OR "
            + _not_kept(None, "a.agent_id = x.agent_id")
            + ")",
        ),
    ),
    "events": (
        Part(
            table="agent_events",
            where=_OLDER.format(column="x.at")
            + " AND "
            + _not_kept("requester", "a.agent_id = x.agent_id"),
        ),
    ),
    "transcripts": (
        Part(
            table="agent_transcript",
            where=_not_kept(
                "executor", "a.peer_instance_id = x.requester_id", "a.agent_id = x.agent_id"
            ),
        ),
        Part(
            table="requested_transcript",
            where=_OLDER.format(column="x.received_at")
            + " AND "
            + _not_kept("requester", "a.agent_id = x.agent_id"),
        ),
    ),
    "checkpoints": (
        Part(
            table="agent_conversations",
            where=_OLDER.format(column="x.updated_at")
            + " AND "
            + _not_kept(
                "executor", "a.peer_instance_id = x.requester_id", "a.agent_id = x.agent_id"
            ),
            batch=200,
        ),
    ),
    "artifacts": (
        Part(
            table="agent_artifacts",
            where=_OLDER.format(column="x.created_at") + " AND " + _not_kept(None, *_RUN_OF_LINK),
        ),
    ),
    "artifact_content": (
        Part(
            table="artifacts",
            where=_OLDER.format(column="x.created_at")
            + " AND NOT EXISTS (SELECT 1 FROM agent_artifacts l WHERE l.sha256 = x.sha256"
            f" AND {_LINK_KEPT})",
            size="x.bytes",
            batch=8,  # up to 64 MiB each, deleted with their chunks
        ),
    ),
    "runs": (
        Part(
            table="agents",
            where="x.state = ANY($2::text[])"
            " AND coalesce(x.finished_at, x.updated_at) < now() - make_interval(secs => $1)"
            # A kill still being delivered to the executor reads the record on each try.
            " AND (x.kill_confirmed IS NOT FALSE OR coalesce(x.finished_at, x.updated_at)"
            f" < now() - make_interval(secs => {KILL_DELIVERY_SECONDS}))",
        ),
    ),
}


def _args(part: Part, kind: str, policy: Retention) -> tuple[object, ...]:
    terminal = sorted(str(state) for state in TERMINAL_STATES)
    args: tuple[object, ...] = (float(policy.seconds(kind)), terminal, float(policy.artifacts))
    used = 3 if "$3" in part.where else 2 if "$2" in part.where else 1
    return args[:used]


async def expired(db: Executor, kind: str, policy: Retention) -> Amount:
    """How many rows (and bytes) of `kind` have expired now (what `delete_expired` deletes,
    expired links of artifact content counted as deleted)."""
    rows = size = 0
    for part in KINDS[kind]:
        found = await db.fetchrow(
            f"SELECT count(*) AS n, coalesce(sum({part.size}), 0)::bigint AS b"
            f" FROM {part.table} x WHERE {part.where}",
            *_args(part, kind, policy),
        )
        assert found is not None
        rows += int(found["n"])
        size += int(found["b"])
    return Amount(rows=rows, bytes=size)


async def delete_expired(db: Executor, kind: str, policy: Retention) -> Amount:
    """Delete the rows of `kind` that have expired, a batch per statement (short locks)."""
    rows = size = 0
    for part in KINDS[kind]:
        while True:
            gone = await db.fetchrow(
                f"WITH gone AS (DELETE FROM {part.table} x USING ("
                f"SELECT x.ctid AS c FROM {part.table} x WHERE {part.where}"
                f" LIMIT {part.batch}) pick WHERE x.ctid = pick.c RETURNING {part.size} AS b)"
                " SELECT count(*) AS n, coalesce(sum(b), 0)::bigint AS b FROM gone",
                *_args(part, kind, policy),
            )
            assert gone is not None
            rows += int(gone["n"])
            size += int(gone["b"])
            if int(gone["n"]) < part.batch:
                break
    return Amount(rows=rows, bytes=size)


async def stored(db: Executor) -> dict[str, Amount]:
    """What each kind holds now (rows and bytes), expired or not."""
    amounts: dict[str, Amount] = {}
    for kind, parts in KINDS.items():
        rows = size = 0
        for part in parts:
            found = await db.fetchrow(
                f"SELECT count(*) AS n, coalesce(sum({part.size}), 0)::bigint AS b"
                f" FROM {part.table} x"
            )
            assert found is not None
            rows += int(found["n"])
            size += int(found["b"])
        amounts[kind] = Amount(rows=rows, bytes=size)
    return amounts


async def run_states(
    db: Executor, requester_id: str, agent_ids: list[str]
) -> dict[str, tuple[str, float | None]]:
    """The executor's runs of one requester among `agent_ids`: state and seconds since they
    ended (None while open)."""
    rows = await db.fetch(
        "SELECT agent_id::text AS id, state,"
        " CASE WHEN state = ANY($3::text[]) THEN"
        "  extract(epoch FROM now() - coalesce(finished_at, updated_at))::float8 END AS ended"
        " FROM agents WHERE role = 'executor' AND peer_instance_id = $1"
        " AND agent_id = ANY($2::uuid[])",
        requester_id,
        agent_ids,
        sorted(str(state) for state in TERMINAL_STATES),
    )
    return {r["id"]: (r["state"], r["ended"]) for r in rows}
