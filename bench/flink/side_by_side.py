"""Weir and Apache Flink side by side on the same generated CSV file and the same queries (not part of the test
suite, which must not need Flink). `bash bench/flink/run.sh` builds Weir, installs PyFlink once and runs this:

    python3 bench/flink/side_by_side.py [--rows 5000000] [--mr-rows 2000000] [--keys 1000] [--dir DIR]
                                        [--weir target/release/weir] [--flink-python PY] [--runs 3]

For each workload it starts Weir's release server on a fresh data directory, creates a `file` source and a
materialized view, and measures from `CREATE MATERIALIZED VIEW` until `weir_catalog.view_progress` says the source
ended: wall seconds, the server's CPU seconds, its peak resident memory. It checks the view against the rows worked
out here in Python from the same file (an independent oracle). With `--flink-python` (a Python that has
`pip install apache-flink` and Java 17), it runs the same query in PyFlink at parallelism 1 into a blackhole sink,
the second and third job in one JVM ("warm", as a long-running Flink job is), measuring wall and process CPU, and
checks Flink's result summary against the same oracle. It prints one table: CPU and wall seconds, ratios, memory.
"""

import argparse
import datetime
import os
import random
import resource
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time

BASE = datetime.datetime(2024, 1, 1)

# name -> (the Weir view's query over `src`, the same for Flink, what the oracle computes)
WORKLOADS = {
    "read and decode only (`WHERE v < 0`)": (
        "SELECT * FROM src WHERE v < 0",
        "SELECT * FROM src WHERE v < 0",
        "filter",
    ),
    "10 s TUMBLE count+sum per key": (
        "SELECT k, window_start, window_end, count(*) AS n, sum(v) AS s "
        "FROM TUMBLE(src, ts, INTERVAL '10' SECOND) GROUP BY k, window_start, window_end EMIT ON WINDOW CLOSE",
        "SELECT k, window_start, window_end, count(*) AS n, sum(v) AS s "
        "FROM TABLE(TUMBLE(TABLE src, DESCRIPTOR(ts), INTERVAL '10' SECOND)) GROUP BY k, window_start, window_end",
        "tumble",
    ),
    "HOP 2 s slide / 10 s size, count per key": (
        "SELECT k, window_start, window_end, count(*) AS n "
        "FROM HOP(src, ts, INTERVAL '2' SECOND, INTERVAL '10' SECOND) GROUP BY k, window_start, window_end "
        "EMIT ON WINDOW CLOSE",
        "SELECT k, window_start, window_end, count(*) AS n "
        "FROM TABLE(HOP(TABLE src, DESCRIPTOR(ts), INTERVAL '2' SECOND, INTERVAL '10' SECOND)) "
        "GROUP BY k, window_start, window_end",
        "hop",
    ),
    "`MATCH_RECOGNIZE (A B+ C) WITHIN 10 s`": (
        "SELECT * FROM src MATCH_RECOGNIZE (PARTITION BY k ORDER BY ts "
        "MEASURES FIRST(A.ts) AS s, COUNT(B.v) AS rises, C.v AS fell ONE ROW PER MATCH AFTER MATCH SKIP PAST LAST ROW "
        "PATTERN (A B+ C) WITHIN INTERVAL '10' SECOND DEFINE B AS B.v > A.v, C AS C.v < A.v) AS m",
        "SELECT * FROM src MATCH_RECOGNIZE (PARTITION BY k ORDER BY ts "
        "MEASURES FIRST(A.ts) AS s, COUNT(B.v) AS rises, C.v AS fell ONE ROW PER MATCH AFTER MATCH SKIP PAST LAST ROW "
        "PATTERN (A B+ C) WITHIN INTERVAL '10' SECOND DEFINE B AS B.v > A.v, C AS C.v < A.v) AS m",
        "mr",
    ),
}

DISORDER_MS = 500

