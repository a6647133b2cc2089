"""Fixtures of the agent runtime tests: a local server that speaks the Anthropic Messages API,
a git repository to clone, and a host TCP listener that sandboxes must not reach."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

Reply = tuple[int, dict[str, Any], dict[str, str]]


def message(
    *blocks: dict[str, Any],
    usage: tuple[int, int] = (100, 10),
    model: str = "claude-test-1",
    stop_reason: str | None = None,
) -> Reply:
    """A Messages API response with these content blocks."""
    has_tool = any(b["type"] == "tool_use" for b in blocks)
    body = {
        "id": "msg_test",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": list(blocks),
        "stop_reason": stop_reason or ("tool_use" if has_tool else "end_turn"),
        "stop_sequence": None,
        "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
    }
    return 200, body, {}


def tool(name: str, call_id: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def error(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> Reply:
    return status, {"type": "error", "error": {"type": kind, "message": detail}}, headers or {}


@dataclass
class MessagesAPI:
    """Answers POST /v1/messages with the scripted replies, in order, and records requests."""

    url: str = ""
    replies: list[Reply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def script(self, *replies: Reply) -> None:
        self.replies = list(replies)

    def tool_results(self, index: int) -> dict[str, dict[str, Any]]:
        """tool_use_id -> tool_result block of the `index`th request's last message."""
        content = self.requests[index]["messages"][-1]["content"]
        return {b["tool_use_id"]: b for b in content if b.get("type") == "tool_result"}


@pytest.fixture
def messages_api() -> Iterator[MessagesAPI]:
    with serve_messages_api() as api:
        yield api


@contextlib.contextmanager
def serve_messages_api() -> Iterator[MessagesAPI]:
    """A local server answering the Messages API with what `MessagesAPI.script` gave it."""
    api = MessagesAPI()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            with lock:
                api.requests.append(body)
                api.headers.append({k.lower(): v for k, v in self.headers.items()})
                if self.path != "/v1/messages" or not api.replies:
                    reply = error(500, "api_error", f"unexpected request {self.path}")
                else:
                    reply = api.replies.pop(0)
            status, payload, headers = reply
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture
def source_repo(tmp_path: Path) -> Path:
    """A local git repository with a `main` and a `feature` branch."""
    repo = tmp_path / "repos" / "project"
    repo.mkdir(parents=True)
    git("init", "-q", "--initial-branch", "main", cwd=repo)
    (repo / "app.py").write_text("def greet():\n    return 'hi'\n\nprint(greet())\n")
    (repo / "README.md").write_text("# project\n")
    (repo / ".gitignore").write_text("*.log\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "first", cwd=repo)
    git("checkout", "-q", "-b", "feature", cwd=repo)
    (repo / "FEATURE").write_text("on the feature branch\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "feature", cwd=repo)
    git("checkout", "-q", "main", cwd=repo)
    return repo


GITLINK = "vendor/lib"


@pytest.fixture
def repo_with_submodule(tmp_path: Path) -> Path:
    """A repository whose starting commit holds a gitlink (the commit need not exist)."""
    repo = tmp_path / "repos" / "with-submodule"
    repo.mkdir(parents=True)
    git("init", "-q", "--initial-branch", "main", cwd=repo)
    (repo / "app.py").write_text("print('hi')\n")
    (repo / ".gitmodules").write_text(
        f'[submodule "lib"]\n\tpath = {GITLINK}\n\turl = https://example.invalid/lib.git\n'
    )
    git("add", "-A", cwd=repo)
    git("update-index", "--add", "--cacheinfo", f"160000,{'1' * 40},{GITLINK}", cwd=repo)
    git("commit", "-q", "-m", "with a submodule", cwd=repo)
    return repo


@dataclass
class Listener:
    port: int
    accepted: list[str] = field(default_factory=list)


@pytest.fixture
def host_listener() -> Iterator[Listener]:
    """A TCP server on the host's loopback that records every connection it accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    listener = Listener(server.getsockname()[1])
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, addr = server.accept()
            except OSError:
                continue
            listener.accepted.append(addr[0])
            with conn:
                conn.sendall(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        stop.set()
        thread.join(5)
        server.close()


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
