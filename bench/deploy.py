"""Deploy benchmarks on real systemd hosts: Fraisier's overhead and fleet scaling.

Overhead: `fraisier deploy` against `ansible-playbook` run on the same generated
inventory, extra vars and playbook, on the same host, alternating (every other round in
the reverse order); median ratio. Beside them, in the same rounds: Fraisier's runner layer
alone and ansible-runner's own `run()`, each in a fresh interpreter, and an interpreter
that only imports the libraries a deployment needs. They tell how much of the overhead is
Fraisier's own work and how much comes with ansible-runner and those libraries.
Fleet: one deployment to 1, 5 and 10 hosts, beside a hand-written minimal playbook
doing the same steps (bench/minimal_release.yml) on the same hosts in the same run,
alternating, median of the per-pair ratios.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.hosts.machines import boot_hosts, stop_hosts  # noqa: E402
from tests.hosts.rootfs import ensure_root  # noqa: E402

GIT = ["git", "-c", "user.name=Bench", "-c", "user.email=bench@fraisier.invalid"]
APP = "/srv/hello"


def make_repo(tmp: Path) -> Path:
    repo = tmp / "hello"
    shutil.copytree(ROOT / "examples" / "hello", repo)
    for args in (("init", "-q", "-b", "main"), ("add", "-A"), ("commit", "-q", "-m", "v1")):
        subprocess.run([*GIT, *args], cwd=repo, check=True)
    return repo


def write_config(tmp: Path, repo: Path, hosts, name: str) -> Path:
    env = {
        "branch": "main",
        "app_path": APP,
        "systemd_service": "hello.service",
        "hosts": {h.name: h.inventory_vars for h in hosts},
        "service": {
            "exec_start": f"/usr/bin/python3 {APP}/current/app.py",
            "working_directory": f"{APP}/current",
            "environment": {"HELLO_BIND": "{{ ansible_host }}"},
        },
        "health_check": {"url": "http://{{ ansible_host }}:8000/health", "retries": 10,
                         "delay": 1},
    }  # fmt: skip
    config = {"fraises": {"hello": {"type": "api", "repository": str(repo),
                                    "environments": {"bench": env}}}}  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def timed(argv: list[str], env: dict | None = None) -> float:
    control_dir = None
    if env is not None:
        # Like Fraisier's runs, each baseline run opens its own SSH connections: a
        # ControlPersist master left by the previous run would hand it a warm start.
        control_dir = tempfile.mkdtemp(prefix="fraisier-bench-cp-")
        env = {**env, "ANSIBLE_SSH_CONTROL_PATH_DIR": control_dir}
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if control_dir is not None:
        subprocess.run(["pkill", "-f", control_dir], check=False)
        shutil.rmtree(control_dir, ignore_errors=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])}... failed:\n{out.stdout[-3000:]}{out.stderr}")
    return elapsed


def fraisier_deploy(config: Path) -> float:
    return timed([sys.executable, "-m", "fraisier", "-c", str(config), "deploy", "hello",
                  "bench", "--force"])  # fmt: skip


# The libraries a deployment cannot start without (the CLI, fraises.yaml, the store, the
# runner), imported by a fresh interpreter and nothing else: the part of Fraisier's fixed
# cost that comes with those libraries rather than with Fraisier's own work.
REQUIRED_IMPORTS = "import click, yaml, peewee, ansible_runner"


def import_floor() -> float:
    return timed([sys.executable, "-c", REQUIRED_IMPORTS])


def latest_run_dir(work: Path) -> Path:
    # Directories only: the plain runs write their extra vars files beside them.
    return max(
        (p for p in (work / "runs").iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime
    )


def ansible_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAISIER_")}
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
            "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
        }
    )
    return env


def release_vars(run_dir: Path, name: str) -> Path:
    """The extra vars Fraisier generated for its last run, under a new release id."""
    extravars = json.loads((run_dir / "env" / "extravars").read_text())
    extravars["fraise_release_id"] = {"__ansible_unsafe": f"{name}-{int(time.time() * 1000)}"}
    path = run_dir.parent / f"{name}.json"
    path.write_text(json.dumps(extravars))
    return path


def plain_playbook(run_dir: Path, n: int, playbook: Path) -> float:
    """ansible-playbook on the inventory and extra vars Fraisier generated, new release id."""
    path = release_vars(run_dir, f"plain-{n}")
    return timed(["ansible-playbook", "-i", str(run_dir / "inventory"), "-e", f"@{path}",
                  str(playbook)], env=ansible_env())  # fmt: skip


# Fraisier's runner layer alone (fraisier/runner.py: ansible-runner with Fraisier's settings,
# events handed to a no-op) in a fresh interpreter, on the same inventory, extra vars and
# playbook: what running through ansible-runner costs without the CLI, the config, the
# store and git.
RUNNER_ONLY = """
import json, sys
from pathlib import Path
from fraisier.runner import PlaybookRun, PlaybookRunner
inventory, extravars, playbook, work = map(Path, sys.argv[1:])
run = PlaybookRun(name="bench", playbook=playbook, inventory=json.loads(inventory.read_text()),
                  extravars=json.loads(extravars.read_text()))
