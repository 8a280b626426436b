"""Process-wide listeners on SQLAlchemy's ``Pool`` class, installed once.

``checkout``: inside a rollback scope, the checked-out connection's DBAPI
connection is replaced by a :class:`LogicalConnection` on the database's shared
physical connection. For a ``QueuePool`` or ``NullPool`` (sync or async), the
pool's own connection becomes the shared one (sync drivers), or is closed; its
record holds a :class:`Vacant` placeholder until a checkout outside every scope
reconnects it (:mod:`._vacant`). For other pools it stays checked out, unused
and read-only (:class:`PoolConnectionGuard`), and goes back to the pool as it
was.
Outside a scope, the checkout is noted, so that a scope opened while the
application still holds the connection can adopt it (:mod:`._adoption`).

``reset``: the pool is taking the connection back; the logical connection ends
as if rolled back, which is what the pool's reset-on-return does in production.
It also arrives with the pool's own connection when a checked-out connection is
garbage collected without being closed.

``invalidate``: SQLAlchemy discards the pool connection (a disconnect error, a
``KeyboardInterrupt`` inside a statement): in production its transaction dies
with it, so the logical connection ends as if rolled back.

``detach``: ``connection.detach()`` takes the pool connection out of the pool;
the logical connection goes on standing in for it, and the pool connection,
which nothing uses any more, is closed when the logical one is.

Listening on the class reaches every pool, including those of engines created
later. Registration is not cheap in SQLAlchemy, so behaviour is switched through
the process-wide state, handed over by :func:`install`, instead of adding and
removing listeners per test.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any, Optional

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

from ._adoption import Registry, note_checkout, note_existing
from ._aio import AsyncDriver, async_driver_for, before_close
from ._drivers import driver_for
from ._guard import GUARD_KEY, Lent, PoolConnectionGuard, give_back
from ._proxy import LogicalConnection
from ._sqla import (
    close_connection,
    is_private,
    lends_one_at_a_time,
    pool_of,
    pre_pings,
    reconnect,
    record_pool,
    reset_connection,
    stand_in,
)
from ._vacant import Vacant

_lock = threading.Lock()
#: the process-wide state, once installed
_state: Optional[Registry] = None


def _on_checkout(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    state = _state
    assert state is not None
    if state.top is None:
        if type(dbapi_connection) is Vacant:
            # Its connection went to a scope's shared connection; outside every
            # scope the application gets a real one, made the pool's way.
            dbapi_connection.vacate()
            stand_in(connection_proxy, reconnect(connection_record))
        note_checkout(connection_proxy, connection_record)
        return
    pool = pool_of(connection_proxy)
    info = connection_record.info
    vacant = type(dbapi_connection) is Vacant
    # A record that holds a placeholder already (the usual checkout in a test) asks nothing more.
    vacatable = not vacant and lends_one_at_a_time(pool)
    phys = state.physical_for(dbapi_connection, pool, info, connection_record if vacatable else None)
    if phys is None:
        return
    driver = phys.driver
    if vacatable:
        if connection_record.dbapi_connection is dbapi_connection:
            # Not taken as the shared connection (it existed, or is an async engine's, made
            # apart): this one is not needed in the scope. The placeholder keeps the record's
            # own driver (an async adapter's, where the shared one is sync: psycopg async).
            own = async_driver_for(dbapi_connection) or driver
            if isinstance(own, AsyncDriver):
                own.abort_if_foreign(dbapi_connection)
            placeholder = Vacant(pool, own, own.autocommit(dbapi_connection))
            close_connection(connection_record, placeholder)
            state.vacated(info, placeholder, own, phys.key)
        dbapi_connection = connection_record.dbapi_connection  # the placeholder
        vacant = True
    autocommit = driver.autocommit(dbapi_connection)
    guard: Optional[PoolConnectionGuard] = info.get(GUARD_KEY)
    if guard is None or guard.real is not dbapi_connection:
        # The pool's own connection may be another kind than the shared one (psycopg async).
        # A placeholder is not asked: it would connect to answer.
        if vacant:
            own = dbapi_connection.driver
        else:
            own = driver_for(dbapi_connection) or async_driver_for(dbapi_connection) or driver
        guard = info[GUARD_KEY] = PoolConnectionGuard(dbapi_connection, own)
    elif not guard.count:
        guard.lend()  # still read-only since an earlier checkout in a scope (give_back's to_pool)
    logical = LogicalConnection(phys, state.next_number(), autocommit, guard)
    logical.async_facing = guard.driver.async_facing
    guard.count += 1
    guard.checkouts.append((weakref.ref(connection_proxy), logical))
    stand_in(connection_proxy, logical)


def _give_back(logical: Lent, connection_record: Any) -> None:
    assert _state is not None
    for error in give_back(logical, connection_record, to_pool=True):
        _state.report(error)


def _on_reset(dbapi_connection: Any, connection_record: Any, reset_state: Any = None) -> None:
    # reset_state: SQLAlchemy 2 passes it, 1.4 does not; it is not needed.
    dbapi_connection = reset_connection(dbapi_connection)
    if type(dbapi_connection) is LogicalConnection:
        # Raising here would only be logged by the pool; the scope raises it instead.
        _give_back(dbapi_connection, connection_record)
        return
    if connection_record is None:
        return
    # A checked-out connection was garbage collected without being closed:
    # the pool resets its own connection instead of ours.
    guard: Optional[PoolConnectionGuard] = connection_record.info.get(GUARD_KEY)
    if guard is not None and guard.real is dbapi_connection:
        for fairy, logical in guard.checkouts:
            if fairy() is None:
                _give_back(logical, connection_record)
                return


def _on_invalidate(dbapi_connection: Any, connection_record: Any, exception: Any) -> None:
    assert _state is not None
    guard: Optional[PoolConnectionGuard] = connection_record.info.pop(GUARD_KEY, None)
    if guard is None:
        return
    # The pool connection is about to be closed; only the logical ones need ending.
    for _, logical in guard.checkouts:
        logical.guard = None
        _state.report(logical.returned())
    guard.checkouts = []


def _on_detach(dbapi_connection: Any, connection_record: Any) -> None:
    guard: Optional[PoolConnectionGuard] = connection_record.info.pop(GUARD_KEY, None)
    if guard is not None:
        guard.detached = True


def _on_do_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
    # Only while the state makes a shared connection (rare: nothing on the checkout path).
    assert _state is not None
    millis = _state.connecting_lock_timeout
    if millis is None:
        return
    # A statement that waits for a row lock held by another transaction of the test (a sync
    # and an async engine on one database) would wait forever, and with it the event loop.
    if dialect.driver == "asyncpg":
        settings = dict(cparams.get("server_settings") or {})
        settings.setdefault("lock_timeout", str(millis))
        cparams["server_settings"] = settings
    else:
        options = str(cparams.get("options") or "")
        if "lock_timeout" not in options:
            cparams["options"] = f"{options} -c lock_timeout={millis}".strip()


def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Only new connections pass here. An asyncpg connection belongs to the loop it was
    # made in; when that loop closes, a pool that pings before lending would ping it from
    # the next loop, before the checkout listener could stand in for it, and fail
    # ("attached to a different loop"). So such a pool makes a new one in the next loop.
    driver = async_driver_for(dbapi_connection)
    if not isinstance(driver, AsyncDriver) or not pre_pings(record_pool(connection_record)):
        return
    record = weakref.ref(connection_record)
    loop = asyncio.get_running_loop()

    def renew() -> None:
        alive = record()
        conn = None if alive is None else alive.dbapi_connection
        if alive is None or conn is None or type(conn) is Vacant or driver.made_in(conn) not in (loop, None):
            return  # closed, or holds a placeholder or a later loop's connection (whose own renew sees to it)
        if not is_private(alive) and not alive.in_use:
            # Closed while its loop still can; the pool's close at the next checkout, from
            # another loop, then finds it closed instead of failing on it. A shared
            # connection's is closed by its own callback, after the rollback; one still
            # checked out is left to its holder, as before.
            driver.close_on(conn, loop)
        alive.invalidate(soft=True)

    before_close(loop, renew)


def install(state: Registry) -> None:
    """Register the listeners, acting on ``state`` (idempotent). Opening a scope calls this."""
    global _state
    if _state is not None:
        return
    with _lock:
        if _state is not None:
            return
        _state = state
        event.listen(Pool, "checkout", _on_checkout)
        event.listen(Pool, "reset", _on_reset)
        event.listen(Pool, "invalidate", _on_invalidate)
        event.listen(Pool, "detach", _on_detach)
        event.listen(Engine, "do_connect", _on_do_connect)
        event.listen(Pool, "connect", _on_connect)
        # Connections the application checked out before this point (while
        # a conftest was imported, say) never pass the checkout listener.
        note_existing()
