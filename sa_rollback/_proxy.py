"""The DBAPI surface of a logical connection and its cursors.

SQLAlchemy (and any code holding ``engine.raw_connection()``) sees these in
place of the driver's connection. Anything not defined here is forwarded to
the physical connection or cursor, so driver-specific attributes keep working.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional, Protocol

from . import _queries
from ._aio import NOW
from ._classify import Kind, Statement, classify
from ._drivers import IDLE
from ._guard import PoolConnectionGuard
from ._history import ScopeLike
from ._logical import Logical
from ._physical import Physical
from ._sqla import await_
from .errors import TransactionEscapeError, UnsupportedOperationError, caller_location


def _sql_text(query: Any, cursor: Any) -> str:
    if isinstance(query, str):
        return query
    if isinstance(query, (bytes, bytearray, memoryview)):
        return bytes(query).decode("utf-8", "replace")
    as_string = getattr(query, "as_string", None)
    if as_string is not None:  # psycopg.sql / psycopg2.sql composables
        try:
            return str(as_string(cursor))
        except Exception:
            pass
    return str(query)


class _Transaction:
    """What psycopg 3's ``transaction()`` block yields."""

    def __init__(self, connection: LogicalConnection, savepoint_name: Optional[str]):
        self.connection = connection
        self.savepoint_name = savepoint_name


def _characteristic(name: str) -> Callable[[LogicalConnection], Any]:
    def get(self: LogicalConnection) -> Any:
        return self._settings.get(name)

    return get


def _set_characteristic(name: str) -> Callable[[LogicalConnection, Any], None]:
    def set_(self: LogicalConnection, value: Any) -> None:
        self._settings[name] = value

    return set_


