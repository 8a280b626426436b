"""The application's engine, made once at import from the environment, as in production."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

# DATABASE_URL may name any PostgreSQL driver; the service talks to it through asyncpg.
URL = make_url(os.environ.get("DATABASE_URL", "postgresql://localhost/notes")).set(drivername="postgresql+asyncpg")

engine = create_async_engine(URL)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


async def get_session() -> AsyncIterator[AsyncSession]:
    async with SessionLocal() as session:
        yield session
