"""Exact round-trip counts from libpq's own protocol trace.

Every connection a test can use is traced: the pools' connections (a class-level
Pool ``connect`` listener, installed once, consults the active tracer),
sa_rollback's physical connections, and the admin connection that clones
databases. Each frontend ``Query`` message or ``Sync`` message is one round trip
(psycopg sends ``Parse/Bind/Describe/Execute/Sync`` for a statement with
parameters, ``Query`` for one without), and so is a ``Flush``, which asyncpg
sends after ``Parse/Describe`` to prepare a statement and then waits for.

Async engines: psycopg's ``AsyncConnection`` is traced by libpq like the sync
one. asyncpg has no libpq: its connections are tapped at the socket instead
(:class:`_AsyncpgTap`), which decodes the frontend messages the driver writes to
its transport and writes them into a file in libpq's trace format, so that the
same parser counts them. Each connection is tapped from its construction on,
before the dialect's on-connect queries; only the start-up and authentication
exchange, which comes before, is left out (it is counted as a new connection).
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.pq import Trace
from sqlalchemy import event
from sqlalchemy.pool import Pool

_LIBC = ctypes.CDLL(None)
_LIBC.fdopen.restype = ctypes.c_void_p
_LIBC.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
_LIBC.fflush.argtypes = [ctypes.c_void_p]
_QUOTED = re.compile(r'"((?:[^"]|"")*)"')


def _psycopg2_libpq() -> Any:
    """psycopg2-binary's bundled libpq, which is the one holding its PGconn structs."""
    import psycopg2

    libs = Path(psycopg2.__file__).resolve().parent.parent / "psycopg2_binary.libs"
    found = sorted(glob.glob(str(libs / "libpq*.so*")))
    if not found:
        return None
    lib = ctypes.CDLL(found[0])
    lib.PQtrace.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.PQuntrace.argtypes = [ctypes.c_void_p]
    lib.PQsetTraceFlags.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


@dataclass
class _Traced:
    conn: Any
    path: Path
    fd: int
    libpq: Any = None
    tap: Any = None


#: names of the frontend messages asyncpg sends, by type byte
_FRONTEND = {
    b"Q": "Query",
    b"P": "Parse",
    b"B": "Bind",
    b"E": "Execute",
    b"D": "Describe",
    b"S": "Sync",
    b"C": "Close",
    b"H": "Flush",
    b"X": "Terminate",
    b"d": "CopyData",
    b"c": "CopyDone",
    b"f": "CopyFail",
}


def _cstrings(body: bytes, n: int) -> list[str]:
    """The first ``n`` NUL-terminated strings of a message body, quoted as libpq's trace quotes them."""
    out = []
    for part in body.split(b"\0", n)[:n]:
        out.append('"' + part.decode("utf-8", "replace").replace('"', '""') + '"')
    return out


class _AsyncpgTap:
    """Decodes what an asyncpg connection writes to its socket into libpq-style trace lines."""

    def __init__(self, conn: Any, fd: int):
        self.fd = fd
        self.transport = conn._transport  # asyncpg keeps the transport it writes to here
        self._write = self.transport.write
        self._writelines = self.transport.writelines
        self._pending = b""
        # Instance attributes shadow the transport class's methods, for this connection only.
        self.transport.write = self.write
        self.transport.writelines = self.writelines

    def write(self, data: Any) -> None:
        self.feed(bytes(data))
        self._write(data)

    def writelines(self, buffers: Any) -> None:
        buffers = list(buffers)
        for data in buffers:
            self.feed(bytes(data))
        self._writelines(buffers)

    def feed(self, data: bytes) -> None:
        buf = self._pending + data
        pos = 0
        lines = []
        while len(buf) - pos >= 5:
            length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if len(buf) - pos < 1 + length:
                break
            kind = buf[pos : pos + 1]
            body = buf[pos + 5 : pos + 1 + length]
            name = _FRONTEND.get(kind, f"Unknown{kind!r}")
            args = _cstrings(body, {"Query": 1, "Parse": 2, "Bind": 2}.get(name, 0))
            lines.append(f"F\t{length}\t{name}\t {' '.join(args)}\n")
            pos += 1 + length
        self._pending = buf[pos:]
        if lines:
            os.write(self.fd, "".join(lines).encode())

    def detach(self) -> None:
        for attr in ("write", "writelines"):
            self.transport.__dict__.pop(attr, None)