# What the oracle summarizes, computed by Flink from the workload's rows in one window over all time (one final row:
# collecting every row through PyFlink takes longer than the jobs themselves).
FLINK_CHECKS = {
    # (a query, the time column to close one window over all time by, "" to total it in one updating aggregation, or
    # None to collect its rows; the summed value: an expression, or for collected rows a column number)
    "filter": ("SELECT * FROM src WHERE v < 0", None, None),
    "tumble": ("SELECT k, window_start AS ws, window_end AS we, window_time AS wt, count(*) AS n "
               "FROM TABLE(TUMBLE(TABLE src, DESCRIPTOR(ts), INTERVAL '10' SECOND)) "
               "GROUP BY k, window_start, window_end, window_time", "wt", "sum(n)"),
    "hop": ("SELECT k, window_start AS ws, window_end AS we, window_time AS wt, count(*) AS n "
            "FROM TABLE(HOP(TABLE src, DESCRIPTOR(ts), INTERVAL '2' SECOND, INTERVAL '10' SECOND)) "
            "GROUP BY k, window_start, window_end, window_time", "wt", "sum(n)"),
    # A match's rowtime may be behind the watermark (a window over it would drop it as late): its rows are totalled
    # (rises summed) in an updating aggregation, in mini-batches so that a few updates reach the client, not one
    # per match (collecting 323,649 rows one by one through PyFlink took longer than all the timed jobs).
    "mr": ("SELECT * FROM q", "", "sum(rises)"),
}


def generate(path, rows, keys, seed):
    """`ts,k,v`: row `i` at millisecond `i` (every time distinct, so no order between equal times is at stake),
    written up to 500 ms out of order (the watermark allows 1 s)."""
    rng = random.Random(seed)
    order = sorted(range(rows), key=lambda i: i + rng.randrange(DISORDER_MS))
    with open(path, "w") as f:
        for i in order:
            at = BASE + datetime.timedelta(milliseconds=i)
            f.write(f"{at.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]},{rng.randrange(keys)},{rng.randrange(1000)}\n")


def read_rows(path):
    rows = []
    with open(path) as f:
        for line in f:
            ts, k, v = line.rstrip("\n").split(",")
            at = datetime.datetime.strptime(ts, "%Y-%m-%d %H:%M:%S.%f")
            rows.append((int((at - BASE).total_seconds() * 1000), int(k), int(v)))
    return rows


def oracle(kind, rows):
    """A summary of the view's rows, worked out from the file: (row count, a sum over the rows)."""
    if kind == "filter":
        return (sum(1 for r in rows if r[2] < 0), 0)
    if kind in ("tumble", "hop"):
        # Rows are never late here: the disorder (500 ms) is inside the watermark's 1 s.
        slide, size = (10_000, 10_000) if kind == "tumble" else (2_000, 10_000)
        windows = {}
        for ts, k, v in rows:
            start = ts - ts % slide
            while start > ts - size:
                key = (k, start)
                n, s = windows.get(key, (0, 0))
                windows[key] = (n + 1, s + v)
                start -= slide
        return (len(windows), sum(n for n, _ in windows.values()))
    if kind == "mr":
        return match_oracle(rows)
    raise ValueError(kind)


