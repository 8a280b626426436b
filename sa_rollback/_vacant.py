"""What a pool record holds while its connection serves as the shared one: a placeholder.

Inside a scope, a checkout from a pool that lends each record to one checkout at
a time (``QueuePool``, ``NullPool``, and their async forms) does not keep a
server connection of its own. With a sync driver, the first one gives its
connection to the database's shared connection, since it has passed the
dialect's and the application's connect hooks; a later one, from a record of its
own, has its connection closed. An async engine's checkout always has it closed
(the shared connection is made apart: per event loop for asyncpg, a sync one
over the libpq connection for psycopg). The record keeps a :class:`Vacant`
instead, so that the worker holds one server connection per database, plus what
is checked out outside every scope.

A record holding a placeholder is checked out inside scopes as before (the
logical connection stands in). A checkout outside every scope gives it a real
connection again, made the pool's way (``_listeners``). The pool may close it
(recycle, ``dispose``, invalidation): that closes nothing real.

The placeholder is what ``driver_connection`` returns inside a scope: the pool's
own connection, which sees only committed data and is read-only for the time.
Used for anything but the pool's pre-ping, it becomes one: it connects through a
private record of the pool, read-only, and forwards to that connection until
the checkout ends (:class:`~._guard.PoolConnectionGuard` closes it then).

An async engine's placeholder can connect only inside SQLAlchemy's greenlet,
where the adapter's methods may wait (``run_sync``, the pool's own calls), and
what it becomes is not made read-only (setting that on an adapter awaits).
Outside it (``driver_connection`` read in a coroutine) an attribute it does
not have raises :class:`~.errors.UnsupportedOperationError`, saying why,
instead of connecting. What the pool calls on it without a checkout (asyncpg's
``ping()`` and ``terminate()``, psycopg's ``set_autocommit()`` and the like at
check-in) is answered without a connection, as for a sync one.
"""

from __future__ import annotations

from typing import Any

from ._sqla import dialect_of, in_greenlet, private_record
from .errors import UnsupportedOperationError

#: the statements of SQLAlchemy's pre-ping (``_dialect_specific_select_one``: psycopg2, psycopg)
_PINGS = frozenset({"SELECT 1", ";"})


