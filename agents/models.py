"""Model providers behind one interface: given the conversation so far, the next assistant turn.

`scripted` is deterministic and offline: each instruction line starting with `$ ` becomes a
shell tool call, in order; then it finishes with a summary of what ran and its exit codes.
A failing command makes it finish unsuccessfully.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class ModelTurn:
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    usage: dict[str, int] = field(default_factory=dict)
    model: str = ""


@dataclass(frozen=True)
class ToolOutcome:
    call_id: str
    content: str
    is_error: bool = False
    exit_code: int | None = None


@dataclass
class Conversation:
    system: str
    task: str
    turns: list[tuple[ModelTurn, list[ToolOutcome]]] = field(default_factory=list)


class ModelProvider(ABC):
    name = "abstract"

    @abstractmethod
    async def next_turn(self, conversation: Conversation) -> ModelTurn: ...


def script_commands(instructions: str) -> list[str]:
    return [line[2:] for line in instructions.splitlines() if line.startswith("$ ")]


class ScriptedProvider(ModelProvider):
    name = "scripted"

    def __init__(self, instructions: str) -> None:
        self.commands = script_commands(instructions)

    async def next_turn(self, conversation: Conversation) -> ModelTurn:
        ran = [o for _, outcomes in conversation.turns for o in outcomes]
        done = len(conversation.turns)
        failed = [o for o in ran if o.is_error]
        if failed or done >= len(self.commands):
            lines = [
                f"`{cmd}` -> exit {o.exit_code}" for cmd, o in zip(self.commands, ran, strict=False)
            ]
            ok = not failed
            verdict = "all commands succeeded" if ok else "a command failed"
            summary = f"Ran {len(ran)} command(s), {verdict}:\n" + "\n".join(lines)
            return ModelTurn(
                tool_calls=(
                    ToolCall(f"call-{done}", "finish", {"summary": summary, "success": ok}),
                ),
                model="scripted",
            )
        return ModelTurn(
            tool_calls=(ToolCall(f"call-{done}", "run_command", {"command": self.commands[done]}),),
            model="scripted",
        )
