"""Every use of SQLAlchemy's private pool internals, in one place.

The public pool events hand over the pool's checkout proxy (a
``_ConnectionFairy``) and its ``_ConnectionRecord``; standing a logical
connection in for the driver's needs a few attributes that SQLAlchemy does not
document. Each is used through a function here, so that a change between
SQLAlchemy lines is met in one module, and each has a test on the supported
lines (``tests/test_sqla.py``).
"""

from __future__ import annotations

from typing import Any, Optional

from sqlalchemy.pool import Pool
from sqlalchemy.pool.base import _ConnectionFairy, _ConnectionRecord

#: the pool's checkout proxy: what ``Connection.connection`` and ``engine.raw_connection()`` return
Fairy = _ConnectionFairy


def pool_of(fairy: Any) -> Pool:
    """The pool a checkout proxy came from."""
    pool: Pool = fairy._pool  # noqa: SLF001  (this module is where such touches live)
    return pool


def dialect_of(pool: Pool) -> Any:
    """The dialect of the engine that owns ``pool``."""
    return pool._dialect  # noqa: SLF001


def record_of(fairy: Any) -> Optional[_ConnectionRecord]:
    """The pool record behind a checkout proxy; None once it is detached or checked in."""
    record: Optional[_ConnectionRecord] = fairy._connection_record  # noqa: SLF001
    return record


def held_connection(fairy: Any) -> Any:
    """The DBAPI connection a checkout proxy hands to its users; None once it is checked in."""
    return fairy.dbapi_connection


def stand_in(fairy: Any, connection: Any) -> None:
    """Make ``fairy`` hand ``connection`` to its users in place of the one it holds.

    SQLAlchemy reads the attribute anew for every cursor, commit and rollback,
    so the swap takes effect at once for every ``Connection`` and ``Session``
    that holds the proxy.
    """
    fairy.dbapi_connection = connection


def private_record(pool: Pool) -> _ConnectionRecord:
    """A new connection made by ``pool`` the way it makes its own, that never enters its queue.

    The dialect's ``on_connect`` hooks and the application's ``connect``
    listeners run on it, so it is set up exactly like the application's
    connections.
    """
    return _ConnectionRecord(pool)


def record_pool(record: Any) -> Optional[Pool]:
    """The pool a record belongs to (a name-mangled attribute)."""
    pool: Optional[Pool] = getattr(record, "_ConnectionRecord__pool", None)
    return pool
