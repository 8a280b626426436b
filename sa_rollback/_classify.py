"""Classify SQL text: does it write, does it control the transaction?

The classification is conservative. A statement counts as a read only when it
starts with a read keyword (SELECT, WITH, SHOW, VALUES, TABLE, EXPLAIN, FETCH,
MOVE, DECLARE, CLOSE) and names no data-modifying keyword anywhere. Everything
else counts as a write. What it gets wrong, by design:

* a SELECT that calls a function with side effects (``SELECT my_insert()``,
  ``set_config(..., true)``) counts as a read;
* a read that merely mentions a write keyword (a column literally named
  ``"update"``, a string literal) counts as a write.

The first costs production fidelity only when that connection then rolls back
without having written anything else; the second costs at most one extra
savepoint. Results are cached per statement string, since applications repeat
their statements.

A write whose string has a statement starting with CREATE, ALTER or DROP is
marked ``schema``: undoing it may change what a statement prepared since then
refers to, which matters to drivers that cache prepared statements (asyncpg).

Two more kinds guard the outer transaction:

* ``ESCAPE``: a string of several statements, one of which ends the
  transaction (``INSERT ...; COMMIT``), or a transaction end with options
  sa_rollback does not know. It is refused before it runs. String literals,
  quoted names, dollar-quoted bodies and comments are skipped when looking, so
  ``'a; commit'`` and function bodies do not trigger it.
* ``TXN_SETTING``: ``SET TRANSACTION ...``, ``SET SESSION CHARACTERISTICS ...``
  and the matching ``SET transaction_*`` / ``default_transaction_*``
  parameters. On the shared transaction they would make every connection of
  the test read-only or change its isolation, so they are accepted and not
  applied, like the DBAPI's per-connection isolation levels.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import NamedTuple


class Kind(Enum):
    READ = "read"
    WRITE = "write"
    SAVEPOINT = "savepoint"
    RELEASE = "release"
    ROLLBACK_TO = "rollback_to"
    BEGIN = "begin"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    TWO_PHASE = "two_phase"
    ESCAPE = "escape"
    TXN_SETTING = "txn_setting"


class Statement(NamedTuple):
    kind: Kind
    #: the savepoint name, for SAVEPOINT / RELEASE / ROLLBACK TO
    name: str = ""
    #: a write that may change the schema (CREATE, ALTER, DROP): what a driver's statement cache depends on
    schema: bool = False


_READ_START = re.compile(
    r"\s*(?:\(\s*)*(?:SELECT|WITH|SHOW|VALUES|TABLE|EXPLAIN|FETCH|MOVE|DECLARE|CLOSE)\b",
    re.IGNORECASE,
)
_ROW_LOCKS = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+UPDATE|UPDATE|KEY\s+SHARE|SHARE)\b", re.IGNORECASE)
_WRITE_WORD = re.compile(
    r"\b(?:INSERT|UPDATE|DELETE|MERGE|INTO|CREATE|ALTER|DROP|TRUNCATE|COPY|CALL|GRANT|REVOKE|NOTIFY)\b",
    re.IGNORECASE,
)
_IDENT = r'("(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
_SAVEPOINT = re.compile(
    r"\s*(SAVEPOINT|RELEASE(?:\s+SAVEPOINT)?|ROLLBACK(?:\s+(?:WORK|TRANSACTION))?\s+TO(?:\s+SAVEPOINT)?)\s+"
    + _IDENT
    + r"\s*;?\s*\Z",
    re.IGNORECASE,
)
_TXN = re.compile(
    r"\s*(BEGIN|START\s+TRANSACTION|COMMIT|END|ROLLBACK|ABORT)\b"
    r"(?:\s+(?:WORK|TRANSACTION))?"
    r"(?:\s*,?\s*(?:ISOLATION\s+LEVEL\s+(?:SERIALIZABLE|REPEATABLE\s+READ|READ\s+COMMITTED|READ\s+UNCOMMITTED)"
    r"|READ\s+(?:ONLY|WRITE)|(?:NOT\s+)?DEFERRABLE))*"
    r"(?:\s+AND\s+(?:NO\s+)?CHAIN)?"
    r"\s*;?\s*\Z",
    re.IGNORECASE,
)
_TXN_SETTING = re.compile(
    r"\s*SET\s+(?:(?:SESSION\s+CHARACTERISTICS\s+AS\s+)?TRANSACTION\s+(?!SNAPSHOT\b)"
    r"|(?:SESSION\s+|LOCAL\s+)?(?:default_)?transaction_(?:isolation|read_only|deferrable)\b)",
    re.IGNORECASE,
)
#: a statement of a string that may change the schema
_SCHEMA = re.compile(r"(?:\A|;)\s*(?:CREATE|ALTER|DROP)\b", re.IGNORECASE)
#: what ends a transaction when it starts a statement (ROLLBACK TO is a savepoint)
_ENDS_TXN = re.compile(
    r"\s*(?:COMMIT|END|ABORT|PREPARE\s+TRANSACTION|ROLLBACK(?!\s+(?:(?:WORK|TRANSACTION)\s+)?TO\b))\b",
    re.IGNORECASE,
)
#: literals, quoted names and comments, which may contain anything
_OPAQUE = re.compile(
    # E'...' only where E starts a token: the E ending LIKE in LIKE'x' is part of the keyword
    r"(?<![\w$])[Ee]'(?:[^'\\]|\\.|'')*'"
    r"|'(?:[^']|'')*'"
    r'|"(?:[^"]|"")*"'
    r"|--[^\n\r]*"  # PostgreSQL ends a line comment at CR too
    r"|/\*.*?\*/"
    r"|\$((?:[A-Za-z_]\w*)?)\$.*?\$\1\$",
    re.DOTALL,
)
_BEGIN_ATOMIC = re.compile(r"\bBEGIN\s+ATOMIC\b", re.IGNORECASE)
_TWO_PHASE = re.compile(r"\s*(?:PREPARE\s+TRANSACTION|COMMIT\s+PREPARED|ROLLBACK\s+PREPARED)\b", re.IGNORECASE)

_TXN_KIND = {
    "BEGIN": Kind.BEGIN,
    "START": Kind.BEGIN,
    "COMMIT": Kind.COMMIT,
    "END": Kind.COMMIT,
    "ROLLBACK": Kind.ROLLBACK,
    "ABORT": Kind.ROLLBACK,
}

_READ = Statement(Kind.READ)
_WRITE = Statement(Kind.WRITE)
_SCHEMA_WRITE = Statement(Kind.WRITE, schema=True)
_ESCAPE = Statement(Kind.ESCAPE)
_TXN_SETTING_STMT = Statement(Kind.TXN_SETTING)
_cache: dict[str, Statement] = {}
_CACHE_MAX = 4096


def normalize_name(ident: str) -> str:
    """PostgreSQL folds unquoted names to lower case; quoted names keep their case."""
    if ident.startswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


def _ends_transaction_among_others(sql: str) -> bool:
    """Does a string of several statements contain one that ends the transaction?"""
    bare = _OPAQUE.sub(" ", sql)
    statements = [part for part in bare.split(";") if part.strip()]
    if len(statements) < 2:
        return False
    atomic = _BEGIN_ATOMIC.search(bare) is not None
    for part in statements:
        if _ENDS_TXN.match(part):
            # The END closing a BEGIN ATOMIC function body is not a COMMIT.
            if atomic and part.strip().upper() == "END":
                continue
            return True
    return False


def _classify(sql: str) -> Statement:
    if ";" in sql and _ends_transaction_among_others(sql):
        return _ESCAPE
    if _READ_START.match(sql):
        if _WRITE_WORD.search(_ROW_LOCKS.sub(" ", sql)):
            return _WRITE
        return _READ
    m = _SAVEPOINT.match(sql)
    if m:
        verb = m.group(1).upper()
        name = normalize_name(m.group(2))
        if verb.startswith("SAVEPOINT"):
            return Statement(Kind.SAVEPOINT, name)
        if verb.startswith("RELEASE"):
            return Statement(Kind.RELEASE, name)
        return Statement(Kind.ROLLBACK_TO, name)
    m = _TXN.match(sql)
    if m:
        return Statement(_TXN_KIND[m.group(1).split()[0].upper()])
    if _TWO_PHASE.match(sql):
        return Statement(Kind.TWO_PHASE)
    if _TXN_SETTING.match(sql):
        return _TXN_SETTING_STMT
    bare = _OPAQUE.sub(" ", sql)
    if _ENDS_TXN.match(bare):
        m = _TXN.match(bare)  # a lone COMMIT with a comment, say
        if m:
            return Statement(_TXN_KIND[m.group(1).split()[0].upper()])
        # A COMMIT or ROLLBACK with clauses the patterns above do not know:
        # running it would end the outer transaction.
        return _ESCAPE
    return _SCHEMA_WRITE if _SCHEMA.search(bare) else _WRITE


def classify(sql: str) -> Statement:
    """Classify one SQL string (see the module docstring for the rules)."""
    try:
        return _cache[sql]
    except KeyError:
        pass
    result = _classify(sql)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[sql] = result
    return result
