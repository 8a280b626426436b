"""The few driver-specific operations the core needs, for psycopg2 and psycopg 3.

Everything here reads libpq state that the driver keeps locally, so none of it
costs a round trip, except :meth:`Driver.execute`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

# libpq's PQtransactionStatus values; psycopg2 and psycopg 3 both report them.
IDLE = 0
ACTIVE = 1
INTRANS = 2
INERROR = 3
UNKNOWN = 4


class DatabaseKey(NamedTuple):
    """Which physical connection a checkout joins: same driver, server, database, role."""

    driver: str
    host: str
    port: str
    dbname: str
    user: str

    def describe(self) -> str:
        return f"{self.dbname} on {self.host}:{self.port} as {self.user} ({self.driver})"


class Driver:
    """Adapter for one DBAPI module."""

    name: str
    #: the exception raised for "current transaction is aborted"
    in_failed_transaction: type[Exception]

    def __init__(self, name: str, in_failed: type[Exception], runner: Callable[[Any, str], None]):
        self.name = name
        self.in_failed_transaction = in_failed
        self._run = runner

    def key(self, conn: Any) -> DatabaseKey:
        info = conn.info
        return DatabaseKey(self.name, str(info.host), str(info.port), str(info.dbname), str(info.user))

    def status(self, conn: Any) -> int:
        raise NotImplementedError

    def execute(self, conn: Any, sql: str) -> None:
        """Run one or more parameterless statements on the physical connection."""
        self._run(conn, sql)

    @staticmethod
    def closed(conn: Any) -> bool:
        return bool(conn.closed)

    @staticmethod
    def autocommit(conn: Any) -> bool:
        return bool(conn.autocommit)

    def make_physical(self, conn: Any) -> None:
        """Put a fresh connection into the state the outer transaction needs."""
        raise NotImplementedError


class _Psycopg2(Driver):
    def status(self, conn: Any) -> int:
        return int(conn.get_transaction_status())

    def make_physical(self, conn: Any) -> None:
        if conn.get_transaction_status() != IDLE:
            conn.rollback()
        conn.set_session(isolation_level="DEFAULT", readonly="DEFAULT", deferrable="DEFAULT", autocommit=False)


class _Psycopg3(Driver):
    def status(self, conn: Any) -> int:
        return int(conn.pgconn.transaction_status)

    def make_physical(self, conn: Any) -> None:
        if conn.pgconn.transaction_status != IDLE:
            conn.rollback()
        conn.autocommit = False
        conn.isolation_level = None
        conn.read_only = None
        conn.deferrable = None


def _run_psycopg2(conn: Any, sql: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql)


def _run_psycopg3(conn: Any, sql: str) -> None:
    # prepare=False: a multi-statement string cannot be a prepared statement,
    # and psycopg would prepare a string it has seen five times.
    with conn.cursor() as cur:
        cur.execute(sql, prepare=False)


_cache: dict[type, Driver | None] = {}


def driver_for(conn: Any) -> Driver | None:
    """The adapter for this DBAPI connection, or None for an unsupported driver."""
    cls = type(conn)
    try:
        return _cache[cls]
    except KeyError:
        pass
    found: Driver | None = None
    module = cls.__module__
    if module.startswith("psycopg2"):
        import psycopg2.errors

        found = _Psycopg2("psycopg2", psycopg2.errors.InFailedSqlTransaction, _run_psycopg2)
    elif module.startswith("psycopg"):
        import psycopg

        if isinstance(conn, psycopg.Connection):
            found = _Psycopg3("psycopg", psycopg.errors.InFailedSqlTransaction, _run_psycopg3)
    _cache[cls] = found
    return found