@dataclass
class Window:
    """The frontend messages one test sent, per connection."""

    round_trips: int = 0
    new_connections: int = 0
    statements: list[str] = field(default_factory=list)


def _label(sql: str) -> str:
    words = " ".join(sql.split())
    return words if len(words) <= 48 else words[:45] + "..."


_MESSAGE = re.compile(r"[FB]\t\d+\t\w+")


def _messages(text: str) -> Iterator[tuple[str, str, str]]:
    """(direction, message type, rest) per message; SQL with newlines spans several trace lines."""
    current: list[str] | None = None
    for line in text.split("\n"):
        if _MESSAGE.match(line):
            if current is not None:
                yield current[0], current[2], "\n".join([current[3] if len(current) > 3 else "", *current[4:]])
            current = line.split("\t", 3)
        elif current is not None:
            current.append(line)
    if current is not None:
        yield current[0], current[2], "\n".join([current[3] if len(current) > 3 else "", *current[4:]])


def prepared_names(text: str) -> dict[str, str]:
    """Statement text of each named (prepared) statement that the trace shows being parsed."""
    names: dict[str, str] = {}
    for direction, kind, rest in _messages(text):
        if direction == "F" and kind == "Parse":
            quoted = _QUOTED.findall(rest)
            if len(quoted) > 1 and quoted[0]:
                names[quoted[0]] = quoted[1]
    return names


