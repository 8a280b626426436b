"""Async engines: the drivers behind SQLAlchemy's asyncio adapters, a task-aware lock, and loops.

An async engine's pool hands out SQLAlchemy's adapter (``AsyncAdapt_asyncpg_connection``,
``AsyncAdapt_psycopg_connection``): a DBAPI-shaped object whose methods wait
for the driver's coroutines inside SQLAlchemy's greenlet. The checkout
listener runs in that greenlet, so a logical connection can stand in for the
adapter as it does for a sync driver's connection.

What differs, and is handled here:

* The driver's connection belongs to the event loop it was made in (asyncpg
  fails in any other). So the shared connection is made per (database, loop),
  lazily inside the loop, and rolled back and closed before the loop closes.
* The adapter runs in autocommit mode: sa_rollback sends ``BEGIN`` itself, and
  the adapter never opens a transaction of its own on the shared connection.
* sa_rollback's own statements go through the driver's connection: awaited in
  the greenlet when one runs, or on the connection's loop when the loop is idle
  (a scope closing in a pytest teardown).
* Tasks of one loop share a thread, so the shared connection's lock is held
  per task, not per thread (:class:`TaskLock`).
* asyncpg does not say whether a transaction is aborted; the driver keeps
  track (:meth:`AsyncpgDriver.note_failure`).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Optional

from ._drivers import IDLE, INERROR, INTRANS, DatabaseKey, Driver, driver_for
from ._sequences import plain_only
from ._sqla import await_, forget_prepared_statements, in_greenlet
from .errors import ConfigurationError


class _Now:
    """An awaitable that is done at once: awaiting it switches greenlets but never yields to the loop."""

    def __await__(self) -> Any:
        return iter(())


NOW = _Now()


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _owner() -> Any:
    """Who takes a lock here: the running task, or the thread when no loop runs in it."""
    if _running_loop() is not None:
        task = asyncio.current_task()
        if task is not None:
            return task
    return threading.get_ident()


def _name(owner: Any) -> str:
    if isinstance(owner, asyncio.Task):
        return f"task {owner.get_name()!r}"
    for thread in threading.enumerate():
        if thread.ident == owner:
            return f"thread {thread.name!r}"
    return "another thread"


class TaskLock:
    """A re-entrant lock held by an asyncio task, or by a thread where no loop runs.

    ``threading.RLock`` lets every task of one thread in at once. This lock
    makes a second task wait, without blocking the loop, for the first to
    finish its statement. A waiter outside a greenlet (sync code) cannot wait
    without blocking the holder, so it gets ``False`` at once.
    """

    __slots__ = ("count", "owner", "waiters")

    def __init__(self) -> None:
        self.owner: Any = None
        self.count = 0
        self.waiters: deque[tuple[Any, asyncio.Future[None]]] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = _owner()
        if self.owner is None:
            self.owner = me
            self.count = 1
            return True
        if self.owner is me:
            self.count += 1
            return True
        if not blocking or not in_greenlet():
            return False
        loop = asyncio.get_running_loop()
        deadline = None if timeout < 0 else time.monotonic() + timeout
        while self.owner is not None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            waiter: asyncio.Future[None] = loop.create_future()
            entry = (me, waiter)
            self.waiters.append(entry)
            try:
                await_(asyncio.wait_for(asyncio.shield(waiter), remaining))
            except asyncio.TimeoutError:
                return False if self.owner is not None else self._take(me)
            finally:
                try:
                    self.waiters.remove(entry)
                except ValueError:
                    pass
        return self._take(me)

    def _take(self, me: Any) -> bool:
        self.owner = me
        self.count = 1
        return True

    def release(self) -> None:
        self.count -= 1
        if self.count:
            return
        self.owner = None
        for _, waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
                break

    def holder(self) -> str:
        """Who holds the lock and who waits for it, for the timeout message."""
        me = _owner()
        waiting = [_name(me)] + [_name(owner) for owner, _ in self.waiters if owner is not me]
        held = _name(self.owner) if self.owner is not None else "nobody"
        return f"{held} (waiting: {', '.join(waiting)})"


def run(loop: asyncio.AbstractEventLoop, awaitable: Any, what: str) -> Any:
    """Wait for ``awaitable`` from sync code: in SQLAlchemy's greenlet, or on ``loop`` while it is idle."""
    if in_greenlet():
        return await_(awaitable)
    if loop.is_closed():
        awaitable.close()
        raise ConnectionError(f"sa_rollback cannot {what}: the event loop of its async connection is closed")
    if _running_loop() is not None:
        awaitable.close()
        raise ConfigurationError(
            f"sa_rollback cannot {what} from synchronous code while an event loop runs: the async "
            "connection can only be awaited. Inside a coroutine, use 'async with rollback_scope()'."
        )
    return loop.run_until_complete(awaitable)


#: loops whose close() is wrapped: loop -> what to run first
_closing: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Callable[[], None]]] = weakref.WeakKeyDictionary()


