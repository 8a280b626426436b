"""Data made with factory_boy: per test, and once for the whole module, rolled back when the module ends.

``test_notes.py`` runs after this module and checks that every table is empty again.
"""

from __future__ import annotations

from collections.abc import Iterator

import factory
import pytest
from factory.alchemy import SQLAlchemyModelFactory
from flask import Flask

from notes_app import db
from notes_app.models import Note, Notebook


class NotebookFactory(SQLAlchemyModelFactory):  # type: ignore[misc]
    class Meta:
        model = Notebook
        sqlalchemy_session_factory = lambda: db.session  # noqa: E731  (the app's own scoped session)
        sqlalchemy_session_persistence = "commit"

    title = factory.Sequence(lambda n: f"notebook {n}")


class NoteFactory(SQLAlchemyModelFactory):  # type: ignore[misc]
    class Meta:
        model = Note
        sqlalchemy_session_factory = lambda: db.session  # noqa: E731
        sqlalchemy_session_persistence = "commit"

    body = factory.Sequence(lambda n: f"note {n}")
    notebook = factory.SubFactory(NotebookFactory)


@pytest.fixture(scope="module")
def shelf(app: Flask, sa_rollback_module_scope: None) -> Iterator[list[str]]:
    """Three notebooks for every test of this module; gone when the module ends."""
    with app.app_context():
        titles = [NotebookFactory().title for _ in range(3)]
        db.session.remove()
    yield titles


def test_the_shelf_is_there(client, shelf: list[str]) -> None:
    assert sorted(n["title"] for n in client.get("/notebooks").get_json()) == sorted(shelf)


def test_a_test_adds_its_own(client, app_context, shelf: list[str]) -> None:
    NoteFactory(notebook__title="mine")
    assert len(client.get("/notebooks").get_json()) == 4


def test_and_the_shelf_is_as_the_fixture_left_it(client, shelf: list[str]) -> None:
    assert len(client.get("/notebooks").get_json()) == 3
