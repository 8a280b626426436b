"""Every use of SQLAlchemy's private pool internals, and every difference between its lines, in one place.

The public pool events hand over the pool's checkout proxy (a
``_ConnectionFairy``) and its ``_ConnectionRecord``; standing a logical
connection in for the driver's needs a few attributes that SQLAlchemy does not
document. Each is used through a function here, so that a change between
SQLAlchemy lines is met in one module, and each has a test on the supported
lines (``tests/test_sqla.py``, run by CI on 1.4, 2.0 and 2.1).

What differs on 1.4: the ``reset`` event passes the checkout proxy, not its
DBAPI connection (:func:`reset_connection`), and a bare ``postgresql://`` URL
means psycopg2, with no dialect for psycopg 3 (:func:`default_postgresql_driver`).
The private attributes used here are the same on every supported line.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool, Pool, QueuePool
from sqlalchemy.pool.base import _ConnectionFairy, _ConnectionRecord

#: the SQLAlchemy releases CI tests, as [lowest, first excluded) per line
SUPPORTED = (((1, 4, 54), (1, 5)), ((2, 0, 30), (2, 2)))


def version_problem(version: str) -> Optional[str]:
    """Why sa_rollback refuses SQLAlchemy ``version``, or None when it is supported."""
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    if any(low <= release < high for low, high in SUPPORTED):
        return None
    return (
        f"sa_rollback supports SQLAlchemy 1.4.54 and later 1.4 releases, and 2.0.30 up to 2.1; this "
        f"environment has SQLAlchemy {version}. Upgrade it: pip install 'SQLAlchemy>=1.4.54,<1.5' to "
        "stay on 1.4, or 'SQLAlchemy>=2.0.30,<2.2'."
    )


# pip cannot be told to skip 2.0.0 to 2.0.29 in one range, so the import refuses them.
_problem = version_problem(sqlalchemy.__version__)
if _problem is not None:
    raise ImportError(_problem)


def in_greenlet() -> bool:
    """Does the caller run inside SQLAlchemy's asyncio greenlet, where :func:`await_` works?"""
    try:
        import greenlet
    except ImportError:
        return False
    return bool(getattr(greenlet.getcurrent(), "__sqlalchemy_greenlet_provider__", False))


def await_(awaitable: Any) -> Any:
    """Wait for ``awaitable`` inside SQLAlchemy's greenlet (``await_only`` on 2.0, ``await_`` on 2.1)."""
    from sqlalchemy.util import concurrency

    wait = getattr(concurrency, "await_", None) or concurrency.await_only
    return wait(awaitable)


