"""The pool's own connection while a logical connection stands in for it, and handing it back."""

from __future__ import annotations

import weakref
from typing import Any, Optional, Protocol

from ._drivers import IDLE, INERROR, Driver
from ._vacant import Vacant
from .errors import SaRollbackError, TransactionEscapeError, caller_location


class Lent(Protocol):
    """A logical connection that stands in for a pool connection (``_proxy.LogicalConnection``)."""

    guard: Optional[PoolConnectionGuard]

    @property
    def adoption(self) -> Any: ...

    def returned(self) -> Optional[SaRollbackError]: ...


#: key of the PoolConnectionGuard in the pool record's ``info``
GUARD_KEY = "sa_rollback.guard"


class PoolConnectionGuard:
    """The pool's own connection while a logical connection stands in for it.

    It stays checked out, unused, and is what ``driver_connection`` returns.
    It is not part of the test's transaction, so it is made read-only for the
    time (client-side settings, no round trip): nothing can be committed
    through it. When the pool takes it back, a transaction left open on it
    means the application used it, and the test fails with
    :class:`TransactionEscapeError`. Several checkouts may share one pool
    connection (``StaticPool``); the last one to return restores it.

    ``real`` may be a :class:`~._vacant.Vacant` placeholder: then there is
    nothing to guard unless the application used it (it became a read-only
    connection), which is closed when the last checkout returns.
    """

    __slots__ = ("checkouts", "count", "detached", "driver", "real", "saved")

    def __init__(self, real: Any, driver: Driver):
        self.real = real
        self.driver = driver
        self.count = 0
        self.detached = False
        #: (weak reference to the pool's checkout proxy, the logical connection in it)
        self.checkouts: list[tuple[weakref.ref[Any], Lent]] = []
        self.saved: Optional[tuple[Any, Any]] = None
        if type(real) is Vacant:
            return  # it guards itself, if it ever connects
        try:
            if driver.status(real) != IDLE:
                # pool_pre_ping's SELECT 1 leaves a transaction open; the pool
                # would roll it back at check-in.
                real.rollback()
            self.saved = driver.guard(real)
        except Exception:
            # A dead pool connection: nothing can go through it anyway.
            pass

    def _connection(self) -> Any:
        """The real connection to look at: the pool's own, or what a placeholder became; None if nothing."""
        real = self.real
        return real.real if type(real) is Vacant else real

    def lend(self) -> None:
        """Lend it again, still read-only from an earlier checkout; pool_pre_ping may have begun a transaction."""
        real = self._connection()
        if real is None:
            return
        try:
            if self.driver.status(real) != IDLE:
                real.rollback()
        except Exception:
            pass  # a dead pool connection: nothing can go through it anyway

    def restore(self) -> None:
        """Make it writable again, as it was lent (the first checkout outside every scope does it)."""
        if self.saved is not None:
            try:
                self.driver.unguard(self.real, self.saved)
            except Exception:
                pass  # a broken connection: the pool finds out on its own
            self.saved = None

    def release(self, keep_guarded: bool = False) -> Optional[TransactionEscapeError]:
        """Describe any use of it; give it back writable, as it was lent, unless ``keep_guarded``."""
        real = self._connection()
        if real is None:
            return None
        driver = self.driver
        if type(self.real) is Vacant:
            try:
                return self._release(real, driver, keep_guarded)
            finally:
                self.real.vacate()  # back to one server connection
        return self._release(real, driver, keep_guarded)

    def _release(self, real: Any, driver: Driver, keep_guarded: bool) -> Optional[TransactionEscapeError]:
        try:
            if driver.closed(real):
                return None
            status = driver.status(real)
            error = None
            if status != IDLE:
                failed = status == INERROR
                error = TransactionEscapeError(
                    "A statement ran on the pool's own connection, which "
                    "`driver_connection` (engine.raw_connection().driver_connection, "
                    "connection.connection.driver_connection) returns inside a test"
                    + (" and failed" if failed else "")
                    + f"; it was returned to the pool at {caller_location()}. That connection is not part "
                    "of the test's transaction: it sees only committed data, and sa_rollback keeps it "
                    "read-only during a test so that nothing is committed through it"
                    + (" (a write there fails with 'read-only transaction')" if failed else "")
                    + ". Use the DBAPI connection instead (connection.connection.dbapi_connection, or the "
                    "raw connection itself), which joins the test's transaction."
                )
                real.rollback()
            if self.saved is not None and not keep_guarded:
                driver.unguard(real, self.saved)
                self.saved = None
            return error
        except Exception:
            # A broken connection: the pool finds out on its own.
            return None

    def close(self) -> None:
        try:
            self.real.close()
        except Exception:
            pass


def give_back(logical: Lent, record: Any, to_pool: bool = False) -> list[SaRollbackError]:
    """The checkout of ``logical`` ends: end it, and restore the pool connection when no one else uses it.

    Returns the errors to report: a rollback that could not be honoured, a
    statement run on the pool's own connection.

    ``to_pool``: the pool takes its connection back. It stays read-only, with
    its guard, for the next checkout in a scope, which then costs no
    ``autocommit``/``read_only`` round of the driver's setters (a few
    microseconds on every checkout of a test); the first checkout outside
    every scope makes it writable (:func:`unguard_idle`).
    """
    errors = [error for error in (logical.returned(),) if error is not None]
    adoption = logical.adoption
    if adoption is not None and not adoption.joined:
        # Lent before the scope and unused in it: the pool's reset-on-return
        # acts on this logical connection, so it would miss the real one.
        try:
            adoption.real.rollback()
        except Exception:
            pass  # a broken connection: the pool finds out on its own
    guard = logical.guard
    if guard is None or guard.detached:
        return errors
    logical.guard = None
    guard.checkouts = [entry for entry in guard.checkouts if entry[1] is not logical]
    guard.count -= 1
    if guard.count <= 0:
        kept = to_pool and record is not None and record.info.get(GUARD_KEY) is guard
        if record is not None and record.info.get(GUARD_KEY) is guard and not kept:
            del record.info[GUARD_KEY]
        error = guard.release(keep_guarded=kept)
        if error is not None:
            errors.append(error)
    return errors


def unguard_idle(record: Any) -> None:
    """A checkout outside every scope: the pool connection, kept read-only since a scope lent it, is writable again."""
    guard: Optional[PoolConnectionGuard] = record.info.get(GUARD_KEY)
    if guard is not None and guard.count <= 0:
        del record.info[GUARD_KEY]
        guard.restore()
