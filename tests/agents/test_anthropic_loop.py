"""The Claude tool loop through the real `anthropic` SDK, against a local server that speaks the
Messages API, with the agent's tools running in a real bubblewrap sandbox."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agents.errors import AgentSetupError
from agents.loop import AgentRunReport
from agents.runtime import RuntimeConfig, run_agent_task
from agents.sandbox.base import Limits
from tests.agents.conftest import MessagesAPI, error, git, message, text, tool

SANDBOX = "bwrap" if shutil.which("bwrap") else "process"


def config(api: MessagesAPI, repos: Path, **overrides: Any) -> RuntimeConfig:
    options: dict[str, Any] = {
        "sandbox": SANDBOX,
        "provider": "anthropic",
        "model": "claude-test-1",
        "api_key": "test-key",
        "base_url": api.url,
        "api_backoff": 0.01,
        "api_backoff_max": 0.05,
        "repo_roots": (repos,),
        "limits": Limits(memory_bytes=512 * 1024 * 1024, pids=64, cpus=1.0, command_timeout=30),
    }
    options.update(overrides)
    return RuntimeConfig(**options)


async def run(
    api: MessagesAPI,
    source_repo: Path,
    tmp_path: Path,
    agent_type: str = "worker",
    progress: list[dict[str, Any]] | None = None,
    context: dict[str, Any] | None = None,
    **overrides: Any,
) -> AgentRunReport:
    return await run_agent_task(
        workspace=tmp_path / "work" / "agent",
        agent_type=agent_type,
        context=context
        or {
            "repository": str(source_repo),
            "branch": "main",
            "workItems": ["greet with hello"],
            "instructions": "Make greet() return 'hello'.",
        },
        config=config(api, source_repo.parent, **overrides),
        on_progress=progress.append if progress is not None else None,
    )


async def test_edits_land_in_the_workspace_and_the_diff_applies(
    messages_api: MessagesAPI, source_repo: Path, tmp_path: Path
) -> None:
    messages_api.script(
        error(529, "overloaded_error", "Overloaded"),
        message(text("Let me look."), tool("read_file", "t1", path="app.py"), usage=(1000, 50)),
        message(
            tool("edit_file", "t2", path="app.py", old_string="'hi'", new_string="'hello'"),
            tool("write_file", "t3", path="docs/NOTES.md", content="notes\n"),
            usage=(1200, 80),
        ),
        message(
            tool("run_command", "t4", command="python3 app.py | tee out.txt"), usage=(1300, 30)
        ),
        error(429, "rate_limit_error", "slow down", {"retry-after": "0"}),
        message(
            tool("finish", "t5", summary="greet() says hello.", success=True), usage=(1400, 20)
        ),
    )
    progress: list[dict[str, Any]] = []
    report = await run(messages_api, source_repo, tmp_path, progress=progress)

    assert report.success, report.summary
    assert report.summary == "greet() says hello."
    workspace = tmp_path / "work" / "agent"
    assert "return 'hello'" in (workspace / "app.py").read_text()
    assert (workspace / "docs" / "NOTES.md").read_text() == "notes\n"
    assert (workspace / "out.txt").read_text() == "hello\n"

    # The result: diff, changed files, its sha256, commands, usage, retries.
    assert report.changed_files == ["app.py", "docs/NOTES.md", "out.txt"]
    assert "-    return 'hi'" in report.diff and "+    return 'hello'" in report.diff
    assert report.diff_sha256 == hashlib.sha256(report.diff.encode()).hexdigest()
    assert report.commands == [
        {"command": "python3 app.py | tee out.txt", "exitCode": 0, "timedOut": False}
    ]
    assert report.usage == {"claude-test-1": {"input": 4900, "output": 180}}
    assert report.api_retries == 2
    assert len(messages_api.requests) == 6
    assert messages_api.requests[0] == messages_api.requests[1]  # the retry resends the same
    result = report.as_result()
    assert result["exitCodes"] == [0] and result["sandbox"]["kind"] == SANDBOX
    assert result["workspace"]["source"] == "clone"

    # A reviewer can apply the diff to a fresh clone of the starting commit.
    fresh = tmp_path / "fresh"
    git("clone", "-q", str(source_repo), str(fresh), cwd=tmp_path)
    subprocess.run(["git", "apply"], input=report.diff.encode(), cwd=fresh, check=True)
    for name in report.changed_files:
        assert (fresh / name).read_bytes() == (workspace / name).read_bytes()

    # What the model was sent: the tools, the worker's prompt, the tool results.
    first = messages_api.requests[0]
    assert first["model"] == "claude-test-1"
    assert {t["name"] for t in first["tools"]} == {
        "run_command",
        "read_file",
        "write_file",
        "edit_file",
        "list_files",
        "finish",
    }
    assert "worker agent" in first["system"][0]["text"]
    task = first["messages"][0]["content"][0]["text"]
    assert "greet with hello" in task and str(source_repo) in task
    sent = messages_api.headers[0]
    assert "test-key" in sent.get("x-api-key", "") + sent.get("authorization", "")
    read = messages_api.tool_results(2)["t1"]
    assert "def greet" in read["content"] and not read["is_error"]
    ran = messages_api.tool_results(4)["t4"]
    assert "hello" in ran["content"] and "[exit code 0]" in ran["content"]

    # Heartbeat progress: turn, last tool, tokens so far.
    assert [p["lastTool"] for p in progress] == [
        "model_retry",
        "read_file",
        "edit_file",
        "write_file",
        "run_command",
        "model_retry",
        "finish",
    ]
    assert [p["turn"] for p in progress] == [1, 1, 2, 2, 3, 4, 4]
    assert progress[1]["tokens"] == 1050 and progress[-1]["tokens"] == 5080


async def test_an_invalid_request_fails_the_run_without_retries(
    messages_api: MessagesAPI, source_repo: Path, tmp_path: Path
) -> None:
    messages_api.script(error(400, "invalid_request_error", "max_tokens: 10000000 > 64000"))
    report = await run(messages_api, source_repo, tmp_path)
    assert not report.success
    assert report.stop_reason == "model_error"
    assert "400 invalid_request_error: max_tokens: 10000000 > 64000" in report.summary
    assert report.api_retries == 0 and len(messages_api.requests) == 1
    assert report.diff == "" and report.changed_files == []


async def test_an_auth_error_fails_the_run_with_its_reason(
    messages_api: MessagesAPI, source_repo: Path, tmp_path: Path
) -> None:
    messages_api.script(error(401, "authentication_error", "invalid x-api-key"))
    report = await run(messages_api, source_repo, tmp_path)
    assert not report.success
    assert "401 authentication_error: invalid x-api-key" in (report.error or "")
    assert len(messages_api.requests) == 1


async def test_transient_errors_are_retried_a_bounded_number_of_times(
    messages_api: MessagesAPI, source_repo: Path, tmp_path: Path
) -> None:
    messages_api.script(*[error(529, "overloaded_error", "Overloaded")] * 4)
    report = await run(messages_api, source_repo, tmp_path, api_retries=2)
    assert not report.success
    assert "unavailable after 2 retries" in report.summary and "529" in report.summary
    assert len(messages_api.requests) == 3


async def test_the_token_budget_stops_the_run(
    messages_api: MessagesAPI, source_repo: Path, tmp_path: Path
) -> None:
    messages_api.script(
        message(tool("list_files", "t1"), usage=(1000, 600)),
        message(tool("finish", "t2", summary="never asked"), usage=(1, 1)),
    )
    report = await run(messages_api, source_repo, tmp_path, token_budget=1500)
    assert not report.success and report.stop_reason == "token_budget"
    assert "1600 used" in report.summary
    assert len(messages_api.requests) == 1


async def test_max_turns_stops_the_run(
    messages_api: MessagesAPI, source_repo: Path, tmp_path: Path
) -> None:
    messages_api.script(*[message(tool("list_files", f"t{i}")) for i in range(3)])
    report = await run(messages_api, source_repo, tmp_path, max_turns=2)
    assert not report.success and report.stop_reason == "max_turns"
    assert report.turns == 2 and len(messages_api.requests) == 2


async def test_a_reviewer_gets_no_write_tools_and_changes_nothing(
    messages_api: MessagesAPI, source_repo: Path, tmp_path: Path
) -> None:
    messages_api.script(
        message(tool("write_file", "t1", path="app.py", content="gone\n")),
        message(tool("finish", "t2", summary="LGTM: greet() is fine.")),
    )
    report = await run(messages_api, source_repo, tmp_path, agent_type="reviewer")
    first = messages_api.requests[0]
    assert {t["name"] for t in first["tools"]} == {
        "run_command",
        "read_file",
        "list_files",
        "finish",
    }
    assert "reviewer agent" in first["system"][0]["text"]
    refused = messages_api.tool_results(1)["t1"]
    assert refused["is_error"] and "not available" in refused["content"]
    assert report.success and report.summary.startswith("LGTM")
    assert report.diff == "" and report.changed_files == []


async def test_file_tools_refuse_paths_outside_the_workspace(
    messages_api: MessagesAPI, source_repo: Path, tmp_path: Path
) -> None:
    messages_api.script(
        message(
            tool("read_file", "t1", path="../../../../etc/passwd"),
            tool("read_file", "t2", path="/etc/passwd"),
            tool("run_command", "t3", command="ln -s /etc/passwd pw"),
        ),
        message(
            tool("read_file", "t4", path="pw"), tool("write_file", "t5", path="pw", content="x")
        ),
        message(tool("finish", "t6", summary="done")),
    )
    passwd = Path("/etc/passwd").read_bytes()
    await run(messages_api, source_repo, tmp_path)
    first, second = messages_api.tool_results(1), messages_api.tool_results(2)
    for result in (first["t1"], first["t2"], second["t4"], second["t5"]):
        assert result["is_error"] and "outside the workspace" in result["content"], result
        assert "root:" not in result["content"]
    assert Path("/etc/passwd").read_bytes() == passwd


async def test_a_turn_without_tools_is_nudged_then_taken_as_the_summary(
    messages_api: MessagesAPI, source_repo: Path, tmp_path: Path
) -> None:
    messages_api.script(
        message(text("Thinking out loud.")), message(text("All good, nothing to do."))
    )
    report = await run(messages_api, source_repo, tmp_path)
    assert report.success and report.summary == "All good, nothing to do."
    assert report.stop_reason == "no_tool_call"
    nudge = messages_api.requests[1]["messages"][-1]["content"][0]["text"]
    assert "call the finish tool" in nudge


async def test_a_spawn_may_only_ask_for_an_allowed_model(
    messages_api: MessagesAPI, source_repo: Path, tmp_path: Path
) -> None:
    context = {"repository": str(source_repo), "model": "claude-other"}
    with pytest.raises(AgentSetupError, match="not offered") as refused:
        await run(messages_api, source_repo, tmp_path, context=context)
    assert refused.value.invalid and messages_api.requests == []

    messages_api.script(message(tool("finish", "t1", summary="ok"), model="claude-other"))
    report = await run(
        messages_api, source_repo, tmp_path, context=context, allowed_models=("claude-other",)
    )
    assert report.success and messages_api.requests[0]["model"] == "claude-other"
    assert set(report.usage) == {"claude-other"}
