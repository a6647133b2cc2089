"""Per-sandbox cgroups: memory, pids and CPU limits, the list of a sandbox's processes, kill.

cgroup v2 is used when the unified hierarchy offers the memory and pids controllers; otherwise
the v1 controllers each get their own directory (hybrid machines, older hosts). A sandbox's
cgroup is created below the executor's own cgroup (`<own>/fedagent/<name>`), so whatever
accounts for the executor keeps accounting for its sandboxes; on v2, where a cgroup with
processes cannot hand controllers to children, it falls back to `/fedagent/<name>` at the root.
Whatever cannot be written leaves that limit to the caller's fallback (rlimits).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from agents.sandbox.base import Limits

log = logging.getLogger(__name__)
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


@dataclass
class CgroupSet:
    """The cgroup of one sandbox: one directory on v2, one per controller on v1."""

    version: int
    dirs: dict[str, Path]  # controller -> directory
    enforced: dict[str, str] = field(default_factory=dict)

    @property
    def procs_files(self) -> list[str]:
        return sorted({str(d / "cgroup.procs") for d in self.dirs.values()})

    def pids(self) -> list[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(line) for line in Path(procs).read_text().split())
        return sorted(found)

    def kill(self) -> None:
        """SIGKILL everything in the cgroup: at once through cgroup.kill where the kernel has
        it (v2, Linux 5.14+), else pid by pid until none is left (the pids limit bounds how
        many a fork bomb can make meanwhile)."""
        if self.version == 2:
            kill_file = next(iter(self.dirs.values())) / "cgroup.kill"
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)

    def oom_kills(self) -> int:
        """How many processes the memory limit has killed so far."""
        memory = self.dirs.get("memory")
        if memory is None:
            return 0
        for name in ("memory.events", "memory.oom_control"):
            with contextlib.suppress(OSError):
                for line in (memory / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        return 0

    def remove(self) -> None:
        for directory in set(self.dirs.values()):
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # still busy for a moment after the last process died
                    time.sleep(0.01)
            with contextlib.suppress(OSError):
                directory.parent.rmdir()  # the shared `fedagent` parent, once it is empty


def _own_cgroups() -> dict[str, str]:
    """controller -> own cgroup path; "" is the v2 unified hierarchy."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount root, mount point, super options) of the cgroup mounts."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
            root, point = fields[3], fields[4].replace("\\040", " ")
            mounts.append((rest[0], root, point, set(rest[2].split(","))))
    return mounts


def _directory(point: str, root: str, own: str) -> Path | None:
    if root != "/" and not (own == root or own.startswith(root.rstrip("/") + "/")):
        return None
    relative = own[len(root) :] if root != "/" else own
    return Path(point) / relative.lstrip("/")


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _apply_limits(version: int, controller: str, directory: Path, limits: Limits) -> bool:
    try:
        if controller == "memory" and limits.memory_bytes:
            if version == 2:
                _write(directory / "memory.max", str(limits.memory_bytes))
                if (directory / "memory.swap.max").exists():
                    _write(directory / "memory.swap.max", "0")
            else:
                _write(directory / "memory.limit_in_bytes", str(limits.memory_bytes))
                if (directory / "memory.memsw.limit_in_bytes").exists():
                    # memory+swap no higher than memory: the limit cannot be dodged by swapping
                    with contextlib.suppress(OSError):
                        _write(directory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            return True
        if controller == "pids" and limits.pids:
            _write(directory / "pids.max", str(limits.pids))
            return True
        if controller == "cpu" and limits.cpus:
            quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
            if version == 2:
                _write(directory / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            else:
                _write(directory / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(directory / "cpu.cfs_quota_us", str(quota))
            return True
    except OSError as exc:
        log.info("cgroup limit %s not applied in %s: %s", controller, directory, exc)
    return False


def _wanted(limits: Limits) -> list[str]:
    values = {"memory": limits.memory_bytes, "pids": limits.pids, "cpu": limits.cpus}
    return [c for c in CONTROLLERS if values[c]]


def _create_v2(point: str, root: str, own: str, name: str, limits: Limits) -> CgroupSet | None:
    mine = _directory(point, root, own)
    if mine is None:
        return None
    wanted = _wanted(limits)
    try:
        available = set((mine / "cgroup.controllers").read_text().split())
    except OSError:
        return None
    if not {"memory", "pids"} <= available:
        return None
    enable = " ".join(f"+{c}" for c in wanted if c in available)
    for base in (mine, Path(point)):
        parent = base / "fedagent"
        _sweep(parent)
        try:
            _write(base / "cgroup.subtree_control", enable)
            parent.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", enable)
            directory = parent / name
            directory.mkdir()
        except OSError as exc:
            log.info("no cgroup v2 sandbox below %s: %s", base, exc)
            continue
        group = CgroupSet(2, dict.fromkeys(CONTROLLERS, directory))
        for controller in wanted:
            if controller in available and _apply_limits(2, controller, directory, limits):
                group.enforced[controller] = "cgroup v2"
        return group
    return None


def _sweep(parent: Path) -> None:
    """Remove the empty cgroups of sandboxes whose worker died (names are sbx-PID-...)."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            parts = entry.name.split("-")
            if len(parts) < 3 or parts[0] != "sbx" or not parts[1].isdigit():
                continue
            if not Path(f"/proc/{parts[1]}").exists():
                with contextlib.suppress(OSError):  # not empty: leave it
                    entry.rmdir()


def create_cgroups(name: str, limits: Limits) -> CgroupSet | None:
    """A new cgroup for one sandbox with the limits written, or None where none can be made."""
    try:
        own = _own_cgroups()
        mounts = _mounts()
    except OSError:
        return None
    for fstype, root, point, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            group = _create_v2(point, root, own[""], name, limits)
            if group is not None:
                return group
    dirs: dict[str, Path] = {}
    enforced: dict[str, str] = {}
    for controller in _wanted(limits):
        for fstype, root, point, options in mounts:
            if fstype != "cgroup" or controller not in options or controller not in own:
                continue
            mine = _directory(point, root, own[controller])
            if mine is None:
                continue
            directory = mine / "fedagent" / name
            _sweep(directory.parent)
            try:
                directory.mkdir(parents=True)
            except OSError as exc:
                log.info("no cgroup v1 %s for the sandbox: %s", controller, exc)
                break
            dirs[controller] = directory
            if _apply_limits(1, controller, directory, limits):
                enforced[controller] = "cgroup v1"
            break
    if not dirs:
        return None
    return CgroupSet(1, dirs, enforced)
