"""SQL classification (``sa_rollback._classify``), without a server.

The expected kinds follow the rules in the module's docstring: a statement is a
read only when it starts with a read keyword and names no data-modifying
keyword; transaction control is recognized alone; a transaction end among
several statements is an escape, unless it sits in a literal, a quoted name, a
dollar-quoted body or a comment.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sa_rollback._classify import Kind, classify, normalize_name

READ, WRITE, ESCAPE = Kind.READ, Kind.WRITE, Kind.ESCAPE

#: (statement, kind, savepoint name)
EXAMPLES: list[tuple[str, Kind, str]] = [
    # reads: every read keyword, any case and layout
    ("SELECT 1", READ, ""),
    ("select 1", READ, ""),
    ("  \n\tSeLeCt\n1", READ, ""),
    ("(SELECT 1) UNION (SELECT 2)", READ, ""),
    ("((select 1))", READ, ""),
    ("WITH x AS (SELECT 1) SELECT * FROM x", READ, ""),
    ("SHOW search_path", READ, ""),
    ("VALUES (1), (2)", READ, ""),
    ("TABLE items", READ, ""),
    ("EXPLAIN SELECT * FROM items", READ, ""),
    ("FETCH ALL FROM c", READ, ""),
    ("MOVE NEXT IN c", READ, ""),
    ("DECLARE c CURSOR FOR SELECT * FROM items", READ, ""),
    ("CLOSE c", READ, ""),
    ("SELECT 1;", READ, ""),
    ("SELECT 1; SELECT 2", READ, ""),
    # a write keyword inside a longer name is not a write keyword
    ("SELECT * FROM updates WHERE into_x = 1", READ, ""),
    # row locks take no snapshot of their own: still reads
    ("SELECT * FROM items FOR UPDATE", READ, ""),
    ("SELECT * FROM items FOR NO KEY UPDATE SKIP LOCKED", READ, ""),
    ("SELECT * FROM items FOR UPDATE OF items NOWAIT", READ, ""),
    ("SELECT * FROM items FOR SHARE", READ, ""),
    ("select * from items for key share", READ, ""),
    ("WITH x AS (SELECT 1) SELECT * FROM x FOR UPDATE", READ, ""),
    ("DECLARE c CURSOR FOR SELECT * FROM items FOR UPDATE", READ, ""),
    # a function with side effects is taken for a read (documented limit)
    ("SELECT nextval('items_id_seq')", READ, ""),
    # writes: data-modifying statements and everything not known to read
    ("INSERT INTO items (name) VALUES ('a')", WRITE, ""),
    ("UPDATE items SET qty = 1", WRITE, ""),
    ("DELETE FROM items", WRITE, ""),
    ("MERGE INTO items USING src ON true WHEN MATCHED THEN DO NOTHING", WRITE, ""),
    ("CREATE TABLE t (x int)", WRITE, ""),
    ("ALTER TABLE items ADD COLUMN y int", WRITE, ""),
    ("DROP TABLE items", WRITE, ""),
    ("TRUNCATE items", WRITE, ""),
    ("CALL proc()", WRITE, ""),
    ("GRANT SELECT ON items TO someone", WRITE, ""),
    ("REVOKE SELECT ON items FROM someone", WRITE, ""),
    ("NOTIFY news, 'x'", WRITE, ""),
    ("LOCK TABLE items", WRITE, ""),
    ("SET search_path TO other", WRITE, ""),
    ("DISCARD ALL", WRITE, ""),
    ("DO $$ BEGIN PERFORM 1; END $$", WRITE, ""),
    # reads that carry a write: CTEs with writes, SELECT INTO, EXPLAIN ANALYZE of a write
    ("WITH d AS (DELETE FROM items RETURNING *) SELECT * FROM d", WRITE, ""),
    ("with u as (update items set qty = 2 returning id) select id from u", WRITE, ""),
    ("WITH i AS (INSERT INTO items (name) VALUES ('x') RETURNING id) SELECT * FROM i", WRITE, ""),
    ("SELECT * INTO copy_of_items FROM items", WRITE, ""),
    ("EXPLAIN ANALYZE DELETE FROM items", WRITE, ""),
    ("(SELECT 1) UNION (SELECT 2) FOR UPDATE; DELETE FROM items", WRITE, ""),
    # COPY, both directions: the classifier counts it a write; the cursor method decides the direction
    ("COPY items FROM STDIN", WRITE, ""),
    ("COPY items TO STDOUT", WRITE, ""),
    ("COPY (SELECT * FROM items) TO STDOUT WITH (FORMAT csv)", WRITE, ""),
    # conservative: a read that names a write keyword anywhere, comments included, is a write
    ('SELECT 1 AS "update"', WRITE, ""),
    ("SELECT 'insert'", WRITE, ""),
    ("SELECT 1 -- then INSERT", WRITE, ""),
    # conservative: a leading comment hides the read keyword
    ("-- the report\nSELECT 1", WRITE, ""),
    ("/* the report */ SELECT 1", WRITE, ""),
    # savepoints, with PostgreSQL's name folding
    ("SAVEPOINT sa_savepoint_1", Kind.SAVEPOINT, "sa_savepoint_1"),
    ("savepoint MySp", Kind.SAVEPOINT, "mysp"),
    ('SAVEPOINT "MySp"', Kind.SAVEPOINT, "MySp"),
    ('SAVEPOINT "a""b";', Kind.SAVEPOINT, 'a"b'),
    ("RELEASE SAVEPOINT sp", Kind.RELEASE, "sp"),
    ("release Sp", Kind.RELEASE, "sp"),
    ("ROLLBACK TO SAVEPOINT sp", Kind.ROLLBACK_TO, "sp"),
    ("ROLLBACK TO sp", Kind.ROLLBACK_TO, "sp"),
    ("rollback work to savepoint Sp", Kind.ROLLBACK_TO, "sp"),
    ("ROLLBACK TRANSACTION TO sp ;", Kind.ROLLBACK_TO, "sp"),
    # lone transaction control, every spelling PostgreSQL accepts
    ("BEGIN", Kind.BEGIN, ""),
    ("begin work", Kind.BEGIN, ""),
    ("BEGIN TRANSACTION;", Kind.BEGIN, ""),
    ("START TRANSACTION", Kind.BEGIN, ""),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY", Kind.BEGIN, ""),
    ("START TRANSACTION READ WRITE NOT DEFERRABLE", Kind.BEGIN, ""),
    ("BEGIN ISOLATION LEVEL REPEATABLE READ DEFERRABLE", Kind.BEGIN, ""),
    ("COMMIT", Kind.COMMIT, ""),
    ("commit;", Kind.COMMIT, ""),
    ("COMMIT WORK", Kind.COMMIT, ""),
    ("END", Kind.COMMIT, ""),
    ("END TRANSACTION", Kind.COMMIT, ""),
    ("COMMIT AND CHAIN", Kind.COMMIT, ""),
    ("COMMIT TRANSACTION AND NO CHAIN", Kind.COMMIT, ""),
    ("COMMIT; ", Kind.COMMIT, ""),
    ("COMMIT -- done", Kind.COMMIT, ""),
    ("/* done */ COMMIT", Kind.COMMIT, ""),
    ("ROLLBACK", Kind.ROLLBACK, ""),
    ("ABORT", Kind.ROLLBACK, ""),
    ("ROLLBACK WORK", Kind.ROLLBACK, ""),
    ("ROLLBACK AND CHAIN", Kind.ROLLBACK, ""),
    ("abort and no chain", Kind.ROLLBACK, ""),
    ("/* undo */ ROLLBACK", Kind.ROLLBACK, ""),
    # two-phase commit
    ("PREPARE TRANSACTION 'gid'", Kind.TWO_PHASE, ""),
    ("commit prepared 'gid'", Kind.TWO_PHASE, ""),
    ("ROLLBACK PREPARED 'gid'", Kind.TWO_PHASE, ""),
    # transaction characteristics: accepted, not applied
    ("SET TRANSACTION READ ONLY", Kind.TXN_SETTING, ""),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", Kind.TXN_SETTING, ""),
    ("set session characteristics as transaction read only", Kind.TXN_SETTING, ""),
    ("SET transaction_read_only = on", Kind.TXN_SETTING, ""),
    ("SET transaction_isolation TO 'serializable'", Kind.TXN_SETTING, ""),
    ("SET LOCAL transaction_deferrable = on", Kind.TXN_SETTING, ""),
    ("SET default_transaction_read_only = on", Kind.TXN_SETTING, ""),
    ("SET SESSION default_transaction_isolation = 'serializable'", Kind.TXN_SETTING, ""),
    # ...but not what only looks like them
    ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", WRITE, ""),
    ("SET transaction_timeout = 0", WRITE, ""),
    # a transaction end among other statements, or with clauses it does not know
    ("INSERT INTO items (name) VALUES ('x'); COMMIT", ESCAPE, ""),
    ("SELECT 1; COMMIT", ESCAPE, ""),
    ("SELECT 1;commit", ESCAPE, ""),
    ("COMMIT; INSERT INTO items (name) VALUES ('x')", ESCAPE, ""),
    ("INSERT INTO items (name) VALUES ('x'); ROLLBACK", ESCAPE, ""),
    ("INSERT INTO items (name) VALUES ('x'); END", ESCAPE, ""),
    ("INSERT INTO items (name) VALUES ('x'); ABORT", ESCAPE, ""),
    ("INSERT INTO items (name) VALUES ('x'); COMMIT; BEGIN", ESCAPE, ""),
    ("INSERT INTO items (name) VALUES ('x'); PREPARE TRANSACTION 'gid'", ESCAPE, ""),
    ("INSERT INTO items (name) VALUES ('x');\n-- done\nCOMMIT;", ESCAPE, ""),
    ("INSERT INTO items (name) VALUES ('x'); /* done */ COMMIT", ESCAPE, ""),
    ("SELECT 1 --\n; COMMIT", ESCAPE, ""),
    ("COMMIT PLEASE", ESCAPE, ""),
    ("ROLLBACK AND CHAIN, WORK", ESCAPE, ""),
    # ...not when it is inside something opaque, or is a savepoint statement
    ("INSERT INTO notes (body) VALUES ('done; COMMIT')", WRITE, ""),
    ("INSERT INTO notes (body) VALUES ('it''s; COMMIT')", WRITE, ""),
    ("SELECT E'it\\'s; COMMIT'", READ, ""),
    ('SELECT 1 AS "x; COMMIT"', READ, ""),
    ("SELECT $$; COMMIT$$", READ, ""),
    ("SELECT $body$ $$ ; COMMIT $$ $body$", READ, ""),
    ("SELECT $t$x$T$; COMMIT $T$ $t$", READ, ""),  # tags are case-sensitive
    ("SELECT 1 -- ; COMMIT", READ, ""),
    ("SELECT 1 /* ; COMMIT */", READ, ""),
    ("INSERT INTO items (name) VALUES ('x'); ROLLBACK TO SAVEPOINT sp", WRITE, ""),
    ("INSERT INTO items (name) VALUES ('x'); RELEASE SAVEPOINT sp", WRITE, ""),
    ("CREATE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN COMMIT; END $$", WRITE, ""),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$; SELECT f()", WRITE, ""),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END", WRITE, ""),
    # ...while what is outside an opaque part still counts
    ("SELECT 'a'; COMMIT", ESCAPE, ""),
    ("SELECT '--'; COMMIT", ESCAPE, ""),
    ("SELECT '/*'; COMMIT; SELECT '*/'", ESCAPE, ""),
    ("SELECT '$$'; COMMIT; SELECT '$$'", ESCAPE, ""),
    ('SELECT 1 AS "it\'s"; COMMIT', ESCAPE, ""),
    ("SELECT E'\\''; COMMIT", ESCAPE, ""),
    ("SELECT 'a\\'; COMMIT", ESCAPE, ""),  # standard strings: a backslash escapes nothing
    ("SELECT 1 -- it's\n; COMMIT", ESCAPE, ""),
    ("SELECT f($body$x$body$); COMMIT", ESCAPE, ""),
    ("SELECT $1, $2; COMMIT", ESCAPE, ""),  # positional parameters open no dollar quote
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; COMMIT", ESCAPE, ""),
]


def _id(statement: str) -> str:
    return statement.replace("\n", "\\n")[:60]


@pytest.mark.parametrize(("statement", "kind", "name"), EXAMPLES, ids=[_id(e[0]) for e in EXAMPLES])
def test_classify(statement: str, kind: Kind, name: str) -> None:
    result = classify(statement)
    assert (result.kind, result.name) == (kind, name)


@pytest.mark.parametrize(
    ("statement", "schema"),
    [
        ("CREATE TABLE t (x int)", True),
        ("  alter table items add column y int", True),
        ("/* note */ DROP TABLE items", True),
        ("INSERT INTO t VALUES (1); ALTER TABLE t ADD y int", True),
        ("INSERT INTO t VALUES ('; alter table')", False),
        ("UPDATE items SET name = 'drop'", False),
        ("TRUNCATE items", False),
        ("SELECT * FROM items", False),
    ],
)
def test_writes_that_may_change_the_schema_are_marked(statement: str, schema: bool) -> None:
    assert classify(statement).schema is schema


def test_the_examples_cover_every_kind() -> None:
    assert {kind for _, kind, _ in EXAMPLES} == set(Kind)


def test_keyword_ending_in_e_before_a_string_is_not_an_escape_string() -> None:
    assert classify("SELECT 1 WHERE 'a' LIKE'a\\'; COMMIT; SELECT 'b'").kind is ESCAPE


def test_line_comment_ends_at_a_carriage_return() -> None:
    assert classify("SELECT 1 -- note\r; COMMIT").kind is ESCAPE


def test_results_are_cached_and_the_cache_is_bounded() -> None:
    from sa_rollback import _classify

    statement = "SELECT 'cached' -- test_results_are_cached"
    first = classify(statement)
    assert _classify._cache[statement] is first
    for i in range(_classify._CACHE_MAX + 10):
        classify(f"SELECT {i} -- filler")
    assert len(_classify._cache) <= _classify._CACHE_MAX
    assert classify(statement) == first  # recomputed after eviction, the same answer


@pytest.mark.parametrize(
    ("ident", "name"),
    [("sp", "sp"), ("Sp", "sp"), ("SP_1", "sp_1"), ('"Sp"', "Sp"), ('"a""b"', 'a"b'), ('"x y"', "x y")],
)
def test_normalize_name_folds_like_postgresql(ident: str, name: str) -> None:
    assert normalize_name(ident) == name


# -- the same rules for any content of the opaque parts --------------------------------------

#: characters that mean something to the scanner, plus the words that end a transaction
_TRICKY = st.lists(
    st.sampled_from([";", "'", '"', "$", "$$", "-", "--", "/", "*", "\\", "E'", "e", "\n", " ", "x", "COMMIT", "end"]),
    max_size=12,
).map("".join)


def _string(text: str) -> str:
    return "SELECT '" + text.replace("'", "''") + "'"


def _escape_string(text: str) -> str:
    return "SELECT E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quoted_name(text: str) -> str:
    return 'SELECT 1 AS "' + (text or "x").replace('"', '""') + '"'


def _dollar(text: str) -> str:
    return "SELECT $q$" + text + "$q$"  # the alphabet has no 'q': the tag cannot occur inside


def _line_comment(text: str) -> str:
    return "SELECT 1 -- " + text.replace("\n", " ") + "\n"


def _block_comment(text: str) -> str:
    # PostgreSQL's block comments nest; the classifier does not follow nesting, so none here.
    return "SELECT 1 /* " + text.replace("*/", "* /").replace("/*", "/ *") + " */"


OPAQUE_FORMS = [_string, _escape_string, _quoted_name, _dollar, _line_comment, _block_comment]


@pytest.mark.parametrize("form", OPAQUE_FORMS, ids=lambda f: f.__name__.strip("_"))
@given(text=_TRICKY)
@example(text="; COMMIT")
@example(text="'; COMMIT; SELECT '")
@example(text="\\'; COMMIT; --")
def test_opaque_content_never_ends_the_transaction(form, text: str) -> None:  # type: ignore[no-untyped-def]
    statement = form(text)
    assert classify(statement + "; SELECT 2").kind is not ESCAPE
    assert classify(statement + "; COMMIT").kind is ESCAPE
    assert classify("COMMIT; " + statement).kind is ESCAPE
