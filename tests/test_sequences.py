"""reset_sequences: each scope hands out the ids it would have handed out first.

Core tests run on a database of their own (one per xdist worker, since
``setval`` is not transactional) and are judged from a plain psycopg
connection. Plugin tests run inner sessions in a subprocess on clones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

import sa_rollback
from sa_rollback import ConfigurationError, _sequences
from sa_rollback._state import STATE

from .conftest import DB_A, RUN_ID, WORKER, driver_url, libpq_dsn

#: this process's own, like the suite's other databases: two runs or workers never share it
SEQ_DB = f"sa_rollback_selftest_{RUN_ID}_{WORKER}_seq"

SEQ_SCHEMA = """
DROP SCHEMA IF EXISTS other CASCADE;
DROP TABLE IF EXISTS s_serial, s_big, s_ident, s_shared_a, s_shared_b CASCADE;
DROP SEQUENCE IF EXISTS shared_seq;
CREATE TABLE s_serial (id serial PRIMARY KEY, x int);
CREATE TABLE s_big (id bigserial PRIMARY KEY, x int);
CREATE TABLE s_ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, x int);
CREATE SEQUENCE shared_seq;
CREATE TABLE s_shared_a (id int PRIMARY KEY DEFAULT nextval('shared_seq'), x int);
CREATE TABLE s_shared_b (id int PRIMARY KEY DEFAULT nextval('shared_seq'), x int);
CREATE SCHEMA other;
CREATE TABLE other."Odd Name" (id serial PRIMARY KEY, x int);
"""
TABLES = ("s_serial", "s_big", "s_ident", "s_shared_a", "s_shared_b", 'other."Odd Name"')
SEQUENCES = ("s_serial_id_seq", "s_big_id_seq", "s_ident_id_seq", "shared_seq", 'other."Odd Name_id_seq"')


@pytest.fixture(scope="module")
def seq_db() -> Iterator[str]:
    """A database of this worker's own, with one of each kind of sequence, none used yet."""
    with psycopg.connect(libpq_dsn("postgres"), autocommit=True) as admin:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (SEQ_DB,)).fetchone() is None:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(SEQ_DB)))
    with psycopg.connect(libpq_dsn(SEQ_DB), autocommit=True) as conn:
        conn.execute(SEQ_SCHEMA)
    yield SEQ_DB
    with psycopg.connect(libpq_dsn("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(SEQ_DB)))


@pytest.fixture
def seq_engine(seq_db: str, driver: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(driver_url(driver, seq_db))
    yield eng
    eng.dispose()


@pytest.fixture
def positions(seq_db: str) -> Iterator[Callable[[], list[tuple[Any, ...]]]]:
    """Each sequence's (last_value, is_called), read outside SQLAlchemy; its rows are cleaned up after."""
    conn = psycopg.connect(libpq_dsn(seq_db), autocommit=True)

    def read() -> list[tuple[Any, ...]]:
        return [conn.execute(f"SELECT last_value, is_called FROM {name}").fetchone() or () for name in SEQUENCES]

    yield read
    counts = [conn.execute(f"SELECT count(*) FROM {table}").fetchone() for table in TABLES]
    conn.execute(SEQ_SCHEMA)
    conn.close()
    assert all(c == (0,) for c in counts), f"rows leaked: {counts}"


def insert_everywhere(engine: sa.Engine, times: int = 2) -> list[int]:
    ids = []
    with engine.begin() as conn:
        for table in TABLES:
            for _ in range(times):
                ids.append(conn.execute(sa.text(f"INSERT INTO {table} (x) VALUES (1) RETURNING id")).scalar_one())
    return ids


def test_each_scope_gets_the_same_ids(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    before = positions()
    seen = []
    for _ in range(3):
        with sa_rollback.rollback_scope(reset_sequences=True):
            seen.append(insert_everywhere(seq_engine))
        assert positions() == before
    # the shared sequence hands out 1, 2 to one table and 3, 4 to the other
    assert seen == [[1, 2, 1, 2, 1, 2, 1, 2, 3, 4, 1, 2]] * 3


def test_without_reset_ids_keep_growing(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    before = positions()
    with sa_rollback.rollback_scope():
        first = insert_everywhere(seq_engine, times=1)
    with sa_rollback.rollback_scope():
        second = insert_everywhere(seq_engine, times=1)
    assert first != second
    assert positions() != before


def test_back_where_the_outer_scope_left_them(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    with sa_rollback.rollback_scope():  # a data scope: its ids are its own
        assert insert_everywhere(seq_engine, times=1)[:2] == [1, 1]
        left = positions()
        for _ in range(2):
            with sa_rollback.rollback_scope(reset_sequences=True):
                assert insert_everywhere(seq_engine, times=1)[:2] == [2, 2]
            assert positions() == left


def test_only_the_moved_ones_and_a_sequence_set_by_hand(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    with psycopg.connect(libpq_dsn(SEQ_DB), autocommit=True) as conn:
        conn.execute("SELECT setval('s_big_id_seq', 41)")
    before = positions()
    with sa_rollback.rollback_scope(reset_sequences=True):
        with seq_engine.begin() as conn:
            assert conn.execute(sa.text("INSERT INTO s_big (x) VALUES (1) RETURNING id")).scalar() == 42
            conn.execute(sa.text("SELECT setval('s_serial_id_seq', 1000)"))
    assert positions() == before


def test_refused_on_a_database_not_listed(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    before = positions()
    with pytest.raises(ConfigurationError, match="not a database sa_rollback created"):
        with sa_rollback.rollback_scope(reset_sequences=True, sequence_databases=["elsewhere"]):
            insert_everywhere(seq_engine)
    assert positions() == before
    lenient = sa_rollback.RollbackScope(reset_sequences=True, sequence_databases=[], refuse_other_sequences=False)
    with lenient:  # a data scope: it leaves them alone
        insert_everywhere(seq_engine)
    assert positions() != before


def test_deferred_violation_still_resets(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    with psycopg.connect(libpq_dsn(SEQ_DB), autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE s_shared_b ADD CONSTRAINT ref FOREIGN KEY (x) REFERENCES s_serial (id) "
            "DEFERRABLE INITIALLY DEFERRED"
        )
    before = positions()
    with pytest.raises(sa_rollback.DeferredConstraintError):
        with sa_rollback.rollback_scope(reset_sequences=True):
            with seq_engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO s_serial (x) VALUES (1)"))
                conn.execute(sa.text("INSERT INTO s_shared_b (x) VALUES (999)"))
    assert positions() == before
    with sa_rollback.rollback_scope(reset_sequences=True):  # the connection is usable again
        assert insert_everywhere(seq_engine, times=1)[0] == 1


def _restore_statements(engine: sa.Engine) -> int:
    """How many restore statements sa_rollback has prepared on the session of ``engine``'s shared connection."""
    with engine.connect() as conn:
        # sa_rollback_<kind>_<token>_<n>: no kind of statement is left twice
        kinds = "split_part(name, '_', 3)"
        query = f"SELECT {kinds}, count(*) FROM pg_prepared_statements WHERE name LIKE 'sa\\_rollback\\_%' GROUP BY 1"
        counts = dict(conn.execute(sa.text(query)).all())
        assert set(counts) <= {"restore", "fingerprint", "moved", "snapshot"} and max(counts.values(), default=1) == 1
        return int(counts.get("restore", 0))


def test_a_lost_prepared_restore_still_puts_them_back(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    """The restore is a prepared statement: one the application deallocated is sent plainly, and prepared again."""
    before = positions()
    # prepared by the first scope; lost in the second, which sends it plainly; prepared again by the third
    for deallocate, prepared in ((False, None), (True, 1), (True, 0), (False, 1)):
        with sa_rollback.rollback_scope(reset_sequences=True):
            assert insert_everywhere(seq_engine) == [1, 2, 1, 2, 1, 2, 1, 2, 3, 4, 1, 2]
            assert prepared is None or _restore_statements(seq_engine) == prepared
            if deallocate:
                with seq_engine.connect() as conn:
                    conn.execute(sa.text("DEALLOCATE ALL"))
        assert positions() == before
    with sa_rollback.rollback_scope(reset_sequences=True):
        assert _restore_statements(seq_engine) == 1


def test_the_drivers_own_prepared_statements_come_and_go(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    """psycopg prepares a statement run five times, and deallocates all on a rollback: the restore follows."""
    # A server session of its own: an earlier test of this process may have left the shared
    # connection in plain mode on purpose (repeated losses), or with failures counted.
    STATE.close_all()
    before = positions()
    for _ in range(4):
        with sa_rollback.rollback_scope(reset_sequences=True):
            with seq_engine.connect() as conn:
                for _ in range(8):  # prepared by psycopg 3 from the sixth time
                    conn.execute(sa.text("INSERT INTO s_serial (x) VALUES (1)"))
                conn.rollback()  # ROLLBACK TO SAVEPOINT: psycopg 3 then deallocates everything
                conn.execute(sa.text("INSERT INTO s_serial (x) VALUES (1)"))
            assert _restore_statements(seq_engine) <= 1
        assert positions() == before
        # never sent an EXECUTE of a statement psycopg had deallocated
        assert all(session.failures == 0 for session in _sequences._sessions.values())
    with sa_rollback.rollback_scope(reset_sequences=True):
        assert _restore_statements(seq_engine) == 1  # prepared again where it had to be, none left behind
        assert insert_everywhere(seq_engine, times=1)[0] == 1


def test_sequences_it_cannot_read_are_left_alone(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    """A sequence the role may not use is not read (it would raise), nor the positions another role read."""
    role = f"sa_rollback_seq_reader_{RUN_ID}_{WORKER}"
    with psycopg.connect(libpq_dsn(SEQ_DB), autocommit=True) as other:
        other.execute("CREATE SEQUENCE not_for_readers")
        other.execute(sql.SQL("DROP ROLE IF EXISTS {0}; CREATE ROLE {0} LOGIN").format(sql.Identifier(role)))
        other.execute(sql.SQL("GRANT ALL ON s_serial, s_serial_id_seq TO {}").format(sql.Identifier(role)))
        reader = sa.create_engine(seq_engine.url.set(username=role))
        try:
            for engine in (seq_engine, reader):
                for _ in range(2):
                    with sa_rollback.rollback_scope(reset_sequences=True, sequence_databases=None):
                        with engine.begin() as conn:
                            assert (
                                conn.execute(sa.text("INSERT INTO s_serial (x) VALUES (1) RETURNING id")).scalar_one()
                                == 1
                            )
        finally:
            reader.dispose()
            other.execute("DROP SEQUENCE not_for_readers")
            other.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(role)))


def test_a_scope_that_does_not_reset_between_two_that_do(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    """The positions known before a scope that does not reset are checked again, and the moved ones taken anew."""
    with sa_rollback.rollback_scope(reset_sequences=True):
        assert insert_everywhere(seq_engine, times=1) == [1, 1, 1, 1, 2, 1]
    with sa_rollback.rollback_scope():  # moves one sequence, for good
        with seq_engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO s_big (x) VALUES (1)"))
    left = positions()
    for read_between in (False, True, False):
        if read_between:
            with sa_rollback.rollback_scope():  # reads only: nothing moves
                with seq_engine.connect() as conn:
                    conn.execute(sa.text("SELECT count(*) FROM s_big")).scalar_one()
        for _ in range(2):
            with sa_rollback.rollback_scope(reset_sequences=True):
                assert insert_everywhere(seq_engine, times=1) == [1, 2, 1, 1, 2, 1]
            assert positions() == left


def test_prepared_statements_lost_again_and_again(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    """A session that keeps losing them (a transaction-pooling PgBouncer) gets the plain statements."""
    before = positions()
    try:
        # every other scope, at the latest, EXECUTEs a restore that a DEALLOCATE ALL took: three in a row
        for _ in range(7):
            with sa_rollback.rollback_scope(reset_sequences=True):
                assert insert_everywhere(seq_engine, times=1)[:2] == [1, 1]
                with seq_engine.connect() as conn:
                    conn.execute(sa.text("DEALLOCATE ALL"))
            assert positions() == before
        for _ in range(2):
            with sa_rollback.rollback_scope(reset_sequences=True):
                assert _restore_statements(seq_engine) == 0  # the first would have prepared them again
                assert insert_everywhere(seq_engine, times=1)[:2] == [1, 1]
            assert positions() == before
    finally:
        for session in _sequences._sessions.values():
            session.failures = 0


def test_a_sequence_the_test_drops(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    """The restore skips a sequence the test dropped (the rollback brings it back) instead of failing on it."""
    before = positions()
    for _ in range(2):
        with sa_rollback.rollback_scope(reset_sequences=True):
            assert insert_everywhere(seq_engine, times=1)[:2] == [1, 1]
            with seq_engine.begin() as conn:
                conn.execute(sa.text("DROP TABLE s_big"))  # and its sequence
        assert positions() == before


def test_work_between_scopes_moves_the_reference(seq_engine: sa.Engine, positions: Callable[[], Any]) -> None:
    """A scope reuses the positions the previous one restored, unless something may have moved them since."""

    def first_ids() -> list[int]:
        with sa_rollback.rollback_scope(reset_sequences=True):
            return insert_everywhere(seq_engine, times=1)

    assert first_ids() == first_ids() == [1, 1, 1, 1, 2, 1]
    try:
        with seq_engine.begin() as conn:  # outside every scope: real, and its id stays taken
            conn.execute(sa.text("INSERT INTO s_serial (x) VALUES (1)"))
        assert first_ids()[0] == first_ids()[0] == 2
        with sa_rollback.rollback_scope():  # a scope that leaves the sequences where it took them
            insert_everywhere(seq_engine, times=1)
        assert first_ids()[:2] == first_ids()[:2] == [3, 2]
        with psycopg.connect(libpq_dsn(SEQ_DB), autocommit=True) as raw:  # a new sequence, where nothing sees it
            raw.execute("CREATE TABLE s_late (id serial PRIMARY KEY)")
        for _ in range(2):
            with sa_rollback.rollback_scope(reset_sequences=True):
                with seq_engine.begin() as conn:
                    assert conn.execute(sa.text("INSERT INTO s_late DEFAULT VALUES RETURNING id")).scalar() == 1
    finally:
        with psycopg.connect(libpq_dsn(SEQ_DB), autocommit=True) as raw:
            raw.execute("DELETE FROM s_serial")
            raw.execute("DROP TABLE IF EXISTS s_late")


# -- the plugin: an inner suite that hard-codes ids from 1 ----------------------

INNER_SCHEMA = """
CREATE TABLE items (id serial PRIMARY KEY, x int);
CREATE TABLE ident (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, x int);
CREATE SEQUENCE shared_seq;
CREATE TABLE shared_a (id int PRIMARY KEY DEFAULT nextval('shared_seq'), x int);
CREATE TABLE shared_b (id int PRIMARY KEY DEFAULT nextval('shared_seq'), x int);
CREATE SCHEMA other;
CREATE TABLE other.things (id bigserial PRIMARY KEY, x int);
CREATE TABLE seeded (id serial PRIMARY KEY, x int);
CREATE TABLE loose (id serial PRIMARY KEY, x int);
"""

INNER_CONFTEST = """
import os
import psycopg
import pytest
import sqlalchemy as sa

pytest_plugins = ["sa_rollback"]
ENGINE = sa.create_engine(os.environ["INNER_URL"])


def insert(table):
    with ENGINE.begin() as conn:
        return conn.execute(sa.text(f"INSERT INTO {table} (x) VALUES (1) RETURNING id")).scalar_one()


@pytest.fixture
def plain(sa_rollback_url):
    '''(last_value, is_called) of a sequence, read outside SQLAlchemy.'''
    dsn = sa.make_url(sa_rollback_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield lambda seq: conn.execute(f"SELECT last_value, is_called FROM {seq}").fetchone()


@pytest.fixture(scope="session", autouse=True)
def seed():
    assert insert("seeded") == 1  # committed for real, before every test
"""

INNER_TESTS = {
    "test_top": """
        import pytest
        from conftest import insert

        @pytest.mark.parametrize("n", range(4))
        def test_ids_from_one(n, plain):
            assert plain("items_id_seq") == (1, False)
            assert [insert("items"), insert("items")] == [1, 2]
            assert insert("ident") == 1
            assert [insert("shared_a"), insert("shared_b"), insert("shared_a")] == [1, 2, 3]
            assert insert("other.things") == 1
            assert plain("items_id_seq") == (2, True)

        @pytest.mark.parametrize("n", range(2))
        def test_after_the_session_fixture(n, plain):
            assert plain("seeded_id_seq") == (1, True)
            assert insert("seeded") == 2

        @pytest.mark.sa_rollback(real_commits=True)
        def test_real_commits(plain):
            assert insert("items") == 1
            assert insert("seeded") == 2
        """,
    "test_module": """
        import pytest
        from conftest import insert

        @pytest.fixture(scope="module")
        def catalog(sa_rollback_module_scope):
            return [insert("items"), insert("items"), insert("shared_b")]

        @pytest.mark.parametrize("n", range(3))
        def test_after_the_module_data(catalog, n, plain):
            assert catalog == [1, 2, 1]
            assert plain("items_id_seq") == (2, True)
            assert insert("items") == 3
            assert insert("shared_a") == 2
            assert insert("ident") == 1
        """,
}

INNER_MARKERS = """
    import pytest
    from conftest import insert

    @pytest.mark.sa_rollback(reset_sequences=True)
    @pytest.mark.parametrize("n", range(3))
    def test_marked(n):
        assert insert("items") == 1

    def test_unmarked_1():
        assert insert("loose") == 1

    def test_unmarked_2():
        assert insert("loose") == 2

    @pytest.mark.sa_rollback(reset_sequences=False)
    def test_marked_off_1():
        assert insert("seeded") == 2

    @pytest.mark.sa_rollback(reset_sequences=False)
    def test_marked_off_2():
        assert insert("seeded") == 3
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, driver: str) -> pytest.Pytester:
    monkeypatch.setenv("INNER_URL", driver_url(driver))
    monkeypatch.setenv("SA_ROLLBACK_URL", driver_url(driver))
    monkeypatch.delenv("SA_ROLLBACK_RESET_SEQUENCES", raising=False)
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makefile(".sql", schema=INNER_SCHEMA)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema=sql:schema.sql", *args)


def test_suite_with_ids_from_one_passes_serially(inner: pytest.Pytester) -> None:
    inner.makepyfile(**INNER_TESTS)
    run(inner, "--sa-reset-sequences=on").assert_outcomes(passed=10)


def test_suite_with_ids_from_one_passes_under_xdist(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    inner.makepyfile(**INNER_TESTS)
    monkeypatch.setenv("SA_ROLLBACK_RESET_SEQUENCES", "on")
    run(inner, "-n", "2").assert_outcomes(passed=10)


def test_without_the_setting_ids_keep_growing(inner: pytest.Pytester) -> None:
    inner.makepyfile(**INNER_TESTS)
    result = run(inner)
    result.assert_outcomes(passed=2, failed=8)  # the first test of the module and of the session fixture
    result.stdout.fnmatch_lines(["*assert (3, True) == (1, False)*"])


def test_marker_and_setting(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_markers=INNER_MARKERS)
    run(inner, "-p", "no:randomly").assert_outcomes(passed=7)
    inner.makeini("[pytest]\nsa_rollback_reset_sequences = on\n")
    result = run(inner, "-p", "no:randomly")
    result.assert_outcomes(passed=6, failed=1)  # the setting now resets after test_unmarked_1 too
    result.stdout.fnmatch_lines(["*test_unmarked_2*"])


def test_refused_on_a_database_used_as_is(inner: pytest.Pytester, outside: Callable[..., Any]) -> None:
    inner.makepyfile(test_as_is="from conftest import insert\n\ndef test_it():\n    insert('items')\n")
    inner.makeconftest(INNER_CONFTEST.replace('assert insert("seeded") == 1', "pass"))
    before = outside("SELECT last_value, is_called FROM items_id_seq")
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-reset-sequences=on")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*reset_sequences is on, but {DB_A}*is not a database sa_rollback*"])
    assert outside("SELECT last_value, is_called FROM items_id_seq") == before
