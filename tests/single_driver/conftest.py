"""A small suite that needs only one PostgreSQL driver: psycopg2 or psycopg 3.

CI runs it in venvs where only one of them is installed (``.ci/run``); the main
suite runs it too, once per driver, with the other one hidden from the inner
projects. It imports no driver it is not testing.

The server is ``SA_ROLLBACK_TEST_URL``, else the one on 127.0.0.1:5432.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from sqlalchemy.engine import URL, make_url

SERVER_URL = make_url(os.environ.get("SA_ROLLBACK_TEST_URL") or "postgresql://postgres@127.0.0.1:5432/postgres")
DRIVERS = ("psycopg", "psycopg2")
INSTALLED = [name for name in DRIVERS if importlib.util.find_spec(name) is not None]
# Imported now, before any pytester fixture snapshots sys.modules: a driver first imported inside a
# pytester test is dropped from sys.modules after it, and psycopg2.errors would then be re-imported
# without the classes its C extension put there once.
MODULES = {name: importlib.import_module(name) for name in INSTALLED}
SQL = {name: importlib.import_module(f"{name}.sql") for name in INSTALLED}

Query = Callable[..., list[tuple[Any, ...]]]


def pytest_report_header() -> str:
    return f"single-driver suite: drivers {', '.join(INSTALLED) or 'none'}; server {SERVER_URL!r}"


@pytest.fixture(params=INSTALLED)
def dbapi(request: pytest.FixtureRequest) -> str:
    """The one driver the inner project has."""
    return str(request.param)


def server_url(dbapi: str, database: str) -> URL:
    return SERVER_URL.set(drivername=f"postgresql+{dbapi}", database=database)


@pytest.fixture
def outside(dbapi: str) -> Iterator[Query]:
    """Queries on the server's maintenance database, through the driver under test, outside any plugin."""
    dsn = SERVER_URL.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = MODULES[dbapi].connect(dsn)
    conn.autocommit = True

    def query(statement: Any, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with conn.cursor() as cursor:
            cursor.execute(statement, params or None)
            return list(cursor.fetchall()) if cursor.description is not None else []

    yield query
    conn.close()
