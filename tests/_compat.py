"""What lets the suite run on SQLAlchemy 1.4 as on 2.x, in one place.

The tests are written in SQLAlchemy 2.0 style. On 1.4 that style is its
"future" mode (``create_engine(future=True)``), which these helpers turn on;
the legacy mode of 1.4 has its own tests (``tests/test_legacy.py``). A test
that cannot run on 1.4 at all says why with :data:`needs_sqlalchemy_2`.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

#: (major, minor) of the installed SQLAlchemy
SA_LINE = tuple(int(part) for part in sa.__version__.split(".")[:2])
SA14 = SA_LINE < (2, 0)

#: the DBAPI drivers under test: SQLAlchemy 1.4 has no dialect for psycopg 3
DRIVERS: tuple[str, ...] = ("psycopg2",) if SA14 else ("psycopg2", "psycopg")
#: the async drivers under test (the semantics suite runs its sync bodies on them, in SQLAlchemy's greenlet)
ASYNC_DRIVERS: tuple[str, ...] = () if SA14 else ("asyncpg", "psycopg_async")


def needs_sqlalchemy_2(reason: str) -> pytest.MarkDecorator:
    """Mark a test that exercises an API SQLAlchemy 1.4 does not have; ``reason`` names it."""
    return pytest.mark.skipif(SA14, reason=f"SQLAlchemy 1.4 has no {reason}")


def create_engine(url: Any, **kwargs: Any) -> Any:
    """``sa.create_engine``, in 2.0 style on every line ("future" mode on 1.4).

    For an async driver, the sync face of an async engine (``AsyncEngine.sync_engine``):
    what ``AsyncSession`` and ``AsyncConnection`` drive, usable inside SQLAlchemy's greenlet.
    """
    if str(url).split("://")[0] in ("postgresql+asyncpg", "postgresql+psycopg_async"):
        from sqlalchemy.ext.asyncio import create_async_engine

        return create_async_engine(url, **kwargs).sync_engine
    if SA14:
        kwargs.setdefault("future", True)
    return sa.create_engine(url, **kwargs)
