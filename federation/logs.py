"""Logging for API and worker processes: one JSON object per line (or readable text), each record
carrying the ids an operator follows a run by: `instance`, `agentId`, `workflowId`, `messageId`.

Ids come from three places, the first one that has them wins:
- `extra={...}` on the logging call itself;
- the log context of the current task (`log_context(agentId=...)`, `bind_log_context(...)`),
  which the API's middleware fills for each request;
- the Temporal activity or workflow the record was logged from (`activity.info()`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

from temporalio import activity

from federation import tracing

CONTEXT_FIELDS = ("instance", "agentId", "workflowId", "messageId", "requestId", "traceId")
_log_context: ContextVar[dict[str, Any] | None] = ContextVar("fedagent_log_context", default=None)
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_AGENT_IN_WORKFLOW_ID = re.compile(
    r"^(?:remote-agent/|agent-run/[^/]+/)([0-9a-fA-F-]{36})$", re.ASCII
)


def current_log_context() -> dict[str, Any]:
    return dict(_log_context.get() or {})


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Records logged inside the block (in this task and tasks it starts) carry `fields`."""
    token = _log_context.set({**(_log_context.get() or {}), **_present(fields)})
    try:
        yield
    finally:
        _log_context.reset(token)


def bind_log_context(**fields: Any) -> None:
    """Add `fields` to the log context for the rest of the current task (e.g. a request)."""
    _log_context.set({**(_log_context.get() or {}), **_present(fields)})


def agent_id_from_workflow_id(workflow_id: str | None) -> str | None:
    """`remote-agent/{agentId}` and `agent-run/{requester}/{agentId}` name their agent."""
    if not workflow_id:
        return None
    match = _AGENT_IN_WORKFLOW_ID.match(workflow_id)
    return match.group(1) if match else None


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) for k, v in fields.items() if v is not None and v != ""}


def _temporal_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Ids of the Temporal workflow or activity that logged the record, if any."""
    details = getattr(record, "temporal_workflow", None) or getattr(
        record, "temporal_activity", None
    )
    workflow_id: str | None = None
    if isinstance(details, dict):
        workflow_id = details.get("workflow_id")
    elif activity.in_activity():
        workflow_id = activity.info().workflow_id
    if not workflow_id:
        return {}
    return _present({"workflowId": workflow_id, "agentId": agent_id_from_workflow_id(workflow_id)})


class ContextFilter(logging.Filter):
    """Puts the context ids on each record (as attributes), never overriding `extra=`."""

    def __init__(self, instance: str | None = None) -> None:
        super().__init__()
        self.instance = instance

    def filter(self, record: logging.LogRecord) -> bool:
        fields: dict[str, Any] = {"instance": self.instance} if self.instance else {}
        fields.update(_temporal_fields(record))
        fields.update(_log_context.get() or {})
        if trace := tracing.trace_id(tracing.current()):
            fields.setdefault("traceId", trace)
        for key, value in fields.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the context ids, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_") or key in event:
                continue
            if key in ("temporal_workflow", "temporal_activity") and isinstance(value, dict):
                # Already flattened into workflowId/agentId; keep the useful rest.
                for name in ("activity_type", "workflow_type", "attempt", "run_id"):
                    if name in value:
                        event.setdefault(_camel(name), _jsonable(value[name]))
                continue
            event[key] = _jsonable(value)
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            event["exc"] = record.exc_text
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal, with the context ids at the end when there are any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(
            f"{k}={getattr(record, k)}"
            for k in CONTEXT_FIELDS
            if k != "instance" and getattr(record, k, None)
        )
        return f"{line} [{ids}]" if ids else line


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def configure_logging(
    level: str = "info",
    fmt: Literal["json", "text"] = "text",
    *,
    instance: str | None = None,
    stream: Any = None,
) -> logging.Handler:
    """Route every logger (uvicorn's and Temporal's too) through one handler on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter(instance))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request at INFO: the API's own access log says more, once.
    if root.level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    # uvicorn configures its own handlers unless told not to; send its records to ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler
