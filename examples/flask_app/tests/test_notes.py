"""The example app's own tests. Each one starts from empty tables, although the views commit."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from notes_app import db
from notes_app.models import AuditEntry, Note, Notebook


def make_notebook(client, title: str) -> int:
    response = client.post("/notebooks", json={"title": title})
    assert response.status_code == 201, response.get_json()
    return int(response.get_json()["id"])


@pytest.mark.parametrize("title", ["work", "home", "work"])  # "work" twice: no leak between tests
def test_create_starts_from_empty(client, title: str) -> None:
    assert client.get("/notebooks").get_json() == []
    make_notebook(client, title)
    assert [n["title"] for n in client.get("/notebooks").get_json()] == [title]
    assert client.get("/audit").get_json() == [f"created notebook {title}"]


def test_duplicate_is_a_conflict_and_the_app_goes_on(client) -> None:
    make_notebook(client, "ideas")
    response = client.post("/notebooks", json={"title": "ideas"})
    assert response.status_code == 409  # IntegrityError, rolled back by the view
    make_notebook(client, "later")
    assert [n["title"] for n in client.get("/notebooks").get_json()] == ["ideas", "later"]


def test_notes_and_cascade(client) -> None:
    notebook_id = make_notebook(client, "trip")
    for body in ("pack", "book"):
        assert client.post(f"/notebooks/{notebook_id}/notes", json={"body": body}).status_code == 201
    assert client.get("/notebooks").get_json()[0]["notes"] == 2
    assert client.delete(f"/notebooks/{notebook_id}").status_code == 204
    assert client.get("/notebooks").get_json() == []
    assert len(client.get("/audit").get_json()) == 4


def test_db_session_sees_what_the_views_committed(client, db_session, app_context) -> None:
    make_notebook(client, "shared")
    assert db_session.scalar(select(func.count()).select_from(Notebook)) == 1
    db_session.add(Notebook(title="from-test"))
    db_session.commit()
    assert [n["title"] for n in client.get("/notebooks").get_json()] == ["from-test", "shared"]


def test_previous_tests_left_nothing(app_context) -> None:
    assert db.session.scalar(select(func.count()).select_from(Notebook)) == 0
    assert db.session.scalar(select(func.count()).select_from(Note)) == 0
    assert db.session.scalar(select(func.count()).select_from(AuditEntry)) == 0


def test_the_audit_bind_is_another_database(app, app_context) -> None:
    main = db.session.execute(select(func.current_database())).scalar()
    audit = db.session.execute(select(func.current_database()), bind_arguments={"bind": db.engines["audit"]}).scalar()
    assert main != audit
    assert audit.endswith("_audit")


def test_db_engine_is_the_apps_engine(client, app_context, db_engine) -> None:
    make_notebook(client, "via-engine")
    with db_engine.connect() as conn:
        assert conn.execute(select(Notebook.title)).scalars().all() == ["via-engine"]


def test_creating_a_notebook_writes_once_to_each_database(client, app_context, sa_queries) -> None:
    """sa_queries lists what the view sent, per database: the audit log is a bind of its own."""
    main, audit = (db.engines[bind].url.database for bind in (None, "audit"))
    make_notebook(client, "counted")
    inserts = [query for query in sa_queries.statements if query.sql.startswith("INSERT")]
    assert [query.database for query in inserts] == [main, audit]
    sa_queries.on(audit).assert_count(1)  # the audit row, nothing else
    with sa_queries.expect(2):  # the notebooks, then each one's notes: lazy loading costs one more per notebook
        client.get("/notebooks")
