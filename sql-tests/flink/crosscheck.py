"""Cross-checks Weir's MATCH_RECOGNIZE against Apache Flink SQL on the same generated readings (not part of the
test suite, which must not need Flink).

    python3 crosscheck.py gen DIR                 # DIR/readings.csv: 3 devices x 80 readings, random walks
    FLINK_PYTHON crosscheck.py flink DIR          # with `pip install apache-flink` (Java 17): DIR/flink.json
    python3 crosscheck.py weir DIR PORT           # against a running Weir: a SELECT and a materialized view per
                                                  # query; compares them with each other and with DIR/flink.json

The queries avoid what Flink does not support (PREV/NEXT: "physical offsets within partition", alternation).
"""

import csv
import datetime
import json
import random
import re
import sys

# name -> (the MATCH_RECOGNIZE clause after PARTITION BY device ORDER BY ts, the measures selected)
QUERIES = {
    "rise_fall": ("MEASURES FIRST(A.ts) AS s, LAST(B.v) AS peak, C.v AS fell "
                  "ONE ROW PER MATCH AFTER MATCH SKIP PAST LAST ROW "
                  "PATTERN (A B+ C) DEFINE B AS (LAST(B.v, 1) IS NULL AND B.v > A.v) OR B.v > LAST(B.v, 1), C AS C.v < LAST(B.v)", "s, peak, fell"),
    "rise_fall_next_row": ("MEASURES FIRST(A.ts) AS s, LAST(B.v) AS peak, C.v AS fell "
                  "ONE ROW PER MATCH AFTER MATCH SKIP TO NEXT ROW "
                  "PATTERN (A B+ C) DEFINE B AS (LAST(B.v, 1) IS NULL AND B.v > A.v) OR B.v > LAST(B.v, 1), C AS C.v < LAST(B.v)", "s, peak, fell"),
    "reluctant": ("MEASURES FIRST(A.ts) AS s, LAST(B.ts) AS e, C.v AS c "
                  "ONE ROW PER MATCH AFTER MATCH SKIP PAST LAST ROW "
                  "PATTERN (A B+? C) DEFINE B AS B.v > A.v, C AS C.v > A.v + 3", "s, e, c"),
    "within": ("MEASURES FIRST(A.ts) AS s, LAST(C.ts) AS e, LAST(B.v) AS peak "
                  "ONE ROW PER MATCH AFTER MATCH SKIP PAST LAST ROW "
                  "PATTERN (A B+ C) WITHIN INTERVAL '3' SECOND DEFINE B AS (LAST(B.v, 1) IS NULL AND B.v > A.v) OR B.v > LAST(B.v, 1), C AS C.v < LAST(B.v)", "s, e, peak"),
    "counted": ("MEASURES FIRST(U.ts) AS s, COUNT(U.v) AS ups, SUM(U.v) AS total, LAST(U.v) AS top "
                  "ONE ROW PER MATCH AFTER MATCH SKIP TO LAST U "
                  "PATTERN (U{2,4} D) DEFINE U AS U.v > 48, D AS D.v < LAST(U.v) - 1", "s, ups, total, top"),
    "first_last": ("MEASURES FIRST(X.v) AS f, LAST(X.v) AS l, FIRST(X.v, 1) AS f1, LAST(X.v, 1) AS l1 "
                  "ONE ROW PER MATCH AFTER MATCH SKIP PAST LAST ROW "
                  "PATTERN (X{4}) DEFINE X AS X.v >= 45", "f, l, f1, l1"),
    "counted_const": ("MEASURES FIRST(U.ts) AS s, COUNT(U.v) AS ups, SUM(U.v) AS total, LAST(U.v) AS top "
                  "ONE ROW PER MATCH AFTER MATCH SKIP TO LAST U "
                  "PATTERN (U{2,4} D) DEFINE U AS U.v > 48, D AS D.v < 59", "s, ups, total, top"),
    "greedy_plus": ("MEASURES FIRST(U.ts) AS s, COUNT(U.v) AS ups, LAST(U.v) AS top "
                  "ONE ROW PER MATCH AFTER MATCH SKIP PAST LAST ROW "
                  "PATTERN (U+ D) DEFINE U AS U.v > 48, D AS D.v < LAST(U.v) - 1", "s, ups, top"),
}


