"""psycopg 3 against Weir: server-side parameters (the extended protocol), types both ways, errors with SQLSTATE.

Usage: psycopg_client.py PORT. Prints "psycopg ok" when every check passed; any failed check raises.
"""
import datetime
import decimal
import sys

import psycopg
from psycopg import errors

port = int(sys.argv[1])
with psycopg.connect(host="127.0.0.1", port=port, user="weir", dbname="weir", autocommit=True) as conn:
    cur = conn.cursor()
    cur.execute("CREATE TABLE people (id INT, name TEXT, born DATE, seen TIMESTAMP(3), balance NUMERIC(12,2))")

    # Server-side parameters: psycopg 3 sends $1.. placeholders with Parse/Bind.
    rows = [
        (1, "ada", datetime.date(1815, 12, 10), datetime.datetime(2024, 1, 1, 10, 0, 0, 500000), decimal.Decimal("10.50")),
        (2, "alan", datetime.date(1912, 6, 23), datetime.datetime(2024, 1, 2, 11, 30), decimal.Decimal("-3.25")),
        (3, "grace", None, None, None),
    ]
    cur.executemany("INSERT INTO people VALUES (%s, %s, %s, %s, %s)", rows)

    cur.execute("SELECT id, name, born, seen, balance FROM people WHERE id <= %s ORDER BY id", (2,))
    got = cur.fetchall()
    assert got == rows[:2], got

    cur.execute("SELECT name FROM people WHERE name = %(name)s", {"name": "grace"})
    assert cur.fetchone() == ("grace",)

    # Binary results.
    bcur = conn.cursor(binary=True)
    bcur.execute("SELECT id, name, born, seen FROM people WHERE id = %s", (1,))
    assert bcur.fetchone() == rows[0][:4]

    # A prepared statement reused many times.
    for i in range(3):
        cur.execute("SELECT count(*) FROM people WHERE id > %s", (i,), prepare=True)
        assert cur.fetchone() == (3 - i,)

    # Errors come back as the right exception classes (by SQLSTATE).
    try:
        cur.execute("SELECT * FROM nowhere")
        raise AssertionError("expected an error")
    except errors.UndefinedTable as e:
        assert e.diag.sqlstate == "42P01"
    try:
        cur.execute("SELECT 1 / %s", (0,))
        raise AssertionError("expected an error")
    except errors.DivisionByZero:
        pass

    # json and jsonb columns come back as Python objects, in text and in binary.
    cur.execute("CREATE TABLE docs (id INT, doc JSONB, raw JSON)")
    cur.execute("INSERT INTO docs VALUES (%s, %s, %s)", (1, '{"a": [1, 2]}', '{"b": true}'))
    cur.execute("SELECT doc, raw FROM docs")
    assert cur.fetchall() == [({"a": [1, 2]}, {"b": True})]
    assert [d.type_code for d in cur.description] == [3802, 114], cur.description
    bcur.execute("SELECT doc FROM docs WHERE id = %s", (1,))
    assert bcur.fetchone() == ({"a": [1, 2]},)

    # MATCH_RECOGNIZE through the extended protocol: 10, 8, 9 is one V (down to 8, up to 9); a row added later is
    # seen by the next execution.
    cur.execute("CREATE TABLE ticks (t INT, price INT)")
    cur.execute("INSERT INTO ticks VALUES (1, 10), (2, 8), (3, 9)")
    v_shape = (
        "SELECT bottom, top, rows FROM ticks MATCH_RECOGNIZE (ORDER BY t "
        "MEASURES LAST(DOWN.price) AS bottom, LAST(UP.price) AS top, COUNT(*) AS rows "
        "PATTERN (STRT DOWN+ UP+) DEFINE DOWN AS price < PREV(price), UP AS price > PREV(price))"
    )
    cur.execute(v_shape + " WHERE rows >= %s", (3,))
    assert cur.fetchall() == [(8, 9, 3)]
    cur.execute("INSERT INTO ticks VALUES (4, 12)")
    cur.execute(v_shape + " WHERE rows >= %s", (4,))
    assert cur.fetchall() == [(8, 12, 4)]
    cur.execute(v_shape + " WHERE rows > %s", (4,))
    assert cur.fetchall() == []
    # Parameters inside the clause: a drop of at least $1 (ticks 10, 8, 9, 12: the drop 10 -> 8 is 2), and one
    # used in the clause and the outer query alike.
    drops = (
        "SELECT bottom FROM ticks MATCH_RECOGNIZE (ORDER BY t MEASURES LAST(DOWN.price) AS bottom "
        "PATTERN (STRT DOWN) DEFINE DOWN AS PREV(price) - price >= %s)"
    )
    cur.execute(drops, (2,))
    assert cur.fetchall() == [(8,)]
    cur.execute(drops, (3,))
    assert cur.fetchall() == []
    cur.execute(
        "SELECT high FROM ticks MATCH_RECOGNIZE (ORDER BY t MEASURES LAST(UP.price) AS high "
        "PATTERN (UP) DEFINE UP AS price > %(p)s) WHERE high < %(p)s + 3",
        {"p": 9},
    )
    assert cur.fetchall() == [(10,)]

    # Type lookups and session parameters that psycopg relies on.
    info = psycopg.types.TypeInfo.fetch(conn, "int4")
    assert info is not None and info.oid == 23, info
    assert conn.info.parameter_status("client_encoding") == "UTF8"

