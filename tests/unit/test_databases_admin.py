"""Which driver administers the server, and how it is given the URL; no server needed."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
from sqlalchemy.engine import URL, make_url

from sa_rollback._sqla import default_postgresql_driver
from sa_rollback.databases import admin_driver, connect_params, safe_url
from sa_rollback.errors import ConfigurationError


def installed(*names: str):  # type: ignore[no-untyped-def]
    """An importer that sees only the named drivers, as in a project that installed only those."""

    def importer(module: str) -> ModuleType:
        if module.partition(".")[0] not in names:
            raise ImportError(f"No module named {module!r}")
        return importlib.import_module(module)

    return importer


@pytest.mark.parametrize(
    ("url", "available", "chosen"),
    [
        ("postgresql+psycopg2://h/db", ("psycopg", "psycopg2"), "psycopg2"),
        ("postgresql+psycopg://h/db", ("psycopg", "psycopg2"), "psycopg"),
        # A bare URL: SQLAlchemy's own default (psycopg2 on 1.4 and 2.0, psycopg from 2.1)
        ("postgresql://h/db", ("psycopg", "psycopg2"), default_postgresql_driver()),
        ("postgresql+psycopg2://h/db", ("psycopg2",), "psycopg2"),
        ("postgresql://h/db", ("psycopg2",), "psycopg2"),
        ("postgresql+psycopg://h/db", ("psycopg2",), "psycopg2"),
        ("postgresql+psycopg2://h/db", ("psycopg",), "psycopg"),
        ("postgresql+asyncpg://h/db", ("psycopg2",), "psycopg2"),
    ],
)
def test_the_urls_driver_is_preferred_and_any_installed_one_serves(
    url: str, available: tuple[str, ...], chosen: str
) -> None:
    driver = admin_driver(make_url(url), installed(*available))
    assert driver.name == chosen
    assert driver.module.__name__ == chosen
    assert driver.sql.__name__ == f"{chosen}.sql"


@pytest.mark.parametrize(
    ("url", "extra"),
    [
        ("postgresql+psycopg2://h/db", "psycopg2"),
        ("postgresql+psycopg://h/db", "psycopg"),
        ("postgresql://h/db", default_postgresql_driver()),
    ],
)
def test_no_driver_at_all_is_a_missing_driver_naming_the_extra(url: str, extra: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        admin_driver(make_url(url), installed())
    message = str(info.value)
    assert f'pip install "sa-rollback[{extra}]"' in message
    assert "unreachable" not in message


def test_connect_params_are_keywords_taken_from_the_url() -> None:
    url = URL.create(
        "postgresql+psycopg2",
        username="ann",
        password="pass word%",
        host="db.example",
        port=6543,
        database="my db",
        query={"sslmode": "require", "application_name": "tests"},
    )
    assert connect_params(url) == {
        "host": "db.example",
        "port": "6543",
        "user": "ann",
        "password": "pass word%",
        "dbname": "my db",
        "sslmode": "require",
        "application_name": "tests",
        "connect_timeout": "10",
    }
    assert "pass word" not in safe_url(url)


def test_connect_params_of_a_socket_url() -> None:
    params = connect_params(make_url("postgresql://postgres:@/postgres?host=/tmp/pg&connect_timeout=3"))
    assert params == {
        "host": "/tmp/pg",
        "user": "postgres",
        "password": "",
        "dbname": "postgres",
        "connect_timeout": "3",
    }
