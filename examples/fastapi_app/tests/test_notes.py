"""Each test starts with no notes, whatever the tests before it committed through the app."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import func, select

from notes_api.db import SessionLocal
from notes_api.models import Note

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("title", ["first", "second"])
async def test_create_then_list(client: httpx.AsyncClient, title: str) -> None:
    assert (await client.get("/notes")).json() == []
    created = await client.post("/notes", json={"title": title})
    assert created.status_code == 201
    assert [note["title"] for note in (await client.get("/notes")).json()] == [title]


async def test_same_title_in_every_test(client: httpx.AsyncClient) -> None:
    # A unique title that every worker's tests use: nothing of one test is left for the next.
    assert (await client.post("/notes", json={"title": "same"})).status_code == 201
    assert (await client.post("/notes", json={"title": "same"})).status_code == 409
    assert len((await client.get("/notes")).json()) == 1


async def test_concurrent_requests_all_land(client: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(*(client.post("/notes", json={"title": f"n{i}"}) for i in range(8)))
    assert [r.status_code for r in responses] == [201] * 8
    assert len((await client.get("/notes")).json()) == 8


async def test_the_test_reads_what_the_app_committed(client: httpx.AsyncClient) -> None:
    note = (await client.post("/notes", json={"title": "x"})).json()
    await client.post(f"/notes/{note['id']}/done")
    async with SessionLocal() as session:  # the app's own session factory, in the test
        assert (await session.get(Note, note["id"])).done is True
        assert await session.scalar(select(func.count()).select_from(Note)) == 1


async def test_starts_empty_again(client: httpx.AsyncClient) -> None:
    async with SessionLocal() as session:
        assert await session.scalar(select(func.count()).select_from(Note)) == 0