# A transaction with psycopg's default (non-autocommit) mode.
with psycopg.connect(host="127.0.0.1", port=port, user="weir", dbname="weir") as conn:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM people")
        assert cur.fetchone() == (3,)
    conn.commit()

# Cancel and statement_timeout: the statement ends with 57014 and the session stays usable.
import threading
import time

with psycopg.connect(host="127.0.0.1", port=port, user="weir", dbname="weir", autocommit=True) as conn:
    started = time.monotonic()
    threading.Timer(0.5, conn.cancel).start()
    try:
        conn.execute("SELECT pg_sleep(30)")
        raise AssertionError("the cancelled statement returned")
    except errors.QueryCanceled as e:
        assert e.sqlstate == "57014", e.sqlstate
    assert time.monotonic() - started < 10, time.monotonic() - started
    assert conn.execute("SELECT 7").fetchone() == (7,)
    conn.execute("SET statement_timeout = 300")
    try:
        conn.execute("SELECT count(*) FROM generate_series(1, 100000000000) AS t(v) WHERE v > %s", (0,))
        raise AssertionError("the statement outlived its timeout")
    except errors.QueryCanceled as e:
        assert "statement timeout" in str(e), str(e)
    assert conn.execute("SELECT %s::int", (8,)).fetchone() == (8,)

# Savepoints: psycopg's nested transactions. A failed inner block is rolled back to its savepoint (over the extended
# protocol) and the outer block goes on; Weir's statements take effect at once, so the row inserted stays.
with psycopg.connect(host="127.0.0.1", port=port, user="weir", dbname="weir") as conn:
    with conn.transaction():
        conn.execute("INSERT INTO people VALUES (%s, %s, NULL, NULL, NULL)", (10, "nested"))
        try:
            with conn.transaction():
                conn.execute("SELECT 1 / %s", (0,))
            raise AssertionError("the division by zero succeeded")
        except errors.DivisionByZero:
            pass
        with conn.transaction():
            assert conn.execute("SELECT name FROM people WHERE id = %s", (10,)).fetchone() == ("nested",)
    try:
        conn.execute("SAVEPOINT outside")
        conn.commit()
    except errors.NoActiveSqlTransaction:
        raise AssertionError("psycopg opens a block before SAVEPOINT")
    conn.rollback()

# json and jsonb parameters (text and binary) are kept as their JSON text; a json parameter that is not JSON is
# refused (22P02).
from psycopg.types.json import Json, Jsonb

