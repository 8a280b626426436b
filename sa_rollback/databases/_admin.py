"""Administrative connections, through whichever supported driver is installed.

The plugin creates and drops databases with a plain DBAPI connection, not an
engine: ``CREATE DATABASE`` cannot run in a transaction, and the admin
connection must stay outside every rollback scope. psycopg 3 and psycopg2 are
both supported; the one the configured URL names is preferred when installed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Optional

from sqlalchemy.engine import URL, make_url

from .._sqla import default_postgresql_driver
from .._stats import STATS
from ..errors import ConfigurationError

#: SQLSTATEs the janitor reacts to
OBJECT_IN_USE = "55006"
INSUFFICIENT_PRIVILEGE = "42501"

_PREFERENCE = {"psycopg2": ("psycopg2", "psycopg"), "psycopg": ("psycopg", "psycopg2")}
_EXTRA = {"psycopg2": "psycopg2", "psycopg": "psycopg"}


def safe_url(url: URL | str) -> str:
    """The URL as text with any password masked, for messages."""
    return make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class AdminDriver:
    """A DBAPI module (psycopg or psycopg2) and its ``sql`` composition module."""

    name: str
    module: ModuleType
    sql: ModuleType

    def connect(self, url: URL, autocommit: bool = True) -> AdminConnection:
        raw = self.module.connect(**connect_params(url))
        try:
            raw.autocommit = autocommit
        except BaseException:
            raw.close()
            raise
        admin = AdminConnection(self, raw)
        STATS.opened(admin)
        return admin


def _url_driver(url: URL) -> str:
    """The driver an URL names, or the installed SQLAlchemy's default when it names none we know."""
    _, _, suffix = url.drivername.partition("+")
    return suffix if suffix in _PREFERENCE else default_postgresql_driver()


def admin_driver(url: URL, importer: Callable[[str], ModuleType] = importlib.import_module) -> AdminDriver:
    """The driver for administering the server of ``url``: its own when installed, else the other one."""
    wanted = _url_driver(url)
    failures: list[str] = []
    for name in _PREFERENCE[wanted]:
        try:
            module = importer(name)
            sql = importer(f"{name}.sql")
        except ImportError as exc:
            failures.append(f"{name}: {exc}")
            continue
        return AdminDriver(name, module, sql)
    raise ConfigurationError(
        "sa_rollback needs a PostgreSQL driver to create its test databases, and neither psycopg 3 nor "
        f'psycopg2 can be imported ({"; ".join(failures)}). Install one: pip install "sa-rollback[{_EXTRA[wanted]}]".'
    )


def connect_params(url: URL) -> dict[str, str]:
    """libpq keyword parameters for ``url``.

    Keywords, not a rendered URI: a password or database name with a space or a
    ``%`` needs no escaping, and no connection string holding the password is
    ever built, so no parse error can echo it.
    """
    params: dict[str, str] = {}
    for key, value in url.query.items():
        params[key] = ",".join(value) if isinstance(value, tuple) else str(value)
    for key, part in (
        ("host", url.host),
        ("port", url.port),
        ("user", url.username),
        ("password", url.password),
        ("dbname", url.database),
    ):
        if part is not None:
            params[key] = str(part)
    params.setdefault("connect_timeout", "10")
    return params


def sqlstate(exc: BaseException) -> Optional[str]:
    """The SQLSTATE of a psycopg or psycopg2 error."""
    return getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)


class AdminConnection:
    """One DBAPI connection of either driver, with the few operations the janitor needs."""

    def __init__(self, driver: AdminDriver, raw: Any) -> None:
        self.driver = driver
        self.raw = raw
        self.sql = driver.sql

    def execute(self, query: Any, params: Optional[tuple[Any, ...]] = None) -> list[tuple[Any, ...]]:
        """Run one statement (text or composed SQL); the rows, if it returns any."""
        with self.raw.cursor() as cursor:
            cursor.execute(query, params)
            return list(cursor.fetchall()) if cursor.description is not None else []

    def compose(self, template: str, *identifiers: str) -> Any:
        """``template`` with each ``{}`` replaced by an identifier quoted by the driver."""
        return self.sql.SQL(template).format(*(self.sql.Identifier(name) for name in identifiers))

    def commit(self) -> None:
        self.raw.commit()

    def rollback(self) -> None:
        self.raw.rollback()

    @property
    def closed(self) -> bool:
        """Whether the connection is gone (closed here, or ended by the server)."""
        return bool(self.raw.closed)

    def close(self) -> None:
        STATS.closed(self)
        self.raw.close()

    def __enter__(self) -> AdminConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(url: URL, autocommit: bool = True) -> AdminConnection:
    """An admin connection to ``url`` through the preferred installed driver."""
    return admin_driver(url).connect(url, autocommit)
