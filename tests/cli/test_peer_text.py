"""What a peer names (an A2A agent's card name, its task's changed files and summary) is
printed by the CLI as text, never read as rich markup: a hostile name cannot restyle the
operator's terminal or hide a link behind a file name."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from cli.follow import print_agent
from cli.main import _connections_table

HOSTILE = "[link=https://evil.example]README.md[/link]"


def printed(*renderables: Any) -> str:
    console = Console(record=True, force_terminal=True, width=240)
    for renderable in renderables:
        console.print(renderable)
    return console.export_text(styles=True)


def test_an_agent_shows_what_its_peer_said_as_it_is() -> None:
    agent = {
        "agentId": "5b1d7bd1-2ad8-4b7e-9c2a-32c0f1e0a0b1",
        "state": "completed",
        "taskId": "t-1",
        "agentType": "worker",
        "connectionId": "0b6a3f0e-9b9c-4e43-8d7c-3d6f0a1e2b3c",
        "peerInstanceId": "a2a-0123456789abcdef01234567",
        "peerKind": "a2a",
        "workflowId": "remote-agent/5b1d7bd1",
        "createdAt": "2026-01-01T00:00:00Z",
        "result": {"changedFiles": [HOSTILE], "summary": HOSTILE},
    }
    console = Console(record=True, force_terminal=True, width=240)
    print_agent(agent, console, peer=HOSTILE)
    out = console.export_text(styles=True)
    assert "\x1b]8;" not in out  # no terminal hyperlink
    assert out.count(HOSTILE) == 3  # the peer's name, the changed file, the summary


def test_a_connection_shows_its_peers_name_and_url_as_they_are() -> None:
    row = {
        "connectionId": "0b6a3f0e-9b9c-4e43-8d7c-3d6f0a1e2b3c",
        "remoteName": HOSTILE,
        "remoteUrl": "https://agent.example/" + HOSTILE,
        "kind": "a2a",
        "direction": "outbound",
        "status": "ACTIVE",
        "grants": {},
        "peerGrants": None,
        "updatedAt": None,
    }
    out = printed(_connections_table([row]))
    assert "\x1b]8;" not in out and HOSTILE in out
