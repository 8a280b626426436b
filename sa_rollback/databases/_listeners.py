"""The SQLAlchemy listeners of the databases: the redirect to the clone, and the pools to close.

Both are registered once per process, on the classes, and switched by their
own state, as the rollback listeners are.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.engine import URL

from .._sqla import record_pool

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", ""}


class _Pools:
    """Every pool that opened a connection in this process, so they can all let go of a database."""

    def __init__(self) -> None:
        self.pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._installed = False

    def install(self) -> None:
        if self._installed:
            return
        from sqlalchemy import event
        from sqlalchemy.pool import Pool

        # "connect" fires only for new DBAPI connections: nothing on the checkout path.
        event.listen(Pool, "connect", self._on_connect)
        self._installed = True

    def _on_connect(self, dbapi_connection: Any, connection_record: Any) -> None:
        pool = record_pool(connection_record)
        if pool is not None:
            self.pools.add(pool)

    def dispose_all(self) -> None:
        for pool in list(self.pools):
            try:
                pool.dispose()
            except Exception:
                pass


POOLS = _Pools()


class _Redirect:
    """Send connections to the configured database to this process's clone instead."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str, str], str] = {}
        self._installed = False
        self._lock = threading.Lock()

    @staticmethod
    def _norm(params: dict[str, Any]) -> tuple[str, str]:
        host = str(params.get("host") or "")
        if host in _LOCAL_HOSTS:
            host = "localhost"
        return host, str(params.get("port") or "5432")

    def _key(self, url: URL, base: str) -> tuple[str, str, str]:
        # A unix-socket URL carries its directory in the query (?host=/run/postgresql).
        params: dict[str, Any] = {"host": url.host or url.query.get("host"), "port": url.port or url.query.get("port")}
        host, port = self._norm({k: v[0] if isinstance(v, tuple) else v for k, v in params.items()})
        return host, port, base

    def add(self, url: URL, base: str, clone: str) -> None:
        self.routes[self._key(url, base)] = clone
        self.install()

    @contextmanager
    def routed(self, url: URL, base: str, target: str) -> Iterator[None]:
        """Send connections for ``base`` to ``target`` for the duration, then route them as before."""
        key = self._key(url, base)
        before = self.routes.get(key)
        self.add(url, base, target)
        try:
            yield
        finally:
            if before is None:
                self.routes.pop(key, None)
            else:
                self.routes[key] = before

    def clear(self) -> None:
        self.routes.clear()

    def install(self) -> None:
        with self._lock:
            if self._installed:
                return
            from sqlalchemy import event
            from sqlalchemy.engine import Engine

            event.listen(Engine, "do_connect", self._on_connect)
            self._installed = True

    def _on_connect(self, dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        if not self.routes:
            return
        host, port = self._norm(cparams)
        for key in ("dbname", "database"):
            name = cparams.get(key)
            if name is not None:
                target = self.routes.get((host, port, str(name)))
                if target is not None:
                    cparams[key] = target
                return


REDIRECT = _Redirect()
