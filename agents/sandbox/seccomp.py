"""The seccomp filter of the bwrap sandbox: what Docker's default profile denies, denied.

bubblewrap applies a compiled classic-BPF program (`--seccomp FD`) to the command just before
it execs it, after bwrap's own namespace and mount setup. The program is built with libseccomp
(through the `pyseccomp` ctypes bindings) for the machine's native architecture; a system call
made through another ABI (i386 `int 0x80`, x32) kills the process, as libseccomp's default for
a foreign architecture does, so the list below cannot be dodged through a compat entry point.

Denied with EPERM (Docker's default profile denies them to an unprivileged container, see
moby's profiles/seccomp/default.json): mounting and namespaces (mount, umount2, the new mount
API, pivot_root, unshare, setns, clone with any CLONE_NEW* flag), kernel keyrings, BPF and perf,
userfaultfd, ptrace and reading other processes' memory, kernel modules and kexec, reboot,
swap, clock and time setting, accounting, quotas, handle-based opens (open_by_handle_at can
reach files outside a bind mount), NUMA policy, io_uring (a second syscall interface that
filters do not see), syslog and the obsolete interfaces. clone3 answers
ENOSYS, as in Docker: its flags sit in memory a filter cannot read, and libc then falls back to
clone, whose flags the filter does check.
"""

from __future__ import annotations

import errno
import os
import tempfile
from functools import lru_cache

# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (and NEWTIME)
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000
CLONE_NAMESPACE_FLAGS |= 0x10000000 | 0x20000000 | 0x40000000 | 0x00000080

DENIED = (
    # mounts and namespaces
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    # kernel keyrings
    "keyctl",
    "add_key",
    "request_key",
    # BPF, perf, userfaultfd
    "bpf",
    "perf_event_open",
    "userfaultfd",
    # other processes
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    # the kernel itself
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "query_module",
    "get_kernel_syms",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "syslog",
    "acct",
    "quotactl",
    "quotactl_fd",
    "nfsservctl",
    "_sysctl",
    "sysfs",
    "uselib",
    "ustat",
    "lookup_dcookie",
    "iopl",
    "ioperm",
    "vm86",
    "vm86old",
    # clocks
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    "adjtimex",
    # files by handle (escapes bind mounts)
    "open_by_handle_at",
    "name_to_handle_at",
    # NUMA policy
    "mbind",
    "set_mempolicy",
    "get_mempolicy",
    "move_pages",
    "migrate_pages",
    # a syscall interface of its own that seccomp does not see into
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)


class SeccompUnavailable(Exception):
    """libseccomp (libseccomp2) or its Python bindings are missing."""


@lru_cache(maxsize=1)
def filter_program() -> bytes:
    """The compiled BPF program (struct sock_filter[]) for this machine's architecture."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError, AttributeError) as exc:
        raise SeccompUnavailable(
            f"the seccomp filter needs libseccomp ({exc}): `apt-get install libseccomp2` "
            "(scripts/install-system-deps.sh) and the pyseccomp package (a fedagent dependency)"
        ) from exc
    deny = seccomp.ERRNO(errno.EPERM)
    program = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED:
        try:
            program.add_rule(deny, name)
        except (OSError, ValueError, RuntimeError):
            pass  # not a system call of this architecture (or of this libseccomp)
    # clone: any namespace flag is refused; threads and plain forks go through
    for flag in _bits(CLONE_NAMESPACE_FLAGS):
        program.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    try:
        program.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    except (OSError, ValueError, RuntimeError):
        pass
    with tempfile.TemporaryFile() as handle:
        program.export_bpf(handle)
        handle.seek(0)
        data = handle.read()
    if not data or len(data) % 8:
        raise SeccompUnavailable(f"libseccomp exported a {len(data)}-byte program")
    return data


def _bits(mask: int) -> list[int]:
    return [1 << bit for bit in range(32) if mask & (1 << bit)]


def program_fd() -> int:
    """A file descriptor holding the program at offset 0, for `bwrap --seccomp FD` (the caller
    closes it once bwrap started)."""
    data = filter_program()
    fd = os.memfd_create("fedagent-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
