"""Tests with real commits: copy a database before the test, put the copy back after it."""

from __future__ import annotations

from ..errors import DatabaseSetupError
from ._janitor import Janitor
from ._listeners import POOLS
from ._names import Mark, snapshot_name
from ._server import Server


def _let_go(janitor: Janitor, database: str) -> None:
    """Close every connection of this process to ``database``, and end everyone else's.

    ``CREATE DATABASE ... TEMPLATE`` and ``DROP DATABASE`` both need the
    database to themselves.
    """
    from .._state import STATE

    STATE.close_all()
    POOLS.dispose_all()
    janitor.terminate(database)


def take_snapshot(server: Server, database: str, run_id: str) -> str:
    """Copy a database this process owns, before a test that commits for real."""
    name = snapshot_name(database)
    with Janitor(server.admin_url) as janitor:
        mark = janitor.mark(database)
        if mark is None:
            raise DatabaseSetupError(
                f"A test with real commits needs a database that sa_rollback created and may restore, "
                f"but {database!r} is your own. Set --sa-schema (for example 'existing', to clone it as "
                "it stands) so that tests run on a clone."
            )
        _let_go(janitor, database)
        janitor.replace(name, Mark.clone(mark.base or database, run_id), template=database)
    return name


def restore_snapshot(server: Server, database: str, snapshot: str) -> None:
    """Put the snapshot back in place of the database the test committed to."""
    with Janitor(server.admin_url) as janitor:
        mark = janitor.mark(database)
        if mark is None:
            raise DatabaseSetupError(f"{database!r} lost sa_rollback's mark; it was not restored.")
        _let_go(janitor, database)
        janitor.drop(database)
        janitor.rename(snapshot, database)
        # The copy carries the mark of a snapshot; the restored database is the original again.
        janitor.set_mark(database, mark)
