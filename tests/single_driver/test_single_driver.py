"""A project with one driver: clones made, redirected, committed to, dropped; nothing left behind."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import DRIVERS, MODULES, SQL, Query, server_url

SCHEMA = "CREATE TABLE users (id serial PRIMARY KEY, name text UNIQUE NOT NULL);"

INNER_CONFTEST = """
import sys

for name in {hidden!r}:
    sys.modules[name] = None  # not installed in this project
pytest_plugins = ["sa_rollback"]
"""

COMMITTING_TESTS = """
import os

import pytest
import sqlalchemy as sa

ENGINE = sa.create_engine(os.environ["APP_URL"])  # the application's own configuration


@pytest.mark.parametrize("i", range(4))
def test_commits_and_starts_clean(i):
    with ENGINE.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (name) VALUES ('same')"))  # a leak breaks the next test
    with ENGINE.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 1
        name = conn.execute(sa.text("SELECT current_database()")).scalar()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(os.environ["OUT_DIR"], "db-" + worker + ".txt"), "a", encoding="utf-8") as out:
        out.write(name + "\\n")
"""


def marked_like(outside: Query, kind: str, base: str) -> list[str]:
    rows = outside(
        "SELECT datname FROM pg_database WHERE starts_with(shobj_description(oid, 'pg_database'), %s)"
        " AND starts_with(datname, %s)",
        (f"sa_rollback:{kind}", base + "_sar_"),
    )
    return sorted(name for (name,) in rows)


@pytest.fixture
def base(dbapi: str, outside: Query) -> Iterator[str]:
    """The project's database name; it never exists: the schema comes from SQL, tests run on clones."""
    name = f"sa_rollback_single_{dbapi}_{uuid.uuid4().hex[:8]}"
    yield name
    sql = SQL[dbapi]
    for template in marked_like(outside, "template", name):
        outside(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(template)))


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, dbapi: str, base: str) -> pytest.Pytester:
    monkeypatch.setenv("APP_URL", server_url(dbapi, base).render_as_string(hide_password=False))
    monkeypatch.setenv("OUT_DIR", str(pytester.path))
    # This suite may itself run under xdist: the inner session must not look like one of its workers.
    for variable in ("SA_ROLLBACK_URL", "SA_ROLLBACK_SCHEMA", "SA_ROLLBACK_RUN_ID", "PYTEST_XDIST_WORKER"):
        monkeypatch.delenv(variable, raising=False)
    pytester.makeconftest(INNER_CONFTEST.format(hidden=[name for name in DRIVERS if name != dbapi]))
    pytester.makefile(".sql", schema=SCHEMA)
    pytester.makepyfile(test_app=COMMITTING_TESTS)
    return pytester


def databases_used(path: Path) -> dict[str, list[str]]:
    return {p.stem[3:]: sorted(set(p.read_text(encoding="utf-8").split())) for p in path.glob("db-*.txt")}


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_a_project_with_only_this_driver(
    project: pytest.Pytester, outside: Query, dbapi: str, base: str, workers: tuple[str, ...]
) -> None:
    url = server_url(dbapi, base).render_as_string(hide_password=False)
    args = ("-p", "no:cacheprovider", "--sa-url", url, "--sa-schema", "sql:schema.sql")
    project.runpytest_subprocess(*args, *workers).assert_outcomes(passed=4)
    used = databases_used(project.path)
    assert set(used) == ({"gw0", "gw1"} if workers else {"main"})
    names = [name for names in used.values() for name in names]
    assert all(len(names) == 1 for names in used.values())  # one clone per process
    assert len(set(names)) == len(names) and all(name.startswith(base + "_sar_") for name in names)
    # From outside: the clones are gone, the template stayed clean, the configured database never existed.
    # Workers drop their clones before they report back, and the controller drops what any left.
    left = [name for name in names if outside("SELECT 1 FROM pg_database WHERE datname = %s", (name,))]
    assert left == []
    assert marked_like(outside, "clone", base) == []
    (template,) = marked_like(outside, "template", base)
    assert outside("SELECT 1 FROM pg_database WHERE datname = %s", (base,)) == []
    conn = MODULES[dbapi].connect(server_url(dbapi, template).set(drivername="postgresql").render_as_string(False))
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM users")
            assert cursor.fetchone() == (0,)
    finally:
        conn.close()


def test_no_driver_at_all_is_reported_as_a_missing_driver(project: pytest.Pytester, dbapi: str, base: str) -> None:
    project.makeconftest(INNER_CONFTEST.format(hidden=list(DRIVERS)))
    url = server_url(dbapi, base).render_as_string(hide_password=False)
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--sa-url", url, "--sa-schema", "sql:schema.sql")
    assert result.ret != 0
    output = result.stdout.str() + result.stderr.str()
    assert f'pip install "sa-rollback[{dbapi}]"' in output
    assert "unreachable" not in output
