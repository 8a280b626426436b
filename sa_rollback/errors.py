"""Exceptions raised by sa_rollback.

Every message says what happened and what to change. All of them derive from
:class:`SaRollbackError`, so a test suite can catch the family in one clause.
"""

from __future__ import annotations

import sys
from types import CodeType, FrameType
from typing import Optional


class SaRollbackError(Exception):
    """Base class of every error raised by sa_rollback."""


class SaRollbackWarning(UserWarning):
    """Something sa_rollback cannot isolate, or a setting it ignores."""


class InterleavedRollbackError(SaRollbackError):
    """A rollback would also undo work that another connection committed later.

    All logical connections of a test share one physical transaction. When
    connection A writes, connection B then writes (or commits), and A rolls
    back, production would undo only A's work. One transaction cannot do that
    without also undoing B's, so sa_rollback refuses instead of guessing.
    """


class TransactionEscapeError(SaRollbackError):
    """Something ended the test's outer transaction behind sa_rollback's back.

    Data written before that point may have been committed for real.
    """


class StaleConnectionError(SaRollbackError):
    """A connection outlived the rollback scope in which it was checked out."""

    @classmethod
    def used_after_scope(cls, database: str, where: str) -> StaleConnectionError:
        return cls(
            f"A connection to {database} was checked out inside a rollback scope that has ended, and is "
            f"used after it ({where}): between tests, by a wider-scoped fixture's set-up or teardown, or "
            "by a thread the test left running. Its work would not be rolled back, so it is refused. End "
            "the transaction of a session kept across tests before each test ends (session.commit(), "
            "session.rollback(), session.close(), scoped_session.remove()), so that its next use checks "
            "out a new connection; or check out a new connection where it is used."
        )


class HeldConnectionError(SaRollbackError):
    """A connection checked out before the scope opened cannot join it.

    It holds a transaction with uncommitted writes made before the scope
    began: joining the scope's transaction would commit them with the scope's
    work or lose them with its rollback, neither of which production would do.
    The statement is not run anywhere. The message names the connection, where
    it was checked out, and the fix.
    """


class UnsupportedOperationError(SaRollbackError):
    """The operation cannot be reproduced inside a rolled-back transaction."""

    @classmethod
    def busy(cls, connection: str, where: str) -> UnsupportedOperationError:
        return cls(
            f"{connection} runs a statement while this thread is still inside a cursor.stream() or "
            f"copy() block on the same database ({where}). In production they would be two "
            "connections; here they share one, which cannot run a statement while the stream or COPY is "
            "open, and psycopg would wait forever. Finish or close the stream first, or fetch its rows "
            "with fetchall() / a server-side cursor."
        )


class ScopeError(SaRollbackError):
    """Rollback scopes were opened or closed out of order."""


class ConfigurationError(SaRollbackError):
    """A setting has a value sa_rollback cannot use."""


class DatabaseSetupError(SaRollbackError):
    """The test database could not be provided."""


class LockTimeoutError(SaRollbackError):
    """A thread waited too long for the shared connection of a database.

    Every statement of a test runs on one physical connection per database, one
    statement at a time. The message names the thread that held the connection
    and shows where each thread was.
    """


class ConnectionLostError(SaRollbackError):
    """The physical connection of a test died (backend terminated, server restarted).

    Everything the test wrote on it is gone; the next rollback scope connects afresh.
    """

    @classmethod
    def of(cls, database: str, cause: Optional[BaseException]) -> ConnectionLostError:
        why = f" ({' '.join(str(cause).split())})" if cause is not None else ""
        return cls(
            f"The connection to {database} was lost{why}: its backend was terminated, the server "
            "restarted, or the network failed. The transaction of the test (and of any outer rollback "
            "scope on it) is gone, with everything written in it; nothing was committed. Once those "
            "scopes end, the next one connects again."
        )


class DeferredConstraintError(SaRollbackError):
    """A deferred constraint is violated when the rollback scope ends.

    In production the ``COMMIT`` would have failed. :attr:`constraint` names the
    constraint when the server reported it.
    """

    def __init__(self, message: str, constraint: Optional[str] = None):
        super().__init__(message)
        self.constraint = constraint


#: modules whose frames are never "the application's code" in an error message
_INTERNAL = ("sa_rollback.", "sqlalchemy.", "psycopg.", "psycopg2.", "contextlib", "threading", "concurrent.")


class OutsideConnectionError(SaRollbackError):
    """Another connection was on the test's own database when its transaction was rolled back.

    Only sa_rollback's connections (and those of SQLAlchemy pools in this
    process, which join the test's transaction) belong on a database it
    created for the run. Any other, a ``psycopg.connect()`` or a process the
    test started, worked outside the test's transaction: what it wrote was
    committed for real and is not rolled back.
    """


class QueryCountError(AssertionError):
    """``sa_queries.assert_count`` or ``expect``: the statements sent were not as many as expected."""


def caller_site(depth: int = 1) -> Optional[tuple[CodeType, int]]:
    """(code, line) of the innermost caller outside sa_rollback, SQLAlchemy and the drivers.

    Cheap enough for every checkout outside a scope: nothing is formatted
    until :func:`format_site` is called.
    """
    try:
        frame: Optional[FrameType] = sys._getframe(depth + 1)  # noqa: SLF001  (stdlib)
    except ValueError:  # called from near the bottom of the stack
        return None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(_INTERNAL) and module != "sa_rollback":
            return frame.f_code, frame.f_lineno
        frame = frame.f_back
    return None


def format_site(site: Optional[tuple[CodeType, int]]) -> str:
    if site is None:
        return "(location unknown)"
    code, line = site
    return f"{code.co_filename}:{line} in {code.co_name}()"


def caller_location() -> str:
    """``file:line in function`` of the innermost caller outside sa_rollback, SQLAlchemy and the drivers."""
    return format_site(caller_site(1))
