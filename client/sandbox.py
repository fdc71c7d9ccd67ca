"""The executor's confinement: what code from an app bundle can reach at a site.

The warm executor runs the ClientApp of each task in its own process. By default only
medfed's own ClientApp runs (`client.bundle_code`), but an app the site approved by its
hash is code the site did not write, and medfed's own code could have a bug an
instruction exploits. So before the executor takes its first task it confines itself
with Linux Landlock (unprivileged, kernel 5.13 and later; TCP rules from 6.7), for good:

- files: it may read and execute only the Python installation and medfed's code, and
  read the system's `/usr`, `/lib*`, `/etc`, `/proc`, `/sys` and `/dev`; it may write
  only under its own `FLWR_HOME` (where Flower installs bundles) and its own temporary
  folder. The site's data, keys, ledger, audit log and `site.toml` are out of reach: the
  worker reads them, and answers the executor only through its API on `worker.sock`;
- network: it may connect over TCP only to the SuperNode's Runtime API port, and bind
  none (Landlock's TCP rules name ports, not addresses). A Unix socket path (the
  worker's) is not a TCP connection and stays reachable.

Landlock applies to the calling thread and to every thread and process it starts
later, and cannot be undone, so `confine` runs before the executor starts any thread.
Where the kernel has no Landlock, the executor says so loudly at start (and in its
log) and runs unconfined: the other layers (only approved code, the egress guard, the
worker's public reasons) still hold.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SYS_CREATE_RULESET = 444  # the same on every architecture Linux unified (x86_64, arm64)
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2
_PR_SET_NO_NEW_PRIVS = 38

_EXECUTE = 1 << 0
_WRITE_FILE = 1 << 1
_READ_FILE = 1 << 2
_READ_DIR = 1 << 3
_FS_ABI1 = (1 << 13) - 1  # execute ... make_sym
_REFER = 1 << 13  # ABI 2
_TRUNCATE = 1 << 14  # ABI 3
_IOCTL_DEV = 1 << 15  # ABI 5
_BIND_TCP = 1 << 0  # ABI 4
_CONNECT_TCP = 1 << 1
_READ = _EXECUTE | _READ_FILE | _READ_DIR

SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/etc", "/proc", "/sys", "/dev", "/bin")
"""System folders the executor may read (never written): libraries, certificates, /proc."""
DEVICE_WRITE = ("/dev/null", "/dev/tty")
MEDFED_ROOMS = (
    "analysis",
    "bench",
    "client",
    "common",
    "coordinator",
    "flower",
    "model",
    "privacy",
    "sites",
)
"""Every room of the package, not only the ones the executor runs: its check that a
bundle's code is the installed code reads each installed room the bundle ships."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64))


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


class _NetPortAttr(ctypes.Structure):
    _fields_ = (("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64))


@dataclass(frozen=True)
class Confinement:
    """What `confine` enforced: the Landlock ABI (0: none), and what it could not."""

    abi: int
    read: tuple[str, ...]
    write: tuple[str, ...]
    tcp_ports: tuple[int, ...] | None
    """The TCP ports it may connect to; None when the kernel cannot limit TCP (ABI < 4)."""
    problem: str | None = None
    """Why nothing is enforced (no Landlock), or None."""

    @property
    def enforced(self) -> bool:
        return self.abi > 0 and self.problem is None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where it has none (or it is disabled)."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    version = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return max(int(version), 0)


def _handled_fs(abi: int) -> int:
    handled = _FS_ABI1
    if abi >= 2:
        handled |= _REFER
    if abi >= 3:
        handled |= _TRUNCATE
    if abi >= 5:
        handled |= _IOCTL_DEV
    return handled


def code_roots() -> list[Path]:
    """Where this Python and medfed's code live: the prefixes, `sys.path`'s folders
    (never the working directory) and the folder of each medfed room (an editable
    install maps them into the repository, whose other files are not code)."""
    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)}
    cwd = Path.cwd().resolve()
    for entry in sys.path:
        if not entry:
            continue
        path = Path(entry).resolve()
        if path.exists() and path != cwd and cwd not in path.parents:
            roots.add(path)
    for package in ("medfed", *(f"medfed.{room}" for room in MEDFED_ROOMS)):
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(package)
            locations = [] if spec is None else list(spec.submodule_search_locations or [])
            roots.update(Path(folder).resolve() for folder in locations)
    return sorted(roots)


def exposed(private: Iterable[Path], readable: Iterable[Path]) -> list[str]:
    """Each private path (the site's data, keys, records) that sits under a readable
    root, as `PRIVATE (under ROOT)`: the confinement would not hide it."""
    roots = [Path(root).resolve() for root in readable]
    found = []
    for path in private:
        resolved = Path(path).resolve()
        for root in roots:
            if resolved == root or root in resolved.parents:
                found.append(f"{resolved} (under {root})")
                break
    return found


def confine(
    *, read: Sequence[Path], write: Sequence[Path], tcp_ports: Sequence[int]
) -> Confinement:
    """Restrict this thread, and every thread and process it starts later, to reading
    `read` (and the system's folders), writing `write` and connecting over TCP to
    `tcp_ports` only. Irreversible. Without Landlock, nothing is restricted and the
    result says why."""
    abi = landlock_abi()
    reads = tuple(str(p) for p in [*map(str, read), *SYSTEM_READ] if Path(p).exists())
    writes = tuple(str(p) for p in [*map(str, write), *DEVICE_WRITE] if Path(p).exists())
    if abi <= 0:
        problem = "this kernel has no Landlock (Linux 5.13 or later with it enabled)"
        return Confinement(0, reads, writes, None, problem)
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    handled_fs = _handled_fs(abi)
    attr = _RulesetAttr(handled_fs, (_BIND_TCP | _CONNECT_TCP) if abi >= 4 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 4 else ctypes.sizeof(ctypes.c_uint64)
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        file_rights = _WRITE_FILE | _READ_FILE | (_TRUNCATE if abi >= 3 else 0)
        for path in reads:
            _add_path(libc, ruleset, path, _READ, handled_fs)
        for path in writes:
            rights = handled_fs if Path(path).is_dir() else file_rights
            _add_path(libc, ruleset, path, rights, handled_fs)
        ports: tuple[int, ...] | None = None
        if abi >= 4:
            ports = tuple(sorted(set(tcp_ports)))
            for port in ports:
                rule = _NetPortAttr(_CONNECT_TCP, port)
                if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_NET_PORT, ctypes.byref(rule), 0):
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule (TCP port {port})")
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0):
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    return Confinement(abi, reads, writes, ports)


def _add_path(libc: ctypes.CDLL, ruleset: int, path: str, rights: int, handled: int) -> None:
    """Allow `rights` beneath `path` (a file takes only file rights)."""
    flags = os.O_PATH | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        if not Path(path).is_dir():
            rights &= _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
        rule = _PathBeneathAttr(rights & handled, fd)
        if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0):
            code = ctypes.get_errno()
            raise OSError(code, f"landlock_add_rule ({path}): {os.strerror(code or errno.EIO)}")
    finally:
        os.close(fd)
