"""Benchmark `fraisier status` and `fraisier history --limit 50` on 100,000 deployments.

Seeds a temporary store (20 fraises x 3 environments, realistic statuses and times), then
prints the median wall time of 10 runs of each command as a subprocess, and of the
in-process Store calls behind them. Target: 0.3 s end to end. Figures, not assertions:
the exit status is 0 whatever the figures.

    .venv/bin/python bench/cli.py [--deployments 100000] [--runs 10] [--keep PATH]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from fraisier.store import Store

TARGET_S = 0.3
ENVIRONMENTS = ("development", "staging", "production")
# Weighted like a healthy fleet: mostly successes, some failures, a few of the rest.
OUTCOMES = (
    ["successful"] * 85
    + ["failed"] * 8
    + ["canceled", "timeout", "rolled_back", "interrupted", "superseded"] * 1
    + ["rollback_failed"]
)


def seed(path: Path, count: int, rng: random.Random) -> float:
    """Fill a fresh store with `count` deployments and their transitions; return seconds."""
    started = time.perf_counter()
    fraises = [f"service_{i:02d}" for i in range(20)]
    pairs = [(f, e) for f in fraises for e in ENVIRONMENTS]
    clock = datetime(2024, 1, 1)
    deployments, transitions = [], []
    for deployment_id in range(1, count + 1):
        fraise, environment = rng.choice(pairs)
        clock += timedelta(seconds=rng.randint(60, 1200))
        duration = timedelta(seconds=rng.uniform(20, 400))
        dry_run = rng.random() < 0.05
        status = "successful" if dry_run else rng.choice(OUTCOMES)
        # The newest deployments of some pairs are still in flight.
        if deployment_id > count - 5:
            status = rng.choice(["running", "queued"])
        created = clock.isoformat(" ", "microseconds")
        begun = None if status == "queued" else (clock + timedelta(seconds=2))
        ended = None if status in ("queued", "running") else (begun + duration)
        deployments.append(
            (
                deployment_id,
                fraise,
                environment,
                status,
                rng.choice(["webhook", "webhook", "webhook", "cli", "rollback"]),
                f"{rng.getrandbits(160):040x}",
                "main" if environment == "production" else "develop",
                None if ended is None else f"{clock:%Y%m%d%H%M%S}",
                int(dry_run),
                rng.choice(["alice", "bob", "carol", "deploy-bot"]),
                "Fix the thing that broke\n\nLonger explanation of the change.",
                "ansible-playbook exited with 2: 1 host failed" if status == "failed" else None,
                created,
                begun.isoformat(" ", "microseconds") if begun else None,
                ended.isoformat(" ", "microseconds") if ended else None,
            )
        )
        transitions.append((deployment_id, None, "queued", created))
        if begun:
            transitions.append(
                (deployment_id, "queued", "running", begun.isoformat(" ", "microseconds"))
            )
        if ended:
            transitions.append(
                (deployment_id, "running", status, ended.isoformat(" ", "microseconds"))
            )
    with Store.open(path) as store:
        db = store.db
        with db.atomic("IMMEDIATE"):
            cursor = db.cursor()
            cursor.executemany(
                'INSERT INTO tb_deployments (id, fraise, environment, status, "trigger", '
                '"commit", branch, release_id, dry_run, requested_by, commit_message, error, '
                "created_at, started_at, completed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                deployments,
            )
            cursor.executemany(
                "INSERT INTO tb_deployment_transitions "
                "(deployment_id, from_status, to_status, created_at) VALUES (?, ?, ?, ?)",
                transitions,
            )
    return time.perf_counter() - started


def median_of(runs: int, action) -> tuple[float, object]:
    """Median wall time in seconds of `runs` calls, and the last call's result."""
    times, result = [], None
    for _ in range(runs):
        begin = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - begin)
    return statistics.median(times), result


def verdict(seconds: float) -> str:
    return "PASS" if seconds <= TARGET_S else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployments", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--keep", type=Path, help="seed this file and keep it")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="fraisier-bench-")
    path = args.keep or Path(tmp.name) / "fraisier.db"
    if path.exists():
        sys.exit(f"{path} exists already; give a new file to --keep")
    seconds = seed(path, args.deployments, random.Random(42))
    size_mb = path.stat().st_size / 1e6
    print(f"seeded {args.deployments:,} deployments in {seconds:.2f} s ({size_mb:.1f} MB): {path}")

    pycache = Path(tmp.name) / "pycache"
    for stats in ("without", "with"):
        if stats == "with":
            begin = time.perf_counter()
            # Opening for writing refreshes the statistics, as the table has grown.
            with Store.open(path) as store:
                store.optimize()
            print(f"\nopen for writing + optimize() (ANALYZE): {time.perf_counter() - begin:.3f} s")
        measure(path, args.runs, stats, pycache)
    tmp.cleanup()
    return 0


def measure(path: Path, runs: int, stats: str, pycache: Path) -> None:
    """Print in-process and end-to-end medians."""
    print(f"\n== {stats} planner statistics ==")
    print(f"in process, median of {runs} runs (store already open):")
    with Store.open(path, readonly=True) as store:
        t_status, rows = median_of(runs, store.status)
        print(f"  Store.status()              {t_status * 1000:8.2f} ms  ({len(rows)} rows)")
        t_hist, rows = median_of(runs, lambda: store.history(limit=50))
        print(f"  Store.history(limit=50)     {t_hist * 1000:8.2f} ms  ({len(rows)} rows)")
        t_pair, rows = median_of(runs, lambda: store.history("service_07", "production", limit=50))
        print(f"  Store.history(pair, 50)     {t_pair * 1000:8.2f} ms  ({len(rows)} rows)")
        t_failed, rows = median_of(runs, lambda: store.history(status="failed", limit=50))
        print(f"  Store.history(failed, 50)   {t_failed * 1000:8.2f} ms  ({len(rows)} rows)")
    t_open, _ = median_of(runs, lambda: Store.open(path, readonly=True).status())
    print(f"  open + status()             {t_open * 1000:8.2f} ms")

    drop = ("FRAISIER_CONFIG", "FRAISIER_DATABASE_URL", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["FRAISIER_DB_PATH"] = str(path)
    # An installed Fraisier runs from compiled bytecode: let the first (untimed) run write
    # it, outside the source tree, instead of compiling every module on every run.
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    print(f"\nend to end, median of {runs} subprocess runs (target <= {TARGET_S} s):")
    baseline, _ = median_of(
        runs, lambda: subprocess.run([sys.executable, "-c", "pass"], check=False)
    )
    print(f"  python -c pass (baseline)   {baseline:8.3f} s")
    for argv in (["status"], ["history", "--limit", "50"]):
        command = [sys.executable, "-m", "fraisier", *argv]

        def run(command=command):
            return subprocess.run(command, env=env, capture_output=True, text=True, check=False)

        run()
        elapsed, proc = median_of(runs, run)
        label = "fraisier " + " ".join(argv)
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"  {label:<27} n/a: exit {proc.returncode} ({why})")
            continue
        lines = len(proc.stdout.splitlines())
        print(f"  {label:<27} {elapsed:8.3f} s  {verdict(elapsed)}  ({lines} lines of output)")


if __name__ == "__main__":
    sys.exit(main())
