"""The connection budget: one server connection per database per process while a test runs.

Inside a scope, a sync ``QueuePool`` or ``NullPool`` checkout's own connection
becomes the shared one, or is closed when that exists already; its pool record
keeps a placeholder (``sa_rollback._vacant``) until a checkout outside every
scope reconnects it. Every count here is read from a plain psycopg connection:
the server connections of the test's own ``application_name`` on the suite's
database.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool, StaticPool

import sa_rollback
from sa_rollback._sqla import await_
from sa_rollback._state import STATE
from sa_rollback._vacant import Vacant

from ._compat import ASYNC_DRIVERS, DRIVERS, create_engine
from .conftest import DB_A, LOOP, driver_url, libpq_dsn

Count = Callable[[], int]


@pytest.fixture
def app_name() -> str:
    return f"budget {uuid.uuid4().hex[:12]}"


@pytest.fixture
def count(app_name: str) -> Iterator[Count]:
    """How many server connections of this test's application_name are open on the suite's database."""
    conn = psycopg.connect(libpq_dsn(DB_A), autocommit=True)

    def counted() -> int:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = %s AND pid <> pg_backend_pid()",
            (DB_A, app_name),
        ).fetchone()
        return int(row[0]) if row else 0

    yield counted
    conn.close()


def settled(count: Count, expected: int) -> int:
    """The count once closed connections' server processes have exited (they leave the view a moment later)."""
    seen = count()
    deadline = time.monotonic() + 2.0
    while seen != expected and time.monotonic() < deadline:
        time.sleep(0.02)
        seen = count()
    return seen


@pytest.fixture
def make(app_name: str, driver: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., sa.Engine]]:
    """Engines of this test's application_name; the shared connections start afresh.

    An async driver's engine is its sync face: the test's body runs in SQLAlchemy's greenlet
    on the loop of ``aloop`` (conftest's pytest_pyfunc_call), and its engines are disposed there.
    """
    loop = request.getfixturevalue("aloop") if driver in ASYNC_DRIVERS else None
    STATE.close_all()  # so that the shared connection is made by this test's engine
    engines: list[sa.Engine] = []

    def made(driver: str, **kwargs: Any) -> sa.Engine:
        url = make_url(driver_url(driver))
        if driver == "asyncpg":  # asyncpg takes no application_name of the URL
            kwargs.setdefault("connect_args", {"server_settings": {"application_name": app_name}})
        else:
            url = url.update_query_dict({"application_name": app_name})
        eng = create_engine(url, **kwargs)
        engines.append(eng)
        return eng

    yield made
    for eng in engines:
        if loop is None:
            eng.dispose()
        else:
            from sqlalchemy.util.concurrency import greenlet_spawn

            loop.run_until_complete(greenlet_spawn(eng.dispose))
    STATE.close_all()


def add(conn: Any, name: str) -> None:
    conn.execute(sa.text("INSERT INTO items (name) VALUES (:name)"), {"name": name})


def names(conn: Any) -> list[str]:
    return list(conn.execute(sa.text("SELECT name FROM items ORDER BY name")).scalars())


def idle_records(eng: sa.Engine) -> list[Any]:
    """The records waiting in the engine's pool (a sync pool's queue, or the asyncio queue behind an async one)."""
    waiting = eng.pool._pool  # type: ignore[attr-defined]
    return list(waiting.queue if hasattr(waiting, "queue") else waiting._queue._queue)


def record_connection(conn: Any) -> Any:
    """What the pool record behind ``conn``'s checkout holds (a placeholder, inside a scope)."""
    return conn.connection._connection_record.dbapi_connection


sync_drivers = pytest.mark.parametrize("driver", DRIVERS)
every_driver = pytest.mark.parametrize("driver", DRIVERS + ASYNC_DRIVERS)


@every_driver
def test_one_connection_while_an_engine_is_checked_out(
    make: Callable[..., sa.Engine], count: Count, driver: str
) -> None:
    eng = make(driver)
    with sa_rollback.rollback_scope():
        with eng.connect() as conn:
            add(conn, "a")
            conn.commit()
            assert isinstance(record_connection(conn), Vacant)
            # the shared one: a sync pool's own connection became it, an async pool's was closed
            assert settled(count, 1) == 1
            with eng.connect() as second:  # a second checkout at once: its connection is closed
                assert names(second) == ["a"]
                assert settled(count, 1) == 1
        with eng.connect() as conn:  # the records hold placeholders: no connect
            assert names(conn) == ["a"]
        assert settled(count, 1) == 1
    assert settled(count, 1) == 1  # the shared connection stays for the next test


