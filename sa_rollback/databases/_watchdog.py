"""The embedded server's watchdog, and the file locks it shares with the server's clients.

The first process that joins the server starts it detached (its own session),
as a plain script run by path (the standard library only: it starts in
milliseconds and needs sa_rollback to be importable nowhere), with the
watchdog lock already held on the descriptor it inherits:

    python -I _watchdog.py SERVER_DIR FD PG_CTL [UID GID]

It waits until the clients lock can be taken exclusively (every client has
exited or been killed), then, holding the state lock so that no process joins
meanwhile, checks again and stops the server with ``pg_ctl stop -m fast``.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional


def flock(path: Path, mode: int) -> int:
    """A descriptor of ``path`` holding the lock ``mode``; ``os.open``'s descriptors are not inherited,
    so the server never holds a client's lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def try_flock(path: Path, mode: int) -> Optional[int]:
    """The descriptor holding the lock, or None when someone else holds it."""
    try:
        return flock(path, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return None


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def postmaster_alive(pgdata: Path) -> bool:
    """Whether the postmaster named by ``pgdata/postmaster.pid`` is alive."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (OSError, ValueError):
        return False
    return True


def watch(server_dir: Path, watchdog_fd: int, pg_ctl: str, user: dict[str, Any]) -> None:
    clients, state_lock, pgdata = server_dir / "clients.lock", server_dir / "state.lock", server_dir / "pgdata"
    while True:
        # Blocks until no client holds its shared lock; released at once, so a joining client can take it.
        unlock(flock(clients, fcntl.LOCK_EX))
        state = flock(state_lock, fcntl.LOCK_EX)
        last = try_flock(clients, fcntl.LOCK_EX)
        if last is None:
            unlock(state)  # a client joined in between: watch on
            continue
        try:
            if postmaster_alive(pgdata):
                print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} no client left: stopping the server", flush=True)
                subprocess.run(
                    [pg_ctl, "-w", "-t", "60", "-D", str(pgdata), "-m", "fast", "stop"],
                    stdin=subprocess.DEVNULL,
                    cwd=server_dir,
                    check=False,
                    **user,
                )
        finally:
            # The watchdog lock goes before the state lock: a client that joins next starts a new watchdog.
            unlock(watchdog_fd)
            unlock(last)
            unlock(state)
        return


def main(argv: list[str]) -> None:
    server_dir, fd, pg_ctl = Path(argv[1]), int(argv[2]), argv[3]
    user: dict[str, Any] = {}
    if len(argv) > 5:
        user = {"user": int(argv[4]), "group": int(argv[5]), "extra_groups": []}
    watch(server_dir, fd, pg_ctl, user)


if __name__ == "__main__":
    main(sys.argv)
