"""The DBAPI surface of a logical connection and its cursors.

SQLAlchemy (and any code holding ``engine.raw_connection()``) sees these in
place of the driver's connection. Anything not defined here is forwarded to
the physical connection or cursor, so driver-specific attributes keep working.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable, Optional

from ._classify import Kind, classify
from ._drivers import IDLE
from ._state import STATE
from ._transaction import Logical, Physical
from .errors import UnsupportedOperationError


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


class LogicalConnection(Logical):
    """A pool checkout inside a rollback scope: a DBAPI connection with its own transaction."""

    __slots__ = ("_settings",)

    def __init__(self, phys: Physical, number: int, autocommit: bool):
        super().__init__(phys, number, autocommit)
        self._settings: dict[str, Any] = {}

    # -- the DBAPI ------------------------------------------------------------

    def cursor(self, *args: Any, **kwargs: Any) -> LogicalCursor:
        if self._ended:
            raise self._closed_error()
        return LogicalCursor(self, self._phys.conn.cursor(*args, **kwargs))

    def commit(self) -> None:
        self._commit()

    def rollback(self) -> None:
        self._rollback()

    def close(self) -> None:
        STATE.report(self._returned())

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        """psycopg 3's ``Connection.execute`` shortcut."""
        return self.cursor().execute(query, params, **kwargs)

    @property
    def closed(self) -> Any:
        return True if self._ended else self._phys.conn.closed

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._set_autocommit(bool(value))

    def _set_autocommit(self, value: bool) -> None:
        if value != self._autocommit and self._txn is not None and not self._autocommit:
            # psycopg refuses this too; the application must end the transaction first.
            self._rollback()
        self._autocommit = value
        self._explicit_block = False

    def set_isolation_level(self, level: int) -> None:
        """psycopg2: level 0 is autocommit; other levels are recorded, not applied."""
        self._set_autocommit(level == 0)
        self._settings["isolation_level"] = level

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

    def __getattr__(self, name: str) -> Any:
        # isolation_level, read_only, readonly, deferrable: a shared transaction
        # has one set of characteristics, so per-connection values are kept
        # for the application to read back, and not applied.
        settings = self._settings
        if name in settings:
            return settings[name]
        if name in _CHARACTERISTICS:
            return None
        return getattr(self._phys.conn, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CHARACTERISTICS:
            self._settings[name] = value
        else:
            object.__setattr__(self, name, value)

    # -- statement dispatch -----------------------------------------------------

    def _run(
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
        phys = self._phys
        with phys.lock:
            frame = self._prepare(STATE.top)
            if kind is Kind.READ or kind is Kind.WRITE or write is not None:
                is_write = kind is not Kind.READ if write is None else write
                auto = self._autocommit and not self._explicit_block
                if phys.aborted_by is not self:
                    self._ensure_undo(frame)
                try:
                    result = fn(query, *args, **kwargs)
                except BaseException:
                    self._failed()
                    if auto:
                        STATE.report(self._undo_txn())
                    raise
                if phys.driver.status(phys.conn) == IDLE:
                    error = phys.escaped(sql, self)
                    STATE.report(error)
                    raise error
                if is_write:
                    self._wrote(frame, sql)
                if auto:
                    self._end_txn()
                return result
            aborted = phys.aborted_by is self
            if kind is Kind.SAVEPOINT and not aborted:
                self._user_savepoint(frame, stmt.name)
                return None
            if kind is Kind.RELEASE and not aborted and self._user_release(stmt.name):
                return None
            if kind is Kind.ROLLBACK_TO and self._user_rollback_to(frame, stmt.name):
                return None
            if kind is Kind.BEGIN:
                if self._autocommit:
                    self._explicit_block = True
                return None
            if kind is Kind.COMMIT:
                self._commit()
                return None
            if kind is Kind.ROLLBACK:
                self._rollback()
                return None
            if kind is Kind.TWO_PHASE:
                raise UnsupportedOperationError(
                    f"{sql!r}: two-phase commit cannot run inside a rolled-back test transaction."
                )
            # An unknown savepoint name, or a savepoint statement in an aborted
            # transaction: PostgreSQL gives the production error.
            try:
                return fn(query, *args, **kwargs)
            except BaseException:
                self._failed()
                raise


_CHARACTERISTICS = frozenset({"isolation_level", "read_only", "readonly", "deferrable"})


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
        return self._result(self._conn._run(cursor, cursor.execute, query, (params, *args), kwargs, None))

    def executemany(self, query: Any, params_seq: Any, *args: Any, **kwargs: Any) -> Any:
        cursor = self._cursor
        return self._result(self._conn._run(cursor, cursor.executemany, query, (params_seq, *args), kwargs, True))

    def callproc(self, procname: str, *args: Any, **kwargs: Any) -> Any:
        cursor = self._cursor
        return self._conn._run(cursor, cursor.callproc, procname, args, kwargs, True)

    # psycopg2's COPY methods
    def copy_from(self, file: Any, table: str, *args: Any, **kwargs: Any) -> Any:
        cursor = self._cursor
        return self._conn._run(
            cursor, lambda q, *a, **k: cursor.copy_from(file, table, *a, **k), f"COPY {table}", args, kwargs, True
        )

    def copy_to(self, file: Any, table: str, *args: Any, **kwargs: Any) -> Any:
        cursor = self._cursor
        return self._conn._run(
            cursor, lambda q, *a, **k: cursor.copy_to(file, table, *a, **k), f"COPY {table}", args, kwargs, False
        )

    def copy_expert(self, sql: str, file: Any, *args: Any, **kwargs: Any) -> Any:
        cursor = self._cursor
        reads = " TO " in sql.upper()
        return self._conn._run(
            cursor, lambda q, *a, **k: cursor.copy_expert(q, file, *a, **k), sql, args, kwargs, not reads
        )

    # psycopg 3's COPY and streaming
    def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        cursor = self._cursor
        reads = " TO " in _sql_text(statement, cursor).upper()
        # The COPY itself runs when the returned context manager is entered;
        # the undo point is taken now, which is what matters.
        return self._conn._run(cursor, cursor.copy, statement, (params,), kwargs, not reads)

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        cursor = self._cursor
        return self._conn._run(cursor, cursor.stream, query, (params,), kwargs, None)

    def close(self) -> None:
        self._cursor.close()

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
