"""The ORM model of the suite's ``items`` table (``conftest.SCHEMA``)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import declarative_base

# Classic declarations, which SQLAlchemy 1.4 and 2.x read alike.
Base = declarative_base()


class Item(Base):
    __tablename__ = "items"
    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.Text, nullable=False)
    qty = sa.Column(sa.Integer, nullable=False, default=0)