class Adopted(Protocol):
    """How a connection the pool lent before the scope opened joins it (``_adoption.Adoption``)."""

    joined: bool
    real: Any

    def join(self, logical: LogicalConnection, action: str) -> None: ...

    def cursor(self, logical: LogicalConnection, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...


class LogicalConnection(Logical):
    """A pool checkout inside a rollback scope: a DBAPI connection with its own transaction."""

    __slots__ = ("_settings", "adoption", "async_facing", "guard")

    def __init__(self, phys: Physical, number: int, autocommit: bool, guard: Optional[PoolConnectionGuard] = None):
        super().__init__(phys, number, autocommit)
        self._settings: dict[str, Any] = {}
        #: the pool's own connection, which this one stands in for
        self.guard = guard
        #: set when the pool lent the connection before the scope opened
        self.adoption: Optional[Adopted] = None
        #: stands in for an async adapter on a sync shared connection (psycopg async)
        self.async_facing = False

    # -- the DBAPI ------------------------------------------------------------

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if self.adoption is not None:
            early = self.adoption.cursor(self, args, kwargs)
            if early is not None:
                return early
        if self._ended:
            raise self._closed_error()
        if self.async_facing:
            # SQLAlchemy's async API requires an await in each statement; the sync
            # connection has none. A done awaitable passes without letting other tasks in.
            await_(NOW)
        phys = self.phys
        if phys.broken:
            # Fail at execute, with the statement, rather than here, where
            # SQLAlchemy would wrap the error in a StatementError.
            return LogicalCursor(self, FailingCursor(phys.lost_error))
        return LogicalCursor(self, phys.conn.cursor(*args, **kwargs))

    def commit(self) -> None:
        adoption = self.adoption
        if adoption is not None and not adoption.joined:
            adoption.join(self, "commit")
        self._commit()

    def rollback(self) -> None:
        adoption = self.adoption
        if adoption is not None and not adoption.joined:
            adoption.join(self, "rollback")
        self._rollback()

    def close(self) -> None:
        self.phys.scopes.report(self.returned())
        guard = self.guard
        if guard is not None and guard.detached:
            # A detached connection owns its pool connection in production,
            # and closing it closes that.
            self.guard = None
            guard.close()

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        """psycopg 3's ``Connection.execute`` shortcut."""
        return self.cursor().execute(query, params, **kwargs)

    @property
    def closed(self) -> Any:
        return True if self._ended else self.phys.conn.closed

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._set_autocommit(bool(value))

    def _set_autocommit(self, value: bool) -> None:
        if value != self._autocommit and self._t.id is not None and not self._autocommit:
            # psycopg refuses this too; the application must end the transaction first.
            self._rollback()
        self._autocommit = value
        self._t.explicit_block = False

    def set_isolation_level(self, level: Any) -> None:
        """Recorded, not applied. psycopg2's level 0, and asyncpg's "autocommit", mean autocommit."""
        name = self.phys.driver.name
        if name == "psycopg2":
            self._set_autocommit(level == 0)
        elif name == "asyncpg":
            self._set_autocommit(level == "autocommit")
        self._settings["isolation_level"] = level

    # psycopg 3's method forms of the attributes
    def set_autocommit(self, value: bool) -> None:
        self._set_autocommit(bool(value))

    def set_read_only(self, value: Any) -> None:
        self._settings["read_only"] = value

    def set_deferrable(self, value: Any) -> None:
        self._settings["deferrable"] = value

    def reset(self) -> None:
        """psycopg2's ``reset()``: end the transaction; on the physical it would end the test's."""
        self._rollback()
        self._settings.clear()

    @contextmanager
    def transaction(self, savepoint_name: Optional[str] = None, force_rollback: bool = False) -> Iterator[Any]:
        """psycopg 3's ``transaction()`` block, on this logical connection.

        On the physical connection it would take savepoints behind
        sa_rollback's back, and its rollback would undo other connections'
        work.
        """
        in_txn = self._t.id is not None and (self._t.explicit_block or not self._autocommit)
        if in_txn or savepoint_name is not None:
            name = savepoint_name or f"_pg3_{self.phys.next_id()}"
            self.execute(f"SAVEPOINT {name}")
            try:
                yield _Transaction(self, name)
            except BaseException:
                self.execute(f"ROLLBACK TO SAVEPOINT {name}")
                self.execute(f"RELEASE SAVEPOINT {name}")
                raise
            if force_rollback:
                self.execute(f"ROLLBACK TO SAVEPOINT {name}")
            self.execute(f"RELEASE SAVEPOINT {name}")
            return
        if self._autocommit:
            self.execute("BEGIN")
        try:
            yield _Transaction(self, None)
        except BaseException:
            self.rollback()
            raise
        if force_rollback:
            self.rollback()
        else:
            self.commit()

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsupportedOperationError(
            "psycopg's pipeline mode cannot run on the connection a test shares: sa_rollback must see each "
            "statement's outcome before the next one. Run the statements one by one, or mark the test to run "
            "with real commits."
        )

    def set_session(
        self,
        isolation_level: Any = None,
        readonly: Any = None,
        deferrable: Any = None,
        autocommit: Any = None,
    ) -> None:
        if autocommit is not None:
            self._set_autocommit(bool(autocommit))
        for name, value in (("isolation_level", isolation_level), ("readonly", readonly), ("deferrable", deferrable)):
            if value is not None:
                self._settings[name] = value

    def tpc_begin(self, *args: Any, **kwargs: Any) -> None:
        raise UnsupportedOperationError(
            "Two-phase commit cannot run inside a rolled-back test transaction. Mark the test to run with real commits."
        )

    tpc_prepare = tpc_commit = tpc_rollback = tpc_recover = tpc_begin

    def __enter__(self) -> LogicalConnection:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    # isolation_level, read_only, readonly, deferrable: a shared transaction
    # has one set of characteristics, so per-connection values are kept for
    # the application to read back, and not applied. Properties rather than a
    # __setattr__ override, which would slow down every attribute the
    # statement path sets.
    isolation_level = property(_characteristic("isolation_level"), _set_characteristic("isolation_level"))
    read_only = property(_characteristic("read_only"), _set_characteristic("read_only"))
    readonly = property(_characteristic("readonly"), _set_characteristic("readonly"))
    deferrable = property(_characteristic("deferrable"), _set_characteristic("deferrable"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.phys.conn, name)

    # -- statement dispatch -----------------------------------------------------

    def run_statement(
        self,
        cursor: Any,
        fn: Callable[..., Any],
        query: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        write: Optional[bool],
    ) -> Any:
        """Run one statement of the application with the undo-point rules around it."""
        sql = _sql_text(query, cursor)
        stmt = classify(sql)
        kind = stmt.kind
        phys = self.phys
        recording = _queries.active  # sa_queries: the one read it costs when nobody asked
        if recording is not None:
            fn = recording.record(sql, args, phys.key.dbname, fn)
        scopes = phys.scopes
        top = scopes.top
        lock = phys.lock
        timeout = scopes.lock_timeout if top is None else top.lock_timeout
        if lock.stuck is not None:
            timeout = lock.wait_for(timeout)
        raw = lock.raw
        if not raw.acquire(True, timeout):
            raise lock.timeout_error(timeout, "to run a statement")
        lock.stuck = None
        try:
            if kind is Kind.READ or kind is Kind.WRITE or write is not None:
                frame = self._prepare(top)
                if phys.streaming:
                    raise phys.busy_error(self)
                auto = self._autocommit and not self._t.explicit_block
                try:
                    if phys.aborted_by is not self:
                        self._ensure_undo(frame)
                    result = fn(query, *args, **kwargs)
                except BaseException:
                    self.failed()
                    if auto:
                        scopes.report(self._undo_txn())
                    raise
                if phys.driver.status(phys.conn) == IDLE:
                    error = phys.escaped(sql, self)
                    scopes.report(error)
                    raise error
                if write is None:
                    if kind is not Kind.READ:
                        self._wrote(frame, sql)
                        if stmt.schema:
                            frame.schema = phys.schema_changed = True
                elif write:
                    self._wrote(frame, sql)
                if auto:
                    self._end_txn()
                return result
            return self._control(cursor, fn, query, args, kwargs, sql, stmt, top)
        finally:
            raw.release()

    def _control(
        self,
        cursor: Any,
        fn: Callable[..., Any],
        query: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        sql: str,
        stmt: Statement,
        top: Optional[ScopeLike],
    ) -> Any:
        """Statements that control the transaction, emulated per logical connection."""
        kind = stmt.kind
        if kind is Kind.COMMIT:
            self._commit()
            return None
        if kind is Kind.ROLLBACK:
            self._rollback()
            return None
        if kind is Kind.ESCAPE:
            error = TransactionEscapeError(
                f"{sql[:200]!r} on {self.describe()} ends the transaction in the middle of a "
                f"multi-statement string ({caller_location()}). Inside a test that would commit or "
                "discard everything the test wrote so far, for every connection; it was not run. "
                "Run the statements one by one and end the transaction with connection.commit() / "
                "session.commit(), or a lone COMMIT."
            )
            self.phys.scopes.report(error)
            raise error
        if kind is Kind.TWO_PHASE:
            raise UnsupportedOperationError(
                f"{sql!r}: two-phase commit cannot run inside a rolled-back test transaction."
            )
        phys = self.phys
        frame = self._prepare(top, control=kind is Kind.ROLLBACK_TO)
        if phys.streaming:
            raise phys.busy_error(self)
        aborted = phys.aborted_by is self
        try:
            if kind is Kind.SAVEPOINT and not aborted:
                self._user_savepoint(frame, stmt.name)
                return None
            if kind is Kind.RELEASE and not aborted and self._user_release(stmt.name):
                return None
            if kind is Kind.ROLLBACK_TO and self._user_rollback_to(frame, stmt.name):
                return None
            if kind is Kind.BEGIN:
                if self._autocommit:
                    self._t.explicit_block = True
                return None
            if kind is Kind.TXN_SETTING:
                # One shared transaction has one set of characteristics; making
                # it read-only or serializable would change every connection.
                return None
            # An unknown savepoint name, or a savepoint statement in an aborted
            # transaction: PostgreSQL gives the production error.
            return fn(query, *args, **kwargs)
        except BaseException:
            self.failed()
            raise


def _held_rows(conn: LogicalConnection, rows: Iterator[Any]) -> Iterator[Any]:
    # psycopg holds its connection lock from the first row to the last: hold
    # ours as long, so that other threads wait for it with a timeout.
    with conn.phys.held(conn):
        yield from rows


class FailingCursor:
    """Stands in for a cursor whose statements must fail: its connection died, or may not run them."""

    def __init__(self, error: Callable[[], BaseException] | BaseException):
        self._error = error

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            error = self._error
            raise error if isinstance(error, BaseException) else error()

        return fail


class LogicalCursor:
    """A driver cursor whose statements go through the logical connection's rules."""

    __slots__ = ("_conn", "_cursor")

    def __init__(self, conn: LogicalConnection, cursor: Any):
        object.__setattr__(self, "_conn", conn)
        object.__setattr__(self, "_cursor", cursor)

    @property
    def connection(self) -> LogicalConnection:
        conn: LogicalConnection = object.__getattribute__(self, "_conn")
        return conn

    def _result(self, result: Any) -> Any:
        return self if result is self._cursor else result

    def execute(self, query: Any, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        cursor = self._cursor
        return self._result(self._conn.run_statement(cursor, cursor.execute, query, (params, *args), kwargs, None))

    def executemany(self, query: Any, params_seq: Any, *args: Any, **kwargs: Any) -> Any:
        cursor = self._cursor
        result = self._conn.run_statement(cursor, cursor.executemany, query, (params_seq, *args), kwargs, True)
        return self._result(result)

    def callproc(self, procname: str, *args: Any, **kwargs: Any) -> Any:
        cursor = self._cursor
        return self._conn.run_statement(cursor, cursor.callproc, procname, args, kwargs, True)

    # psycopg2's COPY methods
    def copy_from(self, file: Any, table: str, *args: Any, **kwargs: Any) -> Any:
        cursor = self._cursor
        return self._conn.run_statement(
            cursor, lambda q, *a, **k: cursor.copy_from(file, table, *a, **k), f"COPY {table}", args, kwargs, True
        )

    def copy_to(self, file: Any, table: str, *args: Any, **kwargs: Any) -> Any:
        cursor = self._cursor
        return self._conn.run_statement(
            cursor, lambda q, *a, **k: cursor.copy_to(file, table, *a, **k), f"COPY {table}", args, kwargs, False
        )

    def copy_expert(self, sql: str, file: Any, *args: Any, **kwargs: Any) -> Any:
        cursor = self._cursor
        reads = " TO " in sql.upper()
        return self._conn.run_statement(
            cursor, lambda q, *a, **k: cursor.copy_expert(q, file, *a, **k), sql, args, kwargs, not reads
        )

    # psycopg 3's COPY and streaming
    @contextmanager
    def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        cursor = self._cursor
        conn = self._conn
        reads = " TO " in _sql_text(statement, cursor).upper()
        # psycopg holds its connection lock for the whole block; hold ours as
        # long, so that other threads wait for it with a timeout.
        manager = conn.run_statement(cursor, cursor.copy, statement, (params,), kwargs, not reads)
        with conn.phys.held(conn), manager as copy:
            yield copy

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        cursor = self._cursor
        conn = self._conn
        return _held_rows(conn, conn.run_statement(cursor, cursor.stream, query, (params,), kwargs, None))

    def close(self) -> None:
        self._cursor.close()

    async def _async_soft_close(self) -> None:
        # SQLAlchemy's async results call it; a sync cursor (psycopg async sharing the
        # sync connection) has fetched its rows already.
        inner = getattr(self._cursor, "_async_soft_close", None)
        if inner is not None:
            await inner()

    def __enter__(self) -> LogicalCursor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._cursor.close()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cursor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._cursor, name, value)