@every_driver
def test_a_checkout_outside_scopes_gets_a_real_connection_that_commits(
    make: Callable[..., sa.Engine], count: Count, driver: str, outside: Callable[..., Any]
) -> None:
    eng = make(driver)
    with sa_rollback.rollback_scope():
        with eng.begin() as conn:
            add(conn, "rolled back")
    assert isinstance(idle_records(eng)[0].dbapi_connection, Vacant)
    try:
        with eng.begin() as conn:  # outside every scope: reconnected (an async one on this loop), real
            assert not isinstance(record_connection(conn), Vacant)
            assert conn.execute(sa.text("SHOW transaction_read_only")).scalar() == "off"
            add(conn, "real")
        assert outside("SELECT name FROM items") == [("real",)]
        assert settled(count, 2) == 2  # the shared one (of this loop, for asyncpg), and the pool's own again
        with sa_rollback.rollback_scope():  # the next scope makes way again: one
            with eng.connect() as conn:
                assert names(conn) == ["real"]
                assert settled(count, 1) == 1
    finally:
        with psycopg.connect(libpq_dsn(DB_A), autocommit=True) as cleanup:
            cleanup.execute("DELETE FROM items")


@every_driver
def test_pre_ping_is_answered_without_a_connection(make: Callable[..., sa.Engine], count: Count, driver: str) -> None:
    eng = make(driver, pool_pre_ping=True, pool_size=1)
    for _ in range(3):  # the checkouts after the first ping the placeholder
        with sa_rollback.rollback_scope():
            with eng.begin() as conn:
                add(conn, "pinged")
                assert settled(count, 1) == 1
            with eng.connect() as conn:
                assert names(conn) == ["pinged"]
    with eng.connect() as conn:  # outside: pinged, then reconnected for real
        assert names(conn) == []
        assert settled(count, 2) == 2


@sync_drivers
def test_recycle_closes_nothing_shared(make: Callable[..., sa.Engine], count: Count, driver: str) -> None:
    eng = make(driver, pool_recycle=1, pool_size=1)
    with sa_rollback.rollback_scope():
        with eng.begin() as conn:
            add(conn, "before")
        time.sleep(1.1)
        with eng.connect() as conn:  # recycled: the placeholder is closed, a new connection made and closed
            assert names(conn) == ["before"]
            add(conn, "after")
            conn.commit()
            assert settled(count, 1) == 1
    with eng.connect() as conn:
        assert names(conn) == []


@sync_drivers
def test_dispose_and_invalidate_mid_test(make: Callable[..., sa.Engine], count: Count, driver: str) -> None:
    eng = make(driver)
    with sa_rollback.rollback_scope():
        with eng.begin() as conn:
            add(conn, "kept")
        eng.dispose()  # closes the pool's records: placeholders only
        with eng.connect() as conn:
            assert names(conn) == ["kept"]
            conn.invalidate()  # the pool discards the record: the shared connection lives on
        with eng.connect() as conn:
            assert names(conn) == ["kept"]
        assert settled(count, 1) == 1
    with eng.connect() as conn:
        assert names(conn) == []


@sync_drivers
def test_driver_connection_connects_only_when_used(make: Callable[..., sa.Engine], count: Count, driver: str) -> None:
    eng = make(driver)
    with sa_rollback.rollback_scope():
        with eng.connect() as conn:
            add(conn, "test's")
            real = conn.connection.driver_connection
            assert settled(count, 1) == 1
            cursor = real.cursor()
            cursor.execute("SELECT count(*) FROM items")  # the pool's own connection: committed data only
            assert cursor.fetchone()[0] == 0
            real.rollback()
            assert settled(count, 2) == 2
            conn.commit()
        assert settled(count, 1) == 1  # closed when the checkout ended


