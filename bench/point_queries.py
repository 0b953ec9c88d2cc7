"""Point queries against a materialized view, measured with pgbench (not part of the test suite).

It starts Weir's release server on a fresh data directory, reads a generated CSV file of `--keys` rows (one per key)
into `CREATE MATERIALIZED VIEW per_key AS SELECT k, count(*) AS n, sum(v) AS total FROM ev GROUP BY k`, checks the
view holds every key, then runs `pgbench -n -c 8 -j 2 -T SECONDS` with `SELECT * FROM per_key WHERE k = :id` (a
random key) in each protocol mode, and prints transactions per second, the 99th percentile of latency (from
pgbench's per-transaction log) and the server's CPU time per query.

    python3 bench/point_queries.py --weir ~/.cache/weir/target/release/weir [--keys 100000] [--seconds 12]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "flink"))
from side_by_side import cpu_seconds, free_port  # noqa: E402


def psql(port, sql):
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "weir", "-d", "weir", "-At", "-v", "ON_ERROR_STOP=1",
         "-c", sql],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weir", required=True, help="the release weir binary")
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--modes", default="extended,prepared,simple")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="weir-point-")
    csv_path = os.path.join(work, "ev.csv")
    with open(csv_path, "w") as f:
        for k in range(args.keys):
            f.write(f"2024-01-01 00:00:{k % 60:02}.000,{k},{k % 97}\n")
    port = free_port()
    server = subprocess.Popen(
        [args.weir, "--data-dir", os.path.join(work, "data"), "--listen", f"127.0.0.1:{port}", "--http-listen", "off",
         "--log-level", "warn", "--allow-file-dir", work],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                psql(port, "SELECT 1")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.1)
        psql(port, "CREATE SOURCE ev (ts TIMESTAMP(3), k BIGINT, v BIGINT) "
                   f"WITH (connector = 'file', path = '{csv_path}') FORMAT PLAIN ENCODE CSV (without_header = 'true')")
        psql(port, "CREATE MATERIALIZED VIEW per_key AS SELECT k, count(*) AS n, sum(v) AS total FROM ev GROUP BY k")
        deadline = time.monotonic() + 120
        while psql(port, "SELECT count(*) FROM per_key") != str(args.keys):
            if time.monotonic() > deadline:
                raise RuntimeError("the view did not hold every key within two minutes")
            time.sleep(0.2)
        # A key worked out by hand: k = 4242 has one row, v = 4242 % 97 = 71.
        if args.keys > 4242 and psql(port, "SELECT n, total FROM per_key WHERE k = 4242") != "1|71":
            raise RuntimeError("the view's row for key 4242 is not (1, 71)")
        script = os.path.join(work, "point.sql")
        with open(script, "w") as f:
            f.write(f"\\set id random(0, {args.keys - 1})\nSELECT * FROM per_key WHERE k = :id;\n")
        print(f"{args.keys} keys, pgbench -c {args.clients} -j 2 -T {args.seconds}", file=sys.stderr)
        print("| mode | tps | average ms | p99 ms | server CPU us per query |")
        print("|---|---|---|---|---|")
        for mode in args.modes.split(","):
            logs = os.path.join(work, f"log-{mode}")
            os.makedirs(logs, exist_ok=True)
            cpu0 = cpu_seconds(server.pid)
            out = subprocess.run(
                ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", "weir", "-c", str(args.clients),
                 "-j", "2", "-T", str(args.seconds), "-M", mode, "-f", script, "-l",
                 "--log-prefix", os.path.join(logs, "tx"), "weir"],
                check=True, capture_output=True, text=True, cwd=logs,
            ).stdout
            cpu = cpu_seconds(server.pid) - cpu0
            tps = float(re.search(r"tps = ([0-9.]+)", out).group(1))
            done = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
            failed = re.search(r"number of failed transactions: (\d+)", out)
            if failed and int(failed.group(1)) > 0:
                raise RuntimeError(f"{mode}: {failed.group(1)} transactions failed")
            latencies = []
            for name in os.listdir(logs):
                with open(os.path.join(logs, name)) as f:
                    latencies.extend(int(line.split()[2]) for line in f if line.strip())
            print(f"| {mode} | {tps:,.0f} | {sum(latencies) / len(latencies) / 1000:.2f} | "
                  f"{percentile(latencies, 0.99) / 1000:.2f} | {cpu / done * 1e6:.0f} |", flush=True)
            shutil.rmtree(logs)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
