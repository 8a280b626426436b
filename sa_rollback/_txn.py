"""The transaction of a logical connection, as one value, and what undoing it takes."""

from __future__ import annotations

from enum import Enum
from typing import Optional, Union

from ._history import Savepoint


class Undo(Enum):
    """What a rollback has to do, when it is not "roll back to this savepoint"."""

    #: nothing of this transaction to undo
    NOTHING = "nothing"
    #: another transaction wrote after this one's writes: one transaction cannot undo them alone
    IMPOSSIBLE = "impossible"


UndoPlan = Union[Savepoint, Undo]


class Txn:
    """The transaction of a logical connection. Replaced whole when it ends."""

    __slots__ = (
        "doomed",
        "explicit_block",
        "first_write",
        "id",
        "last_write",
        "outer_writes",
        "points",
        "recent",
        "user_sps",
    )

    def __init__(self, txn_id: Optional[int] = None) -> None:
        #: the transaction's number on the physical connection; None: no transaction open
        self.id = txn_id
        #: (undo point, seq of this transaction's latest write before it), oldest first
        self.points: list[tuple[Savepoint, Optional[int]]] = []
        #: the newest undo point
        self.recent: Optional[Savepoint] = None
        self.first_write: Optional[int] = None
        #: an upper bound of the seq of this transaction's latest write
        self.last_write: Optional[int] = None
        #: the application's savepoints by name, innermost last
        self.user_sps: dict[str, list[Savepoint]] = {}
        #: it wrote in an outer scope's frame, which the current scope cannot undo
        self.outer_writes = False
        #: BEGIN on an autocommit connection: a transaction until COMMIT / ROLLBACK
        self.explicit_block = False
        #: aborted (its statement failed and the shared transaction was repaired
        #: on its behalf): statements fail until it rolls back
        self.doomed = False

    def unpin(self) -> None:
        for point, _ in self.points:
            point.undo = False

    def moved(self, outer_writes: bool) -> Txn:
        """The same transaction, in a new frame: undo points and savepoints stay behind."""
        self.unpin()
        moved = Txn(self.id)
        moved.outer_writes = outer_writes
        moved.explicit_block = self.explicit_block
        moved.doomed = self.doomed
        return moved