@sync_drivers
def test_garbage_collected_and_detached_checkouts(make: Callable[..., sa.Engine], count: Count, driver: str) -> None:
    eng = make(driver)
    with sa_rollback.rollback_scope():
        conn = eng.connect()
        add(conn, "uncommitted")
        del conn
        gc.collect()
        with eng.connect() as conn:
            assert names(conn) == []
        detached = eng.connect()
        detached.detach()
        add(detached, "detached")
        detached.commit()
        detached.close()
        with eng.connect() as conn:
            assert names(conn) == ["detached"]
        assert settled(count, 1) == 1
    with eng.connect() as conn:
        assert names(conn) == []


@sync_drivers
def test_null_pool_keeps_one_connection(make: Callable[..., sa.Engine], count: Count, driver: str) -> None:
    eng = make(driver, poolclass=NullPool)
    with sa_rollback.rollback_scope():
        for i in range(3):
            with eng.begin() as conn:
                add(conn, f"n{i}")
        with eng.connect() as conn:
            assert len(names(conn)) == 3
            assert settled(count, 1) == 1


@sync_drivers
def test_a_taken_connection_gets_the_lock_timeout_unless_the_application_set_one(
    make: Callable[..., sa.Engine], driver: str
) -> None:
    """What a shared connection made for the purpose gets at connect (a statement never waits forever)."""
    expected = f"{int(STATE.lock_timeout * 1000)}ms"
    with sa_rollback.rollback_scope():
        with make(driver).connect() as conn:
            shown = conn.execute(sa.text("SELECT setting || 'ms' FROM pg_settings WHERE name = 'lock_timeout'"))
            assert shown.scalar() == expected
    STATE.close_all()
    with sa_rollback.rollback_scope():
        with make(driver, connect_args={"options": "-c lock_timeout=5s"}).connect() as conn:
            assert conn.execute(sa.text("SHOW lock_timeout")).scalar() == "5s"


@sync_drivers
def test_static_pool_keeps_its_connection(make: Callable[..., sa.Engine], count: Count, driver: str) -> None:
    """StaticPool lends one record to several checkouts at once: its connection stays, guarded, as before."""
    eng = make(driver, poolclass=StaticPool)
    with sa_rollback.rollback_scope():
        with eng.begin() as conn:
            add(conn, "static")
            assert not isinstance(conn.connection.driver_connection, Vacant)
            assert settled(count, 2) == 2


WORKERS_CONFTEST = """
import os

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

pytest_plugins = ["sa_rollback"]
APP = os.environ["INNER_APP"]
ENGINE = sa.create_engine(make_url(os.environ["INNER_URL"]).update_query_dict({"application_name": APP}))


def connections(database):
    '''The server connections of the application's engine to this worker's database, counted from outside.'''
    url = make_url(os.environ["INNER_URL"]).set(drivername="postgresql", database=database)
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as plain:
        return plain.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            (database, APP),
        ).fetchone()[0]
"""

WORKERS_TESTS = """
import pytest
import sqlalchemy as sa
from conftest import ENGINE, connections


@pytest.mark.parametrize("n", range(6))
def test_one_connection_per_database(n):
    with ENGINE.connect() as conn:
        database = conn.execute(sa.text("SELECT current_database()")).scalar()
        with ENGINE.begin() as second:  # two checkouts at once
            second.execute(sa.text("INSERT INTO items (name) VALUES ('x')"))
            assert connections(database) == 1
        assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar() == 1
        assert connections(database) == 1
"""


