"""Benchmark the webhook receiver: sustained signed pushes with wrk, then a redelivery burst.

Sustained: wrk (keep-alive, loopback) sends signed GitHub pushes, each with its own delivery
id (bench/webhook.lua cycles through requests signed here), to three servers run one after
the other with the same gunicorn settings: a bare hello-world Flask app, a minimal receiver
(HMAC check, JSON parse, one SQLite insert), and `fraisier-webhook --no-deploy`. The pushes
map to fraises whose deployments nobody runs: --no-deploy receives and queues only, so each
push supersedes the previous queued one of its pair, as in a busy repository.
Targets for Fraisier: >= 1,500 deliveries/s accepted and persisted, p99 <= 50 ms, and at
least 0.6x the minimal receiver.

Burst: 10,000 deliveries (10% of them redeliveries of earlier ones, some sent at the same
time as their original) from 16 keep-alive clients: every unique delivery recorded once,
none lost, no 5xx, and the deployments coalesced to one queued per fraise+environment.

Figures, not assertions: the exit status is 0 unless a burst check fails.

    .venv/bin/python bench/webhook.py [--duration 10] [--connections 16] [--skip-baselines]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

SECRET = "bench-secret"
LUA = Path(__file__).with_name("webhook.lua")
PAYLOAD = Path(__file__).resolve().parents[1] / "../shared/payloads/github/push_new_branch.json"
BRANCHES = [f"release-{i}" for i in range(5)]
TARGET_RATE = 1500
TARGET_P99_MS = 50
TARGET_RATIO = 0.6


# --------------------------------------------------------------------------- baseline apps


def bare_app():
    """Hello world: what Flask and gunicorn cost alone."""
    from flask import Flask

    app = Flask("bare")

    @app.post("/webhook")
    def webhook():
        return "hello"

    return app


def minimal_app(db_path: str):
    """The least a receiver can do: check the HMAC, parse the JSON, insert one row."""
    from flask import Flask, request

    app = Flask("minimal")
    local = threading.local()
    key = SECRET.encode()

    def connection() -> sqlite3.Connection:
        if not hasattr(local, "db"):
            local.db = sqlite3.connect(db_path, timeout=5, isolation_level=None)
            local.db.execute("PRAGMA journal_mode=wal")
            local.db.execute("PRAGMA synchronous=normal")
        return local.db

    @app.post("/webhook")
    def webhook():
        body = request.get_data()
        given = request.headers.get("X-Hub-Signature-256", "")
        expected = "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given, expected):
            return {"error": "signature"}, 401
        data = json.loads(body)
        connection().execute(
            "INSERT OR IGNORE INTO deliveries (delivery, ref, sha) VALUES (?, ?, ?)",
            (request.headers.get("X-GitHub-Delivery"), data.get("ref"), data.get("after")),
        )
        return {"status": "queued"}, 202

    return app


def serve_baseline(kind: str, port: int, workers: int, threads: int, db_path: str) -> None:
    """Run a baseline app under gunicorn with the receiver's settings (child process)."""
    from fraisier.web import serve_http

    if kind == "minimal":
        with sqlite3.connect(db_path) as db:
            db.execute("PRAGMA journal_mode=wal")
            db.execute(
                "CREATE TABLE IF NOT EXISTS deliveries (id INTEGER PRIMARY KEY, "
                "delivery TEXT UNIQUE, ref TEXT, sha TEXT)"
            )
    factory = bare_app if kind == "bare" else (lambda: minimal_app(db_path))
    serve_http(
        factory,
        {
            "bind": [f"127.0.0.1:{port}"],
            "workers": workers,
            "worker_class": "gthread",
            "threads": threads,
            "keepalive": 5,
            "loglevel": "warning",
            "errorlog": "-",
            "accesslog": None,
            "control_socket_disable": True,
        },
    )


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def push_body(rng: random.Random, branch: str) -> bytes:
    data = json.loads(PAYLOAD.read_bytes())
    sha = f"{rng.getrandbits(160):040x}"
    data["ref"] = f"refs/heads/{branch}"
    data["after"] = data["head_commit"]["id"] = sha
    return json.dumps(data, separators=(",", ":")).encode()


