"""Each function of ``sa_rollback._sqla`` against the installed SQLAlchemy line.

``_sqla`` holds every use of SQLAlchemy's private pool internals and every
difference between the supported lines; CI runs this file on 1.4, 2.0 and 2.1.
Real engines on the suite's database, real pool events; nothing is mocked.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool, SingletonThreadPool, StaticPool

import sa_rollback
from sa_rollback import _sqla
from sa_rollback._proxy import LogicalConnection
from sa_rollback._state import STATE

from ._compat import SA14, SA_LINE, create_engine, needs_sqlalchemy_2
from .conftest import driver_url


def test_the_installed_line_is_supported() -> None:
    assert _sqla.version_problem(sa.__version__) is None


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("1.3.24", False),
        ("1.4.53", False),
        ("1.4.54", True),
        ("2.0.0", False),
        ("2.0.29", False),
        ("2.0.30", True),
        ("2.1.0b1", True),
        ("2.1.9", True),
        ("2.2.0", False),
    ],
)
def test_versions_outside_the_tested_ones_are_refused_with_the_fix(version: str, supported: bool) -> None:
    problem = _sqla.version_problem(version)
    assert (problem is None) is supported
    if problem is not None:
        assert f"SQLAlchemy {version}" in problem
        assert "pip install 'SQLAlchemy>=1.4.54,<1.5'" in problem


def test_fairy_pool_dialect_record_and_held_connection(engine: sa.Engine) -> None:
    fairy = engine.raw_connection()
    try:
        assert type(fairy) is _sqla.Fairy
        assert _sqla.pool_of(fairy) is engine.pool
        assert _sqla.dialect_of(engine.pool) is engine.dialect
        record = _sqla.record_of(fairy)
        assert record is not None
        held = _sqla.held_connection(fairy)
        assert held is record.dbapi_connection
        assert type(held).__module__.startswith(engine.dialect.driver)  # the driver's own connection
        assert _sqla.record_pool(record) is engine.pool
    finally:
        fairy.close()
    assert _sqla.held_connection(fairy) is None  # checked in
    assert _sqla.record_of(fairy) is None


def test_record_of_a_detached_checkout_is_none(engine: sa.Engine) -> None:
    fairy = engine.raw_connection()
    fairy.detach()
    assert _sqla.record_of(fairy) is None
    assert _sqla.held_connection(fairy) is not None  # still usable, outside the pool
    fairy.close()


class Recorder:
    """A stand-in that records what SQLAlchemy asks of the DBAPI connection, and delegates it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[str] = []

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("cursor")
        return self.real.cursor(*args, **kwargs)

    def commit(self) -> None:
        self.calls.append("commit")
        self.real.commit()

    def rollback(self) -> None:
        self.calls.append("rollback")
        self.real.rollback()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_stand_in_takes_effect_for_a_connection_already_open(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        fairy = conn.connection
        real = _sqla.held_connection(fairy)
        recorder = Recorder(real)
        _sqla.stand_in(fairy, recorder)
        try:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
            conn.commit()
        finally:
            _sqla.stand_in(fairy, real)
    assert recorder.calls[:1] == ["cursor"]
    assert "commit" in recorder.calls


def test_private_record_connects_like_the_pool_but_stays_out_of_it(engine: sa.Engine) -> None:
    connects: list[Any] = []
    event.listen(engine, "connect", lambda dbapi_connection, record: connects.append(record))
    with engine.connect() as conn:  # the pool's own connection
        conn.execute(sa.text("SELECT 1"))
    idle_before = engine.pool.checkedin()
    record = _sqla.private_record(engine.pool)
    try:
        assert len(connects) == 2 and connects[-1] is record  # the application's connect hooks ran
        assert _sqla.record_pool(record) is engine.pool
        assert engine.pool.checkedin() == idle_before  # never enters the pool's queue
        assert _sqla.is_private(record)
        with engine.connect() as conn:
            fairy = conn.connection
            assert _sqla.held_connection(fairy) is not record.dbapi_connection
            assert not _sqla.is_private(_sqla.record_of(fairy))
        cursor = record.dbapi_connection.cursor()
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
        record.dbapi_connection.rollback()
    finally:
        record.close()


def test_lends_one_at_a_time_only_for_queue_and_null_pools(url: str) -> None:
    engines = {
        "queue": create_engine(url),
        "null": create_engine(url, poolclass=NullPool),
        "static": create_engine(url, poolclass=StaticPool),
        "singleton": create_engine(url, poolclass=SingletonThreadPool),
    }
    try:
        lends = {name: _sqla.lends_one_at_a_time(eng.pool) for name, eng in engines.items()}
        assert lends == {"queue": True, "null": True, "static": False, "singleton": False}
    finally:
        for eng in engines.values():
            eng.dispose()


@needs_sqlalchemy_2("async engines")
def test_async_pools_lend_one_at_a_time_unless_static() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    assert _sqla.lends_one_at_a_time(create_async_engine(driver_url("asyncpg")).sync_engine.pool)
    assert _sqla.lends_one_at_a_time(create_async_engine(driver_url("asyncpg"), poolclass=NullPool).sync_engine.pool)
    assert not _sqla.lends_one_at_a_time(
        create_async_engine(driver_url("asyncpg"), poolclass=StaticPool).sync_engine.pool
    )


@needs_sqlalchemy_2("async engines")
def test_forget_prepared_statements_empties_the_asyncpg_adapters_cache() -> None:
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> tuple[int, int]:
        engine = create_async_engine(driver_url("asyncpg"), poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
                adapter = (await conn.get_raw_connection()).dbapi_connection
                before = len(adapter._prepared_statement_cache)
                _sqla.forget_prepared_statements(adapter)
                return before, len(adapter._prepared_statement_cache)
        finally:
            await engine.dispose()

    before, after = asyncio.run(main())
    assert before > 0  # the dialect's own first queries, and SELECT 1
    assert after == 0


class _Placeholder:
    placeholder = True
    closed = False

    def close(self) -> None:
        self.closed = True


def test_take_close_and_reconnect_a_record(engine: sa.Engine) -> None:
    """A record's connection moves to a private record; closing the record then closes only the placeholder."""
    events: list[tuple[str, Any]] = []
    event.listen(engine, "connect", lambda dbapi_connection, record: events.append(("connect", dbapi_connection)))
    event.listen(engine, "close", lambda dbapi_connection, record: events.append(("close", dbapi_connection)))
    fairy = engine.raw_connection()
    record = _sqla.record_of(fairy)
    assert record is not None
    own = record.dbapi_connection
    record.info["kept"] = "with the connection"
    placeholder = _Placeholder()
    private = _sqla.take_connection(record, engine.pool, placeholder)
    try:
        assert record.dbapi_connection is placeholder
        assert private.dbapi_connection is own and private.starttime == record.starttime
        assert private.info["kept"] == "with the connection" and "kept" not in record.info
        assert _sqla.is_private(private) and not _sqla.is_private(record)
        assert _sqla.record_pool(private) is engine.pool
        assert any(conn is own for conn in _sqla.pooled_connections())  # found through its private record
        assert not any(conn is placeholder for conn in _sqla.pooled_connections())  # not a server connection
        # Closing the record the pool's way closes the placeholder; the taken connection still works.
        second = _Placeholder()
        _sqla.close_connection(record, second)
        assert placeholder.closed and record.dbapi_connection is second
        assert ("close", placeholder) in events
        cursor = own.cursor()
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
        own.rollback()
        # A reconnect makes a new connection the pool's way (connect events), with the info cleared.
        record.info["stale"] = True
        fresh = _sqla.reconnect(record)
        assert fresh is record.dbapi_connection and fresh is not own
        assert events[-1] == ("connect", fresh) and "stale" not in record.info
        _sqla.stand_in(fairy, fresh)
        cursor = fairy.cursor()
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    finally:
        fairy.close()
        private.close()
    assert ("close", own) in events


def test_reset_connection_is_the_dbapi_connection_on_this_line(engine: sa.Engine) -> None:
    seen: list[tuple[type, Any]] = []

    def on_reset(dbapi_connection: Any, record: Any, reset_state: Any = None) -> None:
        # Read at the event: 1.4's proxy lets go of its connection once checked in.
        seen.append((type(dbapi_connection), _sqla.reset_connection(dbapi_connection)))

    event.listen(engine.pool, "reset", on_reset)
    fairy = engine.raw_connection()
    held = _sqla.held_connection(fairy)
    fairy.close()
    assert len(seen) == 1
    passed, connection = seen[0]
    assert connection is held
    # 1.4 passes the checkout proxy, 2.x the driver's connection; both come out the same.
    assert (passed is _sqla.Fairy) is SA14


def test_check_ins_inside_a_scope_reuse_one_connection_and_restore_it(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The reset listener gets its argument on this line: no error logged, no reconnect per check-in."""
    connects: list[Any] = []
    event.listen(engine, "connect", lambda dbapi_connection, record: connects.append(record))
    caplog.set_level(logging.ERROR, logger="sqlalchemy.pool")
    physicals_before = {id(phys) for phys in STATE.physicals.values()}
    with sa_rollback.rollback_scope():
        for _ in range(20):
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO items (name) VALUES ('x') ON CONFLICT DO NOTHING"))
            raw = engine.raw_connection()
            assert isinstance(_sqla.held_connection(raw), LogicalConnection)
            raw.close()
    made = len({id(phys) for phys in STATE.physicals.values()} - physicals_before)
    # One for the pool: it became the shared connection when no earlier test
    # made one, else it was closed and its record holds a placeholder (_vacant).
    # A failing reset would discard the pool's connection at each check-in: 20 more.
    assert made in (0, 1)
    assert len(connects) == 1
    assert engine.pool.checkedout() == 0
    assert not [r for r in caplog.records if r.name.startswith("sqlalchemy.pool")]
    with engine.connect() as conn:  # outside the scope the pool's record gets a real, writable connection again
        assert conn.execute(sa.text("SHOW transaction_read_only")).scalar() == "off"
    with engine.connect() as conn:  # once
        assert conn.execute(sa.text("SHOW transaction_read_only")).scalar() == "off"
    assert len(connects) == 2


def test_default_postgresql_driver_is_what_a_bare_url_gets(driver: str) -> None:
    url = make_url(driver_url(driver)).set(drivername="postgresql")
    engine = create_engine(url)
    try:
        assert engine.dialect.driver == _sqla.default_postgresql_driver()
    finally:
        engine.dispose()
    assert _sqla.default_postgresql_driver() == ("psycopg" if SA_LINE >= (2, 1) else "psycopg2")
