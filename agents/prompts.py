"""System and task prompts: one system prompt per agent type, the task built from the spawn's
context (repository, branch, work items, instructions) and what the workspace holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROLES = {
    "worker": (
        "You are a worker agent. Complete the task by changing the code in the workspace: "
        "read what is relevant, make focused edits with the file tools, and run the project's "
        "tests or checks with run_command to verify your work. Do not commit; your changes are "
        "collected as a diff of the workspace against the commit you started from, and a "
        "reviewer will apply it."
    ),
    "reviewer": (
        "You are a reviewer agent. Review the code in the workspace against the work items and "
        "instructions and report what you find. Change nothing: you have no tools to write "
        "files, and your commands must not modify the workspace. Read the code, run tests or "
        "linters if useful. Your summary is the review: a verdict first, then the findings "
        "ordered by severity, each with file:line and a suggested fix."
    ),
    "tester": (
        "You are a tester agent. Write tests for the work items and run them: add or extend "
        "test files in the project's existing test layout and style, run them with "
        "run_command, and do not change the code under test unless the instructions say so. "
        "Your summary says what you tested, the command that runs the tests, and the results, "
        "including any failures you found."
    ),
}

ENVIRONMENT = (
    "You work for fedagent, an orchestrator that ran you on behalf of a peer instance. Your "
    "workspace is {mount}, inside a sandbox without network access; paths for the file tools "
    "are relative to it. Each command has a timeout of {timeout:g} s and long output keeps only "
    "its head and tail. You have at most {turns} turns. When you are done, call the finish tool "
    "with a concise summary; set success to false if the task could not be completed."
)


def system_prompt(
    agent_type: str, *, mount: str = "/workspace", command_timeout: float = 600, max_turns: int = 50
) -> str:
    role = ROLES.get(agent_type, ROLES["worker"])
    environment = ENVIRONMENT.format(mount=mount, timeout=command_timeout, turns=max_turns)
    return f"{role}\n\n{environment}"


def task_prompt(context: Mapping[str, Any], workspace_note: str = "") -> str:
    items = "\n".join(f"- {item}" for item in context.get("workItems") or [])
    lines = [
        f"Repository: {context.get('repository') or '(none)'}",
        f"Branch: {context.get('branch') or '(default)'}",
    ]
    if workspace_note:
        lines.append(f"Workspace: {workspace_note}")
    lines += ["", "Work items:", items or "- (none)", "", "Instructions:"]
    lines.append(str(context.get("instructions") or "(none)"))
    return "\n".join(lines)
