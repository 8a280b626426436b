"""The machine and software versions a run was measured on."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from .db import Admin

REPO = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    """Read-only git queries: which code was measured."""
    try:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def describe(admin: Admin) -> dict[str, Any]:
    import psycopg

    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "postgresql": admin.version(),
        "server": f"{admin.url.host}:{admin.url.port or 5432}",
        # A server started with fsync=off (a scratch one) makes commits cheaper; the report says so.
        "fsync": admin.setting("fsync"),
        "python": platform.python_version(),
        "sqlalchemy": _version("SQLAlchemy"),
        "psycopg": _version("psycopg"),
        "psycopg_impl": psycopg.pq.__impl__,
        "libpq": psycopg.pq.version(),
        "psycopg2": _version("psycopg2-binary"),
        "pytest": _version("pytest"),
        "pytest_xdist": _version("pytest-xdist"),
        "sa_rollback": _version("sa-rollback"),
        "git_head": _git("rev-parse", "--short", "HEAD"),
        # The package may be edited while it is measured; this says so.
        "sa_rollback_modified_files": _git("status", "--porcelain", "--", "sa_rollback").splitlines(),
    }
