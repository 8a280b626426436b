"""Two process-wide listeners on SQLAlchemy's ``Pool`` class, installed once.

``checkout``: inside a rollback scope, the checked-out connection's DBAPI
connection is replaced by a :class:`LogicalConnection` on the database's shared
physical connection. The pool's own connection stays checked out, unused, and
goes back to the pool untouched.

``reset``: the pool is taking the connection back; the logical connection ends
as if rolled back, which is what the pool's reset-on-return does in production.

Listening on the class reaches every pool, including those of engines created
later. Registration is not cheap in SQLAlchemy, so behaviour is switched through
``STATE`` instead of adding and removing listeners per test.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import event
from sqlalchemy.pool import Pool

from ._proxy import LogicalConnection
from ._state import STATE

_lock = threading.Lock()
_installed = False


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
    phys = STATE.physical_for(dbapi_connection, pool)
    if phys is None:
        return
    autocommit = phys.driver.autocommit(dbapi_connection)
    connection_proxy.dbapi_connection = LogicalConnection(phys, STATE.next_number(), autocommit)


def _on_reset(dbapi_connection: Any, connection_record: Any, reset_state: Any) -> None:
    if type(dbapi_connection) is LogicalConnection:
        # Raising here would only be logged by the pool; the scope raises it instead.
        STATE.report(dbapi_connection._returned())


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
        _installed = True


def installed() -> bool:
    return _installed
