"""Where the schema comes from, and its fingerprint.

The fingerprint names the template database: an unchanged source finds its
template by name, and a changed one gets a new template.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import inspect
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from sqlalchemy.engine import URL

from ..errors import ConfigurationError, DatabaseSetupError
from ._admin import connect


@dataclass
class SchemaSource:
    """Where the schema comes from, and its fingerprint."""

    kind: str  # "metadata", "alembic", "sql", "hook", "existing", "empty"
    spec: str
    fingerprint: str
    build: Callable[[URL], None] = field(repr=False)
    #: what the fingerprint was taken of, for the start-up line
    inputs: list[str] = field(default_factory=list)


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

    return SchemaSource("metadata", spec, _digest("metadata", *ddl), build, [f"the DDL of {spec}"])


def _locate(spec: str, base_dir: Optional[Path], what: str) -> Path:
    """A file named in the schema setting; a relative path is relative to ``base_dir`` (the ini file's)."""
    path = Path(spec.strip()).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        where = f" in {str(path.absolute().parent)!r}" if not Path(spec.strip()).expanduser().is_absolute() else ""
        why = " (relative paths are relative to the directory of pytest's ini file)" if base_dir else ""
        raise ConfigurationError(f"{what} {spec.strip()!r} does not exist: looked for it{where}{why}.")
    return path


def _alembic_config(ini: Path) -> Any:
    """Alembic's config of ``ini``; a relative script_location is taken relative to the ini file.

    Alembic reads it relative to the current directory, which is the ini
    file's when ``alembic`` runs from the command line, but not when pytest
    runs from a subdirectory.
    """
    from alembic.config import Config

    config = Config(str(ini))
    location = config.get_main_option("script_location")
    if location and ":" not in location and not Path(location).is_absolute():
        config.set_main_option("script_location", str(ini.parent / location))
    return config


def _alembic_source(spec: str, base_dir: Optional[Path] = None) -> SchemaSource:
    try:
        from alembic import command
        from alembic.script import ScriptDirectory
    except ImportError:
        raise ConfigurationError(f'The schema {spec!r} needs Alembic: pip install "sa-rollback[alembic]".') from None
    ini = _locate(spec, base_dir, "The Alembic configuration")
    config = _alembic_config(ini)
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

        cfg = _alembic_config(ini)
        rendered = url.render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                # env.py files that follow the Alembic cookbook use a given connection.
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            with engine.connect() as conn:
                if conn.execute(sa.text("SELECT to_regclass('alembic_version')")).scalar() is None:
                    raise DatabaseSetupError(
                        "After 'alembic upgrade head' the template database has no alembic_version table: "
                        "env.py migrated another database. Make env.py use the connection in "
                        "config.attributes['connection'] (the Alembic cookbook's recipe) or the "
                        "sqlalchemy.url it is given, rather than a URL or driver connection of its own."
                    )
                current = set(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())
        finally:
            engine.dispose()
        if current != set(heads):
            raise DatabaseSetupError(
                f"After 'alembic upgrade head' the database is at {sorted(current)}, but the scripts' "
                f"head is {heads}. Check that env.py migrates the URL or connection it is given."
            )

    described = (
        [f"{len(files)} Alembic revision files", "env.py"]
        if env_py.is_file()
        else [f"{len(files)} Alembic revision files"]
    )
    return SchemaSource("alembic", spec, _digest(*parts), build, described)


def _sql_source(spec: str, base_dir: Optional[Path] = None) -> SchemaSource:
    names = [p.strip() for p in spec.split(",") if p.strip()]
    if not names:
        raise ConfigurationError("The schema 'sql:' names no file.")
    paths = [_locate(name, base_dir, "The schema file") for name in names]
    contents = [path.read_bytes() for path in paths]

    def build(url: URL) -> None:
        # One transaction: a file that fails leaves no half-built template behind.
        with connect(url, autocommit=False) as conn:
            for path, text in zip(paths, contents):
                try:
                    conn.execute(text.decode())
                except Exception as exc:
                    raise DatabaseSetupError(f"The schema file {str(path)!r} failed: {exc}") from None
            conn.commit()

    return SchemaSource("sql", spec, _digest("sql", *contents), build, [str(path) for path in paths])


def _hook_source(spec: str) -> SchemaSource:
    func = _import_object(spec, "The schema hook")
    if not callable(func):
        raise ConfigurationError(f"The schema hook {spec!r} is not callable.")
    module = inspect.getmodule(func)
    try:
        source = inspect.getsource(module)  # type: ignore[arg-type]
        described = f"the hook's module {getattr(module, '__file__', None) or spec}"
    except (OSError, TypeError):
        source = spec
        described = f"the hook's name {spec}"
    own = getattr(func, "sa_rollback_fingerprint", None)
    fingerprint = own or _digest("hook", spec, source)

    def build(url: URL) -> None:
        func(url.render_as_string(hide_password=False))

    return SchemaSource(
        "hook", spec, str(fingerprint), build, ["the hook's sa_rollback_fingerprint" if own else described]
    )


def _with_inputs(source: SchemaSource, patterns: Sequence[str]) -> SchemaSource:
    """Fold the contents of the files that ``patterns`` (globs) match into the fingerprint."""
    parts: list[str | bytes] = [source.fingerprint]
    for pattern in patterns:
        files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not files:
            raise ConfigurationError(
                f"The schema input {pattern!r} (--sa-schema-inputs) matches no file in {os.getcwd()!r}."
            )
        parts.append(pattern)
        for path in files:
            parts.extend((path, Path(path).read_bytes()))
        source.inputs.append(f"{len(files)} file{'s' if len(files) > 1 else ''} matching {pattern!r}")
    source.fingerprint = _digest("inputs", *parts)
    return source


def existing() -> SchemaSource:
    """The configured database as it stands: nothing to build, it is cloned itself."""
    return SchemaSource("existing", "existing", "", lambda url: None)


def schema_source(
    spec: Optional[str], inputs: Sequence[str] = (), base_dir: Optional[Path] = None
) -> Optional[SchemaSource]:
    """Parse the schema setting; None means "no schema to build".

    ``inputs``: globs of further files that feed the schema (a hook's
    migrations, say), whose contents go into the fingerprint. Relative
    ``alembic:`` and ``sql:`` paths are relative to ``base_dir`` (the plugin
    passes the directory of pytest's ini file, else its rootdir), or to the
    current directory without one.
    """
    source = _parse_schema(spec, base_dir)
    if source is None or not inputs or source.kind == "existing":
        return source
    return _with_inputs(source, inputs)


def split_inputs(value: Optional[str]) -> list[str]:
    """The globs of the schema inputs setting: separated by commas or new lines (an ini list)."""
    if not value:
        return []
    return [part.strip() for part in value.replace("\n", ",").split(",") if part.strip()]


def _parse_schema(spec: Optional[str], base_dir: Optional[Path] = None) -> Optional[SchemaSource]:
    if not spec:
        return None
    kind, sep, rest = spec.partition(":")
    if spec == "existing":
        return existing()
    if sep and kind == "alembic":
        return _alembic_source(rest, base_dir)
    if sep and kind == "sql":
        return _sql_source(rest, base_dir)
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
