"""Shared fixtures of sa_rollback's own suite.

The suite talks to a real PostgreSQL server: ``SA_ROLLBACK_TEST_URL`` if set,
otherwise the server on 127.0.0.1:5432. It never skips when the server is
missing; it fails, saying which server it tried.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Callable

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import make_url

import sa_rollback
from sa_rollback._state import STATE

from . import _compat


def _admin_url() -> str:
    """The server of the suite: SA_ROLLBACK_TEST_URL, else the local one, else an embedded one."""
    explicit = os.environ.get("SA_ROLLBACK_TEST_URL")
    if explicit:
        return explicit
    local = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        psycopg.connect(local, connect_timeout=3).close()
        return local
    except psycopg.OperationalError:
        pass
    from pathlib import Path

    from sa_rollback.databases import embedded_server

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sa_rollback_selftest"
    server = embedded_server(cache)
    return server.admin_url.render_as_string(hide_password=False)


ADMIN_URL = os.environ.setdefault("SA_ROLLBACK_TEST_URL", _admin_url())
DRIVERS = _compat.DRIVERS
#: databases this suite owns; created if missing, never dropped
DB_A = "sa_rollback_selftest_a"
DB_B = "sa_rollback_selftest_b"


def libpq_dsn(database: str) -> str:
    url = make_url(ADMIN_URL).set(database=database)
    return (
        url.render_as_string(hide_password=False)
        .replace("postgresql+psycopg2://", "postgresql://")
        .replace("postgresql+psycopg://", "postgresql://")
    )


def driver_url(driver: str, database: str = DB_A) -> str:
    url = make_url(ADMIN_URL).set(drivername=f"postgresql+{driver}", database=database)
    return url.render_as_string(hide_password=False)


def _ensure_databases() -> None:
    try:
        admin = psycopg.connect(
            libpq_dsn(make_url(ADMIN_URL).database or "postgres"), autocommit=True, connect_timeout=5
        )
    except psycopg.OperationalError as exc:
        url = make_url(ADMIN_URL)
        pytest.exit(
            f"PostgreSQL is unreachable at {url.host}:{url.port or 5432} ({exc}). Start it, or point "
            "SA_ROLLBACK_TEST_URL at a server where this role may create databases.",
            returncode=3,
        )
    with admin:
        for name in (DB_A, DB_B):
            if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


SCHEMA = """
DROP TABLE IF EXISTS items, notes CASCADE;
CREATE TABLE items (id serial PRIMARY KEY, name text UNIQUE NOT NULL, qty int NOT NULL DEFAULT 0);
CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL);
"""


def pytest_report_header() -> str:
    return f"sa_rollback test server: {make_url(ADMIN_URL).render_as_string(hide_password=True)}"


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") not in (None, "gw0"):
        return
    _ensure_databases()
    for name in (DB_A, DB_B):
        with psycopg.connect(libpq_dsn(name), autocommit=True) as conn:
            conn.execute(SCHEMA)


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """The DBAPI driver under test: every semantic test runs on psycopg2 and psycopg 3."""
    return str(request.param)


@pytest.fixture
def url(driver: str) -> str:
    return driver_url(driver)


@pytest.fixture
def engine(url: str) -> Iterator[sa.Engine]:
    eng = _compat.create_engine(url)
    yield eng
    eng.dispose()


@pytest.fixture
def outside() -> Iterator[Callable[..., list[tuple[Any, ...]]]]:
    """Query through a plain psycopg connection that no rollback scope can touch."""
    conn = psycopg.connect(libpq_dsn(DB_A), autocommit=True)

    def query(statement: str, database: str = DB_A) -> list[tuple[Any, ...]]:
        if database == DB_A:
            return conn.execute(statement).fetchall()
        with psycopg.connect(libpq_dsn(database), autocommit=True) as other:
            return other.execute(statement).fetchall()

    yield query
    conn.close()


@pytest.fixture
def scope() -> Iterator[sa_rollback.RollbackScope]:
    """An open rollback scope; the test checks its state, the fixture closes it."""
    with sa_rollback.RollbackScope("test") as opened:
        yield opened


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    assert STATE.top is None, "a test left a rollback scope open"
    for name in (DB_A, DB_B):
        with psycopg.connect(libpq_dsn(name), autocommit=True) as conn:
            left = conn.execute("SELECT (SELECT count(*) FROM items) + (SELECT count(*) FROM notes)").fetchone()
            if left and left[0]:
                conn.execute("TRUNCATE items, notes RESTART IDENTITY")
                pytest.fail(f"{left[0]} rows leaked into {name}")
