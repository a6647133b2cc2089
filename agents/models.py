"""Model providers behind one interface: given the conversation so far, the next assistant turn.

`anthropic` talks to the Anthropic Messages API through the `anthropic` SDK, with tools. The
SDK's own retries are off (`max_retries=0`): the loop retries transient errors itself, bounded
and visible in the result, and a provider only says whether an error is transient.

`scripted` is deterministic and offline: each instruction line starting with `$ ` becomes a
shell tool call, in order; then it finishes with a summary of what ran and its exit codes.
A failing command makes it finish unsuccessfully. Its next step depends only on the tool results
in the conversation, so it resumes from a checkpoint like any model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import anthropic

DEFAULT_MODEL = "claude-sonnet-4-5"


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
    stop_reason: str = ""
    # The assistant content blocks exactly as they must be sent back (thinking included).
    raw: tuple[dict[str, Any], ...] = ()


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
    tools: list[dict[str, Any]] = field(default_factory=list)
    turns: list[tuple[ModelTurn, list[ToolOutcome]]] = field(default_factory=list)


class ProviderError(Exception):
    """A model request failed. `transient` errors are worth retrying (rate limits, overload,
    server errors, lost connections); the others (invalid request, auth) are not."""

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.retry_after = retry_after


class ModelProvider(ABC):
    name = "abstract"
    model = ""

    @abstractmethod
    async def next_turn(self, conversation: Conversation) -> ModelTurn: ...

    async def aclose(self) -> None:  # noqa: B027 - most providers hold nothing to close
        """Release connections."""


# --- scripted ----------------------------------------------------------------------------


def script_commands(instructions: str) -> list[str]:
    return [line[2:] for line in instructions.splitlines() if line.startswith("$ ")]


class ScriptedProvider(ModelProvider):
    name = "scripted"
    model = "scripted"

    def __init__(self, instructions: str) -> None:
        self.commands = script_commands(instructions)

    async def next_turn(self, conversation: Conversation) -> ModelTurn:
        # Derived from the conversation alone (its tool results), so a conversation resumed
        # from a checkpoint gets the same next step as one that never stopped.
        ran = [o for _, outcomes in conversation.turns for o in outcomes]
        done = len(ran)
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


# --- anthropic ---------------------------------------------------------------------------

CONTINUE = "Continue with the task. When it is done, call the finish tool with a summary."


def _retry_after(response: Any) -> float | None:
    try:
        value = response.headers.get("retry-after")
        return max(0.0, float(value)) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def _describe(error: anthropic.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return f"{error.status_code} {inner.get('type', 'error')}: {inner['message']}"
    return f"{error.status_code}: {error.message}"


class AnthropicProvider(ModelProvider):
    """The Messages API with tools. Model, API key and base URL come from settings; whatever is
    not set there falls back to the SDK's own ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL."""

    name = "anthropic"

    def __init__(
        self,
        *,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        base_url: str | None = None,
        max_tokens: int = 8192,
        timeout: float = 600.0,
    ) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout
        )

    def messages(self, conversation: Conversation) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [{"role": "user", "content": conversation.task}]
        for turn, outcomes in conversation.turns:
            messages.append({"role": "assistant", "content": list(turn.raw) or turn.text or "…"})
            if outcomes:
                results: list[dict[str, Any]] = [
                    {
                        "type": "tool_result",
                        "tool_use_id": o.call_id,
                        "content": o.content or "(no output)",
                        "is_error": o.is_error,
                    }
                    for o in outcomes
                ]
                messages.append({"role": "user", "content": results})
            else:
                messages.append({"role": "user", "content": CONTINUE})
        # Cache the conversation so far: each request re-reads it from the cache.
        last = messages[-1]
        if isinstance(last["content"], str):
            last["content"] = [{"type": "text", "text": last["content"]}]
        last["content"][-1] = {**last["content"][-1], "cache_control": {"type": "ephemeral"}}
        return messages

    async def next_turn(self, conversation: Conversation) -> ModelTurn:
        try:
            response = await self.client.messages.create(
                model=self.model,
                max_tokens=self.max_tokens,
                system=[
                    {
                        "type": "text",
                        "text": conversation.system,
                        "cache_control": {"type": "ephemeral"},
                    }
                ],
                tools=conversation.tools,  # type: ignore[arg-type]
                messages=self.messages(conversation),  # type: ignore[arg-type]
            )
        except anthropic.APIStatusError as exc:
            status = exc.status_code
            transient = status in (408, 429) or status >= 500
            raise ProviderError(
                _describe(exc),
                transient=transient,
                status=status,
                retry_after=_retry_after(exc.response),
            ) from exc
        except anthropic.APIConnectionError as exc:
            raise ProviderError(
                f"connection to the model API failed: {exc}", transient=True
            ) from exc
        except (anthropic.AnthropicError, TypeError) as exc:
            # e.g. no API key anywhere (the SDK raises TypeError for that)
            raise ProviderError(f"model API client error: {exc}", transient=False) from exc
        return self._turn(response)

    @staticmethod
    def _turn(response: Any) -> ModelTurn:
        texts: list[str] = []
        calls: list[ToolCall] = []
        raw: list[dict[str, Any]] = []
        for block in response.content:
            kind = getattr(block, "type", "")
            if kind == "text":
                texts.append(block.text)
                raw.append({"type": "text", "text": block.text})
            elif kind == "tool_use":
                tool_input = block.input if isinstance(block.input, dict) else {}
                calls.append(ToolCall(block.id, block.name, tool_input))
                raw.append(
                    {"type": "tool_use", "id": block.id, "name": block.name, "input": tool_input}
                )
            elif kind == "thinking":
                raw.append(
                    {"type": "thinking", "thinking": block.thinking, "signature": block.signature}
                )
            elif kind == "redacted_thinking":
                raw.append({"type": "redacted_thinking", "data": block.data})
        usage = response.usage
        counted = {"input": usage.input_tokens or 0, "output": usage.output_tokens or 0}
        cache_read = getattr(usage, "cache_read_input_tokens", None) or 0
        cache_write = getattr(usage, "cache_creation_input_tokens", None) or 0
        if cache_read:
            counted["cacheRead"] = cache_read
        if cache_write:
            counted["cacheWrite"] = cache_write
        return ModelTurn(
            text="\n".join(texts),
            tool_calls=tuple(calls),
            usage=counted,
            model=str(response.model or ""),
            stop_reason=str(response.stop_reason or ""),
            raw=tuple(raw),
        )

    async def aclose(self) -> None:
        await self.client.close()
