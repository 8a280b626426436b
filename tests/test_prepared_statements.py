"""Prepared statements on the shared connection (psycopg 3 prepares a statement the sixth time it runs).

The test's rollback forgets them, as psycopg's own ``rollback()`` does, and in
the same round trip: every test costs the same round trips, and no statement
prepared inside a test outlives the DDL that the rollback undid.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from psycopg.pq import Trace
from sqlalchemy.orm import Session

import sa_rollback
from sa_rollback._proxy import LogicalConnection

ALL_DRIVERS = ["psycopg2", "psycopg", "psycopg_async", "asyncpg"]

DEFERRED = """
CREATE TABLE sar_parent (id int PRIMARY KEY);
CREATE TABLE sar_child (parent_id int REFERENCES sar_parent DEFERRABLE INITIALLY DEFERRED);
INSERT INTO sar_child VALUES (1)
"""


def _check_nothing_prepared(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.connect() as conn:
            # A statement still prepared would fail: "cached plan must not change result type".
            assert list(conn.exec_driver_sql("SELECT * FROM items").keys()) == ["id", "name", "qty"]
            if engine.dialect.driver == "asyncpg":
                return  # it prepares every statement, this one too: what counts is that the old plan went
            # Forgotten by the driver, and deallocated on the server (which would otherwise keep them all).
            assert conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar() == 0


def _prepare_against_altered_table(engine: sa.Engine, violate_deferred: bool) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE items ADD COLUMN sar_extra int")
        if violate_deferred:
            for statement in DEFERRED.split(";"):  # one at a time: asyncpg prepares each
                conn.exec_driver_sql(statement)
        for _ in range(7):  # psycopg prepares it the sixth time
            assert list(conn.exec_driver_sql("SELECT * FROM items").keys()) == ["id", "name", "qty", "sar_extra"]


@pytest.mark.parametrize("driver", ALL_DRIVERS)
@pytest.mark.parametrize("check_deferred", [True, False])
def test_prepared_statement_does_not_outlive_rolled_back_ddl(engine: sa.Engine, check_deferred: bool) -> None:
    with sa_rollback.rollback_scope(check_deferred=check_deferred):
        _prepare_against_altered_table(engine, violate_deferred=False)
    _check_nothing_prepared(engine)


@pytest.mark.parametrize("driver", ALL_DRIVERS)
def test_prepared_statement_does_not_outlive_ddl_a_nested_scope_undid(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.connect() as conn:  # the outer scope writes first: its frame is not the inner one's
            conn.exec_driver_sql("INSERT INTO items (name, qty) VALUES ('outer', 1)")
            conn.commit()
        with sa_rollback.rollback_scope():
            _prepare_against_altered_table(engine, violate_deferred=False)
        with engine.connect() as conn:
            for _ in range(7):
                assert list(conn.exec_driver_sql("SELECT * FROM items").keys()) == ["id", "name", "qty"]


@pytest.mark.parametrize("driver", ALL_DRIVERS)
def test_prepared_statement_forgotten_when_the_deferred_check_fails(engine: sa.Engine) -> None:
    with pytest.raises(sa_rollback.DeferredConstraintError):
        with sa_rollback.rollback_scope():
            _prepare_against_altered_table(engine, violate_deferred=True)
    _check_nothing_prepared(engine)


@pytest.mark.skipif(sys.platform != "linux", reason="psycopg traces libpq on Linux only")
# psycopg2 prepares nothing; asyncpg has no libpq to trace (the async benchmark counts it at the socket)
@pytest.mark.parametrize("driver", ["psycopg", "psycopg_async"])
def test_every_test_costs_the_same_round_trips(driver: str, engine: sa.Engine, tmp_path: Path) -> None:
    """Twelve ORM tests (insert, commit, select): 5 round trips each, also when a statement reaches psycopg's
    threshold of five runs on the shared connection, which happens every sixth test if the rollback does
    not make psycopg forget its counts."""

    def orm_test() -> None:
        with Session(engine) as session:
            session.execute(sa.text("INSERT INTO items (name) VALUES ('x')"))
            session.commit()
            assert session.execute(sa.text("SELECT name FROM items WHERE name = 'x'")).scalars().all() == ["x"]

    with sa_rollback.rollback_scope():
        orm_test()
        with engine.connect() as conn:
            logical = conn.connection.dbapi_connection
            assert isinstance(logical, LogicalConnection)
            # The async driver's shared connection is SQLAlchemy's adapter around psycopg's AsyncConnection.
            pgconn = getattr(logical.phys.conn, "_connection", logical.phys.conn).pgconn
    trace = tmp_path / "trace"
    fd = os.open(trace, os.O_WRONLY | os.O_CREAT, 0o600)
    pgconn.trace(fd)
    pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)
    try:
        for _ in range(12):
            with sa_rollback.rollback_scope():
                orm_test()
    finally:
        pgconn.untrace()  # flushes the trace
        os.close(fd)
    sent = [line.split("\t")[2] for line in trace.read_text().splitlines() if line.startswith("F\t")]
    # A round trip ends with a simple Query, or with the Sync of an extended-protocol statement.
    assert sum(kind in ("Query", "Sync") for kind in sent) == 12 * 5, sent
