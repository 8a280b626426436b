"""The pytest plugin, tested by running pytest inside pytest.

The listeners are process-wide, so every inner session runs in a subprocess.
"""

from __future__ import annotations

import pytest

from .conftest import DB_A, any_driver, driver_url

# The plugin's wiring is the same whatever the driver; the drivers' differences are tested in
# test_semantics.py and test_trust.py, in-process, where they are cheaper than pytest runs.
pytestmark = [pytest.mark.usefixtures("_inner_env"), any_driver]

ENABLE = 'pytest_plugins = ["sa_rollback"]\n'

COMMON = """
import os
import sqlalchemy as sa

ENGINE = sa.create_engine(os.environ["INNER_URL"])  # created at import time


def names():
    with ENGINE.connect() as conn:
        return list(conn.execute(sa.text("SELECT name FROM items ORDER BY name")).scalars())


def add(name):
    with ENGINE.begin() as conn:
        conn.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
"""


@pytest.fixture
def _inner_env(monkeypatch: pytest.MonkeyPatch, driver: str) -> None:
    monkeypatch.setenv("INNER_URL", driver_url(driver))
    monkeypatch.setenv("SA_ROLLBACK_URL", driver_url(driver))


def test_installing_alone_changes_nothing(pytester: pytest.Pytester, outside) -> None:
    pytester.makepyfile(
        helpers=COMMON,
        test_leak="""
        from helpers import add, names

        def test_one():
            add("leaked")

        def test_two():
            assert names() == ["leaked"]
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert outside("DELETE FROM items RETURNING name") == [("leaked",)]


def test_one_line_isolates_every_test(pytester: pytest.Pytester, outside) -> None:
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(
        helpers=COMMON,
        test_isolated="""
        import pytest
        from helpers import add, names

        @pytest.mark.parametrize("n", range(3))
        def test_each_starts_empty(n):
            assert names() == []
            add(f"row{n}")
            assert names() == [f"row{n}"]
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_wider_fixtures_commit_for_real(pytester: pytest.Pytester, outside) -> None:
    pytester.makeconftest(
        ENABLE
        + """
import pytest
from helpers import ENGINE, add
import sqlalchemy as sa

@pytest.fixture(scope="session")
def seeded():
    add("seed")
    yield
    with ENGINE.begin() as conn:
        conn.execute(sa.text("DELETE FROM items WHERE name = 'seed'"))

@pytest.fixture(scope="module")
def lazy():
    add("lazy")
    yield
    with ENGINE.begin() as conn:
        conn.execute(sa.text("DELETE FROM items WHERE name = 'lazy'"))
"""
    )
    pytester.makepyfile(
        helpers=COMMON,
        test_scopes="""
        from helpers import add, names

        def test_first(seeded, request):
            request.getfixturevalue("lazy")  # first requested inside a test
            add("mine")
            assert names() == ["lazy", "mine", "seed"]

        def test_second(seeded, lazy):
            assert names() == ["lazy", "seed"]
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_db_session_and_db_engine_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(
        test_fixtures="""
        import sqlalchemy as sa

        def test_write(db_session, db_engine):
            db_session.execute(sa.text("INSERT INTO items (name) VALUES ('s')"))
            db_session.commit()
            with db_engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar() == 1

        def test_clean(db_session):
            assert db_session.execute(sa.text("SELECT count(*) FROM items")).scalar() == 0
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_legacy_ini_keys_are_accepted_with_a_message(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ENABLE)
    pytester.makeini("[pytest]\nmocked-sessions = app.db.session\nmocked-engines = app.db.engine\n")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*mocked-engines, mocked-sessions come from pytest-flask-sqlalchemy*"])


def test_swallowed_error_fails_the_test_at_teardown(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(
        helpers=COMMON,
        test_interleave="""
        from helpers import ENGINE, add

        def test_interleave():
            raw = ENGINE.raw_connection()
            raw.cursor().execute("INSERT INTO items (name) VALUES ('a')")
            add("b")
            raw.close()  # the pool logs and swallows the error of its reset
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*InterleavedRollbackError*another transaction wrote*"])


@pytest.mark.parametrize("how", ["flag", "env", "ini", "marker"])
def test_isolation_can_be_switched_off(pytester: pytest.Pytester, outside, monkeypatch, how: str) -> None:
    pytester.makeconftest(ENABLE)
    marker = "@pytest.mark.sa_rollback(enabled=False)" if how == "marker" else ""
    pytester.makepyfile(
        helpers=COMMON,
        test_off=f"""
        import pytest
        from helpers import add

        {marker}
        def test_real_write():
            add("real")
        """,
    )
    args = ["-p", "no:cacheprovider"]
    if how == "flag":
        args.append("--sa-rollback=off")
    elif how == "env":
        monkeypatch.setenv("SA_ROLLBACK", "off")
    elif how == "ini":
        pytester.makeini("[pytest]\nsa_rollback = off\n")
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    assert outside("DELETE FROM items RETURNING name") == [("real",)]


def test_markers_on_modules_classes_and_tests_apply_to_exactly_their_tests(pytester: pytest.Pytester, outside) -> None:
    """Parents' markers are read once per class or module: tests that alternate between parents
    (a module marked off, a class marked off inside an unmarked module, a test marked on inside
    a class marked off) each get exactly what their own chain says."""
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(
        helpers=COMMON,
        test_a_off="""
        import pytest
        from helpers import add

        pytestmark = pytest.mark.sa_rollback(enabled=False)

        def test_module_off():
            add("a module off")

        @pytest.mark.sa_rollback(enabled=True)
        def test_module_off_test_on():
            add("a test on")
        """,
        test_b_mixed="""
        import pytest
        from helpers import add

        def test_before_class():
            add("b before class")

        @pytest.mark.sa_rollback(enabled=False)
        class TestOff:
            def test_in_class(self):
                add("b class off")

            @pytest.mark.sa_rollback(enabled=True)
            def test_in_class_on(self):
                add("b class test on")

        class TestPlain:
            def test_in_plain_class(self):
                add("b plain class")

        def test_after_classes():
            add("b after classes")

        @pytest.mark.parametrize("i", [1, 2])
        def test_parametrized(i):
            add(f"b param {i}")
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=9)
    assert outside("DELETE FROM items RETURNING name") == [("a module off",), ("b class off",)]


def test_a_first_fixture_ending_without_a_test_outcome_still_ends_the_test_scope(
    pytester: pytest.Pytester, outside
) -> None:
    """The test's scope ends in its first function fixture's teardown; pytest skips that when the
    fixture's set-up raised what is no test outcome (SystemExit here, KeyboardInterrupt alike)."""
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(
        helpers=COMMON,
        test_exit="""
        import pytest
        from helpers import add, names

        @pytest.fixture
        def exits():
            add("in the fixture")
            raise SystemExit(3)

        def test_first(exits):
            pass

        @pytest.fixture
        def plain():
            return 1

        def test_second(plain):
            add("second")
            assert names() == ["second"]

        def test_third(plain):
            assert names() == []
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    assert outside("DELETE FROM items RETURNING name") == []


def test_bad_marker_and_bad_setting_say_what_is_wrong(pytester: pytest.Pytester, monkeypatch) -> None:
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.sa_rollback(enabeld=False)
        def test_typo():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*sa_rollback*unexpected keyword argument 'enabeld'*"])
    monkeypatch.setenv("SA_ROLLBACK", "maybe")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stderr.fnmatch_lines(
        ["ERROR: sa_rollback: the environment variable SA_ROLLBACK is 'maybe'; it takes one of: on, off*"]
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_fixture_docs_are_shown(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ENABLE)
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "*db_session*",
            "*A SQLAlchemy session on the test database; commit freely, it is all rolled back.*",
            "*sa_rollback_scope*",
        ]
    )
    assert DB_A  # the inner runs use the suite's own database


DEFERRED_TEST = """
import sqlalchemy as sa
from helpers import ENGINE

def test_violates_a_deferred_constraint():
    with ENGINE.begin() as conn:
        conn.execute(sa.text("CREATE TABLE parent (id int PRIMARY KEY)"))
        conn.execute(sa.text(
            "CREATE TABLE child (parent_id int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)"
        ))
        conn.execute(sa.text("INSERT INTO child VALUES (42)"))  # fine until COMMIT in production
"""


@pytest.mark.parametrize("check", ["default", "off"])
def test_deferred_constraints_are_checked_unless_switched_off(pytester: pytest.Pytester, check: str) -> None:
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(helpers=COMMON, test_deferred=DEFERRED_TEST)
    args = ["-p", "no:cacheprovider"] + (["--sa-check-deferred=off"] if check == "off" else [])
    result = pytester.runpytest_subprocess(*args)
    if check == "off":
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(
            [
                "*DeferredConstraintError*set --sa-check-deferred=off (or the ini key "
                "sa_rollback_check_deferred = off, or SA_ROLLBACK_CHECK_DEFERRED=off) to skip the check*"
            ]
        )
        assert "RollbackScope(check_deferred=False)" not in result.stdout.str()


def test_lock_timeout_setting_is_validated(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(
        test_x="""
        def test_x(db_engine):
            with db_engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        """
    )
    monkeypatch.setenv("SA_ROLLBACK_LOCK_TIMEOUT", "soon")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*SA_ROLLBACK_LOCK_TIMEOUT is 'soon'; it takes a positive number*"])
    monkeypatch.setenv("SA_ROLLBACK_LOCK_TIMEOUT", "inf")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
