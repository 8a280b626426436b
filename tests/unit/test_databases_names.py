"""Database names and the ownership mark; no server needed."""

from __future__ import annotations

import os

import pytest

from sa_rollback.databases import MAX_IDENTIFIER_BYTES, MalformedMark, Mark, clone_name, shorten, template_name
from sa_rollback.databases._names import HOSTNAME


def fits(name: str) -> bool:
    return len(name.encode()) <= MAX_IDENTIFIER_BYTES


@pytest.mark.parametrize("char", ["x", "ü", "€", "𝄞"])
def test_names_are_cut_by_bytes_and_stay_distinct(char: str) -> None:
    base = char * (62 // len(char.encode()))  # as long as PostgreSQL allows, in bytes
    names = {clone_name(base, "run1", "gw0"), clone_name(base, "run1", "gw1"), clone_name(base, "run2", "gw0")}
    names |= {template_name(base, "a" * 64), template_name(base, "b" * 64)}
    assert len(names) == 5
    for name in names:
        assert fits(name), name
        # What PostgreSQL keeps of the name is the name: nothing of the hash is cut off.
        assert name.encode()[:MAX_IDENTIFIER_BYTES].decode() == name
        assert name.startswith(char)


def test_a_name_is_never_cut_inside_a_character() -> None:
    for length in range(50, 70):
        name = shorten("a" + "ü" * length)
        name.encode().decode("utf-8", errors="strict")  # no partial character at the cut
        assert fits(name)
        assert name.startswith("aü")


def test_short_names_are_kept_as_they_are() -> None:
    assert clone_name("app", "run1", "gw0") == "app_sar_run1_gw0"
    assert shorten("ü" * 31) == "ü" * 31


def test_marks_render_and_parse_back() -> None:
    marks = [
        Mark("base"),
        Mark.template("app", "f" * 64, "run1", ready=False),
        Mark.template("my app ü", "f" * 64, "run 1", ready=True),
        Mark.clone("app", "run1"),
    ]
    for mark in marks:
        text = mark.render()
        assert text.startswith("sa_rollback:")
        assert Mark.parse(text) == mark
    clone = Mark.parse(Mark.clone("app", "run1").render())
    assert clone is not None and clone.pid == os.getpid() and clone.host == HOSTNAME
    assert Mark.parse(marks[2].render()) == marks[2]
    assert marks[2].ready and not marks[1].ready


def test_marks_of_earlier_versions_still_parse() -> None:
    mark = Mark.parse("sa_rollback:clone run=ab12cd34 host=box pid=4242")
    assert mark == Mark("clone", run="ab12cd34", host="box", pid=4242)
    assert mark.belongs_to("app", "app_sar_ab12cd34_main", "_sar_")
    assert not mark.belongs_to("app", "other_sar_ab12cd34_main", "_sar_")
    template = Mark.parse("sa_rollback:template fp=abc run=r1 state=ready")
    assert template is not None and template.ready
    assert Mark.parse("sa_rollback:base") == Mark("base")


def test_the_recorded_base_decides_whatever_the_name() -> None:
    mark = Mark.clone("app", "run1")
    assert mark.belongs_to("app", "app_3f9c1a2b", "_sar_")
    assert not mark.belongs_to("app2", "app2_sar_run1_main", "_sar_")


@pytest.mark.parametrize("comment", [None, "", "my own database", "sa_rollback is great", "SA_ROLLBACK:clone"])
def test_comments_without_the_mark_are_not_ours(comment: str | None) -> None:
    assert Mark.parse(comment) is None


@pytest.mark.parametrize(
    "comment",
    [
        "sa_rollback:",
        "sa_rollback:clone",
        "sa_rollback:clone run=r1 host=box",  # no pid: crashed every run before (IndexError)
        "sa_rollback:clone run=r1 host=box pid=",
        "sa_rollback:clone run=r1 host=box pid=12x",
        "sa_rollback:clone run=r1 host=box pid",
        "sa_rollback:template fp=abc run=r1 state=maybe",
        "sa_rollback:template run=r1 state=ready",
        "sa_rollback:snapshot run=r1",
    ],
)
def test_unreadable_marks_are_reported_as_malformed(comment: str) -> None:
    with pytest.raises(MalformedMark):
        Mark.parse(comment)