class Vacant:
    """A pool record's place holder; becomes a read-only real connection if the application uses it."""

    __slots__ = ("__weakref__", "_async", "_autocommit", "_closed", "_driver", "_pool", "_record")

    #: not a server connection: whoever walks the pools' records skips it (``_sqla.pooled_connections``)
    placeholder = True

    def __init__(self, pool: Any, driver: Any, autocommit: bool) -> None:
        _set = object.__setattr__
        _set(self, "_pool", pool)
        _set(self, "_driver", driver)
        _set(self, "_record", None)
        _set(self, "_closed", False)
        _set(self, "_autocommit", autocommit)
        _set(self, "_async", bool(dialect_of(pool).is_async))

    @property
    def driver(self) -> Any:
        """The driver of the connection it stands for (the record's own kind: an async adapter's for an async pool)."""
        return self._driver

    @property
    def autocommit(self) -> Any:
        """Read and set by SQLAlchemy's pre-ping (the logical connection has its own)."""
        real = self.real
        return self._autocommit if real is None else real.autocommit

    def __setattr__(self, name: str, value: Any) -> None:
        # The pool resets what a checkout changed (isolation level, read-only)
        # on its record's connection at check-in; on a placeholder there is
        # nothing to reset, and connecting for it would defeat the purpose.
        real = self.real
        if name == "autocommit":
            object.__setattr__(self, "_autocommit", value)
        if real is not None:
            setattr(real, name, value)

    @property
    def real(self) -> Any:
        """The read-only connection it became, or None."""
        record = self._record
        return None if record is None else record.dbapi_connection

    def materialize(self) -> Any:
        """The read-only connection this stands for, connected on first need."""
        real = self.real
        if real is None:
            record = private_record(self._pool)
            object.__setattr__(self, "_record", record)
            real = record.dbapi_connection
            self._driver.guard(real)  # not part of the test's transaction: nothing is committed through it
        return real

    def vacate(self) -> None:
        """Close the connection it became, if any (the checkout that used it has ended)."""
        record = self._record
        object.__setattr__(self, "_record", None)
        if record is not None:
            try:
                record.close()
            except Exception:
                pass  # a broken connection: nothing to keep

    @property
    def closed(self) -> Any:
        real = self.real
        return real.closed if real is not None else int(self._closed)

    def cursor(self, *args: Any, **kwargs: Any) -> VacantCursor:
        return VacantCursor(self, args, kwargs)

    def commit(self) -> None:
        real = self.real
        if real is not None:
            real.commit()

    def rollback(self) -> None:
        # The pool's reset-on-return of a checkout collected without close() lands here.
        real = self.real
        if real is not None:
            real.rollback()

    def close(self) -> None:
        """The pool closes its record's connection (recycle, dispose, invalidate): nothing shared is closed."""
        self.vacate()
        object.__setattr__(self, "_closed", True)

    def terminate(self) -> None:
        """asyncpg's: the pool's close of a garbage-collected checkout, or of a recycled or invalidated record."""
        self.close()

    def ping(self) -> None:
        """asyncpg's pre-ping: a placeholder has nothing to ping."""
        real = self.real
        if real is not None:
            real.ping()

    def set_isolation_level(self, level: Any) -> None:
        """psycopg2's, called by the pool's reset of a checkout's isolation level."""
        real = self.real
        if real is not None:
            real.set_isolation_level(level)

    def set_session(self, *args: Any, **kwargs: Any) -> None:
        real = self.real
        if real is not None:
            real.set_session(*args, **kwargs)

    # psycopg's async adapter: the pool's reset of what a checkout changed, at check-in
    def set_autocommit(self, value: Any) -> None:
        object.__setattr__(self, "_autocommit", value)
        real = self.real
        if real is not None:
            real.set_autocommit(value)

    def set_read_only(self, value: Any) -> None:
        real = self.real
        if real is not None:
            real.set_read_only(value)

    def set_deferrable(self, value: Any) -> None:
        real = self.real
        if real is not None:
            real.set_deferrable(value)

    def __getattr__(self, name: str) -> Any:
        if self._async and self.real is None and not in_greenlet():
            if name.startswith("__"):
                raise AttributeError(name)  # a protocol probe (copy, repr helpers): nothing to connect for
            # Not an AttributeError: SQLAlchemy's driver_connection is a property, and Python would
            # take one raised inside it for "no such property" and ask the checkout proxy's
            # __getattr__, which answers from the shared connection.
            raise UnsupportedOperationError(
                f"sa_rollback: inside a test, an async engine's pool record holds no connection of its own "
                f"({name!r} was asked of it), and one can be connected for it only inside SQLAlchemy's "
                "greenlet, as in a function passed to AsyncConnection.run_sync. driver_connection is the "
                "pool's own connection, outside the test's transaction: use the SQLAlchemy connection, "
                "which joins it, or driver_connection outside tests."
            )
        return getattr(self.materialize(), name)


class VacantCursor:
    """A placeholder's cursor: answers the pool's pre-ping itself, runs anything else on the real connection."""

    __slots__ = ("_args", "_cursor", "_kwargs", "_owner", "_pinged")

    def __init__(self, owner: Vacant, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._owner = owner
        self._args = args
        self._kwargs = kwargs
        self._pinged = False
        real = owner.real
        self._cursor = None if real is None else real.cursor(*args, **kwargs)

    def _real(self) -> Any:
        if self._cursor is None:
            self._cursor = self._owner.materialize().cursor(*self._args, **self._kwargs)
        return self._cursor

    def execute(self, sql: Any, *args: Any, **kwargs: Any) -> Any:
        if self._cursor is None and not args and not kwargs and isinstance(sql, str) and sql.strip() in _PINGS:
            self._pinged = True
            return self
        self._pinged = False
        return self._real().execute(sql, *args, **kwargs)

    def fetchone(self) -> Any:
        return (1,) if self._pinged else self._real().fetchone()

    def fetchall(self) -> Any:
        return [(1,)] if self._pinged else self._real().fetchall()

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()

    def __enter__(self) -> VacantCursor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real(), name)
