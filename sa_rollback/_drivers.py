"""The few driver-specific operations the core needs, for psycopg2 and psycopg 3.

Everything here reads libpq state that the driver keeps locally, so none of it
costs a round trip, except :meth:`Driver.execute`.
"""

from __future__ import annotations

import select
import threading
from typing import Any, Callable, NamedTuple, Optional

from ._stats import STATS

# libpq's PQtransactionStatus values; psycopg2 and psycopg 3 both report them.
IDLE = 0
ACTIVE = 1
INTRANS = 2
INERROR = 3
UNKNOWN = 4

#: psycopg2.extensions.STATUS_BEGIN: psycopg2's own idea that a transaction is open
_PSYCOPG2_STATUS_BEGIN = 2


class DatabaseKey(NamedTuple):
    """Which physical connection a checkout joins: same driver, server, database, role."""

    driver: str
    host: str
    port: str
    dbname: str
    user: str

    def describe(self) -> str:
        return f"{self.dbname} on {self.host}:{self.port} as {self.user} ({self.driver})"

    @property
    def db(self) -> tuple[str, str, str]:
        """The database itself, whichever driver and role reach it."""
        return (self.host, self.port, self.dbname)


class Driver:
    """Adapter for one DBAPI module."""

    name: str
    #: the exception raised for "current transaction is aborted"
    in_failed_transaction: type[Exception]

    def __init__(
        self,
        name: str,
        in_failed: type[Exception],
        runner: Callable[[Any, str], None],
        fetcher: Optional[Callable[[Any, str], list[tuple[Any, ...]]]] = None,
    ):
        self.name = name
        self.in_failed_transaction = in_failed
        self._run = runner
        self._fetch = fetcher
        #: can it return the rows of a multi-statement string's last statement (:meth:`fetch`)?
        self.can_fetch = fetcher is not None

    #: its connections belong to one event loop: one shared connection per (database, loop)
    per_loop = False
    #: an async adapter whose checkouts run on a sync shared connection (psycopg async)
    async_facing = False

    def new_lock(self) -> Any:
        """The lock of a shared connection: one thread at a time (async drivers: one task)."""
        return threading.RLock()

    def rollback(self, conn: Any) -> None:
        """End the transaction; the next statement begins a new one."""
        STATS.round_trips += 1
        conn.rollback()

    def restart(self, conn: Any) -> None:
        """Roll the whole transaction back and go on in a new one (the frame stays open)."""
        STATS.round_trips += 1
        conn.rollback()

    def physical_side(self, conn: Any, record: Any) -> tuple[Any, Any, Driver]:
        """The connection, record and driver a shared connection uses, made from a pool record's connection."""
        return conn, record, self

    def note_failure(self, conn: Any) -> None:
        """A statement on ``conn`` failed (for drivers that do not report an aborted transaction)."""

    def key(self, conn: Any) -> DatabaseKey:
        info = conn.info
        return DatabaseKey(self.name, str(info.host), str(info.port), str(info.dbname), str(info.user))

    def status(self, conn: Any) -> int:
        raise NotImplementedError

    def execute(self, conn: Any, sql: str) -> None:
        """Run one or more parameterless statements on the physical connection."""
        STATS.round_trips += 1
        self._run(conn, sql)

    def fetch(self, conn: Any, sql: str) -> list[tuple[Any, ...]]:
        """Like :meth:`execute`; the rows of the last statement (only where :attr:`can_fetch`)."""
        if self._fetch is None:
            raise NotImplementedError(f"{self.name}: no rows from multi-statement strings")
        STATS.round_trips += 1
        return self._fetch(conn, sql)

    @staticmethod
    def closed(conn: Any) -> bool:
        return bool(conn.closed)

    @staticmethod
    def autocommit(conn: Any) -> bool:
        return bool(conn.autocommit)

    def make_physical(self, conn: Any) -> None:
        """Put a fresh connection into the state the outer transaction needs."""
        raise NotImplementedError

    def begin_outer(self, conn: Any) -> None:
        """Called before the first statement of a new outer transaction."""

    def rollback_outer(self, conn: Any, check_deferred: bool, probe: str = "") -> list[tuple[Any, ...]]:
        """Roll the outer transaction back, checking deferred constraints first if asked.

        The check shares the rollback's round trip. When it fails, the
        transaction is still rolled back and the driver's error is raised.
        ``probe``, a query, runs after the ROLLBACK in the same round trip;
        its rows are returned.
        """
        if not (check_deferred or probe):
            STATS.round_trips += 1
            conn.rollback()
            return []
        check = "SET CONSTRAINTS ALL IMMEDIATE; " if check_deferred else ""
        try:
            return self.fetch(conn, f"{self.forget_prepared(conn)}{check}ROLLBACK" + (f"; {probe}" if probe else ""))
        except BaseException:
            if not self.closed(conn):
                conn.rollback()
            raise

    def forget_prepared(self, conn: Any) -> str:
        """What the driver's own ``rollback()`` does to its prepared statements, as SQL to send before the ROLLBACK."""
        return ""

    def schema_undone(self, conn: Any) -> None:
        """A rollback undid DDL: forget what was prepared against the schema it changed back.

        psycopg's prepared statements are forgotten at every rollback
        (:meth:`forget_prepared`); psycopg2 prepares nothing.
        """

    def undo_savepoint(self, conn: Any, name: Optional[str]) -> str:
        """Roll back to a frame's savepoint and release it, as SQL.

        psycopg reads the status of ``ROLLBACK TO SAVEPOINT`` as a rollback's:
        it deallocates its prepared statements in a round trip of its own, as
        after a textual ``ROLLBACK`` (:meth:`forget_prepared`). The ``DEALLOCATE
        ALL`` goes last in this round trip instead, once the transaction is
        sound again.
        """
        forget = self.forget_prepared(conn).rstrip("; ")
        return f"ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}" + (f"; {forget}" if forget else "")

    def dead(self, conn: Any) -> bool:
        """Did the server drop this idle connection (backend terminated, restart)? No round trip.

        Between statements nothing arrives unasked, except the server's goodbye
        before it closes the socket (or a LISTEN notification, rare on this
        connection): a readable socket means the connection is gone. Reading
        it to make sure would race with the close.
        """
        try:
            if self.closed(conn):
                return True
            fd = conn.fileno()
        except Exception:
            return True
        try:
            if hasattr(select, "poll"):  # no FD_SETSIZE limit, unlike select()
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                return bool(poller.poll(0))
            readable, _, _ = select.select([fd], [], [], 0)
            return bool(readable)
        except Exception:
            # Cannot tell: a dead connection still fails its first statement.
            return False

    @staticmethod
    def cancel(conn: Any) -> None:
        """Ask the server to cancel the statement running on ``conn`` (safe from any thread)."""
        cancel_safe = getattr(conn, "cancel_safe", None)
        if cancel_safe is not None:
            cancel_safe()
        else:
            conn.cancel()

    @staticmethod
    def backend_pid(conn: Any) -> int:
        return int(conn.info.backend_pid)

    @staticmethod
    def constraint_name(exc: BaseException) -> Optional[str]:
        diag = getattr(exc, "diag", None)
        name = getattr(diag, "constraint_name", None)
        return str(name) if name else None

    #: the connection attribute that makes its transactions read-only
    readonly_attr = "read_only"

    def guard(self, conn: Any) -> tuple[Any, Any]:
        """Make the pool's own (unused) connection refuse writes; returns what :meth:`unguard` restores.

        Client-side settings only: they cost no round trip, and apply to the
        next transaction the connection begins. Autocommit is left first:
        psycopg 3 ignores read-only in autocommit mode, and psycopg2 would
        apply it with a SET round trip.
        """
        saved = (conn.autocommit, getattr(conn, self.readonly_attr))
        if saved[0]:
            conn.autocommit = False
        setattr(conn, self.readonly_attr, True)
        return saved

    def unguard(self, conn: Any, saved: tuple[Any, Any]) -> None:
        setattr(conn, self.readonly_attr, saved[1])
        if saved[0]:
            conn.autocommit = True


