"""Generated declarative models: N tables, each with a foreign key to the previous one."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import DateTime, ForeignKey, Integer, MetaData, String, func
from sqlalchemy.orm import DeclarativeBase, mapped_column


@dataclass(frozen=True)
class Schema:
    size: int
    base: type[DeclarativeBase]
    models: tuple[type[Any], ...]

    @property
    def metadata(self) -> MetaData:
        return self.base.metadata

    def truncate_sql(self) -> str:
        names = ", ".join(t.name for t in self.metadata.sorted_tables)
        return f"TRUNCATE {names} RESTART IDENTITY CASCADE"


@cache
def make_schema(size: int) -> Schema:
    """A fresh declarative base with ``size`` mapped tables ``t000``, ``t001``, ..."""

    class Base(DeclarativeBase):
        pass

    models: list[type[Any]] = []
    for i in range(size):
        attrs: dict[str, Any] = {
            "__tablename__": f"t{i:03d}",
            "id": mapped_column(Integer, primary_key=True),
            "name": mapped_column(String(64), nullable=False),
            "qty": mapped_column(Integer, nullable=False, default=0),
            "created": mapped_column(DateTime(timezone=True), server_default=func.now()),
        }
        if i:
            # Chained foreign keys give TRUNCATE ... CASCADE and drop_all real dependencies to follow.
            attrs["parent_id"] = mapped_column(ForeignKey(f"t{i - 1:03d}.id"), nullable=True, index=True)
        models.append(type(f"T{i:03d}", (Base,), attrs))
    return Schema(size, Base, tuple(models))
