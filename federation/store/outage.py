"""Waiting out a database outage.

A store call fails in two ways that call for opposite answers: the database is away (refused
or lost connections, a server shutting down or starting up), which passes and is waited out,
and the database refused the statement, which asking again does not change. `is_outage` tells
them apart; `wait_for_store` runs a store call again, with backoff, while the database is away,
and raises `StoreUnavailable` once it stayed away too long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

log = logging.getLogger(__name__)
T = TypeVar("T")

# OSError: refused, reset, timed out, or the server's socket file gone. The others: the server
# closed the connection, shuts down, crashed, or is not accepting connections yet.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


class StoreUnavailable(Exception):
    """The database stayed away longer than a store call waits (the outage is its cause)."""


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the database is away rather than that it refused.

    Followed through the context too: a transaction the outage cut off ends in asyncpg's
    InterfaceError ("the underlying connection is closed") raised while handling the outage."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        if isinstance(current, OUTAGE_ERRORS):
            return True
        current, seen = current.__cause__ or current.__context__, seen + 1
    return False


async def wait_for_store(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    patience: float,
    first_delay: float = 0.5,
    max_delay: float = 10.0,
) -> T:
    """`call()`, called again with backoff (first_delay doubling up to max_delay) while the
    database is away, for up to `patience` seconds, then `StoreUnavailable`; any other error
    is raised at once. The call must be safe to repeat: an outage may cut it off after it took
    effect."""
    give_up = time.monotonic() + patience
    delay = first_delay
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_outage(exc):
                raise
            if time.monotonic() + delay > give_up:
                raise StoreUnavailable(
                    f"{what}: the database stayed away for {patience:.0f} s ({exc!r})"
                ) from exc
            log.warning("%s: the database is away (%r); trying again in %.1f s", what, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)
