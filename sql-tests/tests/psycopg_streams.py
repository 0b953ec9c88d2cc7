"""psycopg 3 against Weir: COPY in and out, server-side cursors fetched in pages, and SUBSCRIBE read while rows flow
(as a cursor with FETCH ... WITH (timeout), and as COPY (SUBSCRIBE ...) TO STDOUT until cancelled).

Every expected value is worked out from the rows the script writes. Usage: psycopg_streams.py PORT
"""

import sys
import threading
import time
from datetime import datetime, timedelta

import psycopg
from psycopg import errors

port = int(sys.argv[1])


def connect(**kwargs):
    return psycopg.connect(host="127.0.0.1", port=port, user="weir", dbname="weir", **kwargs)


with connect(autocommit=True) as conn:
    conn.execute("CREATE TABLE meters (id BIGINT NOT NULL, site TEXT, kwh DOUBLE PRECISION, ts TIMESTAMP)")
    cur = conn.cursor()

    # COPY FROM STDIN in the text format, rows written by psycopg: 5,000 readings.
    start = datetime(2024, 1, 1)
    with cur.copy("COPY meters (id, site, kwh, ts) FROM STDIN") as copy:
        for i in range(1, 5001):
            copy.write_row((i, f"site-{i % 7}", i * 0.5, start + timedelta(seconds=i)))
    assert cur.rowcount == 5000, cur.rowcount
    # sum(0.5 * i) for i in 1..5000 = 0.5 * 5000 * 5001 / 2.
    got = conn.execute("SELECT count(*), sum(kwh), min(ts), max(ts) FROM meters").fetchone()
    assert got == (5000, 6251250.0, datetime(2024, 1, 1, 0, 0, 1), datetime(2024, 1, 1, 1, 23, 20)), got

    # COPY TO STDOUT, text and binary, parsed by psycopg.
    query = "COPY (SELECT id, site, kwh FROM meters WHERE id <= 3 ORDER BY id) TO STDOUT"
    with cur.copy(query) as copy:
        copy.set_types(["int8", "text", "float8"])
        rows = list(copy.rows())
    assert rows == [(1, "site-1", 0.5), (2, "site-2", 1.0), (3, "site-3", 1.5)], rows
    with cur.copy(query + " (FORMAT binary)") as copy:
        copy.set_types(["int8", "text", "float8"])
        rows = list(copy.rows())
    assert rows == [(1, "site-1", 0.5), (2, "site-2", 1.0), (3, "site-3", 1.5)], rows

    # A round trip: the table out as CSV with a header, into a second table, which then holds the same rows.
    data = bytearray()
    with cur.copy("COPY meters TO STDOUT WITH (FORMAT csv, HEADER)") as copy:
        for chunk in copy:
            data += chunk
    lines = bytes(data).decode().splitlines()
    assert lines[0] == "id,site,kwh,ts", lines[0]
    assert len(lines) == 5001, len(lines)
    conn.execute("CREATE TABLE meters_copy (id BIGINT NOT NULL, site TEXT, kwh DOUBLE PRECISION, ts TIMESTAMP)")
    with cur.copy("COPY meters_copy FROM STDIN WITH (FORMAT csv, HEADER true)") as copy:
        copy.write(bytes(data))
    got = conn.execute(
        "SELECT count(*), sum(kwh), count(DISTINCT site) FROM meters_copy m JOIN meters USING (id, site, kwh, ts)"
    ).fetchone()
    assert got == (5000, 6251250.0, 7), got

    # A bad line: the whole COPY fails with the line and column named, and nothing is written.
    try:
        with cur.copy("COPY meters (id, site) FROM STDIN WITH (FORMAT csv)") as copy:
            copy.write(b"9001,a\n9002,b\nx9003,c\n")
        raise AssertionError("a bad line was taken")
    except errors.InvalidTextRepresentation as e:
        assert e.diag.context and "COPY meters, line 3, column id: \"x9003\"" in e.diag.context, e.diag.context
    assert conn.execute("SELECT count(*) FROM meters").fetchone() == (5000,)
    try:
        with cur.copy("COPY meters (id, nope) FROM STDIN") as copy:
            copy.write(b"1\t2\n")
        raise AssertionError("an unknown column was taken")
    except errors.UndefinedColumn:
        pass