class _Psycopg2(Driver):
    readonly_attr = "readonly"

    def status(self, conn: Any) -> int:
        return int(conn.get_transaction_status())

    def make_physical(self, conn: Any) -> None:
        if conn.get_transaction_status() != IDLE:
            conn.rollback()
        conn.set_session(isolation_level="DEFAULT", readonly="DEFAULT", deferrable="DEFAULT", autocommit=False)

    def begin_outer(self, conn: Any) -> None:
        # After a textual ROLLBACK (rollback_outer), psycopg2 still believes it
        # is inside a transaction and would send the next statement without
        # BEGIN, in autocommit. Sending the BEGIN here costs the round trip
        # psycopg2 would have spent on its own BEGIN.
        if conn.status == _PSYCOPG2_STATUS_BEGIN and conn.get_transaction_status() == IDLE:
            self.execute(conn, "BEGIN")


class _Psycopg3(Driver):
    def status(self, conn: Any) -> int:
        return int(conn.pgconn.transaction_status)

    def forget_prepared(self, conn: Any) -> str:
        """Empty psycopg's prepared-statement cache, as its ``rollback()`` does; the DEALLOCATE it needs, if any.

        psycopg prepares a statement the sixth time it runs on a connection,
        and its ``rollback()`` forgets what it counted and deallocates what it
        prepared: a rolled-back transaction may have dropped or altered what
        a prepared statement refers to (after a rolled-back ``ALTER TABLE``, a
        prepared ``SELECT *`` fails with "cached plan must not change result
        type"). After a textual ``ROLLBACK`` it deallocates too, in a round
        trip of its own, but keeps the counts: the statements that every test
        runs once got prepared in every sixth test, used once, and deallocated.

        Here the cache is emptied before the rollback, and the ``DEALLOCATE
        ALL`` goes first in the rollback's own round trip. Prepared statements
        are not transactional, so it holds even when the deferred-constraint
        check after it fails. The cache is private to psycopg (``_prepared``,
        3.1 to 3.3); without it, psycopg handles the ``ROLLBACK`` as before.
        """
        return forget_psycopg_prepared(conn)

    def make_physical(self, conn: Any) -> None:
        if conn.pgconn.transaction_status != IDLE:
            conn.rollback()
        conn.autocommit = False
        conn.isolation_level = None
        conn.read_only = None
        conn.deferrable = None