def before_close(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run ``callback`` when ``loop.close()`` is called, before the loop closes.

    asyncio has no hook for this, so the loop's ``close`` is wrapped on the
    instance. pytest-asyncio and anyio close their loops through
    ``asyncio.Runner``, which calls it with the loop idle: the callback can
    still run coroutines on it.
    """
    callbacks = _closing.get(loop)
    if callbacks is not None:
        callbacks.append(callback)
        return
    callbacks = _closing[loop] = [callback]
    original = loop.close

    def close() -> None:
        try:
            while callbacks:
                callbacks.pop(0)()
        finally:
            original()

    try:
        loop.close = close  # type: ignore[method-assign]
    except (AttributeError, TypeError):
        # A loop without instance attributes (uvloop): its connections stay
        # until the end of the run, and their transactions with them.
        del _closing[loop]


class _AdapterDriver(Driver):
    """A driver behind SQLAlchemy's asyncio adapter: the pool's own connection is left as it is.

    Making it read-only would set the adapter's characteristics, which awaits.
    """

    def guard(self, conn: Any) -> tuple[Any, Any]:
        return (None, None)

    def unguard(self, conn: Any, saved: tuple[Any, Any]) -> None:
        pass


class AsyncDriver(_AdapterDriver):
    """A driver reached through SQLAlchemy's asyncio adapter."""

    per_loop = True

    def raw(self, conn: Any) -> Any:
        """The driver's own connection behind the adapter."""
        return conn._connection  # noqa: SLF001  (the adapter's documented-by-use attribute)

    def new_lock(self) -> Any:
        return TaskLock()

    def make_physical(self, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        # The adapters have __slots__; the loop is kept on the driver connection.
        self._loops[id(conn)] = loop
        conn.autocommit = True

    def __init__(self, name: str, in_failed: type[Exception]) -> None:
        super().__init__(name, in_failed, self._execute)
        self._loops: dict[int, asyncio.AbstractEventLoop] = {}

    def loop_of(self, conn: Any) -> asyncio.AbstractEventLoop:
        return self._loops[id(conn)]

    def _execute(self, conn: Any, sql: str) -> None:
        run(self.loop_of(conn), self.raw(conn).execute(sql), "run its statements")

    def begin_outer(self, conn: Any) -> None:
        self.execute(conn, "BEGIN")

    def rollback(self, conn: Any) -> None:
        if self.status(conn) != IDLE:
            self.execute(conn, "ROLLBACK")

    def restart(self, conn: Any) -> None:
        self.execute(conn, "ROLLBACK; BEGIN")

    def rollback_outer(self, conn: Any, check_deferred: bool, probe: str = "") -> list[tuple[Any, ...]]:
        # No probe: these drivers cannot fetch (can_fetch is False), so none is asked for.
        forget = self.forget_prepared(conn)
        if not check_deferred:
            self.execute(conn, forget + "ROLLBACK")
            return []
        try:
            self.execute(conn, forget + "SET CONSTRAINTS ALL IMMEDIATE; ROLLBACK")
        except BaseException:
            if not self.closed(conn):
                self.execute(conn, "ROLLBACK")
            raise
        return []

    def dead(self, conn: Any) -> bool:
        return self.closed(conn)

    @staticmethod
    def cancel(conn: Any) -> None:
        pass

    def abort_if_foreign(self, conn: Any) -> None:
        """The pool is about to close its connection ``conn`` from the running loop.

        One made in another loop (a wider fixture's, outside the tests) cannot
        be closed there: asyncpg would wait on the other loop's futures, and the
        pool would log the failure. It is aborted instead, which needs no loop;
        the pool's close then finds it closed.
        """
        if self.made_in(conn) is _running_loop():
            return
        try:
            self.raw(conn).terminate()
        except Exception:
            pass  # its loop is closed: asyncpg marks it closed before it asks the loop anything

    def made_in(self, conn: Any) -> Optional[asyncio.AbstractEventLoop]:
        """The loop the driver connection behind adapter ``conn`` belongs to."""
        loop: Optional[asyncio.AbstractEventLoop] = getattr(self.raw(conn), "_loop", None)  # no public copy
        return loop

    def close_on(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Close pool connection ``conn`` on its ``loop``, which is closing, idle: no later loop could."""
        raw = self.raw(conn)
        try:
            run(loop, raw.close(), "close a pool connection")
        except Exception:
            try:
                raw.terminate()
            except Exception:
                pass

    def close_connection(self, conn: Any) -> None:
        """Close the driver connection on its own loop (the loop is about to close)."""
        try:
            run(self.loop_of(conn), self.raw(conn).close(), "close its connection")
        finally:
            self._loops.pop(id(conn), None)


class AsyncpgDriver(AsyncDriver):
    def __init__(self, in_failed: type[Exception]) -> None:
        super().__init__("asyncpg", in_failed)
        #: ids of driver connections whose transaction a failed statement aborted
        self._aborted: set[int] = set()

    def key(self, conn: Any) -> DatabaseKey:
        raw = self.raw(conn)
        addr = raw._addr  # noqa: SLF001  (asyncpg keeps no public copy)
        params = raw._params  # noqa: SLF001
        host, port = (addr[0], addr[1]) if isinstance(addr, tuple) else (addr, "")
        return DatabaseKey(self.name, str(host), str(port), str(params.database), str(params.user))

    def status(self, conn: Any) -> int:
        raw = self.raw(conn)
        if not raw.is_in_transaction():
            self._aborted.discard(id(raw))
            return IDLE
        return INERROR if id(raw) in self._aborted else INTRANS

    def note_failure(self, conn: Any) -> None:
        raw = self.raw(conn)
        if raw.is_in_transaction():
            self._aborted.add(id(raw))

    def _execute(self, conn: Any, sql: str) -> None:
        raw = self.raw(conn)
        try:
            run(self.loop_of(conn), raw.execute(sql), "run its statements")
        except BaseException:
            if raw.is_in_transaction():
                self._aborted.add(id(raw))
            raise
        if "ROLLBACK" in sql:
            self._aborted.discard(id(raw))

    def schema_undone(self, conn: Any) -> None:
        """Empty SQLAlchemy's statement cache on the adapter, and asyncpg's caches.

        SQLAlchemy keeps each statement prepared on the connection, and renews
        its cache after DDL that it compiled itself, not after a rollback: a
        ``SELECT *`` prepared after a rolled-back ``ALTER TABLE`` would fail in
        the next test with ``InvalidCachedStatementError``.
        """
        forget_prepared_statements(conn)
        run(self.loop_of(conn), self.raw(conn).reload_schema_state(), "forget its prepared statements")

    @staticmethod
    def closed(conn: Any) -> bool:
        return bool(conn._connection.is_closed())  # noqa: SLF001

    @staticmethod
    def backend_pid(conn: Any) -> int:
        return int(conn._connection.get_server_pid())  # noqa: SLF001


class _SyncView:
    """Stands for the pool record of a shared connection made sync over an async one's libpq connection."""

    def __init__(self, record: Any, conn: Any) -> None:
        self.record = record  # keeps the async connection object alive as long as the libpq one
        self.conn = conn

    def close(self) -> None:
        # The async connection closes with it: they share the libpq connection.
        self.conn.close()
        self.record = None


class PsycopgAsyncDriver(_AdapterDriver):
    """psycopg 3's async mode: its checkouts share the sync psycopg connection of the database.

    psycopg can put a sync ``Connection`` over the libpq connection of an
    ``AsyncConnection``; both are one backend, in one transaction. So an async
    engine's checkout joins the same shared connection as a sync engine's on
    that database, and each sees what the other committed. Its statements run
    through the sync connection: they block the event loop while they run,
    which a test does not notice, and tasks then take turns without a
    task-aware lock. No connection is tied to a loop.
    """

    async_facing = True

    def __init__(self, in_failed: type[Exception]) -> None:
        super().__init__("psycopg", in_failed, lambda conn, sql: None)

    @staticmethod
    def _aconn(conn: Any) -> Any:
        return conn._connection  # noqa: SLF001  (the adapter's documented-by-use attribute)

    def key(self, conn: Any) -> DatabaseKey:
        info = self._aconn(conn).info
        return DatabaseKey(self.name, str(info.host), str(info.port), str(info.dbname), str(info.user))

    def status(self, conn: Any) -> int:
        return int(self._aconn(conn).pgconn.transaction_status)

    @staticmethod
    def closed(conn: Any) -> bool:
        return bool(conn.closed)

    def physical_side(self, conn: Any, record: Any) -> tuple[Any, Any, Driver]:
        import psycopg

        aconn = self._aconn(conn)
        sync = psycopg.Connection(aconn.pgconn)
        try:
            # The dialect configured its types (json, ranges, hstore) on the async connection.
            from psycopg.adapt import AdaptersMap

            sync._adapters = AdaptersMap(aconn.adapters)  # noqa: SLF001  (no public setter)
        except Exception:
            pass
        driver = driver_for(sync)
        assert driver is not None
        plain_only(sync)  # the async connection's own prepared statements are not seen from it
        return sync, _SyncView(record, sync), driver


_cache: dict[type, Optional[Driver]] = {}


def async_driver_for(conn: Any) -> Optional[Driver]:
    """The driver behind SQLAlchemy's asyncio adapter ``conn``, or None."""
    cls = type(conn)
    try:
        return _cache[cls]
    except KeyError:
        pass
    found: Optional[Driver] = None
    name = cls.__name__
    dbapi = getattr(conn, "dbapi", None)
    # SQLAlchemy's adapted DBAPI module carries the driver's exceptions as DBAPI classes.
    failed: type[Exception] = getattr(dbapi, "InternalError", None) or Exception
    if name.startswith("AsyncAdapt_asyncpg_connection"):
        found = AsyncpgDriver(failed)
    elif name.startswith("AsyncAdapt_psycopg_connection"):
        import psycopg

        found = PsycopgAsyncDriver(psycopg.errors.InFailedSqlTransaction)
    _cache[cls] = found
    return found
