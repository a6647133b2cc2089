"""The first sandbox: each command in its own process group in a per-agent workspace.

It isolates nothing but the working directory and enforces no limit but the command timeout;
it is for unit tests and machines where neither bubblewrap nor Docker can run. What it does
guarantee is the kill: the whole process group goes, and the children die with the worker if
the worker dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from agents.sandbox.base import CommandResult, Limits, Sandbox, SandboxUnavailable, read_bounded
from agents.sandbox.bwrap import _launcher

PR_SET_PDEATHSIG = 1


class ProcessSandbox(Sandbox):
    kind = "process"

    def __init__(
        self, workspace: Path, limits: Limits | None = None, *, read_only: bool = False
    ) -> None:
        super().__init__(workspace, limits, read_only=read_only)
        self.workspace_mount = str(workspace.resolve())
        self.enforced = {"commandTimeout": "killed after the timeout"}
        self._groups: set[int] = set()
        self._killed = False

    async def start(self) -> None:
        if self.read_only:
            # Commands run as the worker on the host path: nothing could keep them from writing.
            raise SandboxUnavailable(
                "the process sandbox cannot give a read-only workspace (a reviewer's); "
                "use FEDAGENT_SANDBOX=bwrap or docker"
            )
        self.workspace.mkdir(parents=True, exist_ok=True)

    async def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        if self._killed:
            return CommandResult(command, -9, "", killed=True)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.workspace),
            "LANG": "C.UTF-8",
        }
        # The launcher (not preexec_fn, unsafe in a multi-threaded worker) makes the command
        # die with the worker, then execs it.
        proc = await asyncio.create_subprocess_exec(
            *_launcher([], [], None, None),
            "/bin/sh",
            "-c",
            command,
            cwd=self.workspace,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self._groups.add(proc.pid)
        assert proc.stdout is not None
        reader = asyncio.ensure_future(read_bounded(proc.stdout))
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), timeout or self.limits.command_timeout)
        except TimeoutError:
            timed_out = True
            self._kill_group(proc.pid)
            await proc.wait()
        except asyncio.CancelledError:
            self._kill_group(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                await asyncio.shield(proc.wait())
            raise
        finally:
            self._groups.discard(proc.pid)
            self._kill_group(proc.pid)  # children left behind by a finished command go too
            if not reader.done():
                # a child that escaped the group may still hold the pipe open
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), 1.0)
                reader.cancel()
        output = reader.result() if reader.done() and not reader.cancelled() else ""
        code = proc.returncode if proc.returncode is not None else -9
        return CommandResult(command, code, output, timed_out, self._killed)

    def _kill_group(self, pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    async def kill(self) -> None:
        self._killed = True
        for pgid in list(self._groups):
            self._kill_group(pgid)
        for _ in range(100):
            if not self.alive_pids():
                return
            await asyncio.sleep(0.01)

    def alive_pids(self) -> list[int]:
        alive: list[int] = []
        for pgid in self._groups:
            alive.extend(_pids_in_group(pgid))
        return alive


def _pids_in_group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # field 5 (pgrp) after the parenthesised command name
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids
