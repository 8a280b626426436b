"""Connections checked out before a rollback scope opened, and used inside it.

A connection joins a scope in the pool's ``checkout`` event. One checked out
before the scope opened never passes it: a session that a module fixture keeps
across tests, ``engine.connect()`` at import, a Flask app context pushed for a
whole module. Left alone, its commits inside the test would be real.

So every checkout made while no scope is open is *noted*, and when a scope
opens, each noted connection that is still checked out is *adopted*: a logical
connection stands in for its driver connection. That sends nothing to the
server. On its first use inside the scope, the adopted connection *joins*,
according to what its real connection holds:

* no transaction: it joins as a fresh checkout would;
* a transaction that only read: it is rolled back, then joined. Production
  would see the same data (READ COMMITTED takes a snapshot per statement);
* a transaction with uncommitted writes made before the scope: joining would
  commit them with the scope's work, or lose them with its rollback. Its
  statements and its commit fail with :class:`HeldConnectionError` and run
  nowhere; its rollback undoes them, as production's would, and joins;
* an aborted transaction: rolled back; the statement fails as it would in
  production, and the connection goes on inside the scope.

When the last scope closes, adopted connections get their real connection back
(*released*): between tests they belong to the wider-scoped fixtures, whose
work is real by design. One whose transaction the scope rolled back stays
logical until that transaction ends, so that its commit fails
(:class:`StaleConnectionError`) rather than silently commit nothing.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from types import CodeType
from typing import Any, Callable, Optional, Protocol

from ._drivers import IDLE, INERROR, INTRANS
from ._guard import GUARD_KEY, PoolConnectionGuard, give_back, unguard_idle
from ._physical import Physical, ScopeSource
from ._proxy import FailingCursor, LogicalConnection, LogicalCursor
from ._sequences import untracked as untracked_sequences
from ._sqla import Fairy, dialect_of, held_connection, pool_of, record_of, stand_in
from .errors import HeldConnectionError, SaRollbackError, SaRollbackWarning, caller_site, format_site

Site = Optional[tuple[CodeType, int]]


class Registry(ScopeSource, Protocol):
    """What adoption needs of the process-wide state."""

    adopted: list[LogicalConnection]
    #: PostgreSQL's lock_timeout (ms) for the shared connection being made, else None
    connecting_lock_timeout: Optional[int]

    def physical_for(
        self, dbapi_connection: Any, pool: Any, info: Optional[dict[Any, Any]] = None, record: Any = None
    ) -> Optional[Physical]: ...

    def vacated(self, info: dict[Any, Any], placeholder: Any, driver: Any, key: Any) -> None: ...

    def next_number(self) -> int: ...

    def warn_once(self, key: Any, message: str) -> None: ...


#: checkouts made while no scope was open: id(pool record) -> (weak ref to the pool's proxy, where).
#: Read as a bool by :meth:`._scope.LazyScope.open`, once per test (a call would cost more); written only here.
NOTED: dict[int, tuple[weakref.ref[Any], Site]] = {}

#: the question "did this transaction write?", answered by the server alone (PostgreSQL 13+)
_WROTE = "SELECT pg_current_xact_id_if_assigned() IS NOT NULL"


def note_checkout(fairy: Any, record: Any) -> None:
    """The pool lent ``fairy`` while no scope is open; a scope that opens before it returns adopts it."""
    NOTED[id(record)] = (weakref.ref(fairy), caller_site(2))
    untracked_sequences()  # what it runs is real, and may move sequences
    unguard_idle(record)


def note_existing() -> None:
    """Note the connections checked out before the listeners were installed (a conftest's import)."""
    for obj in gc.get_objects():
        if type(obj) is Fairy and held_connection(obj) is not None and record_of(obj) is not None:
            NOTED.setdefault(id(record_of(obj)), (weakref.ref(obj), None))


class Adoption:
    """How an adopted logical connection came to be, and what it stands in for."""

    __slots__ = ("fairy", "joined", "real", "registry", "site")

    def __init__(self, fairy: weakref.ref[Any], real: Any, site: Site, registry: Registry) -> None:
        self.registry = registry
        self.fairy = fairy
        #: the driver connection the pool lent before the scope opened
        self.real = real
        self.site = site
        self.joined = False

    def join(self, logical: LogicalConnection, action: str) -> None:
        """First use inside the scope (``action``: "statement", "commit" or "rollback")."""
        real = self.real
        driver = logical.phys.driver
        status = driver.status(real)
        error: Optional[HeldConnectionError] = None
        if status == INTRANS and action != "rollback" and _wrote(real):
            error = self._held_writes(logical, action)
            if action == "statement":
                raise error
            # A failed COMMIT ends the transaction in production too.
        if status != IDLE:
            real.rollback()
        guard = PoolConnectionGuard(real, driver)
        guard.count = 1
        guard.checkouts.append((self.fairy, logical))
        fairy = self.fairy()
        record = record_of(fairy) if fairy is not None else None
        if record is not None:
            record.info[GUARD_KEY] = guard
        logical.guard = guard
        self.joined = True
        if error is not None:
            raise error
        if status == INERROR and action == "statement":
            raise driver.in_failed_transaction(
                "current transaction is aborted, commands ignored until end of transaction block "
                f"(sa_rollback: a statement failed on this connection before the scope began, at "
                f"{format_site(self.site)} or later)"
            )

    def _held_writes(self, logical: LogicalConnection, action: str) -> HeldConnectionError:
        where = format_site(caller_site(2))
        if action == "statement":
            outcome = "The statement was not run."
        else:
            outcome = "The commit failed, and those writes were rolled back, as a failed COMMIT's are."
        return HeldConnectionError(
            f"A connection to {logical.phys.key.describe()}, checked out before the current rollback scope "
            f"began (at {format_site(self.site)}), holds uncommitted writes made before the scope, and its "
            f"{action} came inside the scope (at {where}). Joining the scope's transaction would commit those "
            f"writes with the scope's work, or lose them with its rollback. {outcome} End that transaction "
            "before the scope begins: commit (session.commit()) or close (session.close(), "
            "scoped_session.remove()) in the fixture that wrote, or check out a new connection inside the test."
        )

    def cursor(self, logical: LogicalConnection, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What ``cursor()`` returns for an adopted connection, or None to go on as usual."""
        registry = self.registry
        if registry.top is None:
            # Between scopes, a wider-scoped fixture's connection is real again,
            # once the transaction the scope rolled back has ended.
            fairy = self.fairy()
            if logical.stale or logical.holds_work() or fairy is None or held_connection(fairy) is not logical:
                return None
            registry.adopted.remove(logical)
            for error in release(logical, fairy):
                warnings.warn(str(error), SaRollbackWarning, stacklevel=4)
            return self.real.cursor(*args, **kwargs)
        if not self.joined:
            try:
                self.join(logical, "statement")
            except Exception as exc:
                # Raised at execute, with the statement, rather than here,
                # where SQLAlchemy would wrap it in a StatementError.
                return LogicalCursor(logical, FailingCursor(exc))
        return None


def _wrote(real: Any) -> bool:
    cursor = real.cursor()
    try:
        cursor.execute(_WROTE)
        row = cursor.fetchone()
    finally:
        cursor.close()
    return bool(row and row[0])


def has_noted() -> bool:
    """Is any connection noted as lent outside every scope (perhaps returned since)?"""
    return bool(NOTED)


def adopt_noted(registry: Registry) -> None:
    """A scope has opened: every noted connection still checked out joins it on first use."""
    entries: list[tuple[weakref.ref[Any], Site]] = []
    while NOTED:
        try:
            entries.append(NOTED.popitem()[1])
        except KeyError:  # another thread took the last one
            break
    for fairy_ref, site in entries:
        fairy = fairy_ref()
        if fairy is None:
            continue
        real = held_connection(fairy)
        record = record_of(fairy)
        if real is None or record is None or isinstance(real, LogicalConnection):
            continue  # returned, detached, or already standing in
        pool = pool_of(fairy)
        if dialect_of(pool).is_async:
            continue
        phys = registry.physical_for(real, pool, record.info)
        if phys is None:
            continue
        logical = LogicalConnection(phys, registry.next_number(), phys.driver.autocommit(real))
        logical.adoption = Adoption(fairy_ref, real, site, registry)
        stand_in(fairy, logical)
        registry.adopted.append(logical)


def release(logical: LogicalConnection, fairy: Any) -> list[SaRollbackError]:
    """Give ``fairy`` its real connection back; the errors found on the way."""
    adoption = logical.adoption
    assert isinstance(adoption, Adoption)
    record = record_of(fairy)
    errors: list[SaRollbackError] = []
    if adoption.joined:
        errors = give_back(logical, record)
    else:
        logical.end()
    stand_in(fairy, adoption.real)
    if record is not None:
        NOTED[id(record)] = (adoption.fairy, adoption.site)
    return errors


def release_adopted(registry: Registry, keep: Callable[[LogicalConnection], bool]) -> list[SaRollbackError]:
    """Release every adopted connection except those ``keep`` holds back; the errors found."""
    errors: list[SaRollbackError] = []
    kept: list[LogicalConnection] = []
    for logical in registry.adopted:
        adoption = logical.adoption
        assert isinstance(adoption, Adoption)
        fairy = adoption.fairy()
        if fairy is None or held_connection(fairy) is not logical:
            continue  # the pool has it back
        if logical.stale or keep(logical):
            kept.append(logical)
            continue
        errors.extend(release(logical, fairy))
        untracked_sequences()  # its real connection may move sequences now
    registry.adopted = kept
    return errors
