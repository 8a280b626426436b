"""The rollback scope: the public, pytest-free core."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Optional

from ._adoption import NOTED, adopt_noted, release_adopted
from ._listeners import install as install_listeners
from ._physical import Physical
from ._sqla import greenlet_spawn
from ._state import STATE
from .errors import ConfigurationError, SaRollbackError

_installed = False


def install() -> None:
    """Register the process-wide listeners (idempotent); the first scope does it too."""
    global _installed
    if not _installed:
        install_listeners(STATE)
        _installed = True


def _check_timeout(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ConfigurationError(
            f"lock_timeout must be a positive number of seconds, not {value!r}; use math.inf to wait forever."
        )
    # threading.Lock.acquire: -1 waits forever; larger values overflow
    return -1.0 if math.isinf(value) else float(value)


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

    ``lock_timeout``: threads of the test share one connection per database,
    one statement at a time. A thread that waits longer than this many seconds
    for it fails with :class:`~sa_rollback.LockTimeoutError`, which names the
    thread that held it and shows where both were. Defaults to
    ``STATE.lock_timeout`` (30 s).

    ``check_deferred``: before rolling back, a scope that wrote runs ``SET
    CONSTRAINTS ALL IMMEDIATE``, in the same round trip, so that a deferred
    constraint the test violates fails the scope with
    :class:`~sa_rollback.DeferredConstraintError`, as the COMMIT would in
    production.

    ``reset_sequences``: when the scope ends, every sequence of each database
    it touched is put back where it stood when the scope first used that
    database, so that the next scope hands out the same ids. ``setval`` is not
    transactional: use it only on databases no other process uses at the same
    time. ``sequence_databases`` names the databases where that holds (None:
    any); using another one with ``reset_sequences`` raises
    :class:`~sa_rollback.ConfigurationError`, or, with
    ``refuse_other_sequences=False``, leaves its sequences alone.

    >>> with RollbackScope():
    ...     with engine.begin() as conn:
    ...         conn.execute(users.insert().values(name="x"))
    """

    def __init__(
        self,
        label: str = "rollback scope",
        *,
        lock_timeout: Optional[float] = None,
        check_deferred: bool = True,
        reset_sequences: bool = False,
        sequence_databases: Optional[Collection[str]] = None,
        refuse_other_sequences: bool = True,
    ) -> None:
        self.label = label
        # STATE.lock_timeout is checked where it is set (the plugin's settings).
        self.lock_timeout = STATE.lock_timeout if lock_timeout is None else _check_timeout(lock_timeout)
        self.check_deferred = check_deferred
        self.reset_sequences = reset_sequences
        self._sequence_databases = None if sequence_databases is None else frozenset(sequence_databases)
        self.refuse_other_sequences = refuse_other_sequences
        #: how to skip the deferred-constraint check, named by DeferredConstraintError (the plugin names its settings)
        self.deferred_hint = "pass RollbackScope(check_deferred=False)"
        #: errors recorded during the scope, raised at exit
        self.errors: list[SaRollbackError] = []
        self._physicals: list[Physical] = []
        self._open = False

    def __repr__(self) -> str:
        return f"<RollbackScope {self.label!r}>"

    @property
    def is_open(self) -> bool:
        return self._open

    def may_reset_sequences(self, dbname: str) -> bool:
        """May this scope put back the sequences of ``dbname`` (one nobody else uses)?"""
        return self._sequence_databases is None or dbname in self._sequence_databases

    def report(self, error: SaRollbackError) -> None:
        """Keep an error that SQLAlchemy would swallow; the scope raises the first at exit."""
        self.errors.append(error)

    def touched(self, phys: Physical) -> None:
        """``phys`` opened a frame for this scope: roll it back at exit."""
        key = phys.key
        for other in self._physicals:
            okey = other.key
            if okey != key and (okey.host, okey.port, okey.dbname) == (key.host, key.port, key.dbname):
                STATE.warn_once(
                    ("split", key, okey),
                    f"Connections to {key.describe()} and {okey.describe()} use different drivers "
                    "or roles, so they get separate transactions: neither sees what the other wrote "
                    "in a test, and they can block on each other's row locks. Use one engine for both: "
                    "sync helpers of an async app can run on the async engine's connection through "
                    "'await session.run_sync(fn)' or 'await connection.run_sync(fn)'.",
                )
        self._physicals.append(phys)

    @property
    def used_databases(self) -> bool:
        """Has anything run on a database inside this scope yet?"""
        return bool(self._physicals)

    def __enter__(self) -> RollbackScope:
        if self._open:
            raise SaRollbackError(f"{self!r} is already open; create a new scope to nest.")
        install()
        STATE.push(self)
        self._open = True
        adopt_noted(STATE)
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close(raise_errors=exc is None)

    async def __aenter__(self) -> RollbackScope:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        # Inside SQLAlchemy's greenlet, the async connections' rollback can be awaited.
        await greenlet_spawn(self.close, raise_errors=exc is None)

    async def aclose(self, raise_errors: bool = True) -> None:
        """Roll back and leave the scope from a coroutine (what ``__aexit__`` does)."""
        await greenlet_spawn(self.close, raise_errors=raise_errors)

    def close(self, raise_errors: bool = True) -> None:
        """Roll back and leave the scope (what ``__exit__`` does).

        Every database is rolled back even when one of them fails. A connection
        that died, or whose state is unknown, is dropped; the next scope
        connects again.
        """
        if not self._open:
            return
        STATE.pop(self)
        self._open = False
        failures: list[BaseException] = []
        physicals, self._physicals = self._physicals, []
        # An interrupt (KeyboardInterrupt) in here leaves frames behind; the
        # next scope to use those connections rolls them back.
        for phys in reversed(physicals):
            try:
                phys.close_frame(self)
            except Exception as exc:
                failures.append(exc)
            finally:
                if phys.broken and not phys.frames:
                    # Outer scopes still on it keep it, so that they fail too.
                    STATE.discard(phys)
        if STATE.top is None and STATE.adopted:
            # Between scopes, what the application lent before the scope is its own again.
            self.errors.extend(release_adopted(STATE, keep=lambda logical: False))
        if raise_errors:
            if self.errors:
                raise self.errors[0]
            if failures:
                raise failures[0]


