"""Process-wide listeners on SQLAlchemy's ``Pool`` class, installed once.

``checkout``: inside a rollback scope, the checked-out connection's DBAPI
connection is replaced by a :class:`LogicalConnection` on the database's shared
physical connection. The pool's own connection stays checked out, unused and
read-only (:class:`PoolConnectionGuard`), and goes back to the pool as it was.

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
``STATE`` instead of adding and removing listeners per test.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Optional

from sqlalchemy import event
from sqlalchemy.pool import Pool

from ._proxy import LogicalConnection, PoolConnectionGuard
from ._state import STATE

_lock = threading.Lock()
_installed = False
#: key of the PoolConnectionGuard in the pool record's ``info``
_GUARD = "sa_rollback.guard"


def _on_checkout(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    if STATE.top is None:
        return
    pool = connection_proxy._pool
    if pool._dialect.is_async:
        STATE.warn_once(
            ("async", pool._dialect.name),
            "sa_rollback does not isolate async engines yet; their writes are real and outlive the test.",
        )
        return
    info = connection_record.info
    phys = STATE.physical_for(dbapi_connection, pool, info)
    if phys is None:
        return
    driver = phys.driver
    autocommit = driver.autocommit(dbapi_connection)
    guard: Optional[PoolConnectionGuard] = info.get(_GUARD)
    if guard is None or guard.real is not dbapi_connection:
        guard = info[_GUARD] = PoolConnectionGuard(dbapi_connection, driver)
    logical = LogicalConnection(phys, STATE.next_number(), autocommit, guard)
    guard.count += 1
    guard.checkouts.append((weakref.ref(connection_proxy), logical))
    connection_proxy.dbapi_connection = logical


def _give_back(logical: LogicalConnection, connection_record: Any) -> None:
    """The checkout of ``logical`` ends: end it, and restore the pool connection when no one else uses it."""
    STATE.report(logical._returned())
    guard = logical._guard
    if guard is None or guard.detached:
        return
    logical._guard = None
    guard.checkouts = [entry for entry in guard.checkouts if entry[1] is not logical]
    guard.count -= 1
    if guard.count <= 0:
        if connection_record is not None and connection_record.info.get(_GUARD) is guard:
            del connection_record.info[_GUARD]
        STATE.report(guard.release())


def _on_reset(dbapi_connection: Any, connection_record: Any, reset_state: Any) -> None:
    if type(dbapi_connection) is LogicalConnection:
        # Raising here would only be logged by the pool; the scope raises it instead.
        _give_back(dbapi_connection, connection_record)
        return
    if connection_record is None:
        return
    # A checked-out connection was garbage collected without being closed:
    # the pool resets its own connection instead of ours.
    guard: Optional[PoolConnectionGuard] = connection_record.info.get(_GUARD)
    if guard is not None and guard.real is dbapi_connection:
        for fairy, logical in guard.checkouts:
            if fairy() is None:
                _give_back(logical, connection_record)
                return


def _on_invalidate(dbapi_connection: Any, connection_record: Any, exception: Any) -> None:
    guard: Optional[PoolConnectionGuard] = connection_record.info.pop(_GUARD, None)
    if guard is None:
        return
    # The pool connection is about to be closed; only the logical ones need ending.
    for _, logical in guard.checkouts:
        logical._guard = None
        STATE.report(logical._returned())
    guard.checkouts = []


def _on_detach(dbapi_connection: Any, connection_record: Any) -> None:
    guard: Optional[PoolConnectionGuard] = connection_record.info.pop(_GUARD, None)
    if guard is not None:
        guard.detached = True


def install() -> None:
    """Register the listeners (idempotent). Opening a scope calls this."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        event.listen(Pool, "checkout", _on_checkout)
        event.listen(Pool, "reset", _on_reset)
        event.listen(Pool, "invalidate", _on_invalidate)
        event.listen(Pool, "detach", _on_detach)
        _installed = True


def installed() -> bool:
    return _installed
