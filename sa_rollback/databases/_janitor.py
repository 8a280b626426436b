"""The janitor: one admin connection that creates, clones, marks and drops databases."""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Callable, Optional

from sqlalchemy.engine import URL

from .. import SaRollbackWarning
from ..errors import DatabaseSetupError
from ._admin import INSUFFICIENT_PRIVILEGE, OBJECT_IN_USE, AdminConnection, admin_driver, sqlstate
from ._names import PREFIX, MalformedMark, Mark

_TERMINATE = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"


def not_ours(name: str) -> DatabaseSetupError:
    return DatabaseSetupError(
        f"A database named {name!r} exists but sa_rollback did not create it; it will not be replaced. "
        "Rename it, or use another database name."
    )


#: phrases of libpq's connection errors (they carry no SQLSTATE) that mean "the server answered, but refused"
_AUTH_FAILURES = ("password authentication failed", "no password supplied", "authentication failed", "role ")


#: libpq's messages for SQLSTATE 53300: the server's max_connections, or a role's or database's CONNECTION LIMIT
_NO_SLOTS = ("too many clients", "remaining connection slots", "too many connections")


def budget() -> str:
    """The connection arithmetic, with this run's worker count where xdist gives it."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    this_run = f" This run has {workers} workers." if workers else ""
    return (
        "Each test process (each xdist worker) holds about one connection per database it uses, and each run "
        "one more for its lease, plus an admin connection while it creates or drops databases: shards x "
        "(workers x databases + 1) must stay below max_connections (SHOW max_connections) and any CONNECTION "
        f"LIMIT of the role or database, with room for other clients.{this_run} Lower -n, run fewer shards "
        "at once, or raise the limit."
    )


def unreachable(url: URL, exc: BaseException, setting_hint: str) -> DatabaseSetupError:
    """Which server was tried, as whom, why it failed and which setting to change; no password.

    A refused login or a missing database is told apart from a server that is
    not there: "start the server" is the wrong advice for a wrong password.
    """
    socket_dir = url.query.get("host")
    host = url.host or (str(socket_dir) if socket_dir else "the local socket")
    reason = " ".join(str(exc).split()).rstrip(".?")
    if url.password:
        reason = reason.replace(url.password, "***")
    where = f"{host}:{url.port or 5432}"
    user = url.username or "(default)"
    fatal = reason.partition("FATAL:")[2].strip().lower()
    if fatal and "database" in fatal and "does not exist" in fatal:
        return DatabaseSetupError(
            f"PostgreSQL at {where} has no database {url.database!r} ({reason}). Create it, or change {setting_hint}."
        )
    if fatal and any(phrase in fatal for phrase in _NO_SLOTS):
        return DatabaseSetupError(
            f"PostgreSQL at {where} has no connection left for user {user} ({reason}). {budget()}"
        )
    if fatal and any(phrase in fatal for phrase in _AUTH_FAILURES):
        return DatabaseSetupError(
            f"PostgreSQL at {where} refused user {user} ({reason}). The server is running: check the user "
            f"and password in {setting_hint} (or in ~/.pgpass / PGPASSWORD)."
        )
    return DatabaseSetupError(
        f"PostgreSQL is unreachable at {where} as user {user} ({reason}). Start the server or change {setting_hint}."
    )


def _to_stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class Janitor:
    """The plugin's hands on one server, through a single admin connection.

    ``with Janitor(admin_url) as janitor: ...`` connects once for everything
    inside. Only databases that carry a readable :class:`Mark` are ever dropped
    or replaced.
    """

    def __init__(
        self, admin_url: URL, setting_hint: str = "the database URL", notice: Optional[Callable[[str], None]] = None
    ) -> None:
        self.url = admin_url
        self.setting_hint = setting_hint
        #: where a long wait is announced (standard error by default; the plugin writes past pytest's capture)
        self.notice = notice or _to_stderr
        self._conn: Optional[AdminConnection] = None

    def __enter__(self) -> Janitor:
        self._conn = self._connect()
        return self

    def _connect(self) -> AdminConnection:
        # The driver is chosen outside the try: a missing driver is its own error, not an unreachable server.
        driver = admin_driver(self.url)
        try:
            return driver.connect(self.url)
        except driver.module.Error as exc:
            raise unreachable(self.url, exc, self.setting_hint) from None

    def __exit__(self, *exc_info: object) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def reopen_if_lost(self) -> bool:
        """Connect again if the admin connection is gone (the server ended its session); whether it was.

        What the lost session held (advisory locks) went with it.
        """
        if self._conn is None or not self._conn.closed:
            return False
        with suppress(Exception):
            self._conn.close()
        self._conn = None
        self._conn = self._connect()
        return True

    @property
    def conn(self) -> AdminConnection:
        if self._conn is None:
            raise RuntimeError("the janitor is used outside its 'with' block")
        return self._conn

    # -- reading -----------------------------------------------------------------------------

    def require(self, name: str, setting_hint: str) -> None:
        """Fail at start-up, once, when the database the tests are configured to use does not exist."""
        if self.exists(name):
            return
        url = self.url
        raise DatabaseSetupError(
            f"The database {name!r} does not exist on {url.host or 'the local socket'}:{url.port or 5432}. "
            f"Create it, or set the schema ({setting_hint}): with a schema, sa_rollback builds the tests' "
            "database itself, for example sa_rollback_schema = myapp.models:Base, "
            "'alembic:alembic.ini' or 'sql:schema.sql'."
        )

    def exists(self, name: str) -> bool:
        return bool(self.conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)))

    def mark(self, name: str) -> Optional[Mark]:
        """The database's mark; None when it does not exist or is not the plugin's."""
        rows = self.conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
        )
        return self._read(name, rows[0][0]) if rows else None

    def marked(self, ours: str = "") -> list[tuple[str, Mark]]:
        """Every database on the server that carries the plugin's mark, whatever its name.

        A mark that cannot be read is skipped, with a warning when the database's name starts with
        ``ours`` (the names this run makes): one of another project on a shared server is not this
        run's business.
        """
        rows = self.conn.execute(
            "SELECT datname, description FROM ("
            " SELECT datname, shobj_description(oid, 'pg_database') AS description FROM pg_database"
            ") AS d WHERE starts_with(description, %s) ORDER BY datname",
            (PREFIX,),
        )
        found = []
        for name, comment in rows:
            mark = self._read(name, comment, warn=name.startswith(ours))
            if mark is not None:
                found.append((name, mark))
        return found

    @staticmethod
    def _read(name: str, comment: Optional[str], warn: bool = True) -> Optional[Mark]:
        try:
            return Mark.parse(comment)
        except MalformedMark as exc:
            if not warn:
                return None
            warnings.warn(
                f"The database {name!r} has a comment that looks like sa_rollback's mark but cannot be read "
                f"({exc}): sa_rollback treats it as not its own and leaves it alone. Drop it, or change its "
                "comment, if sa_rollback did make it.",
                SaRollbackWarning,
                stacklevel=3,
            )
            return None

    # -- writing -----------------------------------------------------------------------------

    def create(self, name: str, mark: Mark, template: Optional[str] = None, timeout: float = 30.0) -> None:
        """CREATE DATABASE (from ``template``, if given) and mark it.

        A template that another session is cloning or building is busy; retry
        until ``timeout``.
        """
        if template is None:
            statement = self.conn.compose("CREATE DATABASE {}", name)
        else:
            statement = self.conn.compose("CREATE DATABASE {} TEMPLATE {}", name, template)
        if template is not None:
            # PostgreSQL copies a database only when nobody is connected to it, and waits
            # silently for them (5 s per attempt): say at once whom the clone waits for.
            waiting = self._waiting_for(template, timeout)
            grace = time.monotonic() + 0.5  # sessions just terminated (pg_terminate_backend) take a moment to go
            while waiting is not None and time.monotonic() < grace:
                time.sleep(0.05)
                waiting = self._waiting_for(template, timeout)
            if waiting is not None:
                self.notice(waiting)
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                self.conn.execute(statement)
                break
            except self.conn.driver.module.Error as exc:
                code = sqlstate(exc)
                if code == INSUFFICIENT_PRIVILEGE:
                    raise DatabaseSetupError(
                        f"The role may not create databases (CREATE DATABASE {name!r} was refused). "
                        "Grant it with ALTER ROLE ... CREATEDB, or point --sa-url at a server where it may."
                    ) from None
                if code != OBJECT_IN_USE:
                    raise
                if time.monotonic() > deadline:
                    raise DatabaseSetupError(
                        f"Could not clone {template!r}: other sessions stayed connected to it for {timeout:.0f} s. "
                        "Close connections to the template database (psql, an IDE) and run again."
                    ) from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        self.set_mark(name, mark)

    def _waiting_for(self, template: str, timeout: float) -> Optional[str]:
        """Who keeps a template busy: the sessions connected to it, as the server lists them."""
        rows = self.conn.execute(
            "SELECT pid, coalesce(nullif(application_name, ''), '?'), coalesce(client_addr::text, 'local socket'), "
            "usename, to_char(backend_start, 'HH24:MI:SS') FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() ORDER BY backend_start",
            (template,),
        )
        sessions = "; ".join(
            f"pid {pid} {app!r} from {client} as {user}, since {since}" for pid, app, client, user, since in rows[:5]
        )
        if not rows:
            return None
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        return (
            f"sa_rollback: waiting up to {timeout:.0f} s to clone {template!r}: PostgreSQL copies a database only "
            f"while nobody else is connected to it, and {len(rows)} session(s) are: {sessions}{more}. "
            "Close them (psql, an IDE, a running app) to go on."
        )

    def set_mark(self, name: str, mark: Mark) -> None:
        # COMMENT takes no bound parameters; the driver quotes the literal.
        sql = self.conn.sql
        self.conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(mark.render()))
        )

    def terminate(self, name: str) -> None:
        """End every other session on the database."""
        self.conn.execute(_TERMINATE, (name,))

    def _allow_connections(self, name: str, allow: bool) -> None:
        statement = "ALTER DATABASE {} ALLOW_CONNECTIONS " + ("true" if allow else "false")
        self.conn.execute(self.conn.compose(statement, name))

    def drop(self, name: str) -> bool:
        """Drop the database if, and only if, it carries the plugin's mark. Returns whether it did.

        New connections are refused first: ``WITH (FORCE)`` ends the sessions
        it finds, and a pool reconnecting after that would make the DROP wait
        and fail. On failure the database accepts connections again.
        """
        if self.mark(name) is None:
            return False
        drop = self.conn.compose("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)
        if self._invalid(name):
            self.conn.execute(drop)
            return True
        self._allow_connections(name, False)
        try:
            self.conn.execute(drop)
        except BaseException:
            with suppress(Exception):
                if not self._invalid(name):
                    self._allow_connections(name, True)
            raise
        return True

    def _invalid(self, name: str) -> bool:
        """Whether a DROP DATABASE that did not finish left the database invalid.

        PostgreSQL (15.4 and later) then refuses every command on it but DROP
        DATABASE, and an ALTER DATABASE on it ends the session (FATAL): seen
        when two runs dropped the same leftover at once.
        """
        rows = self.conn.execute("SELECT datconnlimit = -2 FROM pg_database WHERE datname = %s", (name,))
        return bool(rows and rows[0][0])

    def drop_if_unused(self, name: str) -> bool:
        """Drop a database of the plugin's that nobody is connected to; leave it alone otherwise."""
        if self.mark(name) is None:
            return False
        if self.conn.execute("SELECT 1 FROM pg_stat_activity WHERE datname = %s", (name,)):
            return False
        try:
            self.conn.execute(self.conn.compose("DROP DATABASE {}", name))
        except self.conn.driver.module.Error as exc:
            # Someone connected in between, or it belongs to another role: leave it.
            if sqlstate(exc) in (OBJECT_IN_USE, INSUFFICIENT_PRIVILEGE):
                return False
            raise
        return True

    def replace(self, name: str, mark: Mark, template: Optional[str] = None) -> None:
        """Create the database, dropping an earlier one of the plugin's by that name first."""
        if self.exists(name) and not self.drop(name):
            raise not_ours(name)
        self.create(name, mark, template)

    def rename(self, old: str, new: str) -> None:
        self.conn.execute(self.conn.compose("ALTER DATABASE {} RENAME TO {}", old, new))

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """A server-wide advisory lock: it serializes xdist workers and separate runs alike."""
        number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        self.conn.execute("SELECT pg_advisory_lock(%s)", (number,))
        try:
            yield
        finally:
            self.conn.execute("SELECT pg_advisory_unlock(%s)", (number,))
