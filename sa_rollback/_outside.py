"""Outside connections: backends on a test's database that are not in its transaction.

A connection made with the driver directly (``psycopg.connect()``), or by a
process the test started, never passes the pool listener, so what it writes is
committed for real. When a scope's frame is rolled back, the same round trip
lists the other client backends on that database (a query appended after the
ROLLBACK, see :mod:`._rollback`); those this process's SQLAlchemy pools opened
are sa_rollback's own or join the test's transaction when used, and the rest
are reported.

Only databases sa_rollback created for this process are watched (set by the
plugin through :meth:`Outside.watch`): there nothing else has any business
being connected. A database used as it is may have any number of legitimate
sessions (psql, the application's own server, another run), which cannot be
told apart from the test's, so it is not checked.

Pool connections are known by their backend pid, read when the pool connects
(a local libpq value, no round trip), with a weak reference to the connection:
they are forgotten when the pool closes them, or when they are closed or
garbage collected without the pool knowing (an engine dropped undisposed), so
that a dead one never hides a live outside connection from the count. Those that
connected before the listener was installed are looked for only when a
backend is not known otherwise.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Optional

from ._sqla import pooled_connections
from .errors import OutsideConnectionError

#: appended to the ROLLBACK (or ROLLBACK TO SAVEPOINT) of a frame, in the same round trip, as the last
#: statement (psycopg2 keeps only the last result of a multi-statement string): how many backends are on
#: the database. A count costs about 0.01 ms; listing the backends (pg_stat_get_activity, whose many
#: columns take long to plan) costs 0.1 to 0.2 ms, and the pg_stat_activity view three times that, so
#: the list is asked for only when the count exceeds our own connections, in a second round trip.
#: The database's oid is learnt by the first count and written into the next ones.
_COUNT_FIRST = "SELECT pg_stat_get_db_numbackends(oid), oid FROM pg_database WHERE datname = current_database()"
_COUNT = "SELECT pg_stat_get_db_numbackends({oid})"
_LIST = (
    "SELECT pid, coalesce(nullif(application_name, ''), '?'), "
    "coalesce(host(client_addr) || ':' || client_port, 'the local socket'), "
    "coalesce(to_char(backend_start, 'YYYY-MM-DD HH24:MI:SS TZ'), '?') "
    "FROM pg_stat_get_activity(NULL) "
    "WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
)
#: inside a transaction PostgreSQL answers from a snapshot of the activity taken at its first read
_FRESH = "SELECT pg_stat_clear_snapshot(); "

#: key, in a pool record's info dict, of the backend pid of its connection
_PID_INFO = "sa_rollback.backend_pid"


def _dbname(dbapi_connection: Any) -> str:
    for conn in (dbapi_connection, getattr(dbapi_connection, "driver_connection", None)):
        name = getattr(getattr(conn, "info", None), "dbname", None)  # psycopg, psycopg2
        name = name or getattr(getattr(conn, "_params", None), "database", None)  # asyncpg
        if name:
            return str(name)
    return ""


def backend_pid(dbapi_connection: Any) -> Optional[int]:
    """The server process of a DBAPI connection (psycopg, psycopg2, or an async adapter); no round trip."""
    if getattr(type(dbapi_connection), "placeholder", False):
        return None  # _vacant.Vacant: no server process, and asking it anything would connect one
    for conn in (dbapi_connection, getattr(dbapi_connection, "driver_connection", None)):
        info = getattr(conn, "info", None)
        pid = getattr(info, "backend_pid", None)
        if pid:
            return int(pid)
        server_pid = getattr(conn, "get_server_pid", None)  # asyncpg
        if server_pid is not None:
            try:
                return int(server_pid())
            except Exception:
                return None
    return None


class Outside:
    """Which databases are watched, which backends are this process's own, what was reported."""

    def __init__(self) -> None:
        #: the databases to check (None: none); a callable, since a run makes more of them as it goes
        self.watched: Optional[Callable[[], Any]] = None
        #: how to turn the check off, named by the error (the plugin names its settings)
        self.hint = "stop watching with Outside.watch(None)"
        #: backend pids of connections this process's SQLAlchemy pools opened: their database and connection
        self.own: dict[int, tuple[str, Callable[[], Any]]] = {}
        #: the oid of each watched database, learnt from the first count
        self._oids: dict[str, int] = {}
        #: (pid, backend_start) of backends already reported: one report each, to the test that left it
        self._reported: set[tuple[int, str]] = set()
        self._installed = False
        self._lock = threading.Lock()

    def watch(self, databases: Optional[Callable[[], Any]], hint: Optional[str] = None) -> None:
        """Check the databases that ``databases()`` names at each rollback (None: check none)."""
        if databases is not None:
            self.install()
        self.watched = databases
        if hint is not None:
            self.hint = hint

    def install(self) -> None:
        """Learn the pools' connections from now on (idempotent; costs only when a pool connects)."""
        with self._lock:
            if self._installed:
                return
            from sqlalchemy import event
            from sqlalchemy.pool import Pool

            event.listen(Pool, "connect", self._on_connect)
            event.listen(Pool, "close", self._on_close)
            event.listen(Pool, "close_detached", self._on_close_detached)
            self._installed = True

    def _on_connect(self, dbapi_connection: Any, connection_record: Any) -> None:
        self._learn(dbapi_connection, connection_record.info)

    def _learn(self, dbapi_connection: Any, info: Optional[dict[Any, Any]] = None) -> None:
        pid = backend_pid(dbapi_connection)
        if pid is not None:
            try:
                ref: Callable[[], Any] = weakref.ref(dbapi_connection)
            except TypeError:  # a driver whose connections take no weak reference: kept until closed
                ref = lambda: dbapi_connection  # noqa: E731
            self.own[pid] = (_dbname(dbapi_connection), ref)
            if info is not None:
                info[_PID_INFO] = pid

    def _on_close(self, dbapi_connection: Any, connection_record: Any) -> None:
        pid = connection_record.info.pop(_PID_INFO, None) if connection_record is not None else None
        if pid is not None:
            self.own.pop(pid, None)

    def _on_close_detached(self, dbapi_connection: Any) -> None:
        pid = backend_pid(dbapi_connection)
        if pid is not None:
            self.own.pop(pid, None)

    def probe(self, database: str, in_transaction: bool = False) -> str:
        """The count to append to the rollback of a frame on ``database``; "" when it is not watched."""
        watched = self.watched
        if watched is None or database not in watched():
            return ""
        oid = self._oids.get(database)
        count = _COUNT_FIRST if oid is None else _COUNT.format(oid=oid)
        return _FRESH + count if in_transaction else count

    def suspicious(self, database: str, rows: list[tuple[Any, ...]]) -> bool:
        """Does the probe's count show more backends than our own connections to ``database``?"""
        if not rows:
            return False
        row = rows[0]
        if len(row) > 1:
            self._oids[database] = int(row[1])
        count = int(row[0] or 0)
        if count == 0:
            # Not even the connection that asked: the oid is another database's now (a
            # snapshot restored under this name). Learn it again next time.
            self._oids.pop(database, None)
            return False
        return count > self._own_on(database)

    def _own_on(self, database: str) -> int:
        """How many of our pool connections to ``database`` are still open; forget the others."""
        alive = 0
        for pid, (name, ref) in list(self.own.items()):
            conn = ref()
            if conn is None or getattr(conn, "closed", False):
                self.own.pop(pid, None)
            elif name == database:
                alive += 1
        return alive

    @staticmethod
    def listing(in_transaction: bool) -> str:
        """The query that lists the other client backends on the database (after :meth:`suspicious`)."""
        return _FRESH + _LIST if in_transaction else _LIST

    def unknown(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The listed backends that are neither this process's pools' nor reported already."""
        own = self.own
        found = [row for row in rows if row[0] not in own and (int(row[0]), str(row[3])) not in self._reported]
        if found:
            # Pools that connected before the listener was installed: found once, the slow way.
            for conn in pooled_connections():
                self._learn(conn)
            found = [row for row in found if row[0] not in own]
        return found

    def error(self, label: str, database: str, rows: list[tuple[Any, ...]]) -> OutsideConnectionError:
        """The error naming the backends of :meth:`unknown`, which are not reported again."""
        found = []
        for pid, app, client, since in rows:
            self._reported.add((int(pid), str(since)))
            found.append(f"pid {pid}, application_name {app!r}, from {client}, connected since {since}")
        listed = "; ".join(found)
        return OutsideConnectionError(
            f"{label}: {len(found)} connection(s) to the test database {database!r} that sa_rollback does "
            f"not know of were open when the test's transaction was rolled back ({listed}). A connection made "
            "with the driver directly (psycopg.connect()) or by another process (a subprocess the test "
            "started) is outside the test's transaction: what it wrote was committed for real and is NOT "
            "rolled back. Connect through a SQLAlchemy engine instead (every engine joins the test's "
            f"transaction), or close it and clean up what it wrote; to turn this check off, {self.hint}."
        )


OUTSIDE = Outside()