def generate(directory):
    random.seed(7)
    rows = []
    base = datetime.datetime(2024, 1, 1)
    for device in ["d1", "d2", "d3"]:
        v = 50
        for i in range(80):
            v += random.randint(-3, 3)
            at = base + datetime.timedelta(seconds=i, milliseconds=random.choice([0, 0, 250, 500]))
            rows.append((device, v, at))
    rows.sort(key=lambda r: r[2])
    with open(f"{directory}/readings.csv", "w") as f:
        for device, v, at in rows:
            f.write(f"{device},{v},{at.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}\n")


def run_flink(directory):
    from pyflink.table import EnvironmentSettings, TableEnvironment

    env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    env.get_config().set("parallelism.default", "1")
    env.execute_sql(
        "CREATE TABLE readings (device STRING, v INT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) "
        f"WITH ('connector' = 'filesystem', 'path' = '{directory}/readings.csv', 'format' = 'csv')"
    )
    out = {}
    for name, (body, cols) in QUERIES.items():
        sql = f"SELECT device, {cols} FROM readings MATCH_RECOGNIZE (PARTITION BY device ORDER BY ts {body}) AS m"
        with env.execute_sql(sql).collect() as results:
            out[name] = sorted([str(x) for x in r] for r in results)
    json.dump(out, open(f"{directory}/flink.json", "w"), indent=1)


def normalized(value):
    """Timestamps as Flink and psycopg print them, in one form."""
    if isinstance(value, datetime.datetime):
        value = value.isoformat()
    value = str(value)
    m = re.match(r"^(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)(\.\d+)?$", value)
    if not m:
        return value
    return f"{m.group(1)}T{m.group(2)}{(m.group(3) or '').rstrip('0').rstrip('.')}"


def run_weir(directory, port):
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="weir", dbname="weir", autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute(
            "CREATE TABLE readings (device TEXT, v INT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)"
        )
        for name, (body, cols) in QUERIES.items():
            cur.execute(
                f"CREATE MATERIALIZED VIEW mv_{name} AS SELECT device, {cols} FROM readings "
                f"MATCH_RECOGNIZE (PARTITION BY device ORDER BY ts {body}) AS m"
            )
        rows = list(csv.reader(open(f"{directory}/readings.csv")))
        # In time order, a few rows per INSERT, then a row much later (another device) to end every match.
        for i in range(0, len(rows), 7):
            cur.execute("INSERT INTO readings VALUES " + ", ".join(f"('{d}', {v}, '{t}')" for d, v, t in rows[i : i + 7]))
        cur.execute("INSERT INTO readings VALUES ('zz', 0, '2024-01-01 02:00:00')")
        cur.execute("FLUSH")
        flink = json.load(open(f"{directory}/flink.json"))
        for name, (body, cols) in QUERIES.items():
            cur.execute(
                f"SELECT device, {cols} FROM readings MATCH_RECOGNIZE (PARTITION BY device ORDER BY ts {body}) AS m "
                "WHERE device <> 'zz'"
            )
            batch = sorted([normalized(x) for x in r] for r in cur.fetchall())
            cur.execute(f"SELECT * FROM mv_{name}")
            stream = sorted([normalized(x) for x in r] for r in cur.fetchall())
            theirs = sorted([normalized(x) for x in r] for r in flink.get(name, []))
            print(f"{name}: weir {len(batch)} rows, view {len(stream)}, flink {len(theirs)}; "
                  f"view == select: {stream == batch}; select == flink: {batch == theirs}")


if __name__ == "__main__":
    command, directory = sys.argv[1], sys.argv[2]
    if command == "gen":
        generate(directory)
    elif command == "flink":
        run_flink(directory)
    else:
        run_weir(directory, int(sys.argv[3]))
