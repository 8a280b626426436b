"""Query capture: the ``sa_queries`` fixture, and ``capture_queries()`` without pytest.

The fixture's behaviour and its failure output run in a pytest subprocess, as
the plugin's other tests; the core's capture runs here, in a rollback scope.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import sa_rollback
from sa_rollback import _queries

from .conftest import DB_A, DB_B, driver_url

#: how a statement on DB_A starts in the list, for fnmatch (where "[" opens a set of characters)
AT_A = f"[[]{DB_A}]"

INNER_CONFTEST = """
import os
import pytest
import sqlalchemy as sa

pytest_plugins = ["sa_rollback"]
ENGINE = sa.create_engine(os.environ["INNER_URL"])
OTHER = sa.create_engine(os.environ["INNER_OTHER_URL"])
"""

COUNTING = """
import sqlalchemy as sa
from conftest import ENGINE, OTHER


def test_counts_what_the_test_sends(sa_queries):
    with ENGINE.begin() as conn:
        conn.execute(sa.text("INSERT INTO items (name) VALUES (:name)"), {"name": "a"})
    # Another connection reads after that commit: sa_rollback takes a SAVEPOINT of its own first.
    with ENGINE.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar() == 1
    sa_queries.assert_count(2)
    first, second = sa_queries.statements
    assert first.sql.startswith("INSERT INTO items") and first.params == {"name": "a"}
    assert second.sql == "SELECT count(*) FROM items" and second.params in (None, {})
    assert first.database == second.database == ENGINE.url.database
    assert first.duration is not None and 0 < first.duration < 5
    assert not any("SAVEPOINT" in query.sql or "ROLLBACK" in query.sql for query in sa_queries)


def test_a_block_and_a_database(sa_queries):
    with ENGINE.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    with sa_queries.expect(2) as block:
        with ENGINE.connect() as conn, OTHER.connect() as other:
            conn.execute(sa.text("SELECT 2"))
            other.execute(sa.text("SELECT 3"))
        assert block.count == 2  # filled in while the block runs
    assert sa_queries.count == 3
    sa_queries.on(OTHER.url.database).assert_count(1)
    sa_queries.assert_count(2, database=ENGINE.url.database)
    with sa_queries.expect(0, database=OTHER.url.database):
        with ENGINE.connect() as conn:
            conn.execute(sa.text("SELECT 4"))
    assert [query.sql for query in sa_queries.on(ENGINE.url.database)] == ["SELECT 1", "SELECT 2", "SELECT 4"]
    sa_queries.clear()
    sa_queries.assert_count(0)


def test_the_applications_own_savepoints_count(sa_queries):
    with ENGINE.connect() as conn:
        with conn.begin():
            with conn.begin_nested():
                conn.execute(sa.text("SELECT 1"))
    assert [query.sql.split()[0] for query in sa_queries] == ["SAVEPOINT", "SELECT", "RELEASE"]
    assert sa_queries[0].duration is None  # sa_rollback answered it without the server
"""

FAILING = """
import pytest
import sqlalchemy as sa
from conftest import ENGINE


def test_too_many(sa_queries):
    with ENGINE.begin() as conn:
        conn.execute(sa.text("INSERT INTO items (name) VALUES (:name)"), {"name": "b"})
        conn.execute(sa.text("SELECT name FROM items"))
    sa_queries.assert_count(1)


def test_block_too_few(sa_queries):
    with ENGINE.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        with sa_queries.expect(2):
            conn.execute(sa.text("SELECT 2"))


@pytest.mark.sa_rollback(enabled=False)
def test_without_a_scope(sa_queries):
    pass
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, driver: str) -> pytest.Pytester:
    monkeypatch.setenv("SA_ROLLBACK_URL", driver_url(driver))
    monkeypatch.setenv("INNER_URL", driver_url(driver))
    monkeypatch.setenv("INNER_OTHER_URL", driver_url(driver, DB_B))
    for name in ("SA_ROLLBACK", "SA_ROLLBACK_SCHEMA", "SA_ROLLBACK_REPORT"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(INNER_CONFTEST)
    return pytester


def test_sa_queries_records_what_the_test_sends(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_counting=COUNTING)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_sa_queries_fails_with_the_numbered_statements(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_failing=FAILING)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "E * Expected 1 statement, but 2 were sent:",
            f"E *  1. {AT_A} INSERT INTO items (name) VALUES (%(name)s) -- params {{'name': 'b'}} (* ms)",
            f"E *  2. {AT_A} SELECT name FROM items (* ms)",
        ]
    )
    result.stdout.fnmatch_lines(
        ["E * Expected 2 statements in the block, but 1 was sent:", f"E *  1. {AT_A} SELECT 2 (* ms)"]
    )
    result.stdout.fnmatch_lines(["*sa_queries records the statements of the test's rollback scope*without one*"])
    assert "SELECT 1 (" not in result.stdout.str()  # before the block: not listed with it


def test_sa_queries_matches_the_configured_name_on_a_clone(inner: pytest.Pytester) -> None:
    inner.makefile(".sql", schema="CREATE TABLE items (id serial PRIMARY KEY, name text);")
    inner.makepyfile(
        test_clone=f"""
        import sqlalchemy as sa
        from conftest import ENGINE

        def test_clone(sa_queries):
            with ENGINE.connect() as conn:
                assert conn.execute(sa.text("SELECT current_database()")).scalar() != {DB_A!r}
            sa_queries.on({DB_A!r}).assert_count(1)
        """
    )
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema=sql:schema.sql")
    result.assert_outcomes(passed=1)


# -- the core, without pytest's plugin ----------------------------------------------------------


def test_capture_queries_records_inside_a_scope(engine: sa.Engine, scope: sa_rollback.RollbackScope) -> None:
    with sa_rollback.capture_queries() as outer:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            with sa_rollback.capture_queries() as inner:  # captures nest: both record
                conn.execute(sa.text("SELECT :x"), {"x": 2})
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 3"))  # after both: not recorded
    assert [query.sql for query in outer] == ["SELECT 1", "SELECT %(x)s"]
    assert [query.params for query in inner] == [{"x": 2}]
    assert _queries.active is None
    with pytest.raises(sa_rollback.QueryCountError, match=r"Expected 1 statement, but 2 were sent:\n  1\. \["):
        outer.assert_count(1)


def test_nothing_is_recorded_when_nobody_captures(engine: sa.Engine, scope: sa_rollback.RollbackScope) -> None:
    with sa_rollback.capture_queries() as queries:
        pass
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    assert queries.count == 0 and _queries.active is None
