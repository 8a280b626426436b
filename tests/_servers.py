"""Embedded-server helpers of the tests: a data directory outside pytest's, and the server's processes.

The directory is not under pytest's ``tmp_path``: pytest resets
``/tmp/pytest-of-<user>`` to mode 0700 whenever another pytest process of the
same user starts, and as root the server runs as an unprivileged user who must
traverse it (``PANIC: could not open file ".../pg_control"``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def server_dir(prefix: str = "sa_rollback_test_server_") -> Iterator[Path]:
    """A fresh directory everyone may traverse; whatever server runs in it is stopped, then it is removed."""
    base = "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    path.chmod(0o755)
    try:
        yield path
    finally:
        stop_server(path)
        shutil.rmtree(path, ignore_errors=True)


def postmaster_pid(path: Path) -> int | None:
    try:
        return int((path / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def server_processes(path: Path) -> list[int]:
    """Pids of the processes that run a server on ``path``'s data directory (its postmaster names it)."""
    needle = f"-D\0{path / 'pgdata'}\0".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                if needle in cmdline.read():
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_until_stopped(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server_processes(path):
            return True
        time.sleep(0.1)
    return not server_processes(path)


def stop_server(path: Path) -> None:
    """Stop a server left on ``path`` (a failed test): never let one outlive the test."""
    for pid in server_processes(path):
        try:
            os.kill(pid, 2)  # SIGINT: fast shutdown
        except OSError:
            pass
    wait_until_stopped(path, 10)
    wait_for_watchdog(path, 10)


def wait_for_watchdog(path: Path, timeout: float) -> bool:
    """Wait until no watchdog holds the directory's watchdog lock (it is about to remove nothing more)."""
    lock = path / "watchdog.lock"
    if not lock.exists():
        return True
    deadline = time.monotonic() + timeout
    with open(lock, "rb") as handle:
        while time.monotonic() < deadline:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                time.sleep(0.05)
    return False
