"""A Debian base image made here, for building the production image where Docker Hub is not
reachable: debootstrap (minbase) of this machine's Debian release from the mirror apt uses
here, with the packages the Dockerfile installs, upgraded from the release's updates and
security suites, then `docker import`.

The root filesystem's tarball is cached between runs under FEDAGENT_TEST_CACHE
(/var/cache/fedagent-test by default: outside the clone, so a fresh clone in CI reuses it),
keyed by the release, the mirror and the package list, and made again when older than
MAX_AGE (security updates). Without a writable cache it is made in the test's own directory."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/fedagent-test")
MAX_AGE = 14 * 86400
SOURCES = ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")


def cache_dir() -> Path | None:
    """The cache directory if it can be written here, else None."""
    path = Path(os.environ.get("FEDAGENT_TEST_CACHE") or DEFAULT_CACHE)
    with contextlib.suppress(OSError):
        path.mkdir(parents=True, exist_ok=True)
    return path if os.access(path, os.W_OK | os.X_OK) else None


def release() -> str:
    """This machine's Debian codename (e.g. bookworm)."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("no VERSION_CODENAME in /etc/os-release: not a Debian release")


def mirror() -> str:
    """The Debian archive apt uses here (the first one that is not the security archive)."""
    for source in SOURCES:
        path = Path(source)
        if not path.exists():
            continue
        for url in re.findall(r"(?:^URIs:|^deb)\s+(?:\[[^]]*\]\s+)?(\S+)", path.read_text(), re.M):
            if "security" not in url:
                return url.rstrip("/")
    return "http://deb.debian.org/debian"


def dockerfile_packages(dockerfile: str) -> list[str]:
    """The packages the Dockerfile's `apt-get install` names."""
    found = re.search(r"apt-get install (.*?)(?:&&|\n\s*\n|$)", dockerfile, re.S)
    if found is None:
        raise ValueError("the Dockerfile installs no package with apt-get install")
    words = found.group(1).replace("\\\n", " ").split()
    return sorted(word for word in words if not word.startswith("-"))


def base_key(packages: list[str]) -> str:
    text = "\n".join([release(), mirror(), *packages])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One maker at a time per cache (two CI runs at once make it once)."""
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def base_tarball(packages: list[str], scratch: Path) -> tuple[Path, bool]:
    """The root filesystem tarball (made now unless cached and fresh) and whether it was
    cached. Made in `scratch` when there is no writable cache."""
    directory = cache_dir() or scratch
    path = directory / f"debian-{release()}-{base_key(packages)}.tar"
    with _locked(directory):
        if path.exists() and time.time() - path.stat().st_mtime < MAX_AGE:
            return path, True
        _make(path, packages)
    return path, False


def _chroot(rootfs: Path, command: str) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c", command], env=env, check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)  # fmt: skip


def _sources(rootfs: Path, codename: str) -> None:
    """The release, its updates and its security suites, from the mirrors apt uses here."""
    archive = mirror()
    security = archive.replace("/debian", "/debian-security")
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {archive}\nSuites: {codename} {codename}-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {codename}-security\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )


def _make(path: Path, packages: list[str]) -> None:
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (scripts/install-system-deps.sh)")
    codename = release()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".rootfs-") as work:
        rootfs = Path(work) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", codename,
             str(rootfs), mirror()],
            check=True, stdin=subprocess.DEVNULL, capture_output=True,
        )  # fmt: skip
        _sources(rootfs, codename)
        _chroot(rootfs, "apt-get update -qq && apt-get -y -qq upgrade")
        _chroot(rootfs, "apt-get clean && rm -rf /var/lib/apt/lists/* /var/log/*.log")
        partial = Path(work) / "rootfs.tar"
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(partial), "."],
            check=True,
        )
        os.replace(partial, path)  # whole or absent: never a half-written cache
