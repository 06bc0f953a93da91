"""The README's first command: deploy the example api fraise to a real systemd host.

Boots one systemd-nspawn host of the test harness, makes a git repository of
examples/hello, deploys it with `fraisier deploy`, asks the app for its version
over HTTP, then shows `fraisier status` and `fraisier history`. The host is
stopped at the end unless --keep is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=Fraisier demo", "-c", "user.email=demo@fraisier.invalid"]


def run(*argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, echoing it first."""
    print(f"$ {' '.join(argv)}", flush=True)
    return subprocess.run(argv, check=check, **kwargs)


def fraisier(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the fraisier CLI of this interpreter."""
    return run(sys.executable, "-m", "fraisier", "-c", str(config), *args, check=check)


def make_repo(demo: Path) -> Path:
    """A git repository of examples/hello with one commit."""
    repo = demo / "hello-src"
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(ROOT / "examples" / "hello", repo)
    for args in (("init", "-q", "-b", "main"), ("add", "-A"), ("commit", "-q", "-m", "hello")):
        subprocess.run([*GIT, *args], cwd=repo, check=True)
    return repo


def write_config(demo: Path, repo: Path, host: dict) -> Path:
    """fraises.yaml for the demo: the example's `hello` fraise, aimed at the booted host."""
    example = yaml.safe_load((ROOT / "examples" / "fraises.yaml").read_text())
    hello = example["fraises"]["hello"]
    hello["repository"] = str(repo)
    env = hello["environments"]["demo"]
    env["hosts"] = {host["name"]: host["inventory_vars"]}
    env.pop("name", None)
    env.pop("inventory_group", None)
    config = {"fraises": {"hello": hello}}
    path = demo / "fraises.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the host running")
    args = parser.parse_args()
    demo = Path(os.environ.get("FRAISIER_DEMO_DIR", ROOT / ".demo")).resolve()
    demo.mkdir(parents=True, exist_ok=True)
    os.environ["FRAISIER_DB_PATH"] = str(demo / "fraisier.db")
    os.environ["FRAISIER_WORK_DIR"] = str(demo / "work")
    os.environ.pop("FRAISIER_CONFIG", None)

    print("== The example configuration", flush=True)
    fraisier(ROOT / "examples" / "fraises.yaml", "config", "validate")
    fraisier(ROOT / "examples" / "fraises.yaml", "list")

    print("\n== A real systemd host (systemd-nspawn)", flush=True)
    state = demo / "hosts.json"
    up = run(
        sys.executable, "-m", "tests.hosts", "up", "--name", "hello-demo", "--replace",
        "--state", str(state), "--format", "json",
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    host = json.loads(up.stdout)[0]
    print(f"host {host['name']} at {host['inventory_vars']['ansible_host']}", flush=True)
    try:
        repo = make_repo(demo)
        config = write_config(demo, repo, host)
        print(f"\n== Deploy (config: {config})", flush=True)
        fraisier(config, "deploy", "hello", "demo", "--force")
        address = host["inventory_vars"]["ansible_host"]
        ssh = [
            "ssh", "-i", host["inventory_vars"]["ansible_ssh_private_key_file"],
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", f"root@{address}",
        ]  # fmt: skip
        print("\n== The app answers on the host", flush=True)
        run(*ssh, f"curl -fsS http://{address}:8000/ && curl -fsS http://{address}:8000/health")
        print("\n== Status and history", flush=True)
        fraisier(config, "status")
        fraisier(config, "history", "--limit", "5")
        print(
            f"\nThe store is {demo / 'fraisier.db'}: FRAISIER_DB_PATH={demo / 'fraisier.db'}"
            f" fraisier -c {config} history",
            flush=True,
        )
    finally:
        if args.keep:
            print(f"host left running; stop it with: python -m tests.hosts down --state {state}")
        else:
            run(sys.executable, "-m", "tests.hosts", "down", "--state", str(state), cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
