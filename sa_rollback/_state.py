"""The one process-wide object the listeners consult.

The listeners stay registered for the life of the process; whether they act is
decided here, by whether a rollback scope is open. Outside a scope the checkout
listener costs one attribute read.

Only the scope layer (:mod:`._scope`) and the pytest layer import it. The
listeners get it when they are installed, and the physical connections it
makes get it as their :class:`~._physical.ScopeSource`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional

from ._aio import AsyncDriver, async_driver_for, before_close
from ._drivers import DatabaseKey, Driver, driver_for
from ._history import ScopeLike
from ._physical import Physical
from ._sqla import await_, dialect_of, private_record, take_connection
from ._vacant import Vacant
from .errors import SaRollbackError, SaRollbackWarning, ScopeError

#: key, in a pool record's info dict, of (its DBAPI connection, driver, database key)
_KEY_INFO = "sa_rollback.key"


#: seconds a thread waits for a database's shared connection before giving up
DEFAULT_LOCK_TIMEOUT = 30.0


class State:
    def __init__(self) -> None:
        #: the innermost open scope (read through :attr:`top`)
        self._top: Optional[ScopeLike] = None
        #: what makes the scope deferred with :meth:`defer` (its one key): it joins the stack when
        #: something first asks for the top. Whoever pops it owns it: the thread that makes the scope
        #: (under :attr:`lock`), or :meth:`cancel`, without the lock; ``dict.pop`` is atomic. Add with
        #: :meth:`defer` (or, where the call costs too much, as it does: only when empty).
        self.deferred: dict[Callable[[], ScopeLike], bool] = {}
        #: the lock timeout of scopes that do not set one (the plugin sets it from its settings)
        self.lock_timeout: float = DEFAULT_LOCK_TIMEOUT
        self.scopes: list[ScopeLike] = []
        #: by database key, and for async drivers by (database key, event loop)
        self.physicals: dict[Any, Physical] = {}
        #: logical connections standing in for connections lent before the scope opened (see _adoption)
        self.adopted: list[Any] = []
        #: guards the stack of scopes, the deferred scope and the shared connections
        self.lock = threading.Lock()
        #: the thread making the deferred scope, until it is on the stack
        self._making: Optional[int] = None
        self._numbers = 0
        self._warned: set[Any] = set()
        #: while a shared connection is being made: its PostgreSQL lock_timeout, in ms
        self.connecting_lock_timeout: Optional[int] = None
        #: async shared connections being made: slot -> done when made (or failed)
        self._connecting: dict[Any, asyncio.Future[None]] = {}

    @property
    def top(self) -> Optional[ScopeLike]:
        """The innermost open scope, or None. A deferred scope joins the stack here, on first need."""
        if self.deferred or self._making is not None:
            self._join_deferred()
        return self._top

    def push(self, scope: ScopeLike) -> None:
        if self.deferred:
            self._join_deferred()  # a scope opened inside it nests in it
        with self.lock:
            self.scopes.append(scope)
            self._top = scope

    def defer(self, make: Callable[[], ScopeLike]) -> None:
        """Open a scope lazily: ``make()`` is called and its scope pushed when the checkout
        listener, a statement or another scope first asks for the top. Until then it costs
        nothing, which is the point: in most suites, most tests touch no database.

        Only for a scope that nothing would adopt into (no connection noted as lent before it):
        what is lent before a scope must be taken over when the scope opens.
        """
        if self.deferred:
            self._join_deferred()
        self.deferred[make] = True

    def cancel(self, make: Callable[[], ScopeLike]) -> bool:
        """The deferred scope of ``make`` closes: True if it was never made, and is now forgotten.

        False once it is made; if another thread is making it, this waits until it is pushed.
        Without the lock when it was never made: taking it costs a test that uses no database
        more than the rest of its end.
        """
        if self.deferred.pop(make, False):
            return True
        with self.lock:
            return False  # made, or being made until the lock is free: then it is pushed

    def _join_deferred(self) -> None:
        # Made and pushed under the lock: another thread that asks meanwhile waits for it, and
        # sees `_making` until it is on the stack. The thread making it may ask too (its maker
        # may check out a connection): for it the scope is not open yet.
        if self._making == threading.get_ident():
            return
        with self.lock:
            # `_making` is set before the pop: a thread that reads `top` without the lock sees
            # the deferred scope or its making at every moment, never neither.
            self._making = threading.get_ident()
            try:
                try:
                    make, _ = self.deferred.popitem()
                except KeyError:
                    return  # made or cancelled meanwhile, while this thread waited for the lock
                scope = make()
                self.scopes.append(scope)
                self._top = scope
            finally:
                self._making = None

    def pop(self, scope: ScopeLike) -> None:
        with self.lock:
            if not self.scopes or self.scopes[-1] is not scope:
                raise ScopeError(
                    "Rollback scopes must close in the reverse order of opening; "
                    f"{scope!r} is not the innermost open scope."
                )
            self.scopes.pop()
            self._top = self.scopes[-1] if self.scopes else None

    @contextmanager
    def suspended(self, keep: int = 0) -> Iterator[None]:
        """Set aside all but the ``keep`` outermost scopes for a while (a wider-scoped fixture's setup).

        Scopes opened meanwhile nest inside the kept ones; the set-aside ones
        come back on top of them.
        """
        if self.deferred:
            self._join_deferred()  # set aside with the rest
        with self.lock:
            saved, self.scopes = self.scopes[keep:], self.scopes[:keep]
            self._top = self.scopes[-1] if self.scopes else None
        try:
            yield
        finally:
            with self.lock:
                self.scopes = self.scopes + saved
                self._top = self.scopes[-1] if self.scopes else None

    def next_number(self) -> int:
        with self.lock:
            self._numbers += 1
            return self._numbers

    def report(self, error: Optional[SaRollbackError]) -> None:
        """Keep an error that SQLAlchemy would swallow, so that the scope raises it at exit."""
        top = self.top
        if error is not None and top is not None:
            top.report(error)

    def warn_once(self, key: Any, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, SaRollbackWarning, stacklevel=3)

    def physical_for(
        self, dbapi_connection: Any, pool: Any, info: Optional[dict[Any, Any]] = None, record: Any = None
    ) -> Optional[Physical]:
        """The shared connection that a checkout from ``pool`` joins, created on first use.

        ``info`` is the pool record's info dict; the driver and key of its
        connection are kept there, since reading them costs a few microseconds.
        ``record``: a pool record checked out inside a scope, whose connection
        may become the shared one (:mod:`._vacant`); sync drivers only.
        """
        cached = info.get(_KEY_INFO) if info is not None else None
        if cached is not None and cached[0] is dbapi_connection:
            driver, key = cached[1], cached[2]
        else:
            driver, key = self._identify(dbapi_connection, pool)
            if driver is None or key is None:
                return None
            if info is not None:
                info[_KEY_INFO] = (dbapi_connection, driver, key)
        if driver.per_loop:
            return self._physical((key, asyncio.get_running_loop()), driver, dbapi_connection, pool)
        return self._physical(key, driver, dbapi_connection, pool, record)

    def vacated(self, info: dict[Any, Any], placeholder: Vacant, driver: Driver, key: DatabaseKey) -> None:
        """A record's connection made way for ``placeholder``: its driver and key stay known."""
        info[_KEY_INFO] = (placeholder, driver, key)

    def _identify(self, dbapi_connection: Any, pool: Any) -> tuple[Optional[Driver], Optional[DatabaseKey]]:
        driver = driver_for(dbapi_connection) or async_driver_for(dbapi_connection)
        if driver is None:
            dialect = dialect_of(pool)
            name = f"{getattr(dialect, 'name', '?')}+{getattr(dialect, 'driver', '?')}"
            self.warn_once(
                ("driver", name),
                f"sa_rollback does not isolate connections of dialect {name!r}: only PostgreSQL "
                "through psycopg2, psycopg (3) or asyncpg is supported. Writes "
                "through it are real and outlive the test.",
            )
            return None, None
        return driver, driver.key(dbapi_connection)

    def _physical(
        self, slot: Any, driver: Driver, dbapi_connection: Any, pool: Any, record: Any = None
    ) -> Optional[Physical]:
        phys = self.physicals.get(slot)
        if phys is not None and phys.usable():
            return phys
        if driver.per_loop or driver.async_facing:
            # Connecting awaits: other tasks of the loop run meanwhile.
            return self._loop_physical(slot, driver, pool)
        with self.lock:
            phys = self.physicals.get(slot)
            if phys is not None and phys.usable():
                return phys
            return self._make(slot, driver, pool, record)

    def _make(self, slot: Any, driver: Driver, pool: Any, record: Any = None) -> Physical:
        phys = self.physicals.pop(slot, None)
        if phys is not None:
            # It died; whatever it held is gone. Start over on a new one.
            self._close(phys)
        # A record of the application's own pool gives a connection set up
        # exactly like the application's (dialect on_connect hooks, user
        # "connect" listeners), yet it never enters that pool's queue.
        # PostgreSQL's limit is INT_MAX ms; beyond it, waiting forever is what was asked.
        millis = None
        if math.isfinite(self.lock_timeout) and self.lock_timeout * 1000 < 2**31 - 1:
            millis = max(1, int(self.lock_timeout * 1000))
        taken = record is not None and type(record.dbapi_connection) is not Vacant
        if taken:
            # The checkout's own connection, already set up, becomes the shared
            # one: no second server connection. Its record keeps a placeholder.
            own = record.dbapi_connection
            placeholder = Vacant(pool, driver, driver.autocommit(own))
            info = record.info
            record = take_connection(record, pool, placeholder)
            self.vacated(info, placeholder, driver, slot)
        else:
            self.connecting_lock_timeout = millis
            try:
                record = private_record(pool)
            finally:
                self.connecting_lock_timeout = None
        conn, record, driver = driver.physical_side(record.dbapi_connection, record)
        driver.make_physical(conn)
        if taken and millis is not None:
            # What do_connect gives a connection made here (_listeners._on_do_connect), unless
            # the application set its own: one round trip, once per shared connection.
            conn.autocommit = True
            try:
                driver.execute(
                    conn,
                    f"SELECT set_config('lock_timeout', '{millis}', false) "
                    "WHERE current_setting('lock_timeout') IN ('0', '0ms')",
                )
            finally:
                conn.autocommit = False
        phys = Physical(slot[0] if driver.per_loop else slot, driver, conn, record, self)
        phys.slot = slot
        self.physicals[slot] = phys
        return phys

    def _loop_physical(self, slot: Any, driver: Driver, pool: Any) -> Physical:
        """The shared connection of an async driver on the running loop, made once however many tasks ask.

        Connecting awaits, so other tasks of the loop run meanwhile; they wait
        for the first one's connection instead of taking a thread lock, which
        would block the loop that the connection needs.
        """
        while True:
            pending = self._connecting.get(slot)
            if pending is None:
                break
            await_(asyncio.shield(pending))
            phys = self.physicals.get(slot)
            if phys is not None and phys.usable():
                return phys
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._connecting[slot] = done
        try:
            phys = self._make(slot, driver, pool)
        finally:
            del self._connecting[slot]
            done.set_result(None)
        if driver.per_loop:
            before_close(loop, lambda: self._retire(phys))
        return phys

    def _retire(self, phys: Physical) -> None:
        """The event loop of an async shared connection closes: roll back what it holds, and close it.

        Its frames belong to scopes that may still be open (pytest-asyncio
        closes a test's loop before the test's scope ends); their statements
        could not run on it any more. A deferred-constraint error goes to the
        scope, which raises it when it closes.
        """
        with self.lock:
            if self.physicals.get(phys.slot) is phys:
                del self.physicals[phys.slot]
        if phys.frames:
            try:
                phys.close_frame(phys.frames[0].scope)
            except SaRollbackError as error:
                self.report(error)
            except Exception:
                pass
        self._close(phys)

    @staticmethod
    def _close(phys: Physical) -> None:
        driver = phys.driver
        if isinstance(driver, AsyncDriver):
            try:
                driver.close_connection(phys.conn)
            except Exception:
                pass
            return
        phys.close()

    def discard(self, phys: Physical) -> None:
        """Forget a physical connection that died or cannot be trusted; the next checkout makes a new one."""
        with self.lock:
            if self.physicals.get(phys.slot) is phys:
                del self.physicals[phys.slot]
        self._close(phys)

    def close_all(self) -> None:
        """Close every physical connection (end of the run, or before dropping a database)."""
        with self.lock:
            physicals = list(self.physicals.values())
            self.physicals.clear()
        for phys in physicals:
            self._close(phys)


STATE = State()
