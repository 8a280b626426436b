"""Async engines under the plugin: pytest-asyncio at every loop scope, anyio, tasks, sync beside async.

The semantics themselves run on the async drivers in test_semantics.py; here
the inner pytest runs check the wiring that only a real async test runner
shows: loops made and closed per test, module and session loops, engines made
at import time, concurrent tasks, and async fixtures of wider scopes. Every
check of what is left is made from outside, with a plain psycopg connection.
"""

from __future__ import annotations

import pytest

from ._compat import ASYNC_DRIVERS, SA14
from .conftest import driver_url

pytestmark = [
    pytest.mark.skipif(SA14, reason="SQLAlchemy 1.4's asyncio support is not covered"),
    pytest.mark.usefixtures("_inner_env"),
]

ENABLE = 'pytest_plugins = ["sa_rollback"]\n'
SCHEMA = "CREATE TABLE items (id serial PRIMARY KEY, name text UNIQUE NOT NULL, qty int NOT NULL DEFAULT 0);\n"

HELPERS = """
import os
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

ENGINE = create_async_engine(os.environ["INNER_URL"])  # made at import time, used by every loop


async def names(engine=ENGINE):
    async with engine.connect() as conn:
        return list((await conn.execute(sa.text("SELECT name FROM items ORDER BY name"))).scalars())


async def add(name, engine=ENGINE):
    async with AsyncSession(engine) as session:
        await session.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
        await session.commit()
"""