@sync_drivers
def test_each_worker_holds_one_connection_per_database(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    monkeypatch.setenv("SA_ROLLBACK_URL", driver_url(driver))
    monkeypatch.setenv("INNER_URL", driver_url(driver))
    monkeypatch.setenv("INNER_APP", f"budget {uuid.uuid4().hex[:12]}")
    for name in ("SA_ROLLBACK", "SA_ROLLBACK_SCHEMA", "SA_ROLLBACK_REPORT", "SA_ROLLBACK_DETECT_OUTSIDE"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(WORKERS_CONFTEST)
    pytester.makefile(".sql", schema="CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);")
    pytester.makepyfile(test_inner=WORKERS_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--sa-schema=sql:schema.sql", "--sa-rebuild=on", "-n", "2"
    )
    result.assert_outcomes(passed=6)


# -- async engines ----------------------------------------------------------------------------
#
# The bodies below are sync code on an async engine's sync face, run in SQLAlchemy's greenlet on
# the test's own event loop (conftest's pytest_pyfunc_call), as AsyncConnection.run_sync runs it.

async_drivers = pytest.mark.parametrize("driver", ASYNC_DRIVERS)


@pytest.fixture
def aloop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """The loop the test's body runs on; closing it retires asyncpg's shared connection of the loop."""
    loop = asyncio.new_event_loop()
    request.node.stash[LOOP] = loop
    yield loop
    loop.close()  # looked up late: sa_rollback wraps close()


@async_drivers
def test_an_async_engine_resets_disposes_invalidates_and_collects(
    make: Callable[..., sa.Engine],
    count: Count,
    driver: str,
    caplog: pytest.LogCaptureFixture,
    aloop: asyncio.AbstractEventLoop,
) -> None:
    """What the pool does to a placeholder, without a server connection for it (judged by the pool's connects)."""
    caplog.set_level(logging.ERROR, logger="sqlalchemy.pool")
    eng = make(driver)
    connects: list[int] = []
    sa.event.listen(eng, "connect", lambda *args: connects.append(1))
    with sa_rollback.rollback_scope():
        with eng.begin() as conn:
            add(conn, "kept")
        assert len(connects) == 2  # the pool's own (closed), and the shared one
        # The pool resets these on the record's connection at check-in: a placeholder has nothing to reset.
        options = {"isolation_level": "SERIALIZABLE", "postgresql_readonly": True, "postgresql_deferrable": True}
        with eng.connect().execution_options(**options) as conn:
            assert names(conn) == ["kept"]
        assert settled(count, 1) == 1
        eng.dispose()  # closes the pool's records: placeholders only
        with eng.connect() as conn:  # a new pool: a connect, closed at once
            assert names(conn) == ["kept"]
            conn.invalidate()  # the pool terminates the placeholder: the shared connection lives on
        with eng.connect() as conn:  # the record connects again
            assert names(conn) == ["kept"]
        assert len(connects) == 4
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SQLAlchemy's own: a checkout collected without close()
            lost = [eng.connect()]
            add(lost[0], "uncommitted")
            lost.clear()
            gc.collect()  # here, in the greenlet
            # Outside the greenlet, as usual. Unused: a statement of sa_rollback's to end the checkout's
            # savepoint cannot run there on asyncpg (its connection can only be awaited), a known limit.
            lost.append(eng.connect())
            aloop.call_soon(lambda: (lost.clear(), gc.collect()))
            await_(asyncio.sleep(0.01))
        assert len(connects) == 5  # the first collected one's record reconnects for the second
        with eng.connect() as conn:
            assert names(conn) == ["kept"]
        assert settled(count, 1) == 1
    with eng.connect() as conn:
        assert names(conn) == []
    # The pool closed all it tried to; it logs its own word on each collected checkout.
    failures = [r.getMessage() for r in caplog.records if not r.getMessage().startswith("The garbage collector")]
    assert failures == []


@async_drivers
def test_an_async_driver_connection_connects_only_in_the_greenlet(
    make: Callable[..., sa.Engine], count: Count, driver: str, aloop: asyncio.AbstractEventLoop
) -> None:
    eng = make(driver)
    with sa_rollback.rollback_scope():
        with eng.connect() as conn:
            add(conn, "test's")
            conn.commit()
            fairy = conn.connection
            seen: list[BaseException] = []

            def from_a_coroutine() -> None:  # where driver_connection is usually read: no greenlet there
                try:
                    fairy.driver_connection  # noqa: B018
                except sa_rollback.UnsupportedOperationError as error:
                    seen.append(error)

            aloop.call_soon(from_a_coroutine)
            await_(asyncio.sleep(0.01))
            assert len(seen) == 1 and "run_sync" in str(seen[0])
            assert settled(count, 1) == 1
            real = fairy.driver_connection  # here, in the greenlet: a connection of the pool's own
            if driver == "asyncpg":
                committed = await_(real.fetchval("SELECT count(*) FROM items"))
            else:
                committed = await_(await_(real.execute("SELECT count(*) FROM items")).fetchone())[0]
                await_(real.rollback())
            assert committed == 0  # it sees committed data only
            assert settled(count, 2) == 2
        assert settled(count, 1) == 1  # closed when the checkout ended


ASYNC_CONFTEST = """
import asyncio
import logging
import os
import time

import psycopg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

pytest_plugins = ["sa_rollback"]
APP = os.environ["INNER_APP"]
URL = make_url(os.environ["INNER_URL"])
if URL.drivername.endswith("asyncpg"):
    KWARGS = {"connect_args": {"server_settings": {"application_name": APP}}}
else:
    URL, KWARGS = URL.update_query_dict({"application_name": APP}), {}
ENGINE = create_async_engine(URL, pool_pre_ping=os.environ["INNER_PING"] == "1", **KWARGS)
POOL_ERRORS = []


class Errors(logging.Handler):
    def emit(self, record):
        POOL_ERRORS.append(record.getMessage())


logging.getLogger("sqlalchemy.pool").addHandler(Errors(logging.ERROR))


def connections(expected):
    '''The server connections of the engine, counted from outside, once closed ones have left.'''
    dsn = URL.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as plain:
        deadline = time.monotonic() + 2
        while True:
            seen = plain.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()",
                (APP,),
            ).fetchone()[0]
            if seen == expected or time.monotonic() > deadline:
                return seen
            time.sleep(0.02)


async def names():
    async with ENGINE.connect() as conn:
        return list((await conn.execute(sa.text("SELECT name FROM items ORDER BY name"))).scalars())


async def add(name):
    async with ENGINE.begin() as conn:
        await conn.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})


async def remove():
    async with ENGINE.begin() as conn:
        await conn.execute(sa.text("DELETE FROM items WHERE name = 'committed'"))
    await ENGINE.dispose()


if os.environ["INNER_FIXTURE_LOOP"] == "session":

    @pytest_asyncio.fixture(scope="session", loop_scope="session")
    async def committed():
        '''Outside every test: commits for real through the engine, and deletes it at the end.'''
        await add("committed")
        yield
        await remove()

else:  # a loop of its own, closed before the tests run

    @pytest.fixture(scope="session")
    def committed():
        asyncio.run(add("committed"))
        yield
        asyncio.run(remove())


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"pool errors: {POOL_ERRORS}")
"""

ASYNC_TESTS = """
import pytest
import sqlalchemy as sa
from conftest import ENGINE, add, connections, names

pytestmark = pytest.mark.asyncio(loop_scope="{scope}")


@pytest.mark.parametrize("n", range(3))
async def test_one_connection(committed, n):
    assert await names() == ["committed"]
    async with ENGINE.connect() as conn:
        async with ENGINE.connect() as second:  # two checkouts at once: two records
            await second.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {{"n": "{scope}"}})
            await second.commit()
            assert connections(1) == 1
        rows = await conn.execute(sa.text("SELECT name FROM items ORDER BY name"))
        assert list(rows.scalars()) == ["committed", "{scope}"]
    assert connections(1) == 1
"""


@pytest.mark.skipif(not ASYNC_DRIVERS, reason="SQLAlchemy 1.4's asyncio support is not covered")
@pytest.mark.parametrize(
    ("fixture_loop", "pre_ping"),
    # Not the session's loop with pre-ping: the pool would ping that loop's connection from a test's
    # loop before any listener runs, which fails with or without sa_rollback.
    [("session", False), ("own", False), ("own", True)],
    ids=["session-loop", "closed-loop", "closed-loop-pre-ping"],
)
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_pytest_asyncio_suites_keep_one_connection(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    outside: Callable[..., Any],
    driver: str,
    fixture_loop: str,
    pre_ping: bool,
) -> None:
    """A session fixture commits through the engine outside the tests (in the session's loop, or in a loop
    of its own that closes); tests in a loop each, then in a module's loop, hold one connection (for
    asyncpg, the loop's shared one: the fixture's pool connection, of another loop, is aborted from the
    first test's); the fixture's teardown reconnects, outside tests, and commits."""
    monkeypatch.setenv("SA_ROLLBACK_URL", driver_url(driver))
    monkeypatch.setenv("INNER_URL", driver_url(driver))
    monkeypatch.setenv("INNER_APP", f"budget {uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("INNER_PING", "1" if pre_ping else "0")
    monkeypatch.setenv("INNER_FIXTURE_LOOP", fixture_loop)
    pytester.makeconftest(ASYNC_CONFTEST)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        test_a_function=ASYNC_TESTS.format(scope="function"), test_b_module=ASYNC_TESTS.format(scope="module")
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error::sa_rollback.SaRollbackWarning")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["pool errors: []"])
    assert outside("SELECT count(*) FROM items") == [(0,)]