def forget_psycopg_prepared(conn: Any) -> str:
    """:meth:`_Psycopg3.forget_prepared` for a psycopg 3 connection, sync or async."""
    manager = getattr(conn, "_prepared", None)
    clear = getattr(manager, "clear", None)
    if clear is None or not clear():
        return ""  # nothing was prepared; the counts are forgotten
    # clear() queued the DEALLOCATE ALL for after the next statement (3.2+: _to_flush, 3.1: _maint_commands).
    for name in ("_to_flush", "_maint_commands"):
        queue = getattr(manager, name, None)
        if queue is not None:
            queue.clear()
            return "DEALLOCATE ALL; "
    return ""


def _run_psycopg2(conn: Any, sql: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql)


def _run_psycopg3(conn: Any, sql: str) -> None:
    # prepare=False: a multi-statement string cannot be a prepared statement,
    # and psycopg would prepare a string it has seen five times.
    with conn.cursor() as cur:
        cur.execute(sql, prepare=False)


def _fetch_psycopg2(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    # psycopg2 keeps only the last result of a multi-statement string.
    with conn.cursor() as cur:
        cur.execute(sql)
        return list(cur.fetchall()) if cur.description is not None else []


def _fetch_psycopg3(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    # psycopg 3 keeps every result and shows the first: step to the last.
    with conn.cursor() as cur:
        cur.execute(sql, prepare=False)
        while cur.nextset():
            pass
        return list(cur.fetchall()) if cur.description is not None else []


_cache: dict[type, Driver | None] = {}


def driver_for(conn: Any) -> Driver | None:
    """The adapter for this DBAPI connection, or None for an unsupported driver."""
    cls = type(conn)
    try:
        return _cache[cls]
    except KeyError:
        pass
    found: Driver | None = None
    module = cls.__module__
    if module.startswith("psycopg2"):
        import psycopg2.errors

        found = _Psycopg2("psycopg2", psycopg2.errors.InFailedSqlTransaction, _run_psycopg2, _fetch_psycopg2)
    elif module.startswith("psycopg"):
        import psycopg

        if isinstance(conn, psycopg.Connection):
            found = _Psycopg3("psycopg", psycopg.errors.InFailedSqlTransaction, _run_psycopg3, _fetch_psycopg3)
    _cache[cls] = found
    return found