# A server-side cursor (psycopg's named cursor: DECLARE, describe the portal, FETCH FORWARD n) read in pages.
with connect() as conn:
    with conn.cursor(name="pages") as cur:
        cur.itersize = 1000
        cur.execute("SELECT id, kwh FROM meters WHERE id > %s ORDER BY id", (4000,))
        first = cur.fetchmany(3)
        assert first == [(4001, 2000.5), (4002, 2001.0), (4003, 2001.5)], first
        rest = cur.fetchall()
        assert len(rest) == 997 and rest[-1] == (5000, 2500.0), (len(rest), rest[-1:])
    conn.commit()
    # Outside a transaction block a cursor needs WITH HOLD, as in Postgres.
    conn.autocommit = True
    try:
        conn.execute("DECLARE loose CURSOR FOR SELECT 1")
        raise AssertionError("DECLARE outside a block was taken")
    except errors.NoActiveSqlTransaction:
        pass

# SUBSCRIBE as a cursor: the view's rows first, then each change as rows are inserted, with the epoch's time and the
# diff (+1 added, -1 retracted).
with connect(autocommit=True) as conn:
    conn.execute("CREATE TABLE taps (tag TEXT, reader TEXT)")
    conn.execute("CREATE MATERIALIZED VIEW per_reader AS SELECT reader, count(*) AS n FROM taps GROUP BY reader")
    conn.execute("INSERT INTO taps VALUES ('t1', 'dock-1'), ('t2', 'dock-1'), ('t3', 'dock-2')")
    conn.execute("FLUSH")

with connect() as conn, connect(autocommit=True) as writer:
    conn.execute("DECLARE feed CURSOR FOR SUBSCRIBE TO per_reader")
    before = int(time.time() * 1000)
    snapshot = conn.execute("FETCH ALL feed WITH (timeout = '2s')").fetchall()
    assert sorted(r[1:] for r in snapshot) == [(1, "dock-1", 2), (1, "dock-2", 1)], snapshot
    # Nothing new: the fetch waits its timeout and returns no rows.
    waited = time.monotonic()
    assert conn.execute("FETCH ALL feed WITH (timeout = '300ms')").fetchall() == []
    assert time.monotonic() - waited >= 0.25
    writer.execute("INSERT INTO taps VALUES ('t4', 'dock-2'), ('t5', 'dock-3')")
    changes = []
    deadline = time.monotonic() + 10
    while len(changes) < 3 and time.monotonic() < deadline:
        changes += conn.execute("FETCH ALL feed WITH (timeout = '1s')").fetchall()
    # dock-2 goes from 1 to 2 (its old row retracted), dock-3 appears; dock-1 is unchanged and not shown.
    assert sorted(r[1:] for r in changes) == [(-1, "dock-2", 1), (1, "dock-2", 2), (1, "dock-3", 1)], changes
    times = {r[0] for r in changes}
    assert len(times) == 1 and min(times) >= before, times
    conn.execute("CLOSE feed")
    conn.commit()

# COPY (SUBSCRIBE ...) TO STDOUT: a change feed as COPY data, read while rows flow, until the client cancels.
with connect(autocommit=True) as conn, connect(autocommit=True) as writer:
    def insert_later():
        time.sleep(0.5)
        writer.execute("INSERT INTO taps VALUES ('t6', 'dock-4')")

    threading.Thread(target=insert_later).start()
    cur = conn.cursor()
    seen = []
    try:
        with cur.copy("COPY (SUBSCRIBE per_reader WITH (snapshot = false)) TO STDOUT") as copy:
            copy.set_types(["int8", "int8", "text", "int8"])
            for row in copy.rows():
                seen.append(row[1:])
                conn.cancel_safe()
        raise AssertionError("the subscription ended by itself")
    except errors.QueryCanceled:
        pass
    assert seen == [(1, "dock-4", 1)], seen
    assert conn.execute("SELECT 1").fetchone() == (1,)

print("psycopg streams ok")
