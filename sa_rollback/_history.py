"""The history of writes on one physical transaction, and its savepoints: plain data, no database.

Writes are numbered in order (``seq``). A frame (what one rollback scope did on
one database) remembers which transaction wrote last and the latest write of
anyone else, which answers "did another transaction write after X?" in
constant time. A savepoint remembers the number of the latest write before it
and the frame's history at that point, so that rolling back to it restores
the history too.

Savepoints form a stack, as on the server. Each knows its place on it
(``index``), so that finding one costs nothing whatever the depth.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

#: (seq of the latest write, its transaction, seq of the latest write by another one, that write's sql, the other's sql)
Marks = tuple[int, int, int, str, str]

#: ``Savepoint.index`` of a savepoint that is not on the stack (any more)
OFF_STACK = -1


def fresh(seq: int) -> Marks:
    """The history of a frame that has not written since write number ``seq``."""
    return (seq, 0, seq, "", "")


class ScopeLike(Protocol):
    """What the physical side needs of a rollback scope: its settings, and to be told it was touched."""

    label: str
    lock_timeout: float
    check_deferred: bool
    #: put the sequences back where they stood when the scope's frame opened
    reset_sequences: bool
    #: on a database where it may not, fail (True) or leave the sequences alone (False)
    refuse_other_sequences: bool

    def may_reset_sequences(self, dbname: str) -> bool: ...

    #: how to skip the deferred-constraint check, for the error that the check raises
    deferred_hint: str

    @property
    def is_open(self) -> bool: ...

    def touched(self, phys: Any) -> None: ...

    def report(self, error: Any) -> None: ...


class Savepoint:
    """One savepoint on the physical connection, or the start of its transaction (``name`` None)."""

    __slots__ = ("before", "index", "is_base", "marks", "name", "owner", "seq", "txn", "undo", "user_live")

    def __init__(
        self,
        name: Optional[str],
        seq: int,
        marks: Marks,
        owner: Any = None,
        txn: Optional[int] = None,
        before: Optional[int] = None,
    ) -> None:
        self.name = name
        self.seq = seq
        self.marks = marks
        #: the logical connection that took it (None for a frame's base)
        self.owner = owner
        #: the owner's transaction, and its latest write before this savepoint
        self.txn = txn
        self.before = before
        #: serves as its owner's undo point
        self.undo = False
        #: a savepoint the application created and has not released yet
        self.user_live = False
        self.is_base = False
        self.index = OFF_STACK

    @property
    def releasable(self) -> bool:
        return not (self.undo or self.user_live or self.is_base)

    @property
    def is_start(self) -> bool:
        """The start of the physical transaction, which is always there."""
        return self.name is None


class SavepointStack:
    """The savepoints open on one physical connection, oldest first, each knowing its index."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[Savepoint] = []

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self) -> Any:
        return iter(self.items)

    def __getitem__(self, index: int) -> Savepoint:
        return self.items[index]

    def push(self, sp: Savepoint) -> None:
        sp.index = len(self.items)
        self.items.append(sp)

    def holds(self, sp: Savepoint) -> bool:
        index = sp.index
        return 0 <= index < len(self.items) and self.items[index] is sp

    def kept_since(self, point: Savepoint, since: Optional[Savepoint]) -> bool:
        """Is ``point`` still there (on the stack, or the start), and no older than ``since``?

        ``since`` None, the start, or gone sets no bound.
        """
        if not point.is_start and not self.holds(point):
            return False
        if since is None or since.is_start or not self.holds(since):
            return True
        return not point.is_start and point.index >= since.index

    def cut(self, index: int) -> list[Savepoint]:
        """Remove the savepoints from ``index`` up; return them."""
        removed = self.items[index:]
        del self.items[index:]
        for sp in removed:
            sp.index = OFF_STACK
        return removed

    def above(self, sp: Savepoint) -> int:
        """Index of the first savepoint newer than ``sp`` (0 for the start of the transaction)."""
        return 0 if sp.is_start else sp.index + 1

    def clear(self) -> None:
        self.cut(0)


class Frame:
    """What one rollback scope did on one physical connection: its base point and its writes."""

    __slots__ = (
        "base",
        "last_seq",
        "last_sql",
        "last_txn",
        "logicals",
        "prev_seq",
        "prev_sql",
        "reset_fp",
        "reset_sql",
        "schema",
        "scope",
    )

    def __init__(self, scope: ScopeLike, base: Savepoint) -> None:
        self.scope = scope
        self.base = base
        self.last_seq = base.seq
        self.last_txn = 0
        self.prev_seq = base.seq
        self.last_sql = ""
        self.prev_sql = ""
        #: the logical connections that ran statements in this frame
        self.logicals: set[Any] = set()
        #: the statement that puts the sequences back after the frame's rollback (see _sequences)
        self.reset_sql = ""
        #: the set of sequences that reset_sql covers (see _sequences.FINGERPRINT)
        self.reset_fp: tuple[int, ...] = ()
        #: a write here may have changed the schema (see _classify): its rollback changes it back
        self.schema = False

    def last_foreign(self, txn: int) -> int:
        """Number of the latest write in this frame by a transaction other than ``txn``."""
        return self.last_seq if self.last_txn != txn else self.prev_seq

    def foreign_sql(self, txn: int) -> str:
        return self.last_sql if self.last_txn != txn else self.prev_sql

    def record_write(self, txn: int, seq: int, sql: str) -> None:
        if self.last_txn != txn:
            self.prev_seq = self.last_seq
            self.prev_sql = self.last_sql
            self.last_txn = txn
        self.last_seq = seq
        self.last_sql = sql

    @property
    def wrote(self) -> bool:
        """Does the frame hold writes that are not rolled back?"""
        return self.last_seq > self.base.seq

    def marks(self) -> Marks:
        return (self.last_seq, self.last_txn, self.prev_seq, self.last_sql, self.prev_sql)

    def restore(self, marks: Marks) -> None:
        self.last_seq, self.last_txn, self.prev_seq, self.last_sql, self.prev_sql = marks
