"""sa_rollback: every test in its own rolled-back PostgreSQL transaction.

Enable the pytest plugin in the root ``conftest.py``::

    pytest_plugins = ["sa_rollback"]

or use the core without pytest::

    with sa_rollback.rollback_scope():
        ...  # any SQLAlchemy engine, any session: rolled back at the end
"""

from ._queries import Queries, Query, capture_queries
from ._scope import RollbackScope, rollback_scope
from ._settings import Settings
from .errors import (
    ConfigurationError,
    ConnectionLostError,
    DatabaseSetupError,
    DeferredConstraintError,
    HeldConnectionError,
    InterleavedRollbackError,
    LockTimeoutError,
    OutsideConnectionError,
    QueryCountError,
    SaRollbackError,
    SaRollbackWarning,
    ScopeError,
    StaleConnectionError,
    TransactionEscapeError,
    UnsupportedOperationError,
)

__version__ = "0.1.0"

#: ``pytest_plugins = ["sa_rollback"]`` registers this package; pytest then loads the plugin proper.
pytest_plugins = ["sa_rollback.plugin"]

__all__ = [
    "ConfigurationError",
    "ConnectionLostError",
    "DatabaseSetupError",
    "DeferredConstraintError",
    "HeldConnectionError",
    "InterleavedRollbackError",
    "LockTimeoutError",
    "OutsideConnectionError",
    "Queries",
    "Query",
    "QueryCountError",
    "RollbackScope",
    "SaRollbackError",
    "SaRollbackWarning",
    "ScopeError",
    "Settings",
    "StaleConnectionError",
    "TransactionEscapeError",
    "UnsupportedOperationError",
    "__version__",
    "capture_queries",
    "rollback_scope",
]
