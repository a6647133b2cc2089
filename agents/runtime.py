"""One entry point for running an agent on a task: `run_agent_task`.

It prepares the workspace (clone or empty repository), starts the configured sandbox, runs the
model/tool loop, always takes the sandbox down (also when cancelled), then adds the diff, the
changed files and what the sandbox enforced to the report. Usable without Temporal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agents.conversation import ConversationSink, ConversationState
from agents.errors import AgentSetupError
from agents.loop import AgentLoop, AgentRunReport, ProgressCallback
from agents.models import (
    DEFAULT_MODEL,
    AnthropicProvider,
    ModelProvider,
    ScriptedProvider,
    script_commands,
)
from agents.sandbox.base import (
    PEER_DISK_BUDGET,
    PEER_USAGE_MAX_AGE,
    Limits,
    Sandbox,
    SandboxUnavailable,
    peer_disk_usage,
)
from agents.sandbox.bwrap import DEFAULT_RUN_AS, BwrapSandbox
from agents.sandbox.fence import claim_workspace, end_workspace_processes, scratch_dir
from agents.sandbox.process import ProcessSandbox
from agents.workspace import (
    BASELINE_MOUNT,
    INPUT_MOUNT,
    SCRATCH_MOUNT,
    CloneSettings,
    DiffSandbox,
    PreparedWorkspace,
    collect_diff,
    diff_dirs,
    prepare_workspace,
    remove_tree,
)

SANDBOXES = ("bwrap", "docker", "process")
READ_ONLY_AGENT = "reviewer"  # its sandbox mounts the workspace read-only
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
    # The instance whose runs these are: docker sandboxes are labelled with it (the sweep).
    instance: str = ""
    repo_roots: tuple[Path, ...] = ()
    clone_timeout: float = 600.0
    # The clone's address policy: hosts allowed although loopback/private, and dev (all).
    outbound_allowlist: tuple[str, ...] = ()
    allow_private_hosts: bool = False
    # Host paths a sandbox must never mount (the data dir, the worker's home): a
    # FEDAGENT_SANDBOX_RO_PATHS entry that holds one (or lies in the data dir) is refused.
    private_paths: tuple[Path, ...] = ()
    data_dir: Path | None = None
    diff_max_bytes: int = 64 * 1024 * 1024
    diff_file_max_bytes: int = 16 * 1024 * 1024
    diff_timeout: float = 300.0
    preview_bytes: int = 16 * 1024
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


def make_sandbox(
    config: RuntimeConfig,
    workspace: Path,
    *,
    read_only: bool = False,
    fresh: bool = True,
    generation: str | None = None,
) -> Sandbox:
    """The configured sandbox over the workspace; `read_only` (a reviewer's) mounts it
    read-only, and a backend that cannot do that refuses to start. A workspace that is not
    `fresh` (an earlier try's, which its agents wrote) is not walked to hand it to the
    sandbox's uid: that uid owns what it wrote, and no host walk crosses agent content."""
    if config.sandbox == "bwrap":
        return BwrapSandbox(
            workspace,
            config.limits,
            bwrap=config.bwrap_path,
            run_as_uid=config.sandbox_uid,
            use_cgroups=config.sandbox_cgroups,
            ro_paths=safe_ro_paths(config),
            read_only=read_only,
            chown_workspace=fresh,
            generation=generation,
        )
    if config.sandbox == "docker":
        from agents.sandbox.docker_sandbox import DockerSandbox

        return DockerSandbox(
            workspace,
            config.limits,
            image=config.docker_image,
            docker_host=config.docker_host,
            run_as_uid=config.sandbox_uid,
            read_only=read_only,
            chown_workspace=fresh,
            instance=config.instance,
            generation=generation,
        )
    if config.sandbox == "process":
        return ProcessSandbox(workspace, config.limits, read_only=read_only)
    raise AgentSetupError(f"unknown sandbox {config.sandbox!r} (one of {', '.join(SANDBOXES)})")


def diff_limits(config: RuntimeConfig) -> Limits:
    """The run's limits for taking its diff, without its peer's disk budget: the diff's
    scratch is bounded by its own caps and gone after, and the run's outcome (maybe stopped
    for that very budget) keeps its diff."""
    return replace(config.limits, command_timeout=config.diff_timeout, peer_disk_bytes=None)


def _diff_sandboxes(
    config: RuntimeConfig,
    prepared: PreparedWorkspace,
    inputs: Path,
    generation: str | None,
    scratch: Path | None = None,
) -> list[Sandbox]:
    """The sandboxes to take the diff in, the first that starts: bwrap, then (for a docker
    run where bwrap cannot start) a container of the run's image, which must have git."""
    limits = diff_limits(config)
    binds = ((str(prepared.baseline), BASELINE_MOUNT), (str(inputs), INPUT_MOUNT))
    choices: list[Sandbox] = [
        BwrapSandbox(
            prepared.path,
            limits,
            bwrap=config.bwrap_path,
            run_as_uid=config.sandbox_uid,
            use_cgroups=config.sandbox_cgroups,
            read_only=True,
            ro_binds=binds,
            chown_workspace=False,
            generation=generation,
            tmp_dir=scratch,
            # The run's own bwrap sandbox showed bwrap works; a docker run needs to know.
            probe=config.sandbox != "bwrap",
        )
    ]
    if config.sandbox == "docker":
        from agents.sandbox.docker_sandbox import DockerSandbox

        choices.append(
            DockerSandbox(
                prepared.path,
                limits,
                image=config.docker_image,
                docker_host=config.docker_host,
                run_as_uid=config.sandbox_uid,
                read_only=True,
                ro_binds=binds,
                chown_workspace=False,
                instance=config.instance,  # what the sweep of a dead worker's containers finds
                generation=generation,
                tmp_dir=scratch,
            )
        )
    return choices


async def _start_first(choices: list[Sandbox]) -> Sandbox:
    for number, sandbox in enumerate(choices, 1):
        try:
            await sandbox.start()
        except SandboxUnavailable:
            await sandbox.kill()
            if number == len(choices):
                raise
        else:
            return sandbox
    raise SandboxUnavailable("no sandbox to take the diff in")


@contextlib.asynccontextmanager
async def diff_sandbox(
    config: RuntimeConfig,
    prepared: PreparedWorkspace,
    step: str = "diff",
    *,
    generation: str | None = None,
) -> AsyncIterator[DiffSandbox]:
    """A fresh sandbox for one step of taking the run's diff, taken down (with its scratch)
    afterwards: no host process runs git in what the agent wrote. The process sandbox, which
    isolates nothing, takes the diff as the worker, as it ran the agent's commands."""
    scratch, inputs = diff_dirs(prepared.path, step)
    for old in (scratch, inputs):
        await asyncio.to_thread(remove_tree, old)
    inputs.mkdir()
    inputs.chmod(0o755)  # the sandbox's uid reads it, whatever the worker's umask
    sandbox: Sandbox | None = None
    try:
        if config.sandbox == "process":
            scratch.mkdir(mode=0o700)
            sandbox = ProcessSandbox(prepared.path, diff_limits(config))
            await sandbox.start()
            baseline, mounts = str(prepared.baseline), (str(inputs), str(scratch))
        else:
            choices = _diff_sandboxes(config, prepared, inputs, generation, scratch)
            sandbox = await _start_first(choices)
            baseline, mounts = BASELINE_MOUNT, (INPUT_MOUNT, SCRATCH_MOUNT)
        yield DiffSandbox(sandbox, baseline, mounts[0], inputs, mounts[1], scratch)
    finally:
        if sandbox is not None:
            await asyncio.shield(sandbox.kill())
        for old in (scratch, inputs):
            await asyncio.to_thread(remove_tree, old)


def safe_ro_paths(config: RuntimeConfig) -> tuple[str, ...]:
    """FEDAGENT_SANDBOX_RO_PATHS, refused when one of them would show sandboxed commands what
    only the worker may read: it holds the data dir (keys, workspaces) or the worker's home,
    or lies inside the data dir. (A toolchain inside the home, ~/.pyenv/versions/3.11, is
    the operator's choice.)"""
    for entry in config.sandbox_ro_paths:
        path = Path(entry).expanduser().resolve()
        data_dir = config.data_dir.expanduser().resolve() if config.data_dir else None
        for private in config.private_paths:
            private = private.expanduser().resolve()
            inside = private == data_dir and path.is_relative_to(private)
            if inside or private.is_relative_to(path):
                raise AgentSetupError(
                    f"FEDAGENT_SANDBOX_RO_PATHS entry {entry} would show sandboxed commands "
                    f"{private} (the instance's data or the worker's home); mount a toolchain "
                    "directory that holds nothing else"
                )
    return config.sandbox_ro_paths


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


async def fence_workspace(config: RuntimeConfig, workspace: Path) -> str:
    """Claim the workspace for this attempt, then end whatever an earlier attempt of this run
    still runs in it (Temporal may have given it up while it still runs here) and drop its
    /tmp, before this attempt touches the workspace (`agents.sandbox.fence`). Returns the
    claim, which this attempt's sandboxes hold to start a command."""
    generation = await claim_workspace(workspace)
    await end_workspace_processes(workspace)
    if config.sandbox == "docker":
        await asyncio.to_thread(_end_workspace_containers, config, workspace)
    await asyncio.to_thread(remove_tree, scratch_dir(workspace))
    return generation


def _end_workspace_containers(config: RuntimeConfig, workspace: Path) -> None:
    import docker.errors

    from agents.sandbox import docker_sandbox

    try:
        client = docker_sandbox.connect(config.docker_host)
        try:
            docker_sandbox.remove_workspace_containers(client, config.instance, workspace)
        finally:
            client.close()
    except docker.errors.DockerException:
        pass  # no daemon: the sandbox's start says so (and removes the container then)


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
    generation: str | None = None,
    restored: bool = False,
    workspace_news: str = "",
) -> AgentRunReport:
    """Run one agent on one task and report. Raises AgentSetupError when it cannot start;
    cancelling it kills the sandbox before the cancellation propagates.

    `resume` keeps the workspace as it was left; `resume_from` continues a checkpointed
    conversation (checkpoints go to `sink`); `previous_try` tells a new conversation what an
    earlier try of the same task did. `generation`: the caller fenced the workspace already
    (`fence_workspace`); `restored`: the executor laid the workspace down itself (from a
    snapshot), so it is handed to the sandbox's uid like a fresh one; `workspace_news`: what
    the agent is told about its workspace instead of how it was prepared."""
    _refuse_empty_script(config, context)
    model = choose_model(config, context)
    if generation is None:
        generation = await fence_workspace(config, workspace)
    await _refuse_over_peer_budget(config, workspace)
    prepared = await prepare_workspace(
        workspace,
        context.get("repository"),
        context.get("branch"),
        roots=config.repo_roots,
        reuse=resume,
        timeout=config.clone_timeout,
        clone=clone_settings(config),
    )
    sandbox = make_sandbox(
        config,
        workspace,
        generation=generation,
        read_only=agent_type == READ_ONLY_AGENT,
        fresh=prepared.source != "resumed" or restored,
    )
    if workspace_news:
        prepared.note = workspace_news
    provider = provider or make_provider(config, model, context)
    try:
        try:
            await sandbox.start()
        except SandboxUnavailable as exc:
            raise AgentSetupError(str(exc)) from exc
        report = await _agent_loop(config, provider, sandbox, on_progress).run(
            agent_type,
            context,
            workspace_note=prepared.note,
            previous_try=previous_try,
            workspace_news=workspace_news,
            resume_from=resume_from,
            sink=sink,
        )
    finally:
        # Shielded: a second cancellation must not leave the sandbox half-killed.
        await asyncio.shield(_shut_down(sandbox, provider))
    report.sandbox = sandbox.describe()
    report.workspace = prepared.describe()
    await _add_diff(report, config, prepared, generation)
    return report


def _refuse_empty_script(config: RuntimeConfig, context: Mapping[str, Any]) -> None:
    if config.provider == "scripted" and not script_commands(
        str(context.get("instructions") or "")
    ):
        raise AgentSetupError(
            "the scripted provider runs the instruction lines that start with '$ ' (a dollar "
            "sign and a space, at the start of the line); these instructions have none",
            invalid=True,
        )


def _agent_loop(
    config: RuntimeConfig,
    provider: ModelProvider,
    sandbox: Sandbox,
    on_progress: ProgressCallback | None,
) -> AgentLoop:
    return AgentLoop(
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


async def _refuse_over_peer_budget(config: RuntimeConfig, workspace: Path) -> None:
    """A try does not start while its peer's runs already hold its whole disk budget here."""
    budget = config.limits.peer_disk_bytes
    if not budget:
        return
    together = await asyncio.to_thread(peer_disk_usage, workspace, PEER_USAGE_MAX_AGE)
    if together >= budget:
        raise AgentSetupError(
            f"{PEER_DISK_BUDGET}: this peer's runs hold {together} bytes here together, at or "
            f"above this executor's budget of {budget} bytes per peer; the try was not started"
        )


def clone_settings(config: RuntimeConfig) -> CloneSettings:
    """How this executor clones a run's repository (its bwrap, caps and address policy)."""
    return CloneSettings(
        bwrap=config.bwrap_path,
        sandbox_uid=config.sandbox_uid,
        use_cgroups=config.sandbox_cgroups,
        limits=config.limits,
        timeout=config.clone_timeout,
        outbound_allowlist=config.outbound_allowlist,
        allow_private_hosts=config.allow_private_hosts,
        host_fallback=config.sandbox != "bwrap",
    )


async def _add_diff(
    report: AgentRunReport, config: RuntimeConfig, prepared: PreparedWorkspace, generation: str
) -> None:
    """The run's diff, taken in sandboxes of this attempt, into the report (without it, and
    saying why, when it cannot be taken: the run's outcome stands)."""
    try:
        diff = await collect_diff(
            prepared,
            functools.partial(diff_sandbox, config, prepared, generation=generation),
            max_bytes=config.diff_max_bytes,
            file_max_bytes=config.diff_file_max_bytes,
            preview_bytes=config.preview_bytes,
            timeout=config.diff_timeout,
        )
    except Exception as exc:  # noqa: BLE001 - the run's outcome stands without its diff
        report.workspace["diffError"] = str(exc)
        return
    report.diff_path = str(diff.path)
    report.diff_preview = diff.preview
    report.diff_sha256 = diff.sha256
    report.diff_bytes = diff.size
    report.diff_truncated = diff.truncated
    report.diff_omitted_files = diff.omitted_files
    report.changed_files = diff.changed_files