def parse_trace(text: str, prepared: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Round trips and a label per round trip, from libpq trace output."""
    prepared = {} if prepared is None else dict(prepared)
    trips = 0
    labels: list[str] = []
    parsed: str | None = None
    bound: str | None = None
    for direction, kind, rest in _messages(text):
        if direction != "F":
            continue
        if kind == "Query":
            trips += 1
            m = _QUOTED.search(rest)
            labels.append(_label(m.group(1) if m else rest))
        elif kind == "Parse":
            names = _QUOTED.findall(rest)
            parsed = names[1] if len(names) > 1 else rest
            if len(names) > 1 and names[0]:
                prepared[names[0]] = names[1]
        elif kind == "Bind":
            names = _QUOTED.findall(rest)
            bound = names[1] if len(names) > 1 else ""
        elif kind == "Flush":
            # asyncpg prepares with Parse/Describe/Flush and waits for the answer: a round trip
            # without a Sync. (libpq sends Flush only in pipeline mode, which nothing here uses.)
            trips += 1
            labels.append("(prepare) " + _label(parsed) if parsed is not None else "(flush)")
            parsed = bound = None
        elif kind == "Sync":
            trips += 1
            if parsed is not None and bound is None:
                labels.append("(prepare) " + _label(parsed))
            elif parsed is not None:
                labels.append(_label(parsed))
            else:
                labels.append(_label(prepared.get(bound or "", f"(prepared statement {bound})")))
            parsed = bound = None
    return trips, labels


class Tracer:
    """Traces connections into one file each; windows read what was sent in between."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._traced: list[_Traced] = []
        self._ids: set[int] = set()
        self._pq2: Any = None

    def attach(self, conn: Any) -> None:
        if type(conn).__name__.startswith("AsyncAdapt_"):
            # SQLAlchemy's asyncio adapter: trace the driver's connection behind it.
            conn = conn._connection
        if id(conn) in self._ids:
            return
        path = self.directory / f"conn{len(self._traced)}.trace"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        if isinstance(conn, (psycopg.Connection, psycopg.AsyncConnection)):
            conn.pgconn.trace(fd)
            conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)
            traced = _Traced(conn, path, fd)
        elif type(conn).__module__.startswith("psycopg2"):
            if self._pq2 is None:
                self._pq2 = _psycopg2_libpq()
            if self._pq2 is None:
                os.close(fd)
                return
            stream = _LIBC.fdopen(fd, b"w")
            self._pq2.PQtrace(conn.pgconn_ptr, stream)
            self._pq2.PQsetTraceFlags(conn.pgconn_ptr, 1)  # PQTRACE_SUPPRESS_TIMESTAMPS
            traced = _Traced(conn, path, fd, self._pq2)
        elif type(conn).__module__.startswith("asyncpg"):
            traced = _Traced(conn, path, fd, tap=_AsyncpgTap(conn, fd))
        else:
            os.close(fd)
            return
        # Keeping the connection object alive keeps its id from being reused by another one.
        self._ids.add(id(conn))
        self._traced.append(traced)

    def attach_physicals(self) -> None:
        for conn in _physical_connections():
            self.attach(conn)

    def mark(self) -> dict[Path, int]:
        # libpq writes through stdio; fflush(NULL) flushes every trace stream at once.
        _LIBC.fflush(None)
        self.attach_physicals()
        return {t.path: t.path.stat().st_size for t in self._traced}

    def since(self, mark: dict[Path, int]) -> Window:
        _LIBC.fflush(None)
        window = Window()
        per_conn: list[tuple[int, list[str]]] = []
        for number, traced in enumerate(self._traced):
            start = mark.get(traced.path)
            if start is None:
                window.new_connections += 1
                start = 0
            data = traced.path.read_bytes()
            earlier = prepared_names(data[:start].decode("utf-8", "replace"))
            trips, labels = parse_trace(data[start:].decode("utf-8", "replace"), earlier)
            window.round_trips += trips
            if labels:
                per_conn.append((number, labels))
        for number, labels in per_conn:
            # Order is exact within a connection only, so several connections are labelled apart.
            window.statements.extend(labels if len(per_conn) == 1 else [f"c{number}: {x}" for x in labels])
        return window

    def close(self) -> None:
        _LIBC.fflush(None)
        for traced in self._traced:
            try:
                if traced.tap is not None:
                    traced.tap.detach()
                elif traced.libpq is not None:
                    if not traced.conn.closed:
                        traced.libpq.PQuntrace(traced.conn.pgconn_ptr)
                else:
                    traced.conn.pgconn.untrace()
            except Exception:
                pass
            os.close(traced.fd)
        self._traced.clear()
        self._ids.clear()


def _physical_connections() -> list[Any]:
    """sa_rollback's shared connections that exist already (those made later pass the Pool listener).

    Read from private structures, which ``compare_revs`` may find changed in
    another revision: then only connections made while tracing are traced.
    """
    try:
        from sa_rollback._state import STATE
    except ImportError:
        return []
    physicals = getattr(STATE, "physicals", None)
    if not isinstance(physicals, dict):
        return []
    return [conn for conn in (getattr(p, "conn", None) for p in list(physicals.values())) if conn is not None]


_ACTIVE: list[Tracer] = []
_installed = False


def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    if _ACTIVE:
        _ACTIVE[-1].attach(dbapi_connection)


def _tap_new_asyncpg_connections() -> Any:
    """Attach every asyncpg connection as it is built, before any query runs on it; returns the undo."""
    try:
        from asyncpg.connection import Connection  # type: ignore[import-untyped]
    except ImportError:
        return lambda: None
    original = Connection.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if _ACTIVE:
            _ACTIVE[-1].attach(self)

    Connection.__init__ = __init__

    def undo() -> None:
        Connection.__init__ = original

    return undo


@contextmanager
def tracing(directory: Path) -> Iterator[Tracer]:
    """Trace every pool connection made inside the block, and whatever is attached by hand."""
    global _installed
    if not _installed:
        event.listen(Pool, "connect", _on_connect)
        _installed = True
    tracer = Tracer(directory)
    _ACTIVE.append(tracer)
    untap = _tap_new_asyncpg_connections()
    try:
        yield tracer
    finally:
        untap()
        _ACTIVE.remove(tracer)
        tracer.close()