outcome = PlaybookRunner(run, work_dir=work, on_event=lambda event: None).run()
sys.exit(0 if outcome.status == "successful" else 1)
"""


def runner_only(run_dir: Path, n: int, playbook: Path, work: Path) -> float:
    path = release_vars(run_dir, f"runner-{n}")
    return timed([sys.executable, "-c", RUNNER_ONLY, str(run_dir / "inventory" / "fraisier.json"),
                  str(path), str(playbook), str(work)])  # fmt: skip


# ansible-runner as shipped, nothing of Fraisier: `ansible_runner.run()` in a fresh
# interpreter on a fresh private data dir holding the same inventory and extra vars.
RUNNER_AS_SHIPPED = """
import shutil, sys
from pathlib import Path
import ansible_runner
inventory, extravars, playbook, pdd = map(Path, sys.argv[1:])
shutil.copytree(inventory, pdd / "inventory")
(pdd / "env").mkdir()
shutil.copy(extravars, pdd / "env" / "extravars")
result = ansible_runner.run(private_data_dir=str(pdd), playbook=str(playbook), quiet=True)
sys.exit(0 if result.status == "successful" else 1)
"""


def runner_as_shipped(run_dir: Path, n: int, playbook: Path, work: Path) -> float:
    path = release_vars(run_dir, f"shipped-{n}")
    pdd = work / f"shipped-{n}"
    return timed([sys.executable, "-c", RUNNER_AS_SHIPPED, str(run_dir / "inventory"), str(path),
                  str(playbook), str(pdd)], env=ansible_env())  # fmt: skip


def minimal_playbook(run_dir: Path, n: int, hosts) -> float:
    extravars = json.loads((run_dir / "env" / "extravars").read_text())
    archive = extravars["fraise_release_archive"]["__ansible_unsafe"]
    variables = {"app_path": APP, "release_id": f"min-{n}-{int(time.time() * 1000)}",
                 "archive": archive, "service": "hello.service"}  # fmt: skip
    path = run_dir.parent / f"minimal-{n}.json"
    path.write_text(json.dumps(variables))
    return timed(["ansible-playbook", "-i", str(run_dir / "inventory"), "-f", str(len(hosts)),
                  "-e", f"@{path}", str(ROOT / "bench" / "minimal_release.yml")],
                 env=ansible_env())  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--overhead-runs",
        type=int,
        default=15,
        help="overhead rounds (default 15): single runs of the same play vary by a second or more",
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="fleet runs of each side per host count (default 5)"
    )
    parser.add_argument("--fleet", default="1,5,10", help="host counts (default 1,5,10)")
    args = parser.parse_args()
    fleet = [int(n) for n in args.fleet.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="fraisier-bench-"))
    os.environ["FRAISIER_DB_PATH"] = str(tmp / "fraisier.db")
    os.environ["FRAISIER_WORK_DIR"] = str(tmp / "work")
    root = ensure_root()
    # Byte-compile the package as `pip install` does: an editable checkout run with
    # PYTHONDONTWRITEBYTECODE would otherwise compile it in every timed `fraisier deploy`.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "fraisier")], check=True)
    hosts = boot_hosts(max(fleet), names=[f"bench-{i}" for i in range(max(fleet))], root=root)
    try:
        repo = make_repo(tmp)
        print(
            f"hosts booted: {len(hosts)}; overhead rounds: {args.overhead_runs}; "
            f"fleet runs per side: {args.runs}"
        )

        # -- overhead on one host -----------------------------------------------
        config = write_config(tmp, repo, hosts[:1], "one")
        fraisier_deploy(config)  # warm: unit installed, mirror made
        run_dir = latest_run_dir(tmp / "work")
        playbook = ROOT / "playbooks" / "api.yml"
        plain_playbook(run_dir, 0, playbook)
        f_times, r_times, s_times, p_times, floors = [], [], [], [], []
        runner_work = tmp / "runner-work"
        for i in range(args.overhead_runs):
            floors.append(import_floor())
            # Every other round runs in the reverse order: a drift of the machine's speed
            # within a round, or a cost one run leaves to the next, then favours no side.
            sides = ["fraisier", "runner", "shipped", "plain"]
            for side in reversed(sides) if i % 2 else sides:
                if side == "fraisier":
                    f_times.append(fraisier_deploy(config))
                    continue
                run_dir = latest_run_dir(tmp / "work")
                if side == "runner":
                    r_times.append(runner_only(run_dir, i + 1, playbook, runner_work))
                elif side == "shipped":
                    s_times.append(runner_as_shipped(run_dir, i + 1, playbook, runner_work))
                else:
                    p_times.append(plain_playbook(run_dir, i + 1, playbook))
        ratios = [f / p for f, p in zip(f_times, p_times, strict=True)]
        print("\n== Overhead: fraisier deploy vs ansible-playbook (same inventory, vars, playbook)")
        print(
            f"fraisier deploy   median {statistics.median(f_times):6.2f} s  "
            f"runs {' '.join(f'{t:.2f}' for t in f_times)}"
        )
        print(
            f"runner layer only median {statistics.median(r_times):6.2f} s  "
            f"runs {' '.join(f'{t:.2f}' for t in r_times)}"
        )
        print(
            f"ansible_runner.run median {statistics.median(s_times):5.2f} s  "
            f"runs {' '.join(f'{t:.2f}' for t in s_times)}"
        )
        print(
            f"ansible-playbook  median {statistics.median(p_times):6.2f} s  "
            f"runs {' '.join(f'{t:.2f}' for t in p_times)}"
        )
        ratio = statistics.median(ratios)
        print(f"median ratio {ratio:.3f} (target <= 1.05: {'PASS' if ratio <= 1.05 else 'FAIL'})")
        runner_ratio = statistics.median(r / p for r, p in zip(r_times, p_times, strict=True))
        print(
            f"runner layer only / ansible-playbook: median ratio {runner_ratio:.3f}"
            " (fraisier/runner.py in a fresh interpreter: no CLI, config, store or git)"
        )
        shipped_ratio = statistics.median(s / p for s, p in zip(s_times, p_times, strict=True))
        print(
            f"ansible_runner.run / ansible-playbook: median ratio {shipped_ratio:.3f}"
            " (ansible-runner as shipped, nothing of Fraisier)"
        )
        floor = statistics.median(floors)
        beyond = statistics.median(
            (f - t) / p for f, p, t in zip(f_times, p_times, floors, strict=True)
        )
        print(
            f"required imports alone (python -c '{REQUIRED_IMPORTS}'): median {floor:.3f} s"
            f" = {floor / statistics.median(p_times):.1%} of the ansible-playbook median;"
            f" ratio without them {beyond:.3f}"
        )

        # -- fleet ---------------------------------------------------------------
        print("\n== Fleet: fraisier deploy vs hand-written minimal playbook, same hosts")
        walls = {}
        for n in fleet:
            config = write_config(tmp, repo, hosts[:n], f"fleet{n}")
            fraisier_deploy(config)  # first deploy of these hosts installs the unit
            # Alternating pairs, as above: on a shared machine one pair says little.
            pairs = []
            for i in range(args.runs):
                if i % 2:
                    m = minimal_playbook(latest_run_dir(tmp / "work"), n * 100 + i, hosts[:n])
                    f = fraisier_deploy(config)
                else:
                    f = fraisier_deploy(config)
                    m = minimal_playbook(latest_run_dir(tmp / "work"), n * 100 + i, hosts[:n])
                pairs.append((f, m))
            f = statistics.median(p[0] for p in pairs)
            m = statistics.median(p[1] for p in pairs)
            ratio = statistics.median(p[0] / p[1] for p in pairs)
            walls[n] = f
            verdict = "PASS" if ratio <= 1.2 else "FAIL"
            print(
                f"{n:3d} hosts: fraisier {f:6.2f} s   minimal playbook {m:6.2f} s   "
                f"median ratio {ratio:.2f} (target <= 1.2: {verdict})   "
                f"runs {' '.join(f'{a:.2f}/{b:.2f}' for a, b in pairs)}"
            )
        if 1 in walls and max(fleet) in walls:
            print(f"{max(fleet)}/1 hosts wall-time ratio: {walls[max(fleet)] / walls[1]:.2f}")
        print(f"load average: {Path('/proc/loadavg').read_text().strip()}")
    finally:
        stop_hosts(hosts)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
