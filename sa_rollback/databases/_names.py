"""Database names and the ownership mark every database the plugin creates carries.

The mark is the ``COMMENT ON DATABASE`` text: ``sa_rollback:<kind> key=value ...``.
It alone says whether a database is the plugin's, whatever its name: names may
be shortened with a hash, and a user may name a database of their own like ours.

Clones and templates also record the host, the process, the time, and the
run's lease: the key of the advisory lock every live run holds (``_lease``).
Whether the owner is alive is decided by that lock alone, on any host; host
and pid are for people reading the mark.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time as _time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import quote, unquote

from ..errors import SaRollbackError

PREFIX = "sa_rollback:"
#: PostgreSQL keeps the first 63 bytes of an identifier and silently drops the rest
MAX_IDENTIFIER_BYTES = 63
#: the host recorded in marks; SA_ROLLBACK_HOSTNAME names it where hostnames repeat (containers)
HOSTNAME = os.environ.get("SA_ROLLBACK_HOSTNAME") or socket.gethostname()

#: the keys each kind must carry; other keys are kept but not required
_REQUIRED = {
    "base": (),
    "template": ("fp", "run", "state"),
    "clone": ("run", "host", "pid"),
}
_STATES = ("building", "ready")


class MalformedMark(SaRollbackError):
    """A ``COMMENT`` starts like the plugin's mark but cannot be read: the database is not ours."""


@dataclass(frozen=True)
class Mark:
    """The ownership mark of a database the plugin created."""

    kind: str
    #: the configured (or embedded) database the template or clone belongs to
    base: Optional[str] = None
    fp: Optional[str] = None
    run: Optional[str] = None
    state: Optional[str] = None
    host: Optional[str] = None
    pid: Optional[int] = None
    #: when it was made (seconds since the epoch)
    time: Optional[int] = None
    #: the advisory lock key that the owning run holds while it lives (None: a mark of an earlier version)
    lease: Optional[int] = None

    @classmethod
    def template(cls, base: str, fingerprint: str, run: str, ready: bool) -> Mark:
        state = "ready" if ready else "building"
        return cls(
            "template", base=base, fp=fingerprint, run=run, state=state, time=int(_time.time()), lease=lease_key(run)
        )

    @classmethod
    def clone(cls, base: str, run: str) -> Mark:
        """A database of this run: it may be dropped once the run's lease is free."""
        return cls(
            "clone",
            base=base,
            run=run,
            host=HOSTNAME,
            pid=os.getpid(),
            time=int(_time.time()),
            lease=lease_key(run),
        )

    def render(self) -> str:
        # Values are percent-quoted so that a space in a database name or run id cannot
        # split a field; marks of earlier versions had no such values and read the same.
        fields = [
            f"{key}={quote(str(value), safe='')}"
            for key, value in (
                ("fp", self.fp),
                ("run", self.run),
                ("state", self.state),
                ("host", self.host),
                ("pid", self.pid),
                ("time", self.time),
                ("lease", self.lease),
                ("base", self.base),
            )
            if value is not None
        ]
        return " ".join([PREFIX + self.kind, *fields])

    @classmethod
    def parse(cls, comment: Optional[str]) -> Optional[Mark]:
        """The mark in a database comment; None for a database without one.

        Raises :class:`MalformedMark` for a comment that starts like a mark but
        cannot be read (a missing field, a pid that is not a number).
        """
        if not comment or not comment.startswith(PREFIX):
            return None
        tokens = comment[len(PREFIX) :].split()
        kind = tokens.pop(0) if tokens else ""
        if kind not in _REQUIRED:
            raise MalformedMark(f"unknown kind {kind!r}")
        values: dict[str, str] = {}
        for token in tokens:
            key, sep, value = token.partition("=")
            if not sep or not key:
                raise MalformedMark(f"{token!r} is not key=value")
            values[key] = unquote(value)
        missing = [key for key in _REQUIRED[kind] if not values.get(key)]
        if missing:
            raise MalformedMark(f"no {', '.join(missing)}")
        if kind == "template" and values["state"] not in _STATES:
            raise MalformedMark(f"unknown state {values['state']!r}")
        numbers: dict[str, Optional[int]] = {}
        for key in ("pid", "time", "lease"):
            numbers[key] = None
            if key in values:
                try:
                    numbers[key] = int(values[key])
                except ValueError:
                    raise MalformedMark(f"{key} {values[key]!r} is not a number") from None
        return cls(
            kind,
            base=values.get("base"),
            fp=values.get("fp"),
            run=values.get("run"),
            state=values.get("state"),
            host=values.get("host"),
            pid=numbers["pid"],
            time=numbers["time"],
            lease=numbers["lease"],
        )

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def belongs_to(self, base: str, name: str, infix: str) -> bool:
        """Whether this database belongs to ``base``. Marks written before the base was
        recorded are matched by their name, which then always started with it."""
        if self.base is not None:
            return self.base == base
        return name.startswith(base + infix)


def pid_alive(pid: int) -> bool:
    """Whether a process of this PID namespace has that pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_key(run: str) -> int:
    """The advisory lock key of a run's lease: a signed 64-bit number taken from its id."""
    return int.from_bytes(hashlib.sha256(f"sa_rollback run {run}".encode()).digest()[:8], "big", signed=True)


def shorten(name: str, limit: int = MAX_IDENTIFIER_BYTES) -> str:
    """``name`` if it fits in ``limit`` bytes of UTF-8, else its start and a hash of the whole.

    Cut by bytes, as PostgreSQL does, and never inside a character: a name
    PostgreSQL would truncate could otherwise lose the part that makes it unique.
    """
    encoded = name.encode()
    if len(encoded) <= limit:
        return name
    suffix = "_" + hashlib.sha256(encoded).hexdigest()[:8]
    head = encoded[: limit - len(suffix)].decode("utf-8", errors="ignore")
    return head + suffix


def template_name(base: str, fingerprint: str) -> str:
    return shorten(f"{base}_sar_tpl_{fingerprint[:12]}")


def clone_name(base: str, run_id: str, worker: str) -> str:
    return shorten(f"{base}_sar_{run_id}_{worker}")


def extra_name(database: str, suffix: str) -> str:
    return shorten(f"{database}_{suffix}")


def snapshot_name(database: str) -> str:
    return shorten(f"{database}_snap")
