"""The example's root conftest: one line enables sa_rollback, the rest is ordinary test setup.

No database configuration: sa_rollback starts an embedded PostgreSQL, gives each
xdist worker its own database, puts its URL in DATABASE_URL (pytest.ini), and
rolls back every test, including what the app commits through its own engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
import sqlalchemy as sa

pytest_plugins = ["sa_rollback"]


@pytest.fixture(scope="session", autouse=True)
def schema(sa_rollback_url: str) -> None:
    """The tables, created once per worker database (session scope: real commits)."""
    from notes_api.models import Base

    engine = sa.create_engine(sa_rollback_url)
    Base.metadata.create_all(engine)
    engine.dispose()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    from notes_api.main import app

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client