class LazyScope:
    """A :class:`RollbackScope` made and opened only when something first needs it, at each :meth:`open`.

    The pytest plugin's scope of every test, one object for the whole run: a
    test that never uses a database pays for :meth:`open` and :meth:`end`
    alone, with no scope made and nothing allocated. The scope is made by
    ``make`` and joins the open scopes when the checkout listener, a
    statement, another scope or :meth:`get` first asks for the innermost
    scope, so for everything it isolates it is as if it had opened at
    :meth:`open`. Where a connection lent before it waits to be adopted, it
    opens at once, as ``__enter__`` would.
    """

    __slots__ = ("_make", "scope")

    def __init__(self, make: Callable[[], RollbackScope]) -> None:
        self._make = make
        #: the scope of this opening, once made
        self.scope: Optional[RollbackScope] = None
        install()

    def open(self) -> None:
        """Open again, lazily; the scope of the previous opening must have ended (:meth:`end`)."""
        if NOTED:
            self.scope = self._make().__enter__()
        else:
            self.scope = None
            STATE.defer(self)

    def __call__(self) -> RollbackScope:
        # STATE calls this under its lock, and pushes what it returns.
        scope = self.scope = self._make()
        scope._open = True  # noqa: SLF001  (one module: the lazy form of its __enter__)
        return scope

    def get(self) -> RollbackScope:
        """The scope, opened now if nothing has opened it yet."""
        if self.scope is None:
            STATE.top  # noqa: B018  (reading it opens the deferred scope: this one)
        assert self.scope is not None
        return self.scope

    def end(self) -> Optional[RollbackScope]:
        """End this opening: None if its scope was never made (then it is forgotten), else the scope to close."""
        if STATE.cancel(self):
            return None
        scope, self.scope = self.scope, None
        return scope


def rollback_scope(
    label: str = "rollback scope",
    *,
    lock_timeout: Optional[float] = None,
    check_deferred: bool = True,
    reset_sequences: bool = False,
    sequence_databases: Optional[Collection[str]] = None,
) -> RollbackScope:
    """Open a :class:`RollbackScope`: ``with rollback_scope(): ...``."""
    return RollbackScope(
        label,
        lock_timeout=lock_timeout,
        check_deferred=check_deferred,
        reset_sequences=reset_sequences,
        sequence_databases=sequence_databases,
    )


@contextmanager
def suspended(keep: int = 0) -> Iterator[None]:
    """Set aside all but the ``keep`` outermost open scopes for a while: a wider fixture's setup.

    With none kept, connections go through for real. Adopted connections are
    then released for the time, unless the test wrote through them and has not
    committed, so that such a fixture's work through them is real too;
    afterwards they are adopted again, with whatever the fixture checked out
    and still holds.
    """
    top = STATE.top
    if top is None or keep >= len(STATE.scopes):
        yield
        return
    if keep == 0:
        for error in release_adopted(STATE, keep=lambda logical: logical.holds_work()):
            top.report(error)
    try:
        with STATE.suspended(keep):
            yield
    finally:
        adopt_noted(STATE)


def open_scopes() -> list[RollbackScope]:
    """The open scopes, outermost first."""
    return [scope for scope in STATE.scopes if isinstance(scope, RollbackScope)]
