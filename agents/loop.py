"""The agent loop: ask the model for a turn, run its tool calls in the sandbox, repeat.

Usable without Temporal: progress goes to a callback, cancellation is plain asyncio. The loop
owns the limits of a run (turns, token budget) and the retries of transient model API errors
(with exponential backoff and jitter, honouring Retry-After); a permanent API error (invalid
request, authentication) ends the run unsuccessfully with the API's reason.

What the report carries inline (`AgentRunReport.as_result`: the activity's result, the final
event, the workflow's result) is text by `agents.text`'s rule and bounded whatever the run did,
so no output fails a finished run: the summary and each command keep their head and tail,
the lists of commands and changed files are cut, with flags and totals saying so. The whole of
each is in the run's log (an artifact) and the diff.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agents.conversation import (
    INTERRUPTED_NOTE,
    ConversationSink,
    ConversationState,
    head_tail,
    note_entry,
    result_entry,
    turn_entries,
)
from agents.models import (
    Conversation,
    ModelProvider,
    ModelTurn,
    ProviderError,
    ToolCall,
    ToolOutcome,
)
from agents.prompts import system_prompt, task_prompt
from agents.sandbox.base import Sandbox
from agents.text import clean, clean_json
from agents.tools import TOOL_SPECS, ToolRunner, tools_for

ProgressCallback = Callable[[dict[str, Any]], Awaitable[None] | None]

LOG_TAIL = 8 * 1024
# Inline bounds of a result (characters): with the previews they keep a final event far below
# the 1 MiB a requester takes and Temporal's 2 MiB payloads, even if every character is escaped.
SUMMARY_LIMIT = 16 * 1024
COMMAND_PREVIEW = 512
COMMANDS_INLINE = 50  # the last ones; exitCodes lists them all
CHANGED_FILES_CHARS = 16 * 1024
OMITTED_FILES_CHARS = 4 * 1024
IN_THE_LOG = "the whole is in the run's log"


@dataclass
class AgentRunReport:
    success: bool
    summary: str
    commands: list[dict[str, Any]] = field(default_factory=list)
    turns: int = 0
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    log_tail: str = ""
    # finished | no_tool_call | max_turns | token_budget | model_error | disk_quota
    # | peer_disk_budget
    stop_reason: str = ""
    error: str | None = None
    api_retries: int = 0
    model: str = ""
    # Model answers in the conversation (across resumes) and how many times it was resumed.
    model_calls: int = 0
    resumes: int = 0
    # Filled by the activity: the transcript kept on the executor (by reference).
    transcript: dict[str, Any] = field(default_factory=dict)
    # The whole log (logTail is its end); kept as an artifact, never sent inline.
    log: str = ""
    # Filled by the runtime once the sandbox is gone: the whole diff is in the file
    # `diff_path` (an artifact); results carry its sha256, size and a bounded preview.
    diff_path: str = ""
    diff_preview: str = ""
    diff_sha256: str = ""
    diff_bytes: int = 0
    diff_truncated: bool = False
    diff_omitted_files: list[dict[str, Any]] = field(default_factory=list)
    changed_files: list[str] = field(default_factory=list)
    sandbox: dict[str, Any] = field(default_factory=dict)
    workspace: dict[str, Any] = field(default_factory=dict)

    @property
    def diff(self) -> str:
        """The whole diff (read from its file)."""
        if not self.diff_path:
            return ""
        with open(self.diff_path, "rb") as handle:
            return handle.read().decode(errors="replace")

    @property
    def summary_preview(self) -> str:
        """The summary as results carry it: its head and tail past SUMMARY_LIMIT characters."""
        return _bounded(self.summary)

    @property
    def tokens(self) -> int:
        return sum(sum(u.values()) for u in self.usage.values())

    def as_result(self) -> dict[str, Any]:
        """The report as the run's result: safe text, bounded (see the module's docstring)."""
        commands = [_command_preview(c) for c in self.commands[-COMMANDS_INLINE:]]
        result: dict[str, Any] = {
            "success": self.success,
            "summary": self.summary_preview,
            "commands": commands,
            "exitCodes": [c["exitCode"] for c in self.commands],
            "turns": self.turns,
            "usage": self.usage,
            "logTail": self.log_tail,
            "stopReason": self.stop_reason,
            "error": _bounded(self.error) if self.error is not None else None,
            "apiRetries": self.api_retries,
            "model": self.model,
            "modelCalls": self.model_calls,
            "resumes": self.resumes,
            "transcript": self.transcript,
            "diffPreview": self.diff_preview,
            "diffSha256": self.diff_sha256,
            "diffBytes": self.diff_bytes,
            "diffTruncated": self.diff_truncated,
            "diffOmittedFiles": _first_fitting(
                self.diff_omitted_files, OMITTED_FILES_CHARS, lambda e: str(e.get("path"))
            ),
            "changedFiles": _first_fitting(self.changed_files, CHANGED_FILES_CHARS, str),
            "sandbox": self.sandbox,
            "workspace": self.workspace,
        }
        if len(self.commands) > COMMANDS_INLINE:
            result["commandsOmitted"] = len(self.commands) - COMMANDS_INLINE
        if len(self.summary) > SUMMARY_LIMIT:
            result["summaryTruncated"], result["summaryChars"] = True, len(self.summary)
        for key, whole in (
            ("changedFiles", self.changed_files),
            ("diffOmittedFiles", self.diff_omitted_files),
        ):
            if len(result[key]) < len(whole):
                result[f"{key}Total"] = len(whole)
        return dict(clean_json(result))


def _bounded(text: str) -> str:
    return head_tail(clean(text), SUMMARY_LIMIT, IN_THE_LOG)[0]


def _command_preview(entry: dict[str, Any]) -> dict[str, Any]:
    command = str(entry.get("command", ""))
    shown, cut = head_tail(command, COMMAND_PREVIEW, IN_THE_LOG)
    if not cut:
        return entry
    return {**entry, "command": shown, "commandChars": len(command), "commandTruncated": True}


def _first_fitting(items: list[Any], budget: int, size_of: Callable[[Any], str]) -> list[Any]:
    """The first items whose texts fit in `budget` characters together."""
    kept: list[Any] = []
    for item in items:
        budget -= len(size_of(item)) + 4
        if budget < 0:
            break
        kept.append(item)
    return kept


def build_task_prompt(
    agent_type: str, context: Mapping[str, Any], workspace_note: str = ""
) -> tuple[str, str]:
    return system_prompt(agent_type), task_prompt(context, workspace_note)


class AgentLoop:
    def __init__(
        self,
        provider: ModelProvider,
        sandbox: Sandbox,
        *,
        on_progress: ProgressCallback | None = None,
        max_turns: int = 50,
        token_budget: int | None = None,
        max_api_retries: int = 6,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        log_tail: int = LOG_TAIL,
    ) -> None:
        self.provider = provider
        self.sandbox = sandbox
        self.on_progress = on_progress
        self.max_turns = max_turns
        self.token_budget = token_budget
        self.max_api_retries = max_api_retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.log_limit = log_tail
        self._log: list[str] = []
        self._log_before = 0  # characters of the log before self._log (a resumed run's)
        self._sink: ConversationSink | None = None
        self._state = ConversationState()

    async def run(
        self,
        agent_type: str,
        context: Mapping[str, Any],
        *,
        workspace_note: str = "",
        previous_try: str = "",
        resume_from: ConversationState | None = None,
        sink: ConversationSink | None = None,
        workspace_news: str = "",
    ) -> AgentRunReport:
        """Run the conversation to its end. Given `resume_from` (a checkpoint of this same
        conversation), continue it instead of starting over; `sink` gets every checkpoint."""
        allowed = tools_for(agent_type)
        conversation = self._conversation(agent_type, allowed, context, workspace_note)
        if previous_try:
            conversation.task += f"\n\nEarlier try: {previous_try}"
        tools = ToolRunner(self.sandbox, allowed)
        report = AgentRunReport(success=False, summary="", model=self.provider.model)
        self._sink = sink
        state = resume_from or ConversationState()
        conversation.turns = state.turns
        self._state = state
        entries = self._opening_entries(report, resume_from, previous_try, workspace_news)
        if entries:
            await self._save(report, entries)
        try:
            await self._run(conversation, tools, report)
        finally:
            self._close_report(report)
        return report

    def _conversation(
        self, agent_type: str, allowed: list[str], context: Mapping[str, Any], workspace_note: str
    ) -> Conversation:
        return Conversation(
            system=system_prompt(
                agent_type,
                mount=self.sandbox.workspace_mount,
                command_timeout=self.sandbox.limits.command_timeout,
                max_turns=self.max_turns,
            ),
            task=task_prompt(context, workspace_note),
            tools=[TOOL_SPECS[name] for name in allowed],
        )

    def _opening_entries(
        self,
        report: AgentRunReport,
        resume_from: ConversationState | None,
        previous_try: str,
        workspace_news: str,
    ) -> list[dict[str, Any]]:
        """What the transcript says before the first turn; a resumed run's report and log
        start where its checkpoint left them."""
        entries: list[dict[str, Any]] = []
        state = self._state
        if resume_from is not None:
            state.resumes += 1
            report.turns = state.turn_count
            report.usage = state.usage
            report.api_retries = state.api_retries
            report.commands = state.commands
            # Checkpoints keep the log's tail only: the whole log of a resumed run starts there.
            self._log = [state.log_tail] if state.log_tail else []
            self._log_before = max(0, state.log_length - len(state.log_tail))
            entries.append(
                note_entry(
                    "resumed",
                    f"the worker running this try was lost; resumed after turn "
                    f"{state.turn_count} from its last checkpoint",
                    turn=state.turn_count,
                )
            )
        elif previous_try:
            entries.append(note_entry("try", f"earlier try: {previous_try}"))
        if workspace_news:
            entries.append(note_entry("workspace", workspace_news))
        return entries

    def _close_report(self, report: AgentRunReport) -> None:
        """The report's bounded, clean texts and the run's counts, however the loop ended."""
        state = self._state
        report.log_tail = clean(self._tail())
        report.model_calls = state.model_calls
        report.resumes = state.resumes
        report.summary = clean(report.summary)
        if report.error is not None:
            report.error = clean(report.error)
        if len(report.summary) > SUMMARY_LIMIT:
            # The result keeps its head and tail; the whole ends the log.
            self._log.append(f"[summary, {len(report.summary)} characters]\n{report.summary}\n")
        report.log = clean("".join(self._log))

    async def _save(self, report: AgentRunReport, entries: list[dict[str, Any]]) -> None:
        if self._sink is None:
            return
        state = self._state
        state.turn_count = report.turns
        state.usage = report.usage
        state.api_retries = report.api_retries
        state.commands = report.commands
        state.log_tail = self._tail()
        state.log_length = self._log_before + sum(len(chunk) for chunk in self._log)
        await self._sink.save(state, entries)

    async def _run(
        self, conversation: Conversation, tools: ToolRunner, report: AgentRunReport
    ) -> None:
        state = self._state
        if conversation.turns:
            # Resumed: finish the tool calls of the last checkpointed answer first.
            last, done = conversation.turns[-1]
            if last.tool_calls and await self._handle_calls(
                report.turns, last, done, tools, report
            ):
                return
        for turn_no in range(report.turns + 1, self.max_turns + 1):
            if self.token_budget is not None and report.tokens >= self.token_budget:
                self._stop(
                    report,
                    "token_budget",
                    f"stopped: the token budget of {self.token_budget} tokens is spent "
                    f"({report.tokens} used)",
                )
                return
            try:
                turn = await self._next_turn(conversation, report, turn_no)
            except ProviderError as exc:
                self._stop(report, "model_error", self._failure_summary(exc, report))
                return
            state.model_calls += 1
            report.turns = turn_no
            self._count_usage(report, turn)
            if turn.text:
                self._log.append(f"[assistant] {turn.text.strip()}\n")
            if not turn.tool_calls:
                if turn.stop_reason == "refusal":
                    self._stop(report, "model_error", "the model declined the task")
                    return
                if state.nudged or turn.stop_reason not in ("end_turn", "max_tokens", ""):
                    # The model ended without calling finish twice: its text is the summary.
                    report.success = True
                    report.summary = turn.text.strip() or "(the model ended without a summary)"
                    report.stop_reason = "no_tool_call"
                    await self._progress(turn_no, "finish", report)
                    return
                state.nudged = turn.stop_reason != "max_tokens"
                conversation.turns.append((turn, []))
                await self._save(report, turn_entries(turn_no, turn))
                continue
            state.nudged = False
            outcomes: list[ToolOutcome] = []
            conversation.turns.append((turn, outcomes))
            await self._save(report, turn_entries(turn_no, turn))
            if await self._handle_calls(turn_no, turn, outcomes, tools, report):
                return
        self._stop(report, "max_turns", f"stopped after the maximum of {self.max_turns} turns")

    async def _handle_calls(
        self,
        turn_no: int,
        turn: ModelTurn,
        outcomes: list[ToolOutcome],
        tools: ToolRunner,
        report: AgentRunReport,
    ) -> bool:
        """Run the calls of `turn` that have no outcome yet; True when one was finish."""
        state = self._state
        for call in turn.tool_calls[len(outcomes) :]:
            if call.name == "finish":
                report.success = bool(call.input.get("success", True))
                report.summary = str(call.input.get("summary", ""))
                report.stop_reason = "finished"
                await self._progress(turn_no, "finish", report)
                return True
            interrupted = state.running_call == call.id
            await self._progress(turn_no, call.name, report, call)
            # Saved before the call starts: if this worker is lost while it runs, the resumed
            # run knows the call was under way and tells the model it was interrupted.
            state.running_call = call.id
            await self._save(report, [])
            outcome, record = await tools.run(call)
            if interrupted:
                outcome = dataclasses.replace(
                    outcome, content=f"{INTERRUPTED_NOTE}\n{outcome.content}"
                )
            if record is not None:
                report.commands.append(
                    {
                        "command": record.command,
                        "exitCode": record.exit_code,
                        "timedOut": record.timed_out,
                        **({"interrupted": True} if interrupted else {}),
                    }
                )
                self._log.append(f"$ {record.command}\n{record.output}[exit {record.exit_code}]\n")
            else:
                status = "error" if outcome.is_error else "ok"
                self._log.append(f"[{call.name} {call.input.get('path', '')}] {status}\n")
            outcomes.append(outcome)
            state.running_call = None
            await self._save(
                report, [result_entry(turn_no, call, outcome, interrupted=interrupted)]
            )
            over = await tools.check_disk()
            if over is not None:
                self._stop(report, over.code, over.reason())
                return True
        return False

    async def _next_turn(
        self, conversation: Conversation, report: AgentRunReport, turn_no: int
    ) -> ModelTurn:
        attempt = 0
        while True:
            try:
                return await self.provider.next_turn(conversation)
            except ProviderError as exc:
                if not exc.transient or attempt >= self.max_api_retries:
                    raise
                delay = min(self.backoff_max, self.backoff * 2**attempt)
                delay = delay * (0.5 + random.random() / 2)  # jitter: retries do not align
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, self.backoff_max))
                attempt += 1
                report.api_retries += 1
                self._log.append(
                    f"[model API] {exc}; retry {attempt}/{self.max_api_retries} in {delay:.2f} s\n"
                )
                await self._progress(turn_no, "model_retry", report, retry=attempt, error=str(exc))
                await asyncio.sleep(delay)

    def _failure_summary(self, exc: ProviderError, report: AgentRunReport) -> str:
        if exc.transient:
            return f"the model API stayed unavailable after {report.api_retries} retries: {exc}"
        return f"the model API refused the request: {exc}"

    def _stop(self, report: AgentRunReport, reason: str, summary: str) -> None:
        report.success = False
        report.stop_reason = reason
        report.summary = summary
        report.error = summary

    async def _progress(
        self,
        turn: int,
        tool: str,
        report: AgentRunReport,
        call: ToolCall | None = None,
        **extra: Any,
    ) -> None:
        if self.on_progress is None:
            return
        detail: dict[str, Any] = {"turn": turn, "lastTool": tool, "tokens": report.tokens}
        if call is not None:
            for key in ("command", "path"):
                if key in call.input:
                    detail[key] = str(call.input[key])[:200]
        detail.update(extra)
        maybe = self.on_progress(clean_json(detail))
        if maybe is not None:
            await maybe

    @staticmethod
    def _count_usage(report: AgentRunReport, turn: ModelTurn) -> None:
        if not turn.usage:
            return
        entry = report.usage.setdefault(turn.model or "unknown", {"input": 0, "output": 0})
        for key, value in turn.usage.items():
            entry[key] = entry.get(key, 0) + value

    def _tail(self) -> str:
        text = "".join(self._log)
        return text[-self.log_limit :]
