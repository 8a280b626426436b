"""The benchmark's own databases: create, clone from a template, drop (a small janitor)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import URL

from .config import check_name
from .schema import Schema

#: Per-test clones get no ALTER DATABASE settings (CREATE DATABASE does not copy them),
#: so their engines ask for the same setting at connection time.
NO_FSYNC_WAIT = {"options": "-c synchronous_commit=off"}


def libpq_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class Admin:
    """An autocommit connection to the server's maintenance database, for CREATE/DROP DATABASE."""

    def __init__(self, url: URL):
        self.url = url
        try:
            self.conn = psycopg.connect(libpq_dsn(url), autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            raise SystemExit(
                f"PostgreSQL is unreachable at {url.host}:{url.port or 5432} ({exc}). Start it, or pass "
                "--url / set SA_ROLLBACK_BENCH_URL to a server where this role may create databases."
            ) from None
        self.created: set[str] = set()

    def db_url(self, name: str) -> URL:
        return self.url.set(database=name)

    def version(self) -> str:
        row = self.conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    def setting(self, name: str) -> str:
        row = self.conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
        return str(row[0]) if row else "?"

    def exists(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None

    def create(self, name: str, template: str | None = None, no_fsync_wait: bool = True) -> None:
        check_name(name)
        ident = sql.Identifier(name)
        if template is None:
            self.conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
        else:
            self.conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(ident, sql.Identifier(template)))
        self.created.add(name)
        if no_fsync_wait:
            # Without it each durable COMMIT waits for fsync, which would hide the overheads measured.
            self.conn.execute(sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(ident))

    def drop(self, name: str, force: bool = False) -> None:
        check_name(name)
        stmt = "DROP DATABASE IF EXISTS {} WITH (FORCE)" if force else "DROP DATABASE IF EXISTS {}"
        self.conn.execute(sql.SQL(stmt).format(sql.Identifier(name)))
        self.created.discard(name)

    def recreate(self, name: str, template: str | None = None) -> None:
        self.drop(name, force=True)
        for attempt in range(50):
            try:
                self.create(name, template)
                return
            except psycopg.errors.ObjectInUse:
                # "source database is being accessed by other users": a backend that just
                # disconnected from the template may still be exiting.
                if attempt == 49:
                    raise
                time.sleep(0.1)

    def drop_created(self) -> None:
        for name in sorted(self.created):
            self.drop(name, force=True)

    def close(self) -> None:
        self.conn.close()


def build_schema(admin: Admin, name: str, schema: Schema) -> None:
    """A database holding the schema (recreated if it exists), and nobody connected to it."""
    admin.recreate(name)
    engine = sa.create_engine(admin.db_url(name), poolclass=sa.NullPool)
    try:
        schema.metadata.create_all(engine)
    finally:
        engine.dispose()


def count_rows(admin: Admin, name: str, schema: Schema) -> int:
    """Rows in all tables of the database, read from outside any rollback scope."""
    union = " + ".join(f"(SELECT count(*) FROM {t.name})" for t in schema.metadata.sorted_tables)
    with psycopg.connect(libpq_dsn(admin.db_url(name)), autocommit=True) as conn:
        row = conn.execute(f"SELECT {union}").fetchone()
    return int(row[0]) if row else 0


@contextmanager
def session_admin(url: URL) -> Iterator[Admin]:
    admin = Admin(url)
    try:
        yield admin
    finally:
        try:
            admin.drop_created()
        finally:
            admin.close()
