"""The six isolation strategies, each a context manager around one test body.

Each strategy owns its database (``sa_rollback_bench_s<size>_<strategy>``), so
that the leaky baseline's rows never reach another strategy's tables. What a
strategy does around the body (outer transaction, TRUNCATE, a new database) is
inside the timed region, as a per-test fixture's work would be.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

import sa_rollback

from .bodies import SessionFactory
from .config import db
from .db import NO_FSYNC_WAIT, Admin, build_schema, count_rows
from .schema import Schema


def db_name(size: int, key: str) -> str:
    return db(f"s{size}_{key}")


def template_name(size: int) -> str:
    return db_name(size, "template")


class Strategy:
    """One way of isolating tests; ``test()`` wraps one test body."""

    key = ""

    def __init__(self, admin: Admin, schema: Schema, driver: str = "psycopg"):
        self.admin = admin
        self.schema = schema
        self.driver = driver
        self.dbname = db_name(schema.size, self.key)
        self.template = template_name(schema.size)
        self.engine: sa.Engine | None = None

    def url(self, name: str) -> URL:
        return self.admin.db_url(name).set(drivername=f"postgresql+{self.driver}")

    def provision(self) -> None:
        """Create the strategy's database from the schema template (not timed)."""
        self.admin.recreate(self.dbname, self.template)

    def open(self) -> None:
        self.engine = sa.create_engine(self.url(self.dbname))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None

    def _truncate(self) -> None:
        assert self.engine is not None
        with self.engine.begin() as conn:
            conn.exec_driver_sql(self.schema.truncate_sql())

    def _factory(self) -> SessionFactory:
        engine = self.engine
        assert engine is not None

        def new_session() -> Session:
            return Session(engine)

        return new_session

    @contextmanager
    def test(self) -> Iterator[SessionFactory]:
        yield self._factory()

    def rows_left(self) -> int:
        return count_rows(self.admin, self.dbname, self.schema)

    def clean(self) -> None:
        """Remove what the tests left behind, outside the timed region."""


class NoIsolation(Strategy):
    key = "none"

    def clean(self) -> None:
        self._truncate()


class Recipe(Strategy):
    """SQLAlchemy 2's "join a Session into an external transaction" recipe."""

    key = "recipe"

    @contextmanager
    def test(self) -> Iterator[SessionFactory]:
        assert self.engine is not None
        conn = self.engine.connect()
        trans = conn.begin()

        def new_session() -> Session:
            return Session(bind=conn, join_transaction_mode="create_savepoint")

        try:
            yield new_session
        finally:
            trans.rollback()
            conn.close()


class SaRollback(Strategy):
    key = "sa_rollback"

    @contextmanager
    def test(self) -> Iterator[SessionFactory]:
        with sa_rollback.rollback_scope():
            yield self._factory()


class Truncate(Strategy):
    key = "truncate"

    @contextmanager
    def test(self) -> Iterator[SessionFactory]:
        assert self.engine is not None
        try:
            yield self._factory()
        finally:
            self._truncate()


class DropCreate(Strategy):
    key = "drop_create"

    @contextmanager
    def test(self) -> Iterator[SessionFactory]:
        assert self.engine is not None
        try:
            yield self._factory()
        finally:
            self.schema.metadata.drop_all(self.engine)
            self.schema.metadata.create_all(self.engine)


class TemplateDatabase(Strategy):
    """A database cloned from the schema template for each test, dropped after it."""

    key = "template_db"

    def __init__(self, admin: Admin, schema: Schema, driver: str = "psycopg"):
        super().__init__(admin, schema, driver)
        self._n = 0

    def provision(self) -> None:
        for n in range(2):  # clones left by an interrupted run
            self.admin.drop(f"{self.dbname}_{n}", force=True)

    def open(self) -> None:
        pass

    @contextmanager
    def test(self) -> Iterator[SessionFactory]:
        self._n += 1
        name = f"{self.dbname}_{self._n % 2}"
        self.admin.create(name, self.template, no_fsync_wait=False)
        self.engine = sa.create_engine(self.url(name), connect_args=NO_FSYNC_WAIT)
        try:
            yield self._factory()
        finally:
            self.engine.dispose()
            self.engine = None
            self.admin.drop(name)

    def rows_left(self) -> int:
        # Every clone is dropped; what could leak is only into the template.
        return count_rows(self.admin, self.template, self.schema)


STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    cls.key: cls for cls in (NoIsolation, Recipe, SaRollback, Truncate, DropCreate, TemplateDatabase)
}


def provision_all(admin: Admin, schema: Schema, keys: tuple[str, ...]) -> None:
    """Build the size's template once and clone every strategy's database from it."""
    build_schema(admin, template_name(schema.size), schema)
    for key in keys:
        STRATEGY_CLASSES[key](admin, schema).provision()
