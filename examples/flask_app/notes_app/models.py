from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from . import db


class Notebook(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "notebooks"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(unique=True)
    notes: Mapped[list[Note]] = relationship(back_populates="notebook", cascade="all, delete-orphan")


class Note(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    notebook_id: Mapped[int] = mapped_column(ForeignKey("notebooks.id"))
    body: Mapped[str]
    notebook: Mapped[Notebook] = relationship(back_populates="notes")


class AuditEntry(db.Model):  # type: ignore[name-defined,misc]
    """Lives in the "audit" bind: another database, another engine."""

    __bind_key__ = "audit"
    __tablename__ = "audit_entries"
    id: Mapped[int] = mapped_column(primary_key=True)
    action: Mapped[str]
    at: Mapped[datetime] = mapped_column(server_default=func.clock_timestamp())
