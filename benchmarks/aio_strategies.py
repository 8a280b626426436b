"""The async benchmark's test body and its four isolation strategies, with the sync body beside them.

The body is what a request handler of an async web service does: open an
``AsyncSession`` on the application's module-level engine, insert a row,
commit, read the row back. Each strategy wraps one test of it, as a per-test
fixture would: its setup and teardown are inside the timed region.

A test runs either on a loop shared by all tests (pytest-asyncio's module or
session loop scope) or on a loop of its own (the default function scope,
``fresh=True``). A loop of its own ends when the test ends, and the driver's
connections cannot outlive it: the hand-written strategies dispose of the
engine's pool at the end of each test, as their fixtures must, and
sa_rollback's shared connection of that loop is rolled back and closed when
the loop closes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, nullcontext
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import sa_rollback

from .config import db
from .db import Admin, count_rows
from .schema import Schema

AsyncSessionFactory = Callable[[], AsyncSession]
SessionFactory = Callable[[], Session]

#: the async strategies, in report order
AIO_STRATEGIES: tuple[str, ...] = ("none", "recipe", "truncate", "sa_rollback")
AIO_LABELS: dict[str, str] = {
    "none": "1. no isolation",
    "recipe": "2. recipe",
    "truncate": "3. TRUNCATE",
    "sa_rollback": "4. sa_rollback",
}
#: SQLAlchemy driver names of the async engines; "psycopg" in create_async_engine is psycopg 3's async mode
AIO_DRIVERS: tuple[str, ...] = ("asyncpg", "psycopg")


def aio_db_name(key: str) -> str:
    return db(f"aio_{key}")


async def body_request(new_session: AsyncSessionFactory, schema: Schema) -> None:
    """Insert a row, commit, read it back: one request of an async service."""
    model = schema.models[0]
    async with new_session() as session:
        row = model(name="request", qty=1)
        session.add(row)
        # The id is taken before the commit expires the object (a refresh would cost a SELECT).
        await session.flush()
        row_id = row.id
        await session.commit()
        found = await session.scalar(sa.select(model.name).where(model.id == row_id))
        if found != "request":
            raise AssertionError(f"the committed row is not there: {found!r}")


def sync_body_request(new_session: SessionFactory, schema: Schema) -> None:
    """The same request through a sync ``Session``: the sync path's reference."""
    model = schema.models[0]
    with new_session() as session:
        row = model(name="request", qty=1)
        session.add(row)
        session.flush()
        row_id = row.id
        session.commit()
        found = session.scalar(sa.select(model.name).where(model.id == row_id))
        if found != "request":
            raise AssertionError(f"the committed row is not there: {found!r}")


class AsyncStrategy:
    """One way of isolating async tests; ``test()`` wraps one test body inside the running loop."""

    key = ""

    def __init__(self, admin: Admin, schema: Schema, driver: str):
        self.admin = admin
        self.schema = schema
        self.driver = driver
        self.dbname = aio_db_name(self.key)
        self.engine: AsyncEngine | None = None

    def open(self) -> None:
        """The application's engine, made outside any loop, as a module would make it at import."""
        url = self.admin.db_url(self.dbname).set(drivername=f"postgresql+{self.driver}")
        self.engine = create_async_engine(url)

    async def dispose(self) -> None:
        """Close the pool's connections; inside the loop that made them."""
        if self.engine is not None:
            await self.engine.dispose()

    def drop_engine(self) -> None:
        """Forget the engine without touching its connections (their loop may be closed).

        Under loops per test, sa_rollback's engine keeps in its pool the connection of the
        first test's loop, which sa_rollback never used for a statement; closing it from
        another loop would fail, so it goes with the engine.
        """
        self.engine = None

    def outside_loop(self) -> AbstractContextManager[Any]:
        """What wraps a fresh-loop test from outside its loop (the plugin's scope, for sa_rollback)."""
        return nullcontext()

    def _factory(self) -> AsyncSessionFactory:
        engine = self.engine
        assert engine is not None

        def new_session() -> AsyncSession:
            return AsyncSession(engine)

        return new_session

    @asynccontextmanager
    async def test(self, fresh: bool) -> AsyncIterator[AsyncSessionFactory]:
        try:
            yield self._factory()
        finally:
            if fresh:
                await self.dispose()

    async def truncate(self) -> None:
        assert self.engine is not None
        async with self.engine.begin() as conn:
            await conn.exec_driver_sql(self.schema.truncate_sql())

    def rows_left(self) -> int:
        return count_rows(self.admin, self.dbname, self.schema)


