"""W3C trace context for one run across instances.

A `traceparent` (`00-{trace-id}-{span-id}-{flags}`) travels inside the signed envelope (so a
peer cannot have it rewritten on the way), from the user's spawn request through the requester's
workflow to the executor and back in its events. Logs carry its `traceId`, so one run can be
followed from requester to executor; an OpenTelemetry exporter, where configured, can use the same
header.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterator
from contextvars import ContextVar

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_current: ContextVar[str | None] = ContextVar("fedagent_traceparent", default=None)


def valid(traceparent: str | None) -> bool:
    if not traceparent:
        return False
    match = TRACEPARENT.match(traceparent)
    return match is not None and match.group(1) != "0" * 32 and match.group(2) != "0" * 16


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child(traceparent: str) -> str:
    """The same trace, a new span: what a hop forwards."""
    match = TRACEPARENT.match(traceparent)
    assert match, traceparent
    return f"00-{match.group(1)}-{secrets.token_hex(8)}-{match.group(3)}"


def trace_id(traceparent: str | None) -> str | None:
    match = TRACEPARENT.match(traceparent or "")
    return match.group(1) if match else None


def current() -> str | None:
    return _current.get()


def outgoing() -> str | None:
    """The traceparent a message sent now should carry: a child span of the current one."""
    parent = _current.get()
    return child(parent) if parent else None


@contextlib.contextmanager
def trace(traceparent: str | None) -> Iterator[None]:
    """Within the block, messages sent and records logged belong to this trace."""
    token = _current.set(traceparent if valid(traceparent) else None)
    try:
        yield
    finally:
        _current.reset(token)


def bind(traceparent: str | None) -> None:
    """Belong to this trace for the rest of the current task (e.g. one request)."""
    _current.set(traceparent if valid(traceparent) else None)