def match_oracle(rows):
    """PATTERN (A B+ C) WITHIN 10 s, B: v > A.v, C: v < A.v, per key in ts order, greedy B+, skip past last row:
    (matches, sum of their rises)."""
    per_key = {}
    for ts, k, v in sorted(rows, key=lambda r: (r[0],)):
        per_key.setdefault(k, []).append((ts, v))
    matches = 0
    rises = 0
    for series in per_key.values():
        i = 0
        while i < len(series):
            a_ts, a_v = series[i]
            j = i + 1
            while j < len(series) and series[j][1] > a_v:
                j += 1
            count = j - i - 1
            # Greedy B+ then C; backtracking gives nothing else here: C needs v < A.v, and a B row is > A.v.
            if count >= 1 and j < len(series) and series[j][1] < a_v and series[j][0] - a_ts < 10_000:
                matches += 1
                rises += count
                i = j + 1
            else:
                i += 1
    return (matches, rises)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_weir(binary, csv_path, rows, query, kind, flags=()):
    import psycopg

    data = tempfile.mkdtemp(prefix="weir-side-")
    port = free_port()
    server = subprocess.Popen(
        [binary, "--data-dir", data, "--listen", f"127.0.0.1:{port}", "--http-listen", "off", "--log-level", "warn",
         "--allow-file-dir", os.path.dirname(os.path.abspath(csv_path)), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                conn = psycopg.connect(f"host=127.0.0.1 port={port} user=weir dbname=weir", autocommit=True)
                break
            except psycopg.OperationalError:
                time.sleep(0.1)
        else:
            raise RuntimeError("Weir did not start")
        conn.execute(
            "CREATE SOURCE src (ts TIMESTAMP(3), k BIGINT, v BIGINT, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) "
            f"WITH (connector = 'file', path = '{csv_path}') FORMAT PLAIN ENCODE CSV (without_header = 'true')"
        )
        cpu0, wall0 = cpu_seconds(server.pid), time.perf_counter()
        conn.execute(f"CREATE MATERIALIZED VIEW out AS {query}")
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            status, read = conn.execute("SELECT status, rows_read FROM weir_catalog.view_progress").fetchone()
            if status == "ended" and read >= rows:
                break
            if status not in ("running", "ended"):
                raise RuntimeError(f"the view stopped: {status}")
            time.sleep(0.01)
        else:
            raise RuntimeError("the view did not read the whole file within 30 minutes")
        wall, cpu = time.perf_counter() - wall0, cpu_seconds(server.pid) - cpu0
        memory = peak_mib(server.pid)
        summary = {
            "filter": "SELECT count(*), 0 FROM out",
            "tumble": "SELECT count(*), sum(n) FROM out",
            "hop": "SELECT count(*), sum(n) FROM out",
            "mr": "SELECT count(*), sum(rises) FROM out",
        }[kind]
        got = tuple(int(x or 0) for x in conn.execute(summary).fetchone())
        conn.close()
        return wall, cpu, memory, got
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)


FLINK_JOB = r'''
import json, os, sys, time
from pyflink.table import EnvironmentSettings, TableEnvironment
csv_path, query, check, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
env.get_config().set("parallelism.default", "1")
env.execute_sql(
    "CREATE TABLE src (ts TIMESTAMP(3), k BIGINT, v BIGINT, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) "
    f"WITH ('connector' = 'filesystem', 'path' = '{csv_path}', 'format' = 'csv')")
env.execute_sql(f"CREATE TEMPORARY VIEW q AS {query}")
columns = ", ".join(f"`{c}` {t}" for c, t in zip(env.from_path("q").get_schema().get_field_names(),
                                                 [str(t) for t in env.from_path("q").get_schema().get_field_data_types()]))
env.execute_sql(f"CREATE TABLE sink ({columns}) WITH ('connector' = 'blackhole')")
def cpu():
    # The JVM runs in a child of this Python process (the py4j gateway): count both.
    total = 0.0
    for pid in [os.getpid()] + [int(p) for p in os.popen(f"pgrep -P {os.getpid()}").read().split()]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total
timings = []
for run in range(runs):
    cpu0, wall0 = cpu(), time.perf_counter()
    env.execute_sql("INSERT INTO sink SELECT * FROM q").wait()
    timings.append((time.perf_counter() - wall0, cpu() - cpu0))
# The rows once more (not timed), summarized as the oracle summarizes them.
summary = [0, 0]
inner, time_column, summed = json.loads(check)
env.execute_sql(f"CREATE TEMPORARY VIEW c AS {inner}")
if time_column == "":
    env.get_config().set("table.exec.mini-batch.enabled", "true")
    env.get_config().set("table.exec.mini-batch.allow-latency", "1 s")
    env.get_config().set("table.exec.mini-batch.size", "100000")
    with env.execute_sql(f"SELECT count(*), {summed} FROM c").collect() as rows:
        for row in rows:
            # Updates of the one total: the last row is the total over every match.
            summary = [int(row[0] or 0), int(row[1] or 0)]
elif time_column:
    # Grouped by both window columns, so that Flink plans a window aggregation that emits one row when the input
    # ends; grouped by window_start alone it plans an updating aggregation, whose hundreds of thousands of updates
    # the collecting client would fetch one by one.
    check = (f"SELECT count(*), {summed} FROM TABLE(TUMBLE(TABLE c, DESCRIPTOR({time_column}), INTERVAL '99' DAY)) "
             "GROUP BY window_start, window_end")
    with env.execute_sql(check).collect() as rows:
        for row in rows:
            summary = [int(row[0] or 0), int(row[1] or 0)]
else:
    with env.execute_sql("SELECT * FROM c").collect() as rows:
        for row in rows:
            summary[0] += 1
            if summed is not None:
                summary[1] += int(row[summed])
print(json.dumps({"timings": timings, "summary": summary}))
'''


def run_flink(python, csv_path, query, kind, runs):
    script = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    script.write(FLINK_JOB)
    script.close()
    import json

    check = json.dumps(FLINK_CHECKS[kind])
    out = subprocess.run([python, script.name, csv_path, query, check, str(runs)], capture_output=True, text=True)
    os.unlink(script.name)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print("Flink jobs (wall s, CPU s), the first cold: "
          + ", ".join(f"({w:.2f}, {c:.2f})" for w, c in result["timings"]), file=sys.stderr)
    warm = result["timings"][1:] or result["timings"]
    # With two warm jobs (`--runs 3`) their mean, not the slower of them.
    wall = statistics.median(w for w, _ in warm)
    cpu = statistics.median(c for _, c in warm)
    return wall, cpu, tuple(result["summary"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--mr-rows", type=int, default=2_000_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "weir-side-by-side"))
    parser.add_argument("--weir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "weir"))
    parser.add_argument("--flink-python")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", help="run the workloads whose name contains this")
    parser.add_argument("--parallelism", type=int, help="Weir's --parallelism (default: the machine's cores)")
    args = parser.parse_args()
    flags = ("--parallelism", str(args.parallelism)) if args.parallelism else ()
    os.makedirs(args.dir, exist_ok=True)
    table = []
    parsed = {}
    for name, (weir_query, flink_query, kind) in WORKLOADS.items():
        if args.only and args.only not in name:
            continue
        rows = args.mr_rows if kind == "mr" else args.rows
        csv_path = os.path.join(args.dir, f"rows-{rows}-{args.keys}.csv")
        if not os.path.exists(csv_path):
            print(f"generating {csv_path}", file=sys.stderr)
            generate(csv_path, rows, args.keys, 7)
        if csv_path not in parsed:
            parsed.clear()
            parsed[csv_path] = read_rows(csv_path)
        expected = oracle(kind, parsed[csv_path])
        weir_runs = [run_weir(args.weir, csv_path, rows, weir_query, kind, flags) for _ in range(args.runs)]
        for run in weir_runs:
            if run[3] != expected:
                raise SystemExit(f"{name}: Weir gave {run[3]}, the oracle {expected}")
        weir_wall = statistics.median(r[0] for r in weir_runs)
        weir_cpu = statistics.median(r[1] for r in weir_runs)
        weir_memory = max(r[2] for r in weir_runs)
        flink = None
        if args.flink_python:
            flink = run_flink(args.flink_python, csv_path, flink_query, kind, args.runs)
            if flink[2] != expected:
                raise SystemExit(f"{name}: Flink gave {flink[2]}, the oracle {expected}")
        table.append((name, rows, weir_cpu, weir_wall, weir_memory, flink, expected))
        print(f"{name}: Weir {weir_cpu:.2f} s CPU, {weir_wall:.2f} s wall, {weir_memory:.0f} MiB peak; "
              f"Flink {flink[1]:.2f} s CPU, {flink[0]:.2f} s wall" if flink else
              f"{name}: Weir {weir_cpu:.2f} s CPU, {weir_wall:.2f} s wall, {weir_memory:.0f} MiB peak", file=sys.stderr)
    print("| workload | rows | Weir CPU s | Flink warm CPU s | CPU ratio | Weir wall s | Flink warm wall s | wall ratio "
          "| Weir peak MiB | result (rows, sum) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, rows, cpu, wall, memory, flink, expected in table:
        if flink:
            f_wall, f_cpu, _ = flink
            print(f"| {name} | {rows:,} | {cpu:.2f} | {f_cpu:.2f} | {f_cpu / cpu:.1f}x | {wall:.2f} | {f_wall:.2f} | "
                  f"{f_wall / wall:.1f}x | {memory:.0f} | {expected} |")
        else:
            print(f"| {name} | {rows:,} | {cpu:.2f} | - | - | {wall:.2f} | - | - | {memory:.0f} | {expected} |")


if __name__ == "__main__":
    main()