@pytest.fixture(params=ASYNC_DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def _inner_env(monkeypatch: pytest.MonkeyPatch, driver: str) -> None:
    monkeypatch.setenv("INNER_URL", driver_url(driver))
    monkeypatch.setenv("SA_ROLLBACK_URL", driver_url(driver))
    monkeypatch.setenv("SYNC_URL", driver_url("psycopg2"))  # a sync engine beside the async ones


def _ini(pytester: pytest.Pytester, loop_scope: str = "function") -> None:
    pytester.makeini(
        f"""
        [pytest]
        asyncio_default_fixture_loop_scope = {loop_scope}
        asyncio_default_test_loop_scope = {loop_scope}
        """
    )


LOOP_SCOPE_MODULE = """
import os
import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from helpers import add, names

pytestmark = pytest.mark.asyncio(loop_scope="{scope}")


@pytest.mark.parametrize("n", range(3))
async def test_module_engine(n):
    assert await names() == []
    await add(f"{scope}{{n}}")
    assert await names() == [f"{scope}{{n}}"]


async def test_engine_made_in_the_test():
    engine = create_async_engine(os.environ["INNER_URL"])
    await add("inside", engine)
    assert await names() == ["inside"]  # the module's engine sees it
    await engine.dispose()
"""


def test_every_test_starts_empty_at_any_loop_scope(pytester: pytest.Pytester, outside) -> None:
    pytester.makeconftest(ENABLE)
    _ini(pytester)
    pytester.makepyfile(
        helpers=HELPERS,
        **{f"test_{scope}": LOOP_SCOPE_MODULE.format(scope=scope) for scope in ("function", "module", "session")},
        test_sync="""
        def test_sync_test_between():
            pass
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error::sa_rollback.SaRollbackWarning")
    result.assert_outcomes(passed=13)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_anyio_plugin(pytester: pytest.Pytester, outside) -> None:
    pytester.makeconftest(
        ENABLE
        + """
import pytest

@pytest.fixture
def anyio_backend():
    return "asyncio"
"""
    )
    pytester.makepyfile(
        helpers=HELPERS,
        test_anyio="""
        import pytest
        from helpers import add, names

        @pytest.mark.anyio
        @pytest.mark.parametrize("n", range(2))
        async def test_isolated(n):
            assert await names() == []
            await add(f"a{n}")
            assert await names() == [f"a{n}"]
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(passed=2)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_gathered_tasks_each_commit(pytester: pytest.Pytester, outside) -> None:
    pytester.makeconftest(ENABLE)
    _ini(pytester)
    pytester.makepyfile(
        helpers=HELPERS,
        test_gather="""
        import asyncio
        import pytest
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import AsyncSession
        from helpers import ENGINE, add, names

        @pytest.mark.asyncio
        async def test_gather():
            async def request(i):
                async with AsyncSession(ENGINE) as session:
                    await session.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": f"g{i:02}"})
                    await asyncio.sleep(0.01)  # other tasks run between the insert and the commit
                    await session.commit()
            await asyncio.gather(*(request(i) for i in range(12)))
            assert await names() == [f"g{i:02}" for i in range(12)]

        @pytest.mark.asyncio
        async def test_one_fails_the_others_land():
            async def request(i):
                async with AsyncSession(ENGINE) as session:
                    await session.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": f"f{i}"})
                    if i == 1:
                        await session.execute(sa.text("SELECT 1/0"))
                    await session.commit()
            results = await asyncio.gather(*(request(i) for i in range(3)), return_exceptions=True)
            assert [type(r).__name__ for r in results] == ["NoneType", "DBAPIError", "NoneType"] or [
                type(r).__name__ for r in results
            ] == ["NoneType", "DataError", "NoneType"]
            assert await names() == ["f0", "f2"]
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_a_task_that_holds_the_connection_too_long_is_named(pytester: pytest.Pytester, outside, driver: str) -> None:
    if driver == "psycopg_async":
        pytest.skip("psycopg async runs each statement through the sync connection: no task waits during one")
    pytester.makeconftest(ENABLE)
    _ini(pytester)
    pytester.makepyfile(
        helpers=HELPERS,
        test_slow="""
        import asyncio
        import pytest
        import sqlalchemy as sa
        from helpers import ENGINE

        @pytest.mark.asyncio
        async def test_slow():
            async def slow():
                async with ENGINE.connect() as conn:
                    await conn.execute(sa.text("SELECT pg_sleep(1.5)"))

            async def quick():
                await asyncio.sleep(0.2)
                async with ENGINE.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))

            await asyncio.gather(asyncio.create_task(slow(), name="slow-request"),
                                 asyncio.create_task(quick(), name="quick-request"))
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sa-lock-timeout=0.5")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*LockTimeoutError*held by task 'slow-request' (waiting: task 'quick-request')*"])
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_module_data_with_a_module_loop(pytester: pytest.Pytester, outside) -> None:
    pytester.makeconftest(ENABLE)
    _ini(pytester, "module")
    pytester.makepyfile(
        helpers=HELPERS,
        test_data="""
        import pytest
        import pytest_asyncio
        from helpers import add, names

        @pytest_asyncio.fixture(scope="module", loop_scope="module")
        async def catalog(sa_rollback_module_scope):
            await add("catalog")

        @pytest.mark.asyncio(loop_scope="module")
        async def test_sees_it(catalog):
            assert await names() == ["catalog"]
            await add("mine")

        @pytest.mark.asyncio(loop_scope="module")
        async def test_sees_it_as_left(catalog):
            assert await names() == ["catalog"]
        """,
        test_later="""
        import pytest
        from helpers import names

        @pytest.mark.asyncio(loop_scope="module")
        async def test_gone():
            assert await names() == []
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_sync_and_async_in_one_test_are_separate_and_say_so(pytester: pytest.Pytester, outside) -> None:
    pytester.makeconftest(ENABLE)
    _ini(pytester)
    pytester.makepyfile(
        helpers=HELPERS,
        test_mixed="""
        import os
        import pytest
        import sqlalchemy as sa
        from helpers import add, names

        SYNC = sa.create_engine(os.environ["SYNC_URL"])

        @pytest.mark.asyncio
        async def test_mixed():
            with SYNC.begin() as conn:
                conn.execute(sa.text("INSERT INTO items (name) VALUES ('sync')"))
            await add("async")
            assert await names() == ["async"]  # a separate transaction: the sync row is not visible
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*get separate transactions*"])
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_psycopg_sync_and_async_share_one_transaction(pytester: pytest.Pytester, outside, driver: str) -> None:
    if driver != "psycopg_async":
        pytest.skip("only psycopg can put a sync and an async connection on one backend")
    pytester.makeconftest(ENABLE)
    _ini(pytester)
    pytester.makepyfile(
        helpers=HELPERS,
        test_shared="""
        import os
        import pytest
        import sqlalchemy as sa
        from helpers import add, names

        SYNC = sa.create_engine(os.environ["SYNC_URL"].replace("psycopg2", "psycopg"))

        def sync_names():
            with SYNC.connect() as conn:
                return list(conn.execute(sa.text("SELECT name FROM items ORDER BY name")).scalars())

        @pytest.mark.asyncio
        @pytest.mark.parametrize("n", range(2))
        async def test_factory_then_app(n):
            with SYNC.begin() as conn:  # a sync factory
                conn.execute(sa.text("INSERT INTO items (name) VALUES ('made-by-factory')"))
            assert await names() == ["made-by-factory"]  # the async app sees it
            await add("made-by-app")
            assert sync_names() == ["made-by-app", "made-by-factory"]
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error::sa_rollback.SaRollbackWarning")
    result.assert_outcomes(passed=2)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_under_xdist(pytester: pytest.Pytester, outside) -> None:
    pytester.makeconftest(ENABLE)
    _ini(pytester)
    pytester.makefile(".sql", schema=SCHEMA)
    pytester.makepyfile(
        helpers=HELPERS,
        test_x="""
        import pytest
        from helpers import add, names

        @pytest.mark.asyncio
        @pytest.mark.parametrize("n", range(6))
        async def test_same_key_in_every_test(n):
            assert await names() == []
            await add("same")  # a unique name: each worker has its own database
            assert await names() == ["same"]
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--sa-schema=sql:schema.sql")
    result.assert_outcomes(passed=6)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_sync_and_async_writing_one_row_never_hang(pytester: pytest.Pytester, outside) -> None:
    pytester.makeconftest(ENABLE)
    _ini(pytester)
    pytester.makepyfile(
        helpers=HELPERS,
        test_clash="""
        import os
        import pytest
        import sqlalchemy as sa
        from helpers import add

        SYNC = sa.create_engine(os.environ["SYNC_URL"])

        @pytest.mark.asyncio
        async def test_async_first():
            await add("clash")
            with SYNC.begin() as conn:  # blocks the loop on the async transaction's row lock
                conn.execute(sa.text("INSERT INTO items (name) VALUES ('clash')"))

        @pytest.mark.asyncio
        async def test_sync_first():
            with SYNC.begin() as conn:
                conn.execute(sa.text("INSERT INTO items (name) VALUES ('clash')"))
            await add("clash")
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sa-lock-timeout=1", "-W", "ignore")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*lock timeout*"])
    assert result.duration < 60
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_module_engine_with_pre_ping_under_a_loop_per_test(pytester: pytest.Pytester, outside) -> None:
    """``pool_pre_ping=True`` on the application's engine: SQLAlchemy pings the pool's connection before the
    checkout listeners run, and under a loop per test that connection belongs to an earlier, closed loop."""
    pytester.makeconftest(ENABLE)
    _ini(pytester)
    pytester.makepyfile(
        helpers=HELPERS,
        test_pre_ping="""
        import os
        import pytest
        from sqlalchemy.ext.asyncio import create_async_engine
        from helpers import add, names

        ENGINE = create_async_engine(os.environ["INNER_URL"], pool_pre_ping=True)
        pytestmark = pytest.mark.asyncio


        @pytest.mark.parametrize("n", range(3))
        async def test_pre_ping(n):
            assert await names(ENGINE) == []
            await add(f"p{n}", ENGINE)
            assert await names(ENGINE) == [f"p{n}"]
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_reset_sequences_is_refused_on_asyncpg_and_works_on_psycopg_async(
    pytester: pytest.Pytester, outside, driver: str
) -> None:
    pytester.makeconftest(ENABLE)
    _ini(pytester)
    pytester.makefile(".sql", schema=SCHEMA)
    pytester.makepyfile(
        helpers=HELPERS,
        test_ids="""
        import pytest
        import sqlalchemy as sa
        from helpers import ENGINE, add

        @pytest.mark.asyncio
        @pytest.mark.sa_rollback(reset_sequences=True)
        @pytest.mark.parametrize("n", range(2))
        async def test_first_id_every_time(n):
            await add(f"r{n}")
            async with ENGINE.connect() as conn:
                assert (await conn.execute(sa.text("SELECT id FROM items"))).scalar() == 1
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema=sql:schema.sql")
    if driver == "asyncpg":
        result.assert_outcomes(failed=2)
        result.stdout.fnmatch_lines(["*reset_sequences is on, but * is reached through asyncpg*"])
    else:
        result.assert_outcomes(passed=2)
    assert outside("SELECT count(*) FROM items") == [(0,)]
