"""The contract every sandbox backend keeps: start, run a command, stop, limits, kill."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

OUTPUT_LIMIT = 16 * 1024  # bytes of a command's output kept (head and tail)


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_code: int
    output: str
    timed_out: bool = False
    killed: bool = False


@dataclass(frozen=True)
class Limits:
    """What a sandbox enforces; `enforced` names the limits this backend really applies."""

    command_timeout: float = 600.0
    enforced: tuple[str, ...] = field(default_factory=tuple)


class Sandbox(ABC):
    """An isolated place where an agent's commands run, inside its workspace."""

    kind: str = "abstract"

    def __init__(self, workspace: Path, limits: Limits | None = None) -> None:
        self.workspace = workspace
        self.limits = limits or Limits()

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def run(self, command: str, *, timeout: float | None = None) -> CommandResult: ...

    @abstractmethod
    async def kill(self) -> None:
        """Take down everything running in the sandbox and wait until it is gone."""

    @abstractmethod
    def alive_pids(self) -> list[int]:
        """Processes of this sandbox still on the machine (empty once it is killed)."""

    async def stop(self) -> None:
        await self.kill()


def bound_output(data: bytes, limit: int = OUTPUT_LIMIT) -> str:
    if len(data) <= limit:
        return data.decode(errors="replace")
    half = limit // 2
    skipped = len(data) - 2 * half
    return (
        data[:half].decode(errors="replace")
        + f"\n... [{skipped} bytes skipped] ...\n"
        + data[-half:].decode(errors="replace")
    )
