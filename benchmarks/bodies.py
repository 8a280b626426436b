"""The test bodies every strategy runs, identical across strategies.

Each body gets a zero-argument callable that opens the ``Session`` the
application would use, and the generated schema.
"""

from __future__ import annotations

from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .schema import Schema

SessionFactory = Callable[[], Session]
Body = Callable[[SessionFactory, Schema], None]


def body_write(new_session: SessionFactory, schema: Schema) -> None:
    """(a) ORM insert of 10 rows, commit, read them back."""
    model = schema.models[0]
    with new_session() as session:
        rows = [model(name=f"row{i}", qty=i) for i in range(10)]
        session.add_all(rows)
        # The ids are taken before the commit expires the objects, which would cost a
        # refresh SELECT per row.
        session.flush()
        ids = [row.id for row in rows]
        session.commit()
        # By primary key, so that the leaky baseline's growing table costs it nothing.
        found = session.scalars(select(model).where(model.id.in_(ids))).all()
        if len(found) != 10:
            raise AssertionError(f"expected the 10 committed rows, found {len(found)}")


def body_read(new_session: SessionFactory, schema: Schema) -> None:
    """(b) Read-only: a primary-key lookup and a count."""
    first, second = schema.models[0], schema.models[1]
    with new_session() as session:
        session.get(first, 1)
        session.scalar(select(func.count()).select_from(second))


def body_nodb(new_session: SessionFactory, schema: Schema) -> None:
    """(c) A test that touches no database."""
    if sum(range(20)) != 190:
        raise AssertionError("arithmetic")


BODY_FUNCS: dict[str, Body] = {"write": body_write, "read": body_read, "nodb": body_nodb}
