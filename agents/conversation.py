"""What a run's conversation looks like at a checkpoint, where checkpoints go, and the transcript.

The loop saves a `ConversationState` after every model answer, before every tool call and
after every tool result, through a `ConversationSink` it is given (the activity implements it
with the executor's PostgreSQL; the runtime itself stores nothing). A run given a saved state
resumes from it: answers already in it are not asked for again, and a tool call that was
running when the state was saved is run again and reported to the model as interrupted.

Along with each checkpoint the loop hands the sink the transcript entries of that step: the
assistant's text and usage, each tool call and each tool result (bounded, head and tail kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from agents.models import ModelTurn, ToolCall, ToolOutcome

# Characters of one tool result or assistant text kept in a transcript entry (head and tail).
TRANSCRIPT_OUTPUT = 4 * 1024
TRANSCRIPT_TEXT = 16 * 1024
TRANSCRIPT_INPUT = 4 * 1024

INTERRUPTED_NOTE = (
    "[The previous attempt at this tool call was interrupted: the worker running it was lost. "
    "It may have had partial effects. The call was run again; this is the output of the new run.]"
)


class ConversationSink(Protocol):
    """Where a run's checkpoints and transcript entries go. `save` must be durable when it
    returns: the loop acts on the step (runs the tool, asks the model) only after it."""

    async def save(self, state: ConversationState, entries: list[dict[str, Any]]) -> None: ...


@dataclass
class ConversationState:
    """A run's conversation as sent to the model, and the counters that span resumes."""

    turns: list[tuple[ModelTurn, list[ToolOutcome]]] = field(default_factory=list)
    turn_count: int = 0
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    api_retries: int = 0
    commands: list[dict[str, Any]] = field(default_factory=list)
    log_tail: str = ""
    # Characters the log has had in all (the tail is its end): a checkpoint saves what a step
    # added to the log, not the whole tail again.
    log_length: int = 0
    nudged: bool = False
    # The tool call that had started and not yet ended when this state was saved.
    running_call: str | None = None
    # How many model answers this conversation holds across resumes, and how often it resumed.
    model_calls: int = 0
    resumes: int = 0

    @property
    def tokens(self) -> int:
        return sum(sum(u.values()) for u in self.usage.values())

    def messages(self) -> list[dict[str, Any]]:
        """The turns as JSON: an assistant message, then the user message with its results."""
        out: list[dict[str, Any]] = []
        for turn, outcomes in self.turns:
            out.append(
                {
                    "role": "assistant",
                    "text": turn.text,
                    "toolCalls": [
                        {"id": c.id, "name": c.name, "input": c.input} for c in turn.tool_calls
                    ],
                    "usage": turn.usage,
                    "model": turn.model,
                    "stopReason": turn.stop_reason,
                    "content": list(turn.raw),
                }
            )
            out.append(
                {
                    "role": "user",
                    "toolResults": [
                        {
                            "callId": o.call_id,
                            "content": o.content,
                            "isError": o.is_error,
                            "exitCode": o.exit_code,
                        }
                        for o in outcomes
                    ],
                }
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "messages": self.messages(),
            "turnCount": self.turn_count,
            "usage": self.usage,
            "apiRetries": self.api_retries,
            "commands": self.commands,
            "logTail": self.log_tail,
            "logLength": self.log_length,
            "nudged": self.nudged,
            "runningCall": self.running_call,
            "modelCalls": self.model_calls,
            "resumes": self.resumes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConversationState:
        messages = list(data.get("messages") or [])
        turns: list[tuple[ModelTurn, list[ToolOutcome]]] = []
        for i in range(0, len(messages) - 1, 2):
            a, u = messages[i], messages[i + 1]
            turn = ModelTurn(
                text=str(a.get("text") or ""),
                tool_calls=tuple(
                    ToolCall(str(c["id"]), str(c["name"]), dict(c.get("input") or {}))
                    for c in a.get("toolCalls") or []
                ),
                usage=dict(a.get("usage") or {}),
                model=str(a.get("model") or ""),
                stop_reason=str(a.get("stopReason") or ""),
                raw=tuple(a.get("content") or ()),
            )
            outcomes = [
                ToolOutcome(
                    str(r["callId"]),
                    str(r.get("content") or ""),
                    bool(r.get("isError")),
                    r.get("exitCode"),
                )
                for r in u.get("toolResults") or []
            ]
            turns.append((turn, outcomes))
        return cls(
            turns=turns,
            turn_count=int(data.get("turnCount") or len(turns)),
            usage={k: dict(v) for k, v in (data.get("usage") or {}).items()},
            api_retries=int(data.get("apiRetries") or 0),
            commands=list(data.get("commands") or []),
            log_tail=str(data.get("logTail") or ""),
            log_length=int(data.get("logLength") or 0),
            nudged=bool(data.get("nudged")),
            running_call=data.get("runningCall"),
            model_calls=int(data.get("modelCalls") or 0),
            resumes=int(data.get("resumes") or 0),
        )


# --- transcript entries ---------------------------------------------------------------------


def head_tail(text: str, limit: int, where: str = "") -> tuple[str, bool]:
    """`text` if it fits, else its head and tail around a marker (saying `where` the whole
    is, if given); and whether it was cut."""
    if len(text) <= limit:
        return text, False
    half = max(1, limit // 2)
    cut = len(text) - 2 * half
    note = f"; {where}" if where else ""
    return f"{text[:half]}\n[... {cut} characters cut{note} ...]\n{text[-half:]}", True


def _bounded_input(value: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, str):
            out[key] = head_tail(item, TRANSCRIPT_INPUT)[0]
        else:
            out[key] = item
    return out


def turn_entries(turn_no: int, turn: ModelTurn) -> list[dict[str, Any]]:
    text, cut = head_tail(turn.text.strip(), TRANSCRIPT_TEXT)
    entries: list[dict[str, Any]] = [
        {
            "kind": "assistant",
            "turn": turn_no,
            "text": text,
            "textCut": cut,
            "model": turn.model,
            "usage": dict(turn.usage),
            "stopReason": turn.stop_reason,
        }
    ]
    for call in turn.tool_calls:
        entries.append(
            {
                "kind": "tool_call",
                "turn": turn_no,
                "callId": call.id,
                "name": call.name,
                "input": _bounded_input(call.input),
            }
        )
    return entries


def result_entry(
    turn_no: int, call: ToolCall, outcome: ToolOutcome, *, interrupted: bool = False
) -> dict[str, Any]:
    output, cut = head_tail(outcome.content, TRANSCRIPT_OUTPUT)
    entry: dict[str, Any] = {
        "kind": "tool_result",
        "turn": turn_no,
        "callId": call.id,
        "name": call.name,
        "isError": outcome.is_error,
        "output": output,
        "outputChars": len(outcome.content),
        "outputCut": cut,
        "interrupted": interrupted,
    }
    if outcome.exit_code is not None:
        entry["exitCode"] = outcome.exit_code
    if "path" in call.input:
        entry["path"] = str(call.input["path"])[:500]
    return entry


def note_entry(kind: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "text": text, **extra}
