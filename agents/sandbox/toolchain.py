"""What an agent finds inside its sandbox: python3, git and pytest, where and which version.

The host's own toolchain is not what a sandbox sees (bwrap mounts /usr, /bin, /lib, /etc and
FEDAGENT_SANDBOX_RO_PATHS; docker sees its image), so `fedagent doctor` asks a real sandbox.
"""

from __future__ import annotations

from dataclasses import dataclass

from agents.sandbox.base import Sandbox

TOOLS = ("python3", "git", "pytest")
PYTEST_MODULE = "python3 -m pytest"

PROBE = r"""
for tool in python3 git pytest; do
    where=$(command -v "$tool") || { printf '%s\t\t\n' "$tool"; continue; }
    printf '%s\t%s\t%s\n' "$tool" "$where" "$("$tool" --version 2>&1 | head -n 1)"
done
if command -v python3 >/dev/null && python3 -m pytest --version >/dev/null 2>&1; then
    printf '%s\t%s\t%s\n' "python3 -m pytest" "$(command -v python3)" \
        "$(python3 -m pytest --version 2>&1 | head -n 1)"
else
    printf '%s\t\t\n' "python3 -m pytest"
fi
"""


@dataclass(frozen=True)
class Tool:
    name: str
    path: str | None  # None: not found in the sandbox
    version: str | None = None

    def describe(self) -> str:
        if self.path is None:
            return f"{self.name}: not found"
        return f"{self.name}: {self.path} ({self.version})" if self.version else self.path


async def sandbox_toolchain(sandbox: Sandbox, timeout: float = 60.0) -> list[Tool]:
    """python3, git, pytest (and `python3 -m pytest`) as a command in this started sandbox
    sees them."""
    result = await sandbox.run(PROBE, timeout=timeout)
    found: dict[str, Tool] = {}
    for line in result.output.splitlines():
        name, _, rest = line.partition("\t")
        path, _, version = rest.partition("\t")
        if name in (*TOOLS, PYTEST_MODULE):
            found[name] = Tool(name, path or None, version.strip() or None)
    return [found.get(name, Tool(name, None)) for name in (*TOOLS, PYTEST_MODULE)]
