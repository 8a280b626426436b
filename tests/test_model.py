"""Model-based test: interleaved units of work against a model of production semantics.

Hypothesis generates sequences of operations on three SQLAlchemy Connections
of one engine: begin, insert, a failing insert (unique violation), a failing
read, read, commit, rollback, begin_nested, release, rollback to the
savepoint, and reads through a fourth, short-lived connection. The
reference model knows what production PostgreSQL would do with three real
connections, where the shared transaction can agree with it:

* every connection sees the committed rows plus everybody's uncommitted ones
  (one transaction cannot hide them: dirty reads are expected);
* a rollback (or a rollback to a savepoint) removes exactly the rows that
  connection wrote since, unless another transaction's surviving write came
  after one of them. Only then may sa_rollback raise InterleavedRollbackError,
  and then it must: one transaction cannot undo the earlier write and keep the
  later one. It then undoes nothing;
* after a failed statement the connection's transaction is aborted (its
  statements fail) until it rolls back, or rolls back to a savepoint; the
  other connections carry on. What it wrote since its innermost savepoint is
  lost whichever way it goes on, so the shared transaction drops it as soon as
  another connection needs the transaction, except what came before another
  transaction's write, which stays until the connection rolls back;
* an insert of a name that another connection holds uncommitted would block
  in production, so the model never generates one.

After each example, a plain psycopg connection checks from outside that the
database is unchanged.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

import sa_rollback

from ._compat import create_engine
from .conftest import DB_A, DRIVERS, driver_url, libpq_dsn

CONNECTIONS = 3
SELECT = sa.text("SELECT name FROM items ORDER BY name")
INSERT = sa.text("INSERT INTO items (name) VALUES (:n)")

#: repeated entries weigh more
OPS = (
    "begin",
    *["insert"] * 4,
    *["insert_dup"] * 2,
    *["read"] * 2,
    "peek",
    *["commit"] * 2,
    "rollback",
    *["nested"] * 3,
    *["release"] * 2,
    *["rollback_nested"] * 3,
    "bad_sql",
)
op_strategy = st.tuples(st.sampled_from(OPS), st.integers(0, CONNECTIONS - 1), st.integers(0, 7))


def count(what: str) -> None:
    """A line of --hypothesis-show-statistics: what the examples exercised."""
    if currently_in_test_context():
        event(what)


@dataclass(eq=False)
class Write:
    seq: int
    name: str
    owner: int


@dataclass(eq=False)
class Savepoint:
    #: the number of the latest write when it was taken
    seq: int
    #: SQLAlchemy's NestedTransaction is open; after its rollback PostgreSQL keeps the savepoint
    open_in_sa: bool = True


@dataclass
class ConnModel:
    in_txn: bool = False
    aborted: bool = False
    #: writes of the open transaction, oldest first
    writes: list[Write] = field(default_factory=list)
    #: savepoints of the open transaction that exist in PostgreSQL, oldest first
    savepoints: list[Savepoint] = field(default_factory=list)

    def pending(self) -> list[Write]:
        return list(self.writes)

    def since(self, sp: Optional[Savepoint]) -> list[Write]:
        return [w for w in self.writes if sp is None or w.seq > sp.seq]

    def innermost_open(self) -> Optional[Savepoint]:
        return next((sp for sp in reversed(self.savepoints) if sp.open_in_sa), None)

    def end(self) -> None:
        self.in_txn = False
        self.aborted = False
        self.writes = []
        self.savepoints = []


class Model:
    """What production would show, where one shared transaction can agree with it."""

    def __init__(self) -> None:
        self.conns = [ConnModel() for _ in range(CONNECTIONS)]
        self.committed: list[Write] = []
        #: number of the latest write issued
        self.last = 0

    def write(self, name: str, owner: int) -> Write:
        self.last += 1
        return Write(self.last, name, owner)

    def visible(self) -> list[str]:
        rows = [w.name for w in self.committed]
        for conn in self.conns:
            rows += [w.name for w in conn.pending()]
        return sorted(rows)

    def surviving(self) -> list[Write]:
        return self.committed + [w for conn in self.conns for w in conn.pending()]

    def unreproducible(self, undo: list[Write]) -> bool:
        """Undoing ``undo`` and keeping every other write needs a later write to survive an earlier rollback."""
        if not undo:
            return False
        first = min(w.seq for w in undo)
        ids = {id(w) for w in undo}
        return any(w.seq > first and id(w) not in ids for w in self.surviving())

    def held_by_others(self, i: int) -> set[str]:
        return {w.name for j, conn in enumerate(self.conns) if j != i for w in conn.pending()}


@dataclass
class Run:
    engine: sa.Engine
    names: Iterator[str]
    model: Model = field(default_factory=Model)
    conns: list[sa.Connection] = field(default_factory=list)
    nested: list[list[Any]] = field(default_factory=lambda: [[] for _ in range(CONNECTIONS)])
    log: list[str] = field(default_factory=list)

    def read(self, i: int) -> list[str]:
        return sorted(self.conns[i].execute(SELECT).scalars())

    def expect_aborted(self, i: int, action: Any) -> None:
        with pytest.raises(sa.exc.DBAPIError, match="current transaction is aborted"):
            action()

    def aborted(self, i: int) -> None:
        m = self.model.conns[i]
        m.in_txn = True
        m.aborted = True
        # What it wrote since its newest savepoint is lost whichever way it goes on, and is dropped
        # as soon as another statement needs the transaction, as far as no other transaction's
        # write came after it. Nothing else writes before that, so deciding now is the same.
        doomed = m.since(m.savepoints[-1] if m.savepoints else None)
        count(f"abort with {min(len(doomed), 2)}+ doomed writes, {min(len(m.savepoints), 2)}+ savepoints")
        others = [w.seq for w in self.model.surviving() if all(w is not d for d in doomed)]
        latest_other = max(others, default=0)
        m.writes = [w for w in m.writes if all(w is not d for d in doomed) or w.seq < latest_other]

    def rollback(self, i: int, nested: bool) -> None:
        m = self.model.conns[i]
        sp = m.innermost_open() if nested else None
        undo = m.since(sp)
        expected = self.model.unreproducible(undo)
        target = self.nested[i][-1] if nested else self.conns[i]
        try:
            target.rollback()
            raised: Optional[BaseException] = None
        except sa_rollback.InterleavedRollbackError as exc:
            raised = exc
        outcome = "refused" if raised else "done"
        count(f"{'nested ' if nested else ''}rollback {outcome}{' after abort' if m.aborted else ''}")
        assert (raised is not None) == expected, (
            f"sa_rollback {'raised ' + repr(raised) if raised else 'did not raise'}; the model says the "
            f"rollback is {'un' if expected else ''}reproducible. Steps: {self.log}"
        )
        if sp is not None:
            self.nested[i].pop()
            if raised is None:
                # ROLLBACK TO: the savepoint stays in PostgreSQL, the later ones go.
                m.writes = [w for w in m.writes if w.seq <= sp.seq]
                m.savepoints = m.savepoints[: m.savepoints.index(sp) + 1]
                m.aborted = False
            # sa_rollback refuses before SQLAlchemy could run anything: the savepoint stays too
            sp.open_in_sa = False
        else:
            self.nested[i].clear()
            if raised is not None:
                self.model.committed.extend(m.pending())  # nothing was undone, the transaction ended
            m.end()

    def step(self, op: str, i: int, k: int) -> None:
        model = self.model
        m = model.conns[i]
        conn = self.conns[i]
        if op == "begin":
            if conn.in_transaction():
                return
            conn.begin()
            m.in_txn = True
        elif op == "insert":
            if m.aborted:
                self.expect_aborted(i, lambda: conn.execute(INSERT, {"n": "never"}))
                return
            name = next(self.names)
            conn.execute(INSERT, {"n": name})
            m.in_txn = True
            m.writes.append(model.write(name, i))
        elif op == "insert_dup":
            if m.aborted:
                return
            # Only names whose insert fails at once in production: committed, or our own.
            candidates = sorted({w.name for w in model.committed} | {w.name for w in m.pending()})
            candidates = [n for n in candidates if n not in model.held_by_others(i)]
            if not candidates:
                return
            with pytest.raises(sa.exc.IntegrityError):
                conn.execute(INSERT, {"n": candidates[k % len(candidates)]})
            self.aborted(i)
        elif op == "bad_sql":
            if m.aborted:
                return
            with pytest.raises(sa.exc.ProgrammingError):
                conn.execute(sa.text("SELECT * FROM sar_no_such_table"))
            self.aborted(i)
        elif op == "read":
            if m.aborted:
                self.expect_aborted(i, lambda: self.read(i))
                return
            assert self.read(i) == model.visible(), f"connection {i} sees wrong rows. Steps: {self.log}"
            m.in_txn = True
        elif op == "peek":
            # A short-lived reader: checked out, read, returned (the pool's reset is a rollback).
            with self.engine.connect() as reader:
                assert sorted(reader.execute(SELECT).scalars()) == model.visible(), f"Steps: {self.log}"
        elif op == "commit":
            if m.aborted:
                # PostgreSQL turns the COMMIT of an aborted transaction into a ROLLBACK.
                self.rollback(i, nested=False)
                return
            conn.commit()
            model.committed.extend(m.pending())
            self.nested[i].clear()
            m.end()
        elif op == "rollback":
            self.rollback(i, nested=False)
        elif op == "nested":
            if m.aborted:
                return
            self.nested[i].append(conn.begin_nested())
            m.in_txn = True
            m.savepoints.append(Savepoint(model.last))
        elif op == "release":
            if m.aborted or not self.nested[i]:
                return
            self.nested[i].pop().commit()
            sp = next(sp for sp in reversed(m.savepoints) if sp.open_in_sa)
            m.savepoints = m.savepoints[: m.savepoints.index(sp)]  # RELEASE takes the later ones along
        elif op == "rollback_nested":
            if not self.nested[i]:
                return
            self.rollback(i, nested=True)
        else:  # pragma: no cover
            raise AssertionError(op)


_engines: dict[str, sa.Engine] = {}
_outside: dict[str, psycopg.Connection[Any]] = {}
_counter = itertools.count()


def engine_for(driver: str) -> sa.Engine:
    if driver not in _engines:
        _engines[driver] = create_engine(driver_url(driver))
    return _engines[driver]


def outside_count() -> int:
    if "conn" not in _outside or _outside["conn"].closed:
        _outside["conn"] = psycopg.connect(libpq_dsn(DB_A), autocommit=True)
    row = _outside["conn"].execute("SELECT count(*) FROM items").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture(scope="module", autouse=True)
def _dispose_engines() -> Iterator[None]:
    yield
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()
    for conn in _outside.values():
        conn.close()
    _outside.clear()


def run_example(driver: str, ops: list[tuple[str, int, int]]) -> None:
    engine = engine_for(driver)
    assert engine.pool.checkedout() == 0, "an earlier example left connections checked out"  # type: ignore[attr-defined]
    example = next(_counter)
    run = Run(engine, (f"x{example}_{n}" for n in itertools.count()))
    scope = sa_rollback.RollbackScope(f"model example {example}")
    with scope:
        run.conns = [engine.connect() for _ in range(CONNECTIONS)]
        try:
            for op, i, k in ops:
                run.log.append(f"{op}({i})")
                run.step(op, i, k)
            for i in range(CONNECTIONS):  # production's reset-on-return, one by one
                run.log.append(f"final rollback({i})")
                run.rollback(i, nested=False)
            for i in range(CONNECTIONS):
                assert run.read(i) == sorted(w.name for w in run.model.committed), f"Steps: {run.log}"
                run.conns[i].rollback()
        finally:
            for conn in run.conns:
                try:
                    conn.close()
                except Exception:
                    # A failing example must not leave the next ones without connections.
                    engine.dispose()
        assert scope.errors == [], f"Steps: {run.log}"
    assert outside_count() == 0, f"rows leaked. Steps: {run.log}"


@pytest.mark.parametrize("driver", DRIVERS)
@settings(
    # SA_ROLLBACK_MODEL_EXAMPLES=5000 for a longer hunt.
    max_examples=int(os.environ.get("SA_ROLLBACK_MODEL_EXAMPLES", "200")),
    deadline=None,
    database=None,  # the falsifying example is printed; no .hypothesis directory in the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op_strategy, min_size=4, max_size=40))
def test_model(driver: str, ops: list[tuple[str, int, int]]) -> None:
    run_example(driver, ops)
