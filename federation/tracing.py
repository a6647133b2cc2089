"""W3C trace context for one run across instances.

A `traceparent` (`00-{trace-id}-{span-id}-{flags}`) travels inside the signed envelope (so a
peer cannot have it rewritten on the way), from the user's spawn request through the requester's
workflow to the executor and back in its events. Logs carry its `traceId`, so one run can be
followed from requester to executor; an OpenTelemetry exporter, where configured, can use the same
header.

With OpenTelemetry on (`federation.telemetry`), the `traceparent` a message carries is the
context of the span that sends it (`sending`), and the executor's ingress continues the trace
from the envelope (`receive`), whatever the HTTP headers say: the envelope is what is signed.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import AsyncIterator, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from federation import telemetry

if TYPE_CHECKING:
    from federation.envelope import Envelope

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_current: ContextVar[str | None] = ContextVar("fedagent_traceparent", default=None)
# The spans `receive` opened during one ingress request, ended by `ingress_spans`.
_ingress: ContextVar[list[Any] | None] = ContextVar("fedagent_ingress_spans", default=None)


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
    """The traceparent a message sent now should carry: a child span of the current one
    (OpenTelemetry on: the current span's own context)."""
    if telemetry.enabled() and (span := _span_traceparent()):
        return span
    parent = _current.get()
    return child(parent) if parent else None


def begin(traceparent: str | None) -> str:
    """The trace a new run joins: the current span's (OpenTelemetry on), else a child of the
    caller's `traceparent`, else a new trace."""
    if telemetry.enabled() and (span := _span_traceparent()):
        return span
    return child(traceparent) if traceparent and valid(traceparent) else new_traceparent()


@contextlib.contextmanager
def trace(traceparent: str | None) -> Iterator[None]:
    """Within the block, messages sent and records logged belong to this trace."""
    token = _current.set(traceparent if valid(traceparent) else None)
    try:
        with _continued(traceparent):
            yield
    finally:
        _current.reset(token)


def bind(traceparent: str | None) -> None:
    """Belong to this trace for the rest of the current task (e.g. one request)."""
    _current.set(traceparent if valid(traceparent) else None)


# --- OpenTelemetry spans (no-ops while `telemetry.enabled()` is false) --------------------------


def _span_traceparent() -> str | None:
    from opentelemetry import trace as otel

    context = otel.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _remote_context(traceparent: str | None) -> Any:
    """The OpenTelemetry context whose parent is the span `traceparent` names (None: none)."""
    if not valid(traceparent):
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": str(traceparent)})


@contextlib.contextmanager
def _continued(traceparent: str | None) -> Iterator[None]:
    """Spans opened in the block belong to `traceparent`'s trace: where no span of that trace
    is current (a workflow started by a sweeper, a task resumed from a stored row), the span
    it names becomes their parent."""
    if not telemetry.enabled() or not valid(traceparent):
        yield
        return
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel

    current = otel.get_current_span().get_span_context()
    if current.is_valid and f"{current.trace_id:032x}" == trace_id(traceparent):
        yield
        return
    token = otel_context.attach(_remote_context(traceparent))
    try:
        yield
    finally:
        otel_context.detach(token)


ATTRIBUTE_MAX = 128  # characters: identifiers a peer names are cut there


def _attributes(values: Mapping[str, Any]) -> dict[str, str | int]:
    """Span attributes of identifiers and counts only (never payload text)."""
    return {
        f"fedagent.{key}": value[:ATTRIBUTE_MAX] if isinstance(value, str) else value
        for key, value in values.items()
        if isinstance(value, (str, int)) and not isinstance(value, bool) and value != ""
    }


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A span around the block (an internal step: `agent.run`), its attributes identifiers
    (`agent_id=`, `connection_id=`, `attempt=`...)."""
    if not telemetry.enabled():
        yield
        return
    tracer = telemetry.tracer(__name__)
    with tracer.start_as_current_span(name, attributes=_attributes(attributes)):
        yield


@contextlib.contextmanager
def sending(message_type: str, command_type: str | None, **attributes: Any) -> Iterator[None]:
    """The span of one signed message sent to a peer: messages signed in the block carry its
    context (`outgoing`), and the HTTP request it makes is its child."""
    if not telemetry.enabled():
        yield
        return
    from opentelemetry import trace as otel

    tracer = telemetry.tracer(__name__)
    with tracer.start_as_current_span(
        f"send {command_type or message_type}",
        kind=otel.SpanKind.PRODUCER,
        attributes=_attributes(
            {"message_type": message_type, "command_type": command_type, **attributes}
        ),
    ):
        yield


def receive(envelope: Envelope, connection: Mapping[str, Any] | None = None) -> None:
    """A verified peer message: the rest of the request belongs to its trace (logs, messages
    sent) and, OpenTelemetry on, to a span whose parent is the span that signed it."""
    bind(envelope.traceparent)
    spans = _ingress.get()
    if not telemetry.enabled() or spans is None or not valid(envelope.traceparent):
        return
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel

    payload = envelope.payload if isinstance(envelope.payload, dict) else {}
    http = otel.get_current_span().get_span_context()
    opened = telemetry.tracer(__name__).start_span(
        f"receive {envelope.commandType or envelope.type.value}",
        context=_remote_context(envelope.traceparent),
        kind=otel.SpanKind.CONSUMER,
        # The request's HTTP span, when its headers named another trace or none.
        links=[otel.Link(http)] if http.is_valid else [],
        attributes=_attributes(
            {
                "message_type": envelope.type.value,
                "command_type": envelope.commandType,
                "message_id": envelope.messageId,
                "peer_instance_id": envelope.senderId,
                "agent_id": payload.get("agentId"),
                "connection_id": str((connection or {}).get("connection_id") or ""),
            }
        ),
    )
    spans.append(opened)
    # For the rest of this request (its own task), like `bind`: ended by `ingress_spans`.
    otel_context.attach(otel.set_span_in_context(opened))


async def ingress_spans() -> AsyncIterator[None]:
    """A dependency of the peer ingress: the spans `receive` opens end with the request."""
    if not telemetry.enabled():
        yield
        return
    spans: list[Any] = []
    _ingress.set(spans)
    try:
        yield
    except Exception as exc:
        for opened in spans:
            opened.record_exception(exc)
        raise
    finally:
        for opened in spans:
            opened.end()