with psycopg.connect(host="127.0.0.1", port=port, user="weir", dbname="weir", autocommit=True) as conn:
    conn.execute("CREATE TABLE json_docs (id INT, body TEXT)")
    conn.execute("INSERT INTO json_docs VALUES (%s, %s)", (1, Json({"a": 1})))
    conn.execute("INSERT INTO json_docs VALUES (%s, %s)", (2, Jsonb({"b": [1, 2]})))
    conn.cursor(binary=True).execute("INSERT INTO json_docs VALUES (%s, %b)", (3, Jsonb({"c": None})))
    got = conn.execute("SELECT id, body FROM json_docs ORDER BY id").fetchall()
    assert got == [(1, '{"a": 1}'), (2, '{"b": [1, 2]}'), (3, '{"c": null}')], got
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO json_docs VALUES (%s, %s)", (4, psycopg.types.json.Json("x", dumps=lambda _: "{bad")))
        raise AssertionError("a json parameter that is not JSON was taken")
    except errors.InvalidTextRepresentation as e:
        assert e.sqlstate == "22P02" and "invalid input syntax for type json" in str(e), str(e)

# SQLAlchemy 2 over psycopg 3 (its default driver): it connects (psycopg opens a savepoint while SQLAlchemy sets the
# connection up), runs a query, nests a transaction, and lists the tables.
import sqlalchemy as sa

engine = sa.create_engine(f"postgresql+psycopg://weir@127.0.0.1:{port}/weir")
with engine.connect() as c:
    assert c.execute(sa.text("SELECT count(*) FROM people")).scalar() == 4
    try:
        with c.begin_nested():
            c.execute(sa.text("SELECT 1 / 0"))
        raise AssertionError("the division by zero succeeded")
    except sa.exc.DataError:
        pass
    assert c.execute(sa.text("SELECT 1")).scalar() == 1
    c.commit()
assert "people" in sa.inspect(engine).get_table_names()
engine.dispose()

# What Superset, pandas and other SQLAlchemy users read of the catalog, over psycopg 3 and psycopg2: tables, views and
# materialized views by kind, a table's columns with their types, its (absent) keys and indexes, a whole table
# reflected, and pandas' read_sql_table / read_sql.
import pandas as pd

with psycopg.connect(host="127.0.0.1", port=port, user="weir", dbname="weir", autocommit=True) as conn:
    conn.execute("CREATE MATERIALIZED VIEW people_per_year AS SELECT born, count(*) AS n FROM people GROUP BY born")
    conn.execute("FLUSH")
for url in (f"postgresql+psycopg://weir@127.0.0.1:{port}/weir", f"postgresql+psycopg2://weir@127.0.0.1:{port}/weir"):
    engine = sa.create_engine(url)
    inspector = sa.inspect(engine)
    assert "people" in inspector.get_table_names(), inspector.get_table_names()
    assert inspector.get_materialized_view_names() == ["people_per_year"], inspector.get_materialized_view_names()
    assert "people_per_year" not in inspector.get_table_names()
    columns = [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns("people")]
    assert columns == [
        ("id", "INTEGER", True),
        ("name", "TEXT", True),
        ("born", "DATE", True),
        ("seen", "TIMESTAMP", True),
        ("balance", "NUMERIC(12, 2)", True),
    ], columns
    assert [c["name"] for c in inspector.get_columns("people_per_year")] == ["born", "n"]
    assert inspector.get_pk_constraint("people")["constrained_columns"] == []
    assert inspector.get_indexes("people") == [] and inspector.get_foreign_keys("people") == []
    table = sa.Table("people", sa.MetaData(), autoload_with=engine)
    assert table.c.keys() == ["id", "name", "born", "seen", "balance"], table.c.keys()
    frame = pd.read_sql_table("people", engine)
    assert len(frame) == 4 and list(frame.columns) == ["id", "name", "born", "seen", "balance"], frame
    per_year = pd.read_sql("SELECT count(*) AS years, sum(n) AS people FROM people_per_year", engine)
    # Born 1815, 1912, and unknown (twice).
    assert per_year.iloc[0].tolist() == [3, 4], per_year
    engine.dispose()

print("psycopg ok")
