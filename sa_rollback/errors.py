"""Exceptions raised by sa_rollback.

Every message says what happened and what to change. All of them derive from
:class:`SaRollbackError`, so a test suite can catch the family in one clause.
"""

from __future__ import annotations


class SaRollbackError(Exception):
    """Base class of every error raised by sa_rollback."""


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


class UnsupportedOperationError(SaRollbackError):
    """The operation cannot be reproduced inside a rolled-back transaction."""


class ScopeError(SaRollbackError):
    """Rollback scopes were opened or closed out of order."""


class ConfigurationError(SaRollbackError):
    """A setting has a value sa_rollback cannot use."""


class DatabaseSetupError(SaRollbackError):
    """The test database could not be provided."""
