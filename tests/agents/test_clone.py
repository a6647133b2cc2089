"""The clone of a peer's repository, against a real git server on loopback (dumb HTTP over a
bare repository) and local repositories: what the clone may reach, what it carries, what the
peer is told, and how much it may take."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agents.errors import AgentSetupError
from agents.runtime import RuntimeConfig, run_agent_task
from agents.sandbox.base import Limits
from agents.workspace import normalise_repository_url
from tests.agents.conftest import Listener, git

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap is not installed (scripts/install-system-deps.sh installs it)",
)
LIMITS = Limits(memory_bytes=256 * 1024 * 1024, pids=64, cpus=1.0, command_timeout=60)
WORKER_SECRET = "s3cret-of-the-worker"


@dataclass
class GitServer:
    url: str
    requests: list[dict[str, str]] = field(default_factory=list)
    require_auth: bool = False


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[GitServer]:
    """A bare repository `calc.git` served read-only over git's dumb HTTP protocol."""
    work = tmp_path / "served-work"
    work.mkdir()
    git("init", "-q", "--initial-branch", "main", cwd=work)
    (work / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "calc", cwd=work)
    root = tmp_path / "served"
    root.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(root / "calc.git")], check=True)
    git("update-server-info", cwd=root / "calc.git")
    server_state = GitServer(url="")

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            server_state.requests.append({k.lower(): v for k, v in self.headers.items()})
            if server_state.require_auth:
                self.send_response(401)
                self.send_header("www-authenticate", 'Basic realm="internal git on 10.1.2.3"')
                self.send_header("content-length", "0")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server_state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield server_state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def worker_with_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's own git setup: a credential helper and an extra header with a secret."""
    home = tmp_path / "worker-home"
    home.mkdir()
    (home / ".gitconfig").write_text(
        "[credential]\n"
        f'\thelper = "!f() {{ echo username=worker; echo password={WORKER_SECRET}; }}; f"\n'
        "[http]\n"
        f"\textraHeader = X-Worker-Secret: {WORKER_SECRET}\n"
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("FEDAGENT_SECRET_KEY", WORKER_SECRET)


async def run(tmp_path: Path, repository: str, instructions: str = "$ cat calc.py", **config: Any):
    options: dict[str, Any] = {"sandbox": "bwrap", "limits": LIMITS}
    options.update(config)
    return await run_agent_task(
        workspace=tmp_path / "runs" / "c1",
        agent_type="worker",
        context={"repository": repository, "instructions": instructions},
        config=RuntimeConfig(**options),
    )


async def test_a_repository_on_an_allowed_host_is_cloned_over_http(
    git_server: GitServer, tmp_path: Path
) -> None:
    report = await run(tmp_path, f"{git_server.url}/calc.git", outbound_allowlist=("127.0.0.1",))
    assert report.success, report.summary
    assert "return a + b" in report.log_tail
    assert report.workspace["source"] == "clone"
    assert git_server.requests  # it did go over the network


async def test_a_clone_carries_none_of_the_workers_credentials_or_environment(
    git_server: GitServer, tmp_path: Path, worker_with_credentials: None
) -> None:
    git_server.require_auth = True
    with pytest.raises(AgentSetupError) as failed:
        await run(tmp_path, f"{git_server.url}/calc.git", allow_private_hosts=True)
    assert git_server.requests, "the clone never reached the server"
    secret = base64.b64encode(f"worker:{WORKER_SECRET}".encode()).decode()
    for headers in git_server.requests:
        assert "authorization" not in headers
        assert "x-worker-secret" not in headers
        assert secret not in str(headers) and WORKER_SECRET not in str(headers)
    # The peer learns that it failed, not what the executor's network answered.
    reason = str(failed.value)
    assert "could not be fetched" in reason
    # The URL in the reason holds a random port: the status code is looked for as a number
    # of its own, so a port like 34017 cannot look like a leaked 401.
    assert re.search(r"(?<![0-9])401(?![0-9])", reason) is None, reason
    for leak in ("Authentication", "10.1.2.3", "fatal", "realm"):
        assert leak not in reason
    assert not (tmp_path / "runs" / "c1").exists()


async def test_a_clone_of_a_loopback_url_is_refused_outside_dev(
    host_listener: Listener, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{host_listener.port}/calc.git"
    with pytest.raises(AgentSetupError, match="not one this executor may reach") as refused:
        await run(tmp_path, url)
    assert refused.value.invalid
    assert host_listener.accepted == []  # nothing was sent anywhere
    for private in ("http://10.0.0.1/r.git", "http://169.254.169.254/r.git", "git://[::1]/r"):
        with pytest.raises(AgentSetupError, match="not one this executor may reach"):
            await run(tmp_path, private)
    assert host_listener.accepted == []


async def test_a_clone_over_plain_http_needs_the_host_named_in_the_allowlist(
    git_server: GitServer, tmp_path: Path
) -> None:
    # localhost's addresses are allowed, its name is not: TLS-less clones need the name.
    port = git_server.url.rsplit(":", 1)[1]
    with pytest.raises(AgentSetupError, match="plain http://") as refused:
        await run(
            tmp_path, f"http://localhost:{port}/calc.git", outbound_allowlist=("127.0.0.1", "::1")
        )
    assert refused.value.invalid
    assert git_server.requests == []
    assert not (tmp_path / "runs" / "c1").exists()
    report = await run(
        tmp_path, f"http://localhost:{port}/calc.git", outbound_allowlist=("localhost",)
    )
    assert report.success, report.summary


async def test_a_clone_does_not_follow_a_redirect(git_server: GitServer, tmp_path: Path) -> None:
    # The allowed host answers with a redirect to a host that is not allowed.
    target = git_server.url
    redirector = ThreadingHTTPServer(("127.0.0.1", 0), _redirect_to(target))
    thread = threading.Thread(target=redirector.serve_forever, daemon=True)
    thread.start()
    try:
        port = redirector.server_address[1]
        with pytest.raises(AgentSetupError, match="could not be fetched"):
            await run(
                tmp_path, f"http://localhost:{port}/calc.git", outbound_allowlist=("localhost",)
            )
    finally:
        redirector.shutdown()
        redirector.server_close()
        thread.join(5)
    assert git_server.requests == []


def _redirect_to(target: str) -> type[SimpleHTTPRequestHandler]:
    class Redirect(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(302)
            self.send_header("location", target + self.path)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    return Redirect


async def test_a_repository_larger_than_the_disk_quota_is_not_cloned(tmp_path: Path) -> None:
    repo = tmp_path / "repos" / "big"
    repo.mkdir(parents=True)
    git("init", "-q", "--initial-branch", "main", cwd=repo)
    (repo / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "big", cwd=repo)
    limits = Limits(memory_bytes=LIMITS.memory_bytes, pids=64, disk_bytes=1024 * 1024)
    with pytest.raises(AgentSetupError, match="disk quota") as refused:
        await run(tmp_path, str(repo), repo_roots=(repo.parent,), limits=limits)
    assert refused.value.invalid
    assert not (tmp_path / "runs" / "c1").exists()


async def test_ssh_clones_are_refused_for_want_of_credentials(tmp_path: Path) -> None:
    for url in ("ssh://git@github.com/acme/x.git", "git@github.com:acme/x.git"):
        with pytest.raises(AgentSetupError, match="no credentials") as refused:
            await run(tmp_path, url)
        assert refused.value.invalid


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("https://GitHub.COM/acme/x.git", "https://github.com/acme/x.git"),
        ("https://github.com/acme/../evil/x", "https://github.com/evil/x"),
        ("https://github.com/acme/%2e%2e/evil/x", "https://github.com/evil/x"),
        ("https://github.com//acme/./x/", "https://github.com/acme/x"),
        ("https://user:pw@github.com:443/acme/x", "https://github.com/acme/x"),
        ("http://example.org:8080/a/b/../c", "http://example.org:8080/a/c"),
        ("git@github.com:acme/x.git", "ssh://github.com/acme/x.git"),
        ("file:///srv/repos/../secret", "file:///srv/secret"),
        ("/srv/repos/./a/../b", "/srv/repos/b"),
        ("acme/x", "acme/x"),
    ],
)
def test_repository_urls_are_normalised_before_grants_match_them(
    given: str, normalised: str
) -> None:
    assert normalise_repository_url(given) == normalised


@pytest.mark.parametrize(
    "bad", ["https://github.com/acme/x?evil=1", "https://github.com/a#b", "https:///x", "a b"]
)
def test_what_cannot_name_a_repository_is_refused_by_the_normaliser(bad: str) -> None:
    with pytest.raises(ValueError):
        normalise_repository_url(bad)


async def test_where_bwrap_cannot_run_the_clone_keeps_its_minimal_environment(
    git_server: GitServer, tmp_path: Path, worker_with_credentials: None
) -> None:
    # The process (or docker) sandbox on a machine without bwrap: git runs on the host, with
    # the same environment, options and address policy.
    no_bwrap = {"sandbox": "process", "bwrap_path": "/nonexistent/bwrap"}
    report = await run(
        tmp_path, f"{git_server.url}/calc.git", outbound_allowlist=("127.0.0.1",), **no_bwrap
    )
    assert report.success, report.summary
    assert "return a + b" in report.log_tail
    local = await run(tmp_path, str(tmp_path / "served-work"), repo_roots=(tmp_path,), **no_bwrap)
    assert local.success and "return a + b" in local.log_tail, local.summary
    git_server.require_auth = True
    with pytest.raises(AgentSetupError, match="could not be fetched") as failed:
        await run(tmp_path, f"{git_server.url}/calc.git", allow_private_hosts=True, **no_bwrap)
    assert "401" not in str(failed.value)
    for headers in git_server.requests:
        assert "authorization" not in headers and "x-worker-secret" not in headers
    with pytest.raises(AgentSetupError, match="not one this executor may reach"):
        await run(tmp_path, f"{git_server.url}/calc.git", **no_bwrap)
