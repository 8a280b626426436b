"""The embedded server's watchdog: stops the server once no process uses it, however they ended.

Started detached (its own session) by the first process that joins the server,
with the watchdog lock already held on the descriptor it inherits:

    python -m sa_rollback.databases._watchdog SERVER_DIR FD

It waits until the clients lock can be taken exclusively (every client has
exited or been killed), then, holding the state lock so that no process joins
meanwhile, checks again and stops the server.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from ._embedded import _flock, cluster, try_flock, unlock


def watch(server_dir: Path, watchdog_fd: int) -> None:
    embedded = cluster(server_dir)
    while True:
        # Blocks until no client holds its shared lock; released at once, so a joining client can take it.
        unlock(_flock(embedded.clients_lock, fcntl.LOCK_EX))
        state = _flock(embedded.state_lock, fcntl.LOCK_EX)
        last = try_flock(embedded.clients_lock, fcntl.LOCK_EX)
        if last is None:
            unlock(state)  # a client joined in between: watch on
            continue
        try:
            if embedded.running():
                print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} no client left: stopping the server", flush=True)
                embedded.stop()
        finally:
            # The watchdog lock goes before the state lock: a client that joins next starts a new watchdog.
            unlock(watchdog_fd)
            unlock(last)
            unlock(state)
        return


def main() -> None:
    server_dir, fd = Path(sys.argv[1]), int(sys.argv[2])
    os.set_inheritable(fd, False)  # the server (restarted by nobody here) must never hold it
    watch(server_dir, fd)


if __name__ == "__main__":
    main()
