"""The end-of-run report: its figures, serially and summed over xdist workers.

The inner suite is built so that every figure is known in advance: each test
writes one row (its rollback is one round trip, with the deferred-constraint
check), and one test reads after another connection's commit (one savepoint).
psycopg2 also sends one BEGIN of sa_rollback's own before each test's
transaction but the first of each process: after the textual ROLLBACK it
believes a transaction is still open and would send none. Each process's shared
connection is its pool's first connection, taken over (``_vacant``): one round
trip gives it the scope's lock timeout, which a connection made for the purpose
gets at connect.
"""

from __future__ import annotations

import re

import pytest

from .conftest import driver_url

INNER_CONFTEST = """
import os
import sqlalchemy as sa

pytest_plugins = ["sa_rollback"]
ENGINE = sa.create_engine(os.environ["INNER_URL"])


def insert(name):
    with ENGINE.begin() as conn:
        conn.execute(sa.text("INSERT INTO items (name) VALUES (:name)"), {"name": name})
"""

TESTS = """
import pytest
import sqlalchemy as sa
from conftest import ENGINE, insert


@pytest.mark.parametrize("n", range({writers}))
def test_writes(n):
    insert(f"row {{n}}")


def test_reads_after_a_commit():
    insert("read")
    with ENGINE.connect() as conn:  # another transaction reads after the commit: one savepoint
        assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar() == 1


@pytest.mark.sa_rollback(enabled=False)
def test_not_isolated():
    pass


def test_no_database():
    pass
"""

SCHEMA = "CREATE TABLE items (id serial PRIMARY KEY, name text UNIQUE NOT NULL);"


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, driver: str) -> pytest.Pytester:
    monkeypatch.setenv("SA_ROLLBACK_URL", driver_url(driver))
    monkeypatch.setenv("INNER_URL", driver_url(driver))
    for name in ("SA_ROLLBACK", "SA_ROLLBACK_SCHEMA", "SA_ROLLBACK_REPORT", "SA_ROLLBACK_DETECT_OUTSIDE"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makefile(".sql", schema=SCHEMA)
    return pytester


def _line(result: pytest.RunResult, driver: str, isolated: int, databases: str, processes: int = 1) -> str:
    """The report's line, checked up to the timings: one savepoint, and the round trips it implies."""
    lines = [line for line in result.stdout.lines if line.startswith("sa_rollback: ") and "isolated" in line]
    assert len(lines) == 1, result.stdout.str()
    writing = isolated - 1  # all but test_no_database
    # One rollback per writing test, one savepoint, one lock-timeout SET per process's shared connection;
    # psycopg2: a BEGIN per test but each process's first.
    round_trips = writing + 1 + processes + (writing - processes if driver == "psycopg2" else 0)
    start = (
        f"sa_rollback: {isolated} tests isolated on {databases}; 1 savepoint, {round_trips} round trips of its own; "
    )
    assert lines[0].startswith(start), lines[0]
    return lines[0]


def test_the_line_counts_tests_databases_savepoints_and_round_trips(inner: pytest.Pytester, driver: str) -> None:
    inner.makepyfile(test_inner=TESTS.format(writers=3))
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema=sql:schema.sql", "--sa-rebuild=on")
    result.assert_outcomes(passed=6)
    # 5 tests isolated: the one marked enabled=False is not; the one that touches no database is.
    line = _line(result, driver, 5, "1 database")
    assert re.search(r"s in isolation \(set-up \d+\.\d\d s, rollback \d+\.\d\d s, provisioning \d+\.\d\d s\)", line)
    # While the template is built: the run's lease, the janitor's admin connection and the build's own. The
    # tests' connection opens once the last two are closed.
    assert line.endswith("at most 3 server connections at once"), line


def test_verbose_gives_the_table_and_the_slowest_rollbacks(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_inner=TESTS.format(writers=2))
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema=sql:schema.sql", "--sa-rebuild=on", "-v")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(
        [
            "*- sa_rollback -*",
            "sa_rollback report",
            "  tests isolated * 4",
            "  databases touched * 1  *_sar_*",
            "  savepoints taken * 1  *",
            "  round trips of its own * *",
            "  scope set-up * s",
            "  rollback * s",
            "  server * s  *",
            "  template * s  *",
            "  clones * s  1 made",
            "  server connections, peak * 3",  # the lease, the janitor and the template's build
            "  slowest to roll back:",
            "    0.* s  test_inner.py::*",
        ]
    )
    slowest = result.stdout.lines.index("  slowest to roll back:")
    listed = [line for line in result.stdout.lines[slowest + 1 :] if line.startswith("    0.")]
    # test_no_database is isolated too, but had nothing to roll back: its scope was never made.
    assert len(listed) == 3 and not any("test_no_database" in line for line in listed)


def test_xdist_workers_add_up(inner: pytest.Pytester, driver: str) -> None:
    inner.makepyfile(test_inner=TESTS.format(writers=7))
    result = inner.runpytest_subprocess(
        "-p", "no:cacheprovider", "--sa-schema=sql:schema.sql", "--sa-rebuild=on", "-n", "2"
    )
    result.assert_outcomes(passed=10)
    line = _line(result, driver, 9, "2 databases", processes=2)  # each worker writes to its own clone
    # The controller holds the lease and builds the template (three connections); each worker holds one at a time.
    assert line.endswith("at most 5 server connections at once, summed over 2 processes"), line


@pytest.mark.parametrize("how", [("--sa-report=off",), ("-o", "sa_rollback_report=off")], ids=["flag", "ini"])
def test_the_report_can_be_turned_off(inner: pytest.Pytester, how: tuple[str, ...]) -> None:
    inner.makepyfile(test_inner=TESTS.format(writers=1))
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", *how)
    result.assert_outcomes(passed=4)
    assert "isolated on" not in result.stdout.str()
