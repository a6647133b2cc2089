"""What a local user can do, in one place for every face: the REST routes, the web console and
(through REST) the CLI call these functions, so a rule holds wherever the request came from.

Each function takes the instance's `Services` (pool, HTTP client, Temporal client, settings,
the spawn starter and the key cipher) and the `User` asking, and raises `FederationError`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import httpx
from temporalio.client import Client

from federation.identity import Identity, load_identity
from federation.keystore import KeyCipher
from federation.settings import Settings
from federation.store.notifications import Listener
from federation.transcripts import TranscriptPuller


class WorkflowStarter(Protocol):
    """Starts the requester's workflow of a committed spawn row (the spawn outbox)."""

    def kick(self, row: dict[str, Any]) -> None: ...

    async def kill_with_start(self, row: dict[str, Any], request: Any) -> Any: ...


@dataclass(frozen=True)
class Services:
    pool: asyncpg.Pool
    http: httpx.AsyncClient
    temporal: Client
    settings: Settings
    starter: WorkflowStarter
    # Pulls the transcript entries events did not bring (one per instance: the pulls of one
    # agent never overlap).
    transcripts: TranscriptPuller
    cipher: KeyCipher | None = None
    # The process's LISTEN connection (event streams wake on it); None: streams re-read on a
    # short bound instead.
    listener: Listener | None = None

    async def identity(self) -> Identity:
        # Loaded per call: a rotated key signs from the next request on, in every process.
        return await load_identity(self.pool, self.cipher)
