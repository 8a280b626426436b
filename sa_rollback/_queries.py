"""Query capture: the statements the code under test sends, with their parameters, database and duration.

Every statement of the application inside a rollback scope passes
``LogicalConnection.run_statement``, which reads :data:`active` once: None
(nobody asked) costs that one read. While a :class:`Queries` capture is open,
each statement is recorded there before it runs, and the driver call is timed.
sa_rollback's own control statements (its savepoints, releases and rollbacks)
go to the driver directly and are never recorded; the application's own
``SAVEPOINT``/``RELEASE`` statements (``begin_nested()``) are, as it sent them.

Without pytest: ``with capture_queries() as queries: ...`` inside a
:class:`~sa_rollback.RollbackScope`. The plugin's ``sa_queries`` fixture is
one capture per test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

from .errors import QueryCountError


class Query:
    """One statement the application sent: its SQL text, parameters, database and duration."""

    __slots__ = ("database", "duration", "many", "params", "sql")

    def __init__(self, sql: str, params: Any, database: str, many: bool) -> None:
        #: the SQL text as the driver received it (parameters not interpolated)
        self.sql = sql
        #: the parameters (for ``executemany``: the sequence of parameter sets)
        self.params = params
        #: the database name (a clone's name when sa_rollback redirected the connection)
        self.database = database
        #: seconds the driver took; None when sa_rollback answered without the server (COMMIT, a
        #: savepoint the application named, refused statements)
        self.duration: Optional[float] = None
        #: sent with ``executemany`` (one statement, several parameter sets)
        self.many = many

    def __repr__(self) -> str:
        return f"<Query {self.database} {self.sql[:60]!r}>"

    def describe(self) -> str:
        params = "" if self.params in (None, (), [], {}) else f" -- params {_short(self.params)}"
        took = "" if self.duration is None else f" ({self.duration * 1000:.2f} ms)"
        return f"[{self.database}] {' '.join(self.sql.split())}{params}{took}"


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class QueryList:
    """Recorded statements, all or those of one database; shared API of :class:`Queries` and its views."""

    def __init__(
        self, records: list[Query], database: Optional[str] = None, aliases: Optional[dict[str, str]] = None
    ) -> None:
        self._records = records
        self._database = database
        #: other names of databases: the configured one for the clone that stands in for it
        self._aliases = aliases if aliases is not None else {}

    @property
    def database(self) -> Optional[str]:
        """The database this view is limited to (None: all)."""
        return self._database

    @property
    def statements(self) -> list[Query]:
        """The recorded statements, in the order they were sent."""
        database = self._database
        if database is None:
            return list(self._records)
        return [query for query in self._records if query.database == database]

    @property
    def count(self) -> int:
        return len(self.statements)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Query]:
        return iter(self.statements)

    def __getitem__(self, index: int) -> Query:
        return self.statements[index]

    def on(self, database: str) -> QueryList:
        """The statements sent to ``database`` only (same API); the configured name stands for its clone."""
        return QueryList(self._records, self._aliases.get(database, database), self._aliases)

    def clear(self) -> None:
        """Forget what was recorded so far (on every database)."""
        del self._records[:]

    def assert_count(self, expected: int, database: Optional[str] = None) -> None:
        """Fail unless exactly ``expected`` statements were recorded so far (on ``database``, if given)."""
        __tracebackhide__ = True
        view = self if database is None else self.on(database)
        statements = view.statements
        if len(statements) != expected:
            raise QueryCountError(_mismatch(expected, statements, view.database, ""))

    def expect(self, expected: int, database: Optional[str] = None) -> _Expect:
        """``with sa_queries.expect(2): ...``: fail unless the block sends exactly ``expected`` statements.

        Yields the block's own statements (filled in as it runs).
        """
        database = self._database if database is None else self._aliases.get(database, database)
        return _Expect(_Block(self._records, len(self._records), database), expected)


class _Expect:
    """The context manager of :meth:`QueryList.expect`."""

    def __init__(self, block: _Block, expected: int) -> None:
        self.block = block
        self.expected = expected

    def __enter__(self) -> QueryList:
        return self.block

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        __tracebackhide__ = True
        self.block.close()
        statements = self.block.statements
        if exc_type is None and len(statements) != self.expected:
            raise QueryCountError(_mismatch(self.expected, statements, self.block.database, " in the block"))


class _Block(QueryList):
    """The statements of one ``expect`` block, read while it runs or after it."""

    def __init__(self, records: list[Query], start: int, database: Optional[str]) -> None:
        super().__init__(records, database)
        self._start = start
        self._end: Optional[int] = None

    def close(self) -> None:
        self._end = len(self._records)

    @property
    def statements(self) -> list[Query]:
        database = self._database
        return [q for q in self._records[self._start : self._end] if database is None or q.database == database]


def _mismatch(expected: int, statements: list[Query], database: Optional[str], where: str) -> str:
    on = f" to {database}" if database else ""
    sent = len(statements)
    were = "1 was" if sent == 1 else f"{sent} were"
    lines = [f"Expected {expected} statement{'' if expected == 1 else 's'}{on}{where}, but {were} sent:"]
    width = len(str(sent))
    lines.extend(f"  {number:>{width}}. {query.describe()}" for number, query in enumerate(statements, 1))
    if not statements:
        lines.append("  (none)")
    return "\n".join(lines)


class Queries(QueryList):
    """A capture of every statement sent inside rollback scopes while it is open.

    Captures nest: a statement is recorded in every open one.
    """

    def __init__(self, aliases: Optional[dict[str, str]] = None) -> None:
        super().__init__([], None, aliases)
        self._parent: Optional[Queries] = None
        self._open = False

    def start(self) -> Queries:
        global active
        if self._open:
            return self
        self._parent, active = active, self
        self._open = True
        return self

    def stop(self) -> None:
        global active
        if not self._open:
            return
        self._open = False
        if active is self:
            active = self._parent
        self._parent = None

    def __enter__(self) -> Queries:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def add(self, query: Query) -> None:
        """Record ``query`` here and in every capture this one is nested in."""
        self._records.append(query)
        if self._parent is not None:
            self._parent.add(query)

    def record(self, sql: str, args: tuple[Any, ...], database: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Record a statement about to run; return ``fn`` wrapped to time the driver call."""
        many = getattr(fn, "__name__", "") == "executemany"
        query = Query(sql, args[0] if args else None, database, many)
        self.add(query)

        def timed(*call_args: Any, **call_kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*call_args, **call_kwargs)
            finally:
                query.duration = time.perf_counter() - started

        return timed


#: the innermost open capture, or None: read once per statement by the proxy
active: Optional[Queries] = None


def capture_queries(aliases: Optional[dict[str, str]] = None) -> Queries:
    """Record the statements sent inside rollback scopes: ``with capture_queries() as queries: ...``.

    ``aliases`` maps other names of a database to the one it is connected as,
    for ``queries.on(name)``.
    """
    return Queries(aliases)