async def greenlet_spawn(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run sync ``fn`` in SQLAlchemy's greenlet, where it may wait for async connections."""
    from sqlalchemy.util import concurrency

    return await concurrency.greenlet_spawn(fn, *args, **kwargs)


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


def reset_connection(argument: Any) -> Any:
    """The DBAPI connection that the pool's ``reset`` event is about.

    SQLAlchemy 2 passes the checkout proxy's DBAPI connection; 1.4 passes the
    checkout proxy itself (its documentation says otherwise), whose
    ``dbapi_connection`` is the one meant. Told apart by type, not by version,
    so that the 2.x path costs one type check.
    """
    if type(argument) is Fairy:
        return argument.dbapi_connection
    return argument


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


#: key, in a record's ``info``, marking one that never enters its pool's queue
_PRIVATE = "sa_rollback.private"


def private_record(pool: Pool) -> _ConnectionRecord:
    """A new connection made by ``pool`` the way it makes its own, that never enters its queue.

    The dialect's ``on_connect`` hooks and the application's ``connect``
    listeners run on it, so it is set up exactly like the application's
    connections.
    """
    record = _ConnectionRecord(pool)
    record.info[_PRIVATE] = True
    return record


def is_private(record: Any) -> bool:
    """Was ``record`` made by :func:`private_record` or :func:`take_connection` (a shared connection's, say)?"""
    return bool(record.info.get(_PRIVATE))


def pre_pings(pool: Any) -> bool:
    """Does ``pool`` ping a connection before lending it (``pool_pre_ping=True``)?"""
    return bool(getattr(pool, "_pre_ping", False))


def record_pool(record: Any) -> Optional[Pool]:
    """The pool a record belongs to (a name-mangled attribute)."""
    pool: Optional[Pool] = getattr(record, "_ConnectionRecord__pool", None)
    return pool


def default_postgresql_driver() -> str:
    """The driver of a bare ``postgresql://`` URL: psycopg2 up to SQLAlchemy 2.0, psycopg (3) from 2.1.

    SQLAlchemy 1.4 has no dialect for psycopg 3 at all, so a URL naming it
    cannot be handed to 1.4's engines.
    """
    driver: str = make_url("postgresql://").get_dialect().driver
    return driver


def pooled_connections() -> list[Any]:
    """The DBAPI connections of every live pool record in the process (a walk of the garbage collector's objects).

    Slow (tens of milliseconds in a large process): only for the rare question
    "is this backend one of our pools' after all?", when a pool connected
    before anyone listened.
    """
    import gc

    found = []
    for obj in gc.get_objects():
        if type(obj) is _ConnectionRecord:
            conn = obj.dbapi_connection
            if conn is not None and not getattr(type(conn), "placeholder", False):  # _vacant.Vacant: no connection
                found.append(conn)
    return found


#: pools that lend each record to one checkout at a time (AsyncAdaptedQueuePool is a QueuePool)
_ONE_AT_A_TIME = (QueuePool, NullPool)


def lends_one_at_a_time(pool: Pool) -> bool:
    """Does ``pool`` lend each record's connection to one checkout at a time (QueuePool, NullPool, their async forms)?

    Only then may a record's connection leave it while it is checked out
    (:func:`take_connection`, :func:`close_connection`): ``StaticPool`` and
    ``SingletonThreadPool`` hand one record's connection to several checkouts
    at once.
    """
    return isinstance(pool, _ONE_AT_A_TIME)


def take_connection(record: _ConnectionRecord, pool: Pool, placeholder: Any) -> _ConnectionRecord:
    """Move ``record``'s connection to a new private record of ``pool``, leaving ``placeholder`` in its place.

    The connection is not closed, reopened or set up again: it has passed the
    dialect's and the application's connect hooks already. Its ``info`` goes
    with it. Closing the private record closes it; closing ``record`` closes
    only the placeholder.
    """
    private = _ConnectionRecord(pool, connect=False)
    private.dbapi_connection = record.dbapi_connection
    private.starttime = record.starttime
    # What listeners keep about a connection goes with it (SQLAlchemy clears it when it reconnects a record).
    private.info.update(record.info)
    private.info[_PRIVATE] = True
    record.info.clear()
    record.dbapi_connection = placeholder
    return private


def close_connection(record: _ConnectionRecord, placeholder: Any) -> None:
    """Close ``record``'s connection the pool's way (its ``close`` event runs), and put ``placeholder`` in its place.

    For an async engine, inside SQLAlchemy's greenlet: the adapter's ``close()`` waits there.
    """
    record._ConnectionRecord__close()  # type: ignore[attr-defined]  # noqa: SLF001
    record.dbapi_connection = placeholder


def reconnect(record: _ConnectionRecord) -> Any:
    """Give ``record`` a new connection, made as the pool makes its own (connect events run); returns it.

    The record's ``info`` is cleared first, as SQLAlchemy does before it
    reconnects a record.
    """
    record.info.clear()
    record._ConnectionRecord__connect()  # type: ignore[attr-defined]  # noqa: SLF001
    return record.dbapi_connection


def forget_prepared_statements(adapter: Any) -> None:
    """Empty the statement cache of SQLAlchemy's asyncpg adapter ``adapter`` (when it keeps one)."""
    cache = getattr(adapter, "_prepared_statement_cache", None)
    if cache is not None:
        cache.clear()
