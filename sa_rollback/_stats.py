"""What sa_rollback itself cost this process: plain counters, for the end-of-run report.

Every count is an integer increment on a path that runs anyway (a savepoint
taken, a control statement sent, a connection opened or closed); nothing here
sends anything to the server. The pytest layer reads and resets it
(:mod:`._report`); the core only adds to it.
"""

from __future__ import annotations


class Stats:
    """The process-wide counters. Read them, never rely on them for behaviour."""

    __slots__ = ("_held", "databases", "peak", "round_trips", "savepoints")

    def __init__(self) -> None:
        #: savepoints sa_rollback took (undo points and nested scopes' bases), not the application's own
        self.savepoints = 0
        #: round trips of sa_rollback's own control statements (SAVEPOINT, RELEASE, ROLLBACK, sequence reads)
        self.round_trips = 0
        #: the databases this process opened a shared (physical) connection to
        self.databases: set[str] = set()
        #: the highest number of server connections held at once: shared ones and admin ones
        self.peak = 0
        self._held: set[int] = set()

    def reset(self) -> None:
        """Start counting afresh (a new pytest run in this process); connections still open stay counted."""
        self.savepoints = 0
        self.round_trips = 0
        self.databases = set()
        self.peak = len(self._held)

    def opened(self, connection: object, database: str = "") -> None:
        """A server connection of sa_rollback's own was opened (``database``: a shared one's)."""
        held = self._held
        held.add(id(connection))
        if len(held) > self.peak:
            self.peak = len(held)
        if database:
            self.databases.add(database)

    def closed(self, connection: object) -> None:
        """It was closed (closing twice counts once)."""
        self._held.discard(id(connection))

    @property
    def held(self) -> int:
        return len(self._held)


STATS = Stats()
