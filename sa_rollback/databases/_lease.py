"""A run's liveness lease: a session advisory lock, held on the server for as long as the run lives.

Each run's key is derived from its run id (:func:`._names.lease_key`) and
recorded in the mark of every clone and template it makes. The process that
prepares the run (the xdist controller, or the single process) holds the lock
in shared mode on a connection of its own; a worker whose controller holds it
takes none. When the run ends, however it ends, its connection closes and the
server releases the lock: SIGKILL closes the socket at once, and a host that
vanishes is noticed by the server's TCP keepalives, which this connection sets
to about a minute.

Whether an owner is gone is then asked of the server, from any host, in any
PID namespace: ``pg_try_advisory_lock(key)`` succeeds only when nobody holds it.
"""

from __future__ import annotations

import threading
from typing import Optional

from sqlalchemy.engine import URL

from ._admin import AdminConnection, admin_driver
from ._names import lease_key

#: the server ends the connection of a run whose host stopped answering after about 30 + 3 x 10 s
_KEEPALIVES = "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"


class Lease:
    """This process's hold on a run's lease; released when closed or when the process ends."""

    def __init__(self, admin_url: URL, run_id: str) -> None:
        self.key = lease_key(run_id)
        options = " ".join(str(part) for part in (admin_url.query.get("options"), _KEEPALIVES) if part)
        url = admin_url.update_query_dict({"application_name": f"sa_rollback lease {run_id}"[:63], "options": options})
        self._conn: Optional[AdminConnection] = admin_driver(url).connect(url)
        self._conn.execute("SELECT pg_advisory_lock_shared(%s)", (self.key,))

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except Exception:
                pass  # the server is gone already: so is the lock


_LEASES: dict[tuple[str, str], Lease] = {}
_LOCK = threading.Lock()


def hold(admin_url: URL, run_id: str) -> None:
    """Hold the run's lease on this server from now until :func:`release_all` or the process's end."""
    key = (admin_url.render_as_string(hide_password=False), run_id)
    with _LOCK:
        if key not in _LEASES:
            _LEASES[key] = Lease(admin_url, run_id)


def release_all() -> None:
    with _LOCK:
        leases = list(_LEASES.values())
        _LEASES.clear()
    for lease in leases:
        lease.close()


def owner_gone(conn: AdminConnection, key: int) -> bool:
    """Whether no live run holds the lease ``key``. If so, this session now holds it exclusively, so that
    no run can take it while its databases are dropped: call :func:`let_go` after."""
    rows = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
    return bool(rows and rows[0][0])


def let_go(conn: AdminConnection, key: int) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