class AsyncNoIsolation(AsyncStrategy):
    key = "none"


class AsyncRecipe(AsyncStrategy):
    """The hand-written async recipe: an outer transaction, a session joined to it with savepoints."""

    key = "recipe"

    @asynccontextmanager
    async def test(self, fresh: bool) -> AsyncIterator[AsyncSessionFactory]:
        assert self.engine is not None
        try:
            async with self.engine.connect() as conn:
                trans = await conn.begin()
                bound: AsyncConnection = conn

                def new_session() -> AsyncSession:
                    return AsyncSession(bind=bound, join_transaction_mode="create_savepoint")

                try:
                    yield new_session
                finally:
                    await trans.rollback()
        finally:
            if fresh:
                await self.dispose()


class AsyncTruncate(AsyncStrategy):
    key = "truncate"

    @asynccontextmanager
    async def test(self, fresh: bool) -> AsyncIterator[AsyncSessionFactory]:
        try:
            yield self._factory()
        finally:
            await self.truncate()
            if fresh:
                await self.dispose()


class AsyncSaRollback(AsyncStrategy):
    """sa_rollback around each test; the application keeps its engine, with no teardown of its own.

    On a shared loop the scope is entered and left inside the loop (``async
    with``). On a loop per test it is opened outside the loop and closed after
    the loop closed, in the order the pytest plugin does it under
    pytest-asyncio's function scope: the loop's close rolls back and closes
    the shared connection.
    """

    key = "sa_rollback"

    def outside_loop(self) -> AbstractContextManager[Any]:
        return sa_rollback.rollback_scope()

    @asynccontextmanager
    async def test(self, fresh: bool) -> AsyncIterator[AsyncSessionFactory]:
        if fresh:
            yield self._factory()
            return
        async with sa_rollback.rollback_scope():
            yield self._factory()


AIO_CLASSES: dict[str, type[AsyncStrategy]] = {
    cls.key: cls for cls in (AsyncNoIsolation, AsyncRecipe, AsyncTruncate, AsyncSaRollback)
}


class SyncStrategy:
    """The sync reference: the same request on a sync psycopg engine, isolated the same four ways."""

    def __init__(self, admin: Admin, schema: Schema, key: str):
        self.admin = admin
        self.schema = schema
        self.key = key
        self.dbname = aio_db_name(key)
        self.engine: sa.Engine | None = None

    def open(self) -> None:
        self.engine = sa.create_engine(self.admin.db_url(self.dbname).set(drivername="postgresql+psycopg"))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None

    def truncate(self) -> None:
        assert self.engine is not None
        with self.engine.begin() as conn:
            conn.exec_driver_sql(self.schema.truncate_sql())

    @contextmanager
    def test(self) -> Iterator[SessionFactory]:
        engine = self.engine
        assert engine is not None
        if self.key == "recipe":
            with engine.connect() as conn:
                trans = conn.begin()
                try:
                    yield lambda: Session(bind=conn, join_transaction_mode="create_savepoint")
                finally:
                    trans.rollback()
            return
        if self.key == "sa_rollback":
            with sa_rollback.rollback_scope():
                yield lambda: Session(engine)
            return
        try:
            yield lambda: Session(engine)
        finally:
            if self.key == "truncate":
                self.truncate()

    def rows_left(self) -> int:
        return count_rows(self.admin, self.dbname, self.schema)
