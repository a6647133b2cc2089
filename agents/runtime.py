"""One entry point for running an agent on a task: `run_agent_task`.

It prepares the workspace (clone or empty repository), starts the configured sandbox, runs the
model/tool loop, always takes the sandbox down (also when cancelled), then adds the diff, the
changed files and what the sandbox enforced to the report. Usable without Temporal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.conversation import ConversationSink, ConversationState
from agents.errors import AgentSetupError
from agents.loop import AgentLoop, AgentRunReport, ProgressCallback
from agents.models import DEFAULT_MODEL, AnthropicProvider, ModelProvider, ScriptedProvider
from agents.sandbox.base import Limits, Sandbox, SandboxUnavailable
from agents.sandbox.bwrap import DEFAULT_RUN_AS, BwrapSandbox
from agents.sandbox.process import ProcessSandbox
from agents.workspace import collect_diff, prepare_workspace

SANDBOXES = ("bwrap", "docker", "process")
PROVIDERS = ("scripted", "anthropic")


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything the runtime needs, given by its caller (the activity builds it from the
    instance's settings); the runtime reads no settings or environment of its own."""

    sandbox: str = "bwrap"
    limits: Limits = field(default_factory=Limits)
    provider: str = "scripted"
    model: str = DEFAULT_MODEL
    # Models a spawn may ask for (context "model"); the default model is always allowed.
    allowed_models: tuple[str, ...] = ()
    api_key: str | None = None
    base_url: str | None = None
    max_turns: int = 50
    token_budget: int | None = 2_000_000
    max_output_tokens: int = 8192
    api_retries: int = 6
    api_backoff: float = 1.0
    api_backoff_max: float = 30.0
    api_timeout: float = 600.0
    bwrap_path: str = "bwrap"
    sandbox_uid: int = DEFAULT_RUN_AS
    sandbox_cgroups: bool = True
    sandbox_ro_paths: tuple[str, ...] = ()
    docker_image: str = "python:3.12-bookworm"
    docker_host: str | None = None
    repo_roots: tuple[Path, ...] = ()
    clone_timeout: float = 600.0
    diff_limit: int = 1024 * 1024
    log_tail: int = 8 * 1024


def choose_model(config: RuntimeConfig, context: Mapping[str, Any]) -> str:
    """The spawn's model if it asked for one this executor allows, else the default."""
    asked = context.get("model")
    if not asked:
        return config.model
    if asked == config.model or asked in config.allowed_models:
        return str(asked)
    allowed = ", ".join(sorted({config.model, *config.allowed_models}))
    raise AgentSetupError(
        f"model {asked!r} is not offered by this executor (allowed: {allowed})", invalid=True
    )


def make_sandbox(config: RuntimeConfig, workspace: Path) -> Sandbox:
    if config.sandbox == "bwrap":
        return BwrapSandbox(
            workspace,
            config.limits,
            bwrap=config.bwrap_path,
            run_as_uid=config.sandbox_uid,
            use_cgroups=config.sandbox_cgroups,
            ro_paths=config.sandbox_ro_paths,
        )
    if config.sandbox == "docker":
        from agents.sandbox.docker_sandbox import DockerSandbox

        return DockerSandbox(
            workspace,
            config.limits,
            image=config.docker_image,
            docker_host=config.docker_host,
            run_as_uid=config.sandbox_uid,
        )
    if config.sandbox == "process":
        return ProcessSandbox(workspace, config.limits)
    raise AgentSetupError(f"unknown sandbox {config.sandbox!r} (one of {', '.join(SANDBOXES)})")


def make_provider(config: RuntimeConfig, model: str, context: Mapping[str, Any]) -> ModelProvider:
    if config.provider == "scripted":
        return ScriptedProvider(str(context.get("instructions") or ""))
    if config.provider == "anthropic":
        return AnthropicProvider(
            model=model,
            api_key=config.api_key,
            base_url=config.base_url,
            max_tokens=config.max_output_tokens,
            timeout=config.api_timeout,
        )
    raise AgentSetupError(f"unknown model provider {config.provider!r}")


async def _shut_down(sandbox: Sandbox, provider: ModelProvider) -> None:
    try:
        await sandbox.kill()
    finally:
        await provider.aclose()


async def run_agent_task(
    *,
    workspace: Path,
    agent_type: str,
    context: Mapping[str, Any],
    config: RuntimeConfig,
    on_progress: ProgressCallback | None = None,
    resume: bool = False,
    provider: ModelProvider | None = None,
    sink: ConversationSink | None = None,
    resume_from: ConversationState | None = None,
    previous_try: str = "",
) -> AgentRunReport:
    """Run one agent on one task and report. Raises AgentSetupError when it cannot start;
    cancelling it kills the sandbox before the cancellation propagates.

    `resume` keeps the workspace as it was left; `resume_from` continues a checkpointed
    conversation (checkpoints go to `sink`); `previous_try` tells a new conversation what an
    earlier try of the same task did."""
    model = choose_model(config, context)
    prepared = await prepare_workspace(
        workspace,
        context.get("repository"),
        context.get("branch"),
        roots=config.repo_roots,
        reuse=resume,
        timeout=config.clone_timeout,
    )
    sandbox = make_sandbox(config, workspace)
    provider = provider or make_provider(config, model, context)
    try:
        try:
            await sandbox.start()
        except SandboxUnavailable as exc:
            raise AgentSetupError(str(exc)) from exc
        loop = AgentLoop(
            provider,
            sandbox,
            on_progress=on_progress,
            max_turns=config.max_turns,
            token_budget=config.token_budget,
            max_api_retries=config.api_retries,
            backoff=config.api_backoff,
            backoff_max=config.api_backoff_max,
            log_tail=config.log_tail,
        )
        report = await loop.run(
            agent_type,
            context,
            workspace_note=prepared.note,
            previous_try=previous_try,
            resume_from=resume_from,
            sink=sink,
        )
    finally:
        # Shielded: a second cancellation must not leave the sandbox half-killed.
        await asyncio.shield(_shut_down(sandbox, provider))
    report.sandbox = sandbox.describe()
    report.workspace = prepared.describe()
    try:
        diff = await collect_diff(prepared, config.diff_limit)
    except Exception as exc:  # noqa: BLE001 - the run's outcome stands without its diff
        report.workspace["diffError"] = str(exc)
    else:
        report.diff = diff.text
        report.diff_sha256 = diff.sha256
        report.diff_bytes = diff.size
        report.diff_truncated = diff.truncated
        report.changed_files = diff.changed_files
    return report
