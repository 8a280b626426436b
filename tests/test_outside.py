"""Outside connections: a test that leaves a connection of its own on its clone fails, naming it.

Each case is an inner pytest run on a clone (``--sa-schema``), on both drivers.
"""

from __future__ import annotations

import pytest

from .conftest import driver_url

INNER_CONFTEST = """
import os
import subprocess
import sys
import time

import psycopg
import pytest
import sqlalchemy as sa

pytest_plugins = ["sa_rollback"]
ENGINE = sa.create_engine(os.environ["INNER_URL"])
HELD = []


def dsn(url, app):
    return sa.make_url(url).set(drivername="postgresql", query={"application_name": app}).render_as_string(
        hide_password=False
    )


def write(name):
    with ENGINE.begin() as conn:
        conn.execute(sa.text("INSERT INTO items (name) VALUES (:name)"), {"name": name})


@pytest.fixture(scope="module", autouse=True)
def let_go():
    yield
    for held in HELD:
        held.kill() if hasattr(held, "kill") else held.close()


def in_subprocess(url):
    '''A process that connects to the test database and stays connected until it is killed.'''
    code = "import sys, time, psycopg; c = psycopg.connect(sys.argv[1]); print('up', flush=True); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", code, dsn(url, "from_subprocess")], stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"up"
    HELD.append(process)
"""

LEAKS = """
import psycopg
import pytest
from conftest import HELD, dsn, in_subprocess, write


def test_keeps_a_driver_connection_open(sa_rollback_url):
    write("a")
    HELD.append(psycopg.connect(dsn(sa_rollback_url, "leaky"), autocommit=True))


def test_closes_its_connection_in_time(sa_rollback_url):
    write("b")
    with psycopg.connect(dsn(sa_rollback_url, "tidy")) as conn:
        conn.execute("SELECT 1")


def test_closes_it_in_a_fixture_just_before_the_end(closing):
    write("c")


@pytest.fixture
def closing(sa_rollback_url):
    conn = psycopg.connect(dsn(sa_rollback_url, "closed_at_teardown"))
    yield
    conn.close()  # its server process exits a moment later, while the rollback runs


def test_starts_a_process_that_stays_connected(sa_rollback_url):
    write("e")
    in_subprocess(sa_rollback_url)


def test_after_them():
    write("d")  # the connections still open were reported once, to the tests that opened them
"""

NESTED = """
import psycopg
import pytest
from conftest import HELD, dsn, write


@pytest.fixture(scope="module")
def catalog(sa_rollback_module_scope):
    write("catalog")


def test_first_inside_the_module_scope(catalog):
    write("first")  # its check reads the activity inside the module's transaction: a later read must be fresh


def test_inside_a_module_scope(catalog, sa_rollback_url):
    write("mine")  # the test's scope is a savepoint in the module's transaction
    HELD.append(psycopg.connect(dsn(sa_rollback_url, "nested_leak"), autocommit=True))
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, driver: str) -> pytest.Pytester:
    monkeypatch.setenv("SA_ROLLBACK_URL", driver_url(driver))
    monkeypatch.setenv("INNER_URL", driver_url(driver))
    for name in ("SA_ROLLBACK", "SA_ROLLBACK_SCHEMA", "SA_ROLLBACK_DETECT_OUTSIDE", "SA_ROLLBACK_EXPORT_ENV"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makefile(".sql", schema="CREATE TABLE items (id serial PRIMARY KEY, name text UNIQUE NOT NULL);")
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rE", "--sa-schema=sql:schema.sql", *args)


def test_a_connection_left_open_fails_the_test_that_opened_it(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_leaks=LEAKS)
    result = run(inner)
    result.assert_outcomes(passed=5, errors=2)
    result.stdout.fnmatch_lines(
        [
            "ERROR test_leaks.py::test_keeps_a_driver_connection_open - *",
            "ERROR test_leaks.py::test_starts_a_process_that_stays_connected - *",
        ],
        consecutive=False,
    )
    output = result.stdout.str()
    assert "test_leaks.py::test_keeps_a_driver_connection_open: 1 connection(s) to the test database" in output, output
    # Where it comes from: an address and port, or "the local socket".
    result.stdout.fnmatch_lines(["*(pid *, application_name 'leaky', from *, connected since 20*-*-* *:*:* *)*"])
    assert "application_name 'from_subprocess'" in output
    assert "what it wrote was committed for real and is NOT rolled back" in output
    assert "--sa-detect-outside=off" in output
    # Closed before the end (in the test, or in a fixture's teardown just before the rollback): not reported.
    assert "'tidy'" not in output and "'closed_at_teardown'" not in output
    # The connections stay open for the later tests, which are not blamed for them: 'leaky' is named in
    # its test's error, and again only in the short summary's line of that error (whole under CI=true).
    errors = output.split("= ERRORS =")[1].split("short test summary info")[0]
    assert errors.count("application_name 'leaky'") == 1, errors


def test_nested_scopes_are_checked_too(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_nested=NESTED)
    result = run(inner)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*test_nested.py::test_inside_a_module_scope: 1 connection(s)*'nested_leak'*"])


DROPPED_ENGINES = """
import gc
import os

import psycopg
import pytest
import sqlalchemy as sa
from conftest import HELD, dsn, write


@pytest.mark.parametrize("n", range(3))
def test_an_engine_per_test_never_disposed(n):
    engine = sa.create_engine(os.environ["INNER_URL"])
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO items (name) VALUES (:name)"), {"name": f"dropped {n}"})
    del engine, conn
    gc.collect()  # its pool's connection closes without the pool being told


def test_leaks_after_them(sa_rollback_url):
    write("after")
    HELD.append(psycopg.connect(dsn(sa_rollback_url, "after_dropped_engines"), autocommit=True))
"""


def test_engines_dropped_undisposed_do_not_hide_a_leak(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_dropped=DROPPED_ENGINES)
    result = run(inner)
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*test_dropped.py::test_leaks_after_them: 1 connection(s)*'after_dropped_engines'*"])


@pytest.mark.parametrize("how", [("--sa-detect-outside=off",), ("-o", "sa_rollback_detect_outside=off")])
def test_the_check_can_be_turned_off(inner: pytest.Pytester, how: tuple[str, ...]) -> None:
    inner.makepyfile(test_leaks=LEAKS)
    run(inner, *how).assert_outcomes(passed=5)


def test_a_database_used_as_it_is_is_not_checked(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_leaks=LEAKS.replace('write("', 'print("'))
    # No schema: the configured database is shared with whoever else uses it, so nothing is checked.
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)


def test_xdist_workers_see_no_outside_connections(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_many="""
        import pytest
        from conftest import write

        @pytest.mark.parametrize("n", range(8))
        def test_writes(n):
            write(f"row {n}")
        """
    )
    run(inner, "-n", "2").assert_outcomes(passed=8)
