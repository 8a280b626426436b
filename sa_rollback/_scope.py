"""The rollback scope: the public, pytest-free core."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Optional

from ._listeners import install
from ._state import STATE
from .errors import SaRollbackError

if TYPE_CHECKING:
    from ._transaction import Physical


class RollbackScope:
    """Everything written to PostgreSQL inside the ``with`` block is rolled back at its end.

    Any SQLAlchemy engine, created before or inside the block, joins the scope:
    its checkouts share one transaction per database, application commits
    become savepoint releases, and the scope's exit rolls it all back. Scopes
    nest; an inner scope rolls back to where the outer one stood.

    Errors that SQLAlchemy would swallow (a rollback during the pool's
    reset-on-return that cannot be honoured, say) are kept in :attr:`errors`
    and the first is raised at exit, unless another exception is already
    propagating.

    >>> with RollbackScope():
    ...     with engine.begin() as conn:
    ...         conn.execute(users.insert().values(name="x"))
    """

    def __init__(self, label: str = "rollback scope") -> None:
        self.label = label
        #: errors recorded during the scope, raised at exit
        self.errors: list[SaRollbackError] = []
        self._physicals: list[Physical] = []
        self._open = False

    def __repr__(self) -> str:
        return f"<RollbackScope {self.label!r}>"

    def _touched(self, phys: Physical) -> None:
        key = phys.key
        for other in self._physicals:
            okey = other.key
            if okey != key and (okey.host, okey.port, okey.dbname) == (key.host, key.port, key.dbname):
                STATE.warn_once(
                    ("split", key, okey),
                    f"Connections to {key.describe()} and {okey.describe()} use different drivers "
                    "or roles, so they get separate transactions: neither sees what the other wrote "
                    "in a test, and they can block on each other's row locks.",
                )
        self._physicals.append(phys)

    def __enter__(self) -> RollbackScope:
        if self._open:
            raise SaRollbackError(f"{self!r} is already open; create a new scope to nest.")
        install()
        STATE.push(self)
        self._open = True
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close(raise_errors=exc is None)

    def close(self, raise_errors: bool = True) -> None:
        """Roll back and leave the scope (what ``__exit__`` does)."""
        if not self._open:
            return
        STATE.pop(self)
        self._open = False
        failures: list[BaseException] = []
        for phys in reversed(self._physicals):
            try:
                phys.close_frame(self)
            except Exception as exc:  # the connection died: the next scope reconnects
                failures.append(exc)
        self._physicals.clear()
        if raise_errors:
            if self.errors:
                raise self.errors[0]
            if failures:
                raise failures[0]


def rollback_scope(label: str = "rollback scope") -> RollbackScope:
    """Open a :class:`RollbackScope`: ``with rollback_scope(): ...``."""
    return RollbackScope(label)
