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


class Statement(NamedTuple):
    kind: Kind
    #: the savepoint name, for SAVEPOINT / RELEASE / ROLLBACK TO
    name: str = ""


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
    r"(?:\s+(?:WORK|TRANSACTION))?(?:\s+(?:ISOLATION\s+LEVEL\s+[\w\s]+?|READ\s+\w+|(?:NOT\s+)?DEFERRABLE))*"
    r"\s*;?\s*\Z",
    re.IGNORECASE,
)
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
_cache: dict[str, Statement] = {}
_CACHE_MAX = 4096


def normalize_name(ident: str) -> str:
    """PostgreSQL folds unquoted names to lower case; quoted names keep their case."""
    if ident.startswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


def _classify(sql: str) -> Statement:
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
    return _WRITE


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
