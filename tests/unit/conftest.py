"""Unit tests: no PostgreSQL server, no database, no network.

``tests/conftest.py`` creates the suite's databases through its autouse
``_no_leftovers`` fixture; the fixture of the same name here replaces it for
the tests below this directory, so ``pytest tests/unit`` runs with the server
down.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sa_rollback._state import STATE


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    assert STATE.top is None, "a test left a rollback scope open"
