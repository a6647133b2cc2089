"""The agent loop: ask the model for a turn, run its tool calls in the sandbox, repeat.

Usable without Temporal: progress goes to a callback, cancellation is plain asyncio.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agents.models import Conversation, ModelProvider, ModelTurn, ToolCall, ToolOutcome
from agents.sandbox.base import Sandbox

ProgressCallback = Callable[[dict[str, Any]], Awaitable[None] | None]

SYSTEM_PROMPTS = {
    "worker": "You are a worker agent. Change the code in the workspace to complete the task.",
    "reviewer": "You are a reviewer agent. Review the code in the workspace; change nothing.",
    "tester": "You are a tester agent. Write and run tests for the code in the workspace.",
}
LOG_TAIL = 8 * 1024


@dataclass
class AgentRunReport:
    success: bool
    summary: str
    commands: list[dict[str, Any]] = field(default_factory=list)
    turns: int = 0
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    log_tail: str = ""

    def as_result(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "summary": self.summary,
            "commands": self.commands,
            "exitCodes": [c["exitCode"] for c in self.commands],
            "turns": self.turns,
            "usage": self.usage,
            "logTail": self.log_tail,
        }


def build_task_prompt(agent_type: str, context: dict[str, Any]) -> tuple[str, str]:
    system = SYSTEM_PROMPTS.get(agent_type, SYSTEM_PROMPTS["worker"])
    items = "\n".join(f"- {item}" for item in context.get("workItems") or [])
    task = (
        f"Repository: {context.get('repository') or '(none)'}\n"
        f"Branch: {context.get('branch') or '(default)'}\n"
        f"Work items:\n{items or '- (none)'}\n\n"
        f"Instructions:\n{context.get('instructions') or ''}"
    )
    return system, task


class AgentLoop:
    def __init__(
        self,
        provider: ModelProvider,
        sandbox: Sandbox,
        *,
        on_progress: ProgressCallback | None = None,
        max_turns: int = 50,
    ) -> None:
        self.provider = provider
        self.sandbox = sandbox
        self.on_progress = on_progress
        self.max_turns = max_turns
        self._log: list[str] = []

    async def run(self, agent_type: str, context: dict[str, Any]) -> AgentRunReport:
        system, task = build_task_prompt(agent_type, context)
        conversation = Conversation(system=system, task=task)
        report = AgentRunReport(success=False, summary="")
        for turn_no in range(1, self.max_turns + 1):
            turn = await self.provider.next_turn(conversation)
            report.turns = turn_no
            self._count_usage(report, turn)
            outcomes: list[ToolOutcome] = []
            for call in turn.tool_calls:
                if call.name == "finish":
                    report.success = bool(call.input.get("success", True))
                    report.summary = str(call.input.get("summary", ""))
                    report.log_tail = self._tail()
                    await self._progress(turn_no, "finish", report)
                    return report
                await self._progress(turn_no, call.name, report, call)
                outcomes.append(await self._run_tool(call, report))
            conversation.turns.append((turn, outcomes))
        report.summary = f"stopped after the maximum of {self.max_turns} turns"
        report.log_tail = self._tail()
        return report

    async def _run_tool(self, call: ToolCall, report: AgentRunReport) -> ToolOutcome:
        if call.name != "run_command":
            return ToolOutcome(call.id, f"unknown tool {call.name!r}", is_error=True)
        command = str(call.input.get("command", ""))
        result = await self.sandbox.run(command)
        report.commands.append(
            {"command": command, "exitCode": result.exit_code, "timedOut": result.timed_out}
        )
        self._log.append(f"$ {command}\n{result.output}[exit {result.exit_code}]\n")
        return ToolOutcome(
            call.id, result.output, is_error=result.exit_code != 0, exit_code=result.exit_code
        )

    async def _progress(
        self, turn: int, tool: str, report: AgentRunReport, call: ToolCall | None = None
    ) -> None:
        if self.on_progress is None:
            return
        tokens = sum(u.get("input", 0) + u.get("output", 0) for u in report.usage.values())
        detail: dict[str, Any] = {"turn": turn, "lastTool": tool, "tokens": tokens}
        if call is not None and "command" in call.input:
            detail["command"] = str(call.input["command"])[:200]
        maybe = self.on_progress(detail)
        if maybe is not None:
            await maybe

    @staticmethod
    def _count_usage(report: AgentRunReport, turn: ModelTurn) -> None:
        if not turn.usage:
            return
        entry = report.usage.setdefault(turn.model or "unknown", {"input": 0, "output": 0})
        entry["input"] += turn.usage.get("input", 0)
        entry["output"] += turn.usage.get("output", 0)

    def _tail(self) -> str:
        text = "".join(self._log)
        return text[-LOG_TAIL:]