def signature(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


def write_requests(path: Path, count: int, rng: random.Random) -> None:
    """Pre-signed requests for wrk: signature, event and body per line."""
    with path.open("w") as out:
        for i in range(count):
            body = push_body(rng, BRANCHES[i % len(BRANCHES)])
            out.write(f"{signature(body)}\tpush\t{body.decode()}\n")


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"server on port {port} did not start")


@contextlib.contextmanager
def running(command: list[str], port: int, env: dict[str, str], log: Path):
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command,
            env=env,
            # Not the checkout: `python -m` puts the working directory first on sys.path,
            # ahead of PYTHONPATH, and --compare-tree relies on PYTHONPATH.
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_port(port, proc)
            # Let every gunicorn worker boot before measuring.
            time.sleep(1.5)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) used so far by the live processes of a process group."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def run_wrk(port: int, requests_file: Path, prefix: str, args, pgid: int) -> dict:
    command = [
        args.wrk,
        f"-t{args.wrk_threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}/webhook",
        "--",
        str(requests_file),
        prefix,
    ]
    cpu_before = group_cpu_seconds(pgid)
    out = subprocess.run(command, capture_output=True, text=True, timeout=args.duration + 60)
    cpu = group_cpu_seconds(pgid) - cpu_before
    for line in out.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            return {**json.loads(line[len("WRK_RESULT ") :]), "server_cpu_s": cpu}
    raise SystemExit(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")


def count_rows(db_path: Path, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db:
        return db.execute(sql).fetchone()[0]


def describe(name: str, result: dict, persisted: int | None) -> dict:
    seconds = result["duration_us"] / 1e6
    row = {
        "server": name,
        "requests": result["requests"],
        "rate": result["requests"] / seconds,
        "persisted": persisted,
        "persisted_rate": (persisted / seconds) if persisted is not None else None,
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "max_ms": result["max_us"] / 1000,
        "errors": result["errors"],
        "statuses": result["statuses"],
        # Server CPU per request does not depend on what else the machine runs.
        "cpu_ms_per_request": 1000 * result["server_cpu_s"] / max(1, result["requests"]),
    }
    return row


# --------------------------------------------------------------------------- the runs


def fraisier_config(root: Path) -> Path:
    fraises = "\n".join(
        textwrap.dedent(
            f"""\
              svc{i}:
                type: api
                repository: {root}/no-repo.git
                environments:
                  production: {{branch: {branch}, app_path: /srv/svc{i}, hosts: [localhost]}}"""
        )
        for i, branch in enumerate(BRANCHES)
    )
    path = root / "fraises.yaml"
    path.write_text(
        f"git:\n  github:\n    webhook_secret: {SECRET}\nfraises:\n"
        + textwrap.indent(fraises, "  ")
        + "\n"
    )
    return path


def fraisier_command(config: Path, port: int, args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fraisier.web",
        "--config",
        str(config),
        "--port",
        str(port),
        "--http-workers",
        str(args.http_workers),
        "--threads",
        str(args.threads),
        "--no-deploy",
        "--log-level",
        "warning",
    ]


def sustained(root: Path, args, env: dict[str, str]) -> list[dict]:
    rng = random.Random(7)
    requests_file = root / "requests.tsv"
    write_requests(requests_file, args.signed_requests, rng)
    rows = []
    if not args.skip_baselines:
        for kind in ("bare", "minimal"):
            port = free_port()
            db = root / f"{kind}.db"
            command = [
                sys.executable,
                __file__,
                "--serve",
                kind,
                "--port",
                str(port),
                "--http-workers",
                str(args.http_workers),
                "--threads",
                str(args.threads),
                "--db",
                str(db),
            ]
            with running(command, port, env, root / f"{kind}.log") as proc:
                result = run_wrk(port, requests_file, kind, args, proc.pid)
            persisted = (
                count_rows(db, "SELECT COUNT(*) FROM deliveries") if kind == "minimal" else None
            )
            rows.append(describe(f"{kind} baseline", result, persisted))
    config = fraisier_config(root)
    servers = [("fraisier-webhook", env, root / "fraisier.db")]
    if args.compare_tree:
        # Another checkout of the package (e.g. `git archive HEAD fraisier | tar -x -C DIR`)
        # measured in the same run: before/after figures under the same machine load.
        other = {
            **env,
            "PYTHONPATH": os.pathsep.join(filter(None, [args.compare_tree, env.get("PYTHONPATH")])),
            "FRAISIER_DB_PATH": str(root / "compare.db"),
        }
        servers.insert(0, ("fraisier (compare)", other, root / "compare.db"))
    for name, server_env, db in servers:
        port = free_port()
        log = root / f"{db.stem}.log"
        with running(fraisier_command(config, port, args), port, server_env, log) as proc:
            result = run_wrk(port, requests_file, db.stem, args, proc.pid)
        persisted = count_rows(
            db, "SELECT COUNT(*) FROM tb_webhook_events WHERE outcome = 'accepted'"
        )
        rows.append(describe(name, result, persisted))
    return rows


def burst(root: Path, args, env: dict[str, str]) -> dict:
    """10,000 deliveries, 10% redeliveries; check nothing is lost or recorded twice."""
    rng = random.Random(11)
    total = args.burst
    unique = total - total // 10
    bodies = {}
    plan = []
    for n in range(unique):
        delivery = f"burst-{n}"
        bodies[delivery] = push_body(rng, BRANCHES[n % len(BRANCHES)])
        plan.append(delivery)
    # Redeliveries: some right after the original (racing it), the rest later.
    for _ in range(total - unique):
        original = plan[rng.randrange(len(plan))]
        position = min(len(plan), plan.index(original) + rng.choice([1, 2, 50, 500]))
        plan.insert(position, original)
    db = root / "burst.db"
    port = free_port()
    config = fraisier_config(root)
    burst_env = {**env, "FRAISIER_DB_PATH": str(db)}
    results: list[tuple[str, int, str]] = []
    lock = threading.Lock()
    chunks = [plan[i :: args.connections] for i in range(args.connections)]

    def client(deliveries: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for delivery in deliveries:
            body = bodies[delivery]
            headers = {
                "Content-Type": "application/json",
                "X-GitHub-Event": "push",
                "X-GitHub-Delivery": delivery,
                "X-Hub-Signature-256": signature(body),
            }
            try:
                conn.request("POST", "/webhook", body=body, headers=headers)
                response = conn.getresponse()
                answer = json.loads(response.read() or b"{}")
                mine.append((delivery, response.status, answer.get("status", "")))
            except (OSError, http.client.HTTPException) as exc:
                mine.append((delivery, 0, type(exc).__name__))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.close()
        with lock:
            results.extend(mine)

    with running(fraisier_command(config, port, args), port, burst_env, root / "burst.log"):
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.connections) as pool:
            list(pool.map(client, chunks))
        seconds = time.perf_counter() - started

    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        recorded = [r[0] for r in conn.execute("SELECT delivery_id FROM tb_webhook_events")]
        per_pair = conn.execute(
            "SELECT fraise, environment, SUM(status = 'queued'), SUM(status = 'superseded'), "
            "COUNT(*) FROM tb_deployments GROUP BY fraise, environment ORDER BY fraise"
        ).fetchall()
    accepted = {d for d, code, _ in results if code == 202}
    report = {
        "sent": len(results),
        "unique": unique,
        "seconds": seconds,
        "rate": len(results) / seconds,
        "status_5xx": sum(1 for _, code, _ in results if code >= 500),
        "failed_requests": sum(1 for _, code, _ in results if code == 0),
        "answered_202": sum(1 for _, code, _ in results if code == 202),
        "answered_duplicate": sum(1 for _, _, status in results if status == "duplicate"),
        "recorded": len(recorded),
        "recorded_distinct": len(set(recorded)),
        "lost": len(set(plan) - set(recorded)),
        "accepted_twice": len([d for d, code, _ in results if code == 202]) - len(accepted),
        "pairs": [
            {"pair": f"{f}/{e}", "queued": q, "superseded": s, "deployments": n}
            for f, e, q, s, n in per_pair
        ],
    }
    report["ok"] = (
        report["sent"] == total
        and report["status_5xx"] == 0
        and report["failed_requests"] == 0
        and report["recorded"] == report["recorded_distinct"] == unique
        and report["lost"] == 0
        and report["accepted_twice"] == 0
        and report["answered_202"] == unique
        and all(
            p["queued"] == 1 and p["deployments"] == p["superseded"] + 1 for p in report["pairs"]
        )
    )
    return report


def print_sustained(rows: list[dict], args) -> None:
    print(
        f"\nSustained signed GitHub pushes: wrk -t{args.wrk_threads} -c{args.connections} "
        f"-d{args.duration}s, gunicorn {args.http_workers} workers x {args.threads} threads, "
        f"{os.cpu_count()} CPUs shared with wrk"
    )
    print(f"load average before the run: {args.load_before}")
    print(
        f"{'server':<20}{'req/s':>9}{'persisted/s':>13}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'CPU ms/req':>12}  statuses"
    )
    for row in rows:
        persisted = f"{row['persisted_rate']:.0f}" if row["persisted_rate"] is not None else "-"
        print(
            f"{row['server']:<20}{row['rate']:>9.0f}{persisted:>13}{row['p50_ms']:>9.1f}"
            f"{row['p99_ms']:>9.1f}{row['max_ms']:>9.1f}{row['cpu_ms_per_request']:>12.2f}"
            f"  {row['statuses']}" + (f" errors={row['errors']}" if row["errors"] else "")
        )
    ours = rows[-1]
    minimal = next((r for r in rows if r["server"] == "minimal baseline"), None)
    print(
        f"fraisier: {ours['persisted_rate']:.0f} deliveries/s persisted (target >= {TARGET_RATE}), "
        f"p99 {ours['p99_ms']:.1f} ms (target <= {TARGET_P99_MS})"
        + (
            f", {ours['persisted_rate'] / minimal['persisted_rate']:.2f}x the minimal receiver "
            f"(target >= {TARGET_RATIO})"
            if minimal
            else ""
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--http-workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--signed-requests", type=int, default=2000)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument(
        "--compare-tree",
        metavar="DIR",
        help="also measure the fraisier package found in DIR (before/after in one run)",
    )
    parser.add_argument("--skip-burst", action="store_true")
    parser.add_argument("--skip-sustained", action="store_true")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--serve", choices=["bare", "minimal"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.http_workers is None:
        from fraisier.web import _default_http_workers

        args.http_workers = _default_http_workers()
    if args.serve:
        serve_baseline(args.serve, args.port, args.http_workers, args.threads, args.db)
        return 0
    if not PAYLOAD.is_file():
        raise SystemExit(f"payload not found: {PAYLOAD}")

    root = Path(tempfile.mkdtemp(prefix="fraisier-bench-webhook-"))
    env = {
        **os.environ,
        "FRAISIER_DB_PATH": str(root / "fraisier.db"),
        "FRAISIER_WORK_DIR": str(root / "work"),
    }
    env.pop("FRAISIER_DATABASE_URL", None)
    figures: dict = {"load_before": Path("/proc/loadavg").read_text().split()[:3]}
    args.load_before = " ".join(figures["load_before"])
    ok = True
    try:
        if not args.skip_sustained:
            if not shutil.which(args.wrk):
                raise SystemExit("wrk is not installed (apt-get install wrk)")
            figures["sustained"] = sustained(root, args, env)
            print_sustained(figures["sustained"], args)
        if not args.skip_burst:
            report = burst(root, args, env)
            figures["burst"] = report
            ok = report["ok"]
            print(
                f"\nBurst: {report['sent']} deliveries ({report['unique']} unique, the rest "
                f"redeliveries) from {args.connections} clients in {report['seconds']:.1f} s "
                f"({report['rate']:.0f}/s)"
            )
            print(
                f"  answered 202: {report['answered_202']}, duplicate: "
                f"{report['answered_duplicate']}, 5xx: {report['status_5xx']}, failed requests: "
                f"{report['failed_requests']}"
            )
            print(
                f"  recorded: {report['recorded']} ({report['recorded_distinct']} distinct), "
                f"lost: {report['lost']}, accepted twice: {report['accepted_twice']}"
            )
            for pair in report["pairs"]:
                print(
                    f"  {pair['pair']}: {pair['deployments']} deployments -> {pair['queued']} "
                    f"queued, {pair['superseded']} superseded"
                )
            print(f"  burst checks: {'PASS' if ok else 'FAIL'}")
        if args.json:
            print(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
