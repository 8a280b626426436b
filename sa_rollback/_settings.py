"""Settings: one table, each a CLI flag, an ini key and an environment variable.

Precedence, highest first: command line, environment variable, ini file,
default. The environment outranks the ini file because the ini file is
committed with the project while the environment belongs to one machine or CI
job. Resolved once per run into the frozen :class:`Settings`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import ConfigurationError


@dataclass(frozen=True)
class Option:
    field: str
    flag: str
    ini: str
    env: str
    help: str
    kind: str = "string"  # "string", "bool" or "float"
    default: Any = None


def _default_cache_dir() -> str:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # As root the embedded server runs as an unprivileged user, who must traverse every parent of
        # its directory: /var/tmp is open to all and survives a reboot; root's home is closed.
        import pwd
        import tempfile

        base = "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()
        return os.path.join(base, f"sa_rollback-{pwd.getpwuid(os.geteuid()).pw_name}")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sa_rollback")


OPTIONS: tuple[Option, ...] = (
    Option(
        "enabled",
        "--sa-rollback",
        "sa_rollback",
        "SA_ROLLBACK",
        "Roll back every test's database writes; 'off' lets them through",
        kind="bool",
        default=True,
    ),
    Option(
        "url",
        "--sa-url",
        "sa_rollback_url",
        "SA_ROLLBACK_URL",
        "SQLAlchemy URL of the PostgreSQL database (or server) the tests use; "
        "unset means an embedded server started for the run",
    ),
    Option(
        "schema",
        "--sa-schema",
        "sa_rollback_schema",
        "SA_ROLLBACK_SCHEMA",
        "Where the schema comes from: 'module:Base' or 'module:metadata', 'alembic:PATH/alembic.ini', "
        "'sql:FILE[,FILE...]', 'hook:module:function', or 'existing' to clone the database as it stands",
    ),
    Option(
        "schema_inputs",
        "--sa-schema-inputs",
        "sa_rollback_schema_inputs",
        "SA_ROLLBACK_SCHEMA_INPUTS",
        "Further files that feed the schema (globs, separated by commas), whose contents go into the "
        "template's fingerprint: the migrations a hook: schema runs, say",
    ),
    Option(
        "rebuild",
        "--sa-rebuild",
        "sa_rollback_rebuild",
        "SA_ROLLBACK_REBUILD",
        "Rebuild the schema template even when its fingerprint is unchanged",
        kind="bool",
        default=False,
    ),
    Option(
        "export_env",
        "--sa-export-env",
        "sa_rollback_export_env",
        "SA_ROLLBACK_EXPORT_ENV",
        "Name of an environment variable to set to the test database URL (for apps that read DATABASE_URL at import)",
    ),
    Option(
        "lock_timeout",
        "--sa-lock-timeout",
        "sa_rollback_lock_timeout",
        "SA_ROLLBACK_LOCK_TIMEOUT",
        "Seconds a thread waits for a database's shared connection before the test fails with both "
        "threads' stacks; 'inf' waits forever",
        kind="float",
        default=30.0,
    ),
    Option(
        "check_deferred",
        "--sa-check-deferred",
        "sa_rollback_check_deferred",
        "SA_ROLLBACK_CHECK_DEFERRED",
        "Check deferred constraints (SET CONSTRAINTS ALL IMMEDIATE) before each test's rollback",
        kind="bool",
        default=True,
    ),
    Option(
        "reset_sequences",
        "--sa-reset-sequences",
        "sa_rollback_reset_sequences",
        "SA_ROLLBACK_RESET_SEQUENCES",
        "Put every sequence back after each test, so that each test gets the ids it would get first "
        "after its scope opened",
        kind="bool",
        default=False,
    ),
    Option(
        "detect_outside",
        "--sa-detect-outside",
        "sa_rollback_detect_outside",
        "SA_ROLLBACK_DETECT_OUTSIDE",
        "Fail a test that leaves a connection sa_rollback does not know of (psycopg.connect(), a "
        "subprocess) open on its database; checked in the rollback's own round trip, on clones only",
        kind="bool",
        default=True,
    ),
    Option(
        "report",
        "--sa-report",
        "sa_rollback_report",
        "SA_ROLLBACK_REPORT",
        "Show what isolation cost at the end of the run: one line, the full table with -v",
        kind="bool",
        default=True,
    ),
    Option(
        "server_dir",
        "--sa-server-dir",
        "sa_rollback_server_dir",
        "SA_ROLLBACK_SERVER_DIR",
        "Data directory of the embedded PostgreSQL server, kept between runs",
        default=_default_cache_dir(),
    ),
)


#: each option's default, from the table above: the one place defaults are written
_DEFAULTS: dict[str, Any] = {option.field: option.default for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """The resolved settings of one run."""

    enabled: bool = _DEFAULTS["enabled"]
    url: Optional[str] = _DEFAULTS["url"]
    schema: Optional[str] = _DEFAULTS["schema"]
    schema_inputs: Optional[str] = _DEFAULTS["schema_inputs"]
    rebuild: bool = _DEFAULTS["rebuild"]
    export_env: Optional[str] = _DEFAULTS["export_env"]
    lock_timeout: float = _DEFAULTS["lock_timeout"]
    check_deferred: bool = _DEFAULTS["check_deferred"]
    reset_sequences: bool = _DEFAULTS["reset_sequences"]
    detect_outside: bool = _DEFAULTS["detect_outside"]
    report: bool = _DEFAULTS["report"]
    server_dir: Path = Path(_DEFAULTS["server_dir"])


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def switch(value: str) -> Optional[bool]:
    """A switch's word (on, off, true, false, yes, no, 1, 0) as a bool; None for any other word."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE and lowered:
        return False
    return None


def _to_bool(option: Option, value: str, source: str) -> bool:
    if not value.strip():
        return False
    result = switch(value)
    if result is not None:
        return result
    raise ConfigurationError(f"{source} is {value!r}; it takes one of: on, off, true, false, 1, 0.")


def _to_seconds(option: Option, value: str, source: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:  # also rejects nan
        raise ConfigurationError(f"{source} is {value!r}; it takes a positive number of seconds, or 'inf'.")
    return seconds


def resolve(cli: Callable[[str], Any], ini: Callable[[str], Any], env: Optional[dict[str, str]] = None) -> Settings:
    """Resolve every option from the three sources (see the module docstring)."""
    environ = os.environ if env is None else env
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw: Any = None
        source = ""
        cli_value = cli(option.field)
        if cli_value is not None:
            raw, source = cli_value, f"the command line option {option.flag}"
        elif environ.get(option.env):
            raw, source = environ[option.env], f"the environment variable {option.env}"
        else:
            ini_value = ini(option.ini)
            if ini_value not in (None, "", []):
                raw, source = ini_value, f"the ini key {option.ini}"
        if raw is None:
            values[option.field] = option.default
        elif option.kind == "bool":
            values[option.field] = raw if isinstance(raw, bool) else _to_bool(option, str(raw), source)
        elif option.kind == "float":
            values[option.field] = _to_seconds(option, str(raw), source)
        else:
            values[option.field] = str(raw).strip()
    values["server_dir"] = Path(values["server_dir"]).expanduser()
    return Settings(**values)
