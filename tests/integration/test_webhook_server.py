"""`fraisier-webhook` as a real process over loopback HTTP: payloads, queue, crash safety.

Deployments run a user playbook on localhost (local connection) from a real local git
repository; a gate file lets a test hold a deployment while it is running.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fraisier.git import sign_headers
from fraisier.runner import processes_mentioning
from fraisier.store import Store

SECRET = "integration-secret"

PLAYBOOK = """
- name: Deploy for the webhook tests
  hosts: fraisier_targets
  gather_facts: false
  tasks:
    - name: Say the deployment started
      ansible.builtin.copy:
        content: "{{{{ fraisier_commit }}}}"
        dest: "{out}/started-{{{{ fraisier_fraise }}}}-{{{{ fraisier_deployment_id }}}}"
        mode: "0644"
    - name: Wait for the gate
      ansible.builtin.wait_for:
        path: "{gate}"
        timeout: 120
    - name: Say the deployment is done
      ansible.builtin.copy:
        content: "{{{{ fraisier_commit }}}}"
        dest: "{out}/done-{{{{ fraisier_fraise }}}}-{{{{ fraisier_deployment_id }}}}"
        mode: "0644"
"""

CONFIG = """
git:
  max_body_bytes: 200000
  github: {{webhook_secret: {secret}}}
  gitlab: {{secret_token: {secret}}}
  gitea: {{webhook_secret: {secret}}}
  bitbucket: {{webhook_secret: {secret}}}
fraises:
  app:
    type: api
    repository: {repo}
    environments:
      production: &env
        branch: master
        app_path: {out}/app
        playbook: {playbook}
        hosts:
          localhost:
            ansible_connection: local
            ansible_python_interpreter: {python}
  svc:
    type: api
    repository: {repo}
    environments:
      production: *env
branch_mapping:
  master:
    - {{fraise: app, environment: production}}
    - {{fraise: svc, environment: production}}
  name-of-branch: {{fraise: app, environment: production}}
"""


def payloads_dir() -> Path:
    """The shared payloads folder beside the repository checkout (or $FRAISIER_PAYLOADS_DIR)."""
    override = os.environ.get("FRAISIER_PAYLOADS_DIR")
    path = (
        Path(override) if override else Path(__file__).resolve().parents[2] / "../shared/payloads"
    )
    path = path.resolve()
    if not (path / "github" / "push.json").is_file():
        pytest.fail(f"webhook payloads not found at {path}; set FRAISIER_PAYLOADS_DIR")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


class Server:
    """One fraisier-webhook process tree on a loopback port."""

    def __init__(self, root: Path, port: int, args: list[str]):
        self.root = root
        self.port = port
        env = {
            **os.environ,
            "FRAISIER_DB_PATH": str(root / "fraisier.db"),
            "FRAISIER_WORK_DIR": str(root / "work"),
            "FRAISIER_CONFIG": str(root / "fraises.yaml"),
        }
        env.pop("FRAISIER_DATABASE_URL", None)
        env.pop("FRAISIER_GIT_PROVIDER", None)
        script = Path(sys.executable).with_name("fraisier-webhook")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "fraisier.web"]
        self.log = (root / f"server-{port}.log").open("ab")
        self.proc = subprocess.Popen(
            [*command, "--port", str(port), "--http-workers", "2", *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.read_log()}")
            with contextlib.suppress(OSError):
                status, _ = self.request("GET", "/health")
                if status == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"server not healthy in time: {self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return (self.root / f"server-{self.port}.log").read_text(errors="replace")[-4000:]

    def request(self, method, path, body=None, headers=None, conn=None):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, (json.loads(data) if data else None)
        finally:
            if own:
                conn.close()

    def push(self, provider, body, *, event=None, delivery, secret=SECRET, conn=None):
        headers = sign_headers(provider, body, secret, delivery, event)
        return self.request("POST", "/webhook", body, headers, conn)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill_group()
        self.log.close()

    def kill(self) -> None:
        """kill -9 of the main process only, as a crash would."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait_port_free(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)
        raise AssertionError(f"port {self.port} still answers after the server died")


@pytest.fixture
def site(tmp_path):
    """A git repository with three commits, a gated playbook and a fraises.yaml."""
    if (
        shutil.which("ansible-playbook") is None
        and not Path(sys.executable).with_name("ansible-playbook").exists()
    ):
        pytest.fail("ansible-playbook is not installed beside the test interpreter")
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "master")
    git(repo, "config", "user.email", "t@example.org")
    git(repo, "config", "user.name", "T")
    made = []
    for n in (1, 2, 3):
        (repo / "file.txt").write_text(f"version {n}\n")
        git(repo, "add", "file.txt")
        git(repo, "commit", "-q", "-m", f"version {n}")
        made.append(git(repo, "rev-parse", "HEAD"))
    out = tmp_path / "out"
    out.mkdir()
    playbook = tmp_path / "deploy.yml"
    playbook.write_text(PLAYBOOK.format(out=out, gate=tmp_path / "gate"))
    (tmp_path / "fraises.yaml").write_text(
        textwrap.dedent(
            CONFIG.format(
                secret=SECRET, repo=repo, out=out, playbook=playbook, python=sys.executable
            )
        )
    )
    servers: list[Server] = []

    class Site:
        root = tmp_path
        commits = made
        gate = tmp_path / "gate"
        out_dir = out

        @staticmethod
        def start(*args: str) -> Server:
            server = Server(tmp_path, free_port(), list(args))
            servers.append(server)
            return server

        @staticmethod
        def push_body(commit: str, branch: str = "master") -> bytes:
            data = json.loads((payloads_dir() / "github/push_new_branch.json").read_bytes())
            data["ref"] = f"refs/heads/{branch}"
            data["after"] = data["head_commit"]["id"] = commit
            return json.dumps(data).encode()

        @staticmethod
        def store() -> Store:
            return Store.open(tmp_path / "fraisier.db")

    yield Site
    Site.gate.touch()
    for server in servers:
        server.stop()
    # ansible-playbook detaches into its own session: find its processes by our folder.
    for pid in processes_mentioning(str(tmp_path)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout} s")


def statuses(store: Store, ids) -> dict[int, str]:
    return {i: store.deployment(i)["status"] for i in ids}


# --------------------------------------------------------------------------- payloads over HTTP

PAYLOADS = [
    ("github", "github/push_new_branch.json", "push", 202),
    ("github", "github/push.json", "push", 200),
    ("github", "github/ping.json", "ping", 200),
    ("github", "github/delete.json", "delete", 200),
    ("gitlab", "gitlab/push.json", "Push Hook", 202),
    ("gitlab", "gitlab/tag_push.json", "Tag Push Hook", 200),
    ("gitea", "gitea/push.json", "push", 202),
    ("forgejo", "gitea/push.json", "push", 202),
    ("gitea", "gitea/create.json", "create", 200),
    ("gitea", "gitea/delete.json", "delete", 200),
    ("bitbucket", "bitbucket-cloud/repo_push.json", "repo:push", 202),
    ("bitbucket-server", "bitbucket-server/repo_refs_changed.json", "repo:refs_changed", 200),
]


def test_every_payload_through_the_real_server(site):
    server = site.start("--no-deploy")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    queued_ids = []
    for n, (provider, name, event, code) in enumerate(PAYLOADS):
        body = (payloads_dir() / name).read_bytes()
        status, answer = server.push(provider, body, event=event, delivery=f"p-{n}", conn=conn)
        assert status == code, (provider, name, answer)
        queued_ids += [d["id"] for d in answer["deployments"]]
        # The same delivery again, over the same kept-alive connection: a duplicate.
        status, again = server.push(provider, body, event=event, delivery=f"p-{n}", conn=conn)
        assert (status, again["status"]) == (200, "duplicate"), (provider, name)
        # Signed with the wrong secret: refused.
        status, refused = server.push(
            provider, body, event=event, delivery=f"bad-{n}", secret="wrong", conn=conn
        )
        assert status == 401, (provider, name, refused)
    conn.close()
    with site.store() as store:
        rows = store.history(limit=None)
        assert sorted(r["id"] for r in rows) == sorted(queued_ids)
        events = store.webhook_events(limit=1000)
        assert sorted(e["delivery_id"] for e in events if e["delivery_id"]) == sorted(
            f"p-{n}" for n in range(len(PAYLOADS))
        )
        assert sum(e["outcome"] == "rejected" for e in events) == len(PAYLOADS)


def test_body_cap_holds_over_real_http(site):
    server = site.start("--no-deploy")
    body = b'{"pad": "' + b"x" * 300_000 + b'"}'
    headers = sign_headers("github", body, SECRET, "big-1", "push")
    status, answer = server.request("POST", "/webhook", body, headers)
    assert status == 413, answer
    # Chunked, without Content-Length: the read itself is capped.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST", "/webhook", body=iter([body[i : i + 50_000] for i in range(0, len(body), 50_000)]),
        headers=headers, encode_chunked=True,
    )  # fmt: skip
    response = conn.getresponse()
    assert response.status == 413
    conn.close()
    for bad in (b"not json", b"[1, 2]", b'{"a":' * 3000 + b"1" + b"}" * 3000):
        status, answer = server.push("github", bad, event="push", delivery="bad")
        assert status == 400, answer
    with site.store() as store:
        assert store.history(limit=None) == []


# --------------------------------------------------------------------------- the queue


def test_push_deploys_the_pushed_commit_in_parallel_pairs(site):
    server = site.start("--workers", "2")
    old, _, _ = site.commits
    # An older commit than the branch head: the pushed one must be what is deployed.
    status, answer = server.push("github", site.push_body(old), event="push", delivery="run-1")
    assert status == 202, answer
    ids = [d["id"] for d in answer["deployments"]]
    assert len(ids) == 2
    # Both pairs reach the gate together: they run in parallel.
    started = [site.out_dir / f"started-{f}-{i}" for f, i in zip(("app", "svc"), ids, strict=True)]
    wait_for(lambda: all(path.exists() for path in started), what="both deployments running")
    with site.store() as store:
        assert set(statuses(store, ids).values()) == {"running"}
    site.gate.touch()
    with site.store() as store:
        wait_for(
            lambda: set(statuses(store, ids).values()) == {"successful"},
            what="both deployments successful",
        )
        for fraise, deployment_id in zip(("app", "svc"), ids, strict=True):
            assert (site.out_dir / f"done-{fraise}-{deployment_id}").read_text() == old
            assert store.deployment(deployment_id)["commit"] == old
    status, detail = server.request("GET", f"/api/deployments/{ids[0]}")
    assert status == 200
    assert detail["hosts"][0]["host"] == "localhost"
    assert detail["events"]


def test_newer_push_supersedes_the_queued_one_and_cli_lock_is_waited_for(site):
    server = site.start("--workers", "1")
    c1, c2, c3 = site.commits
    with site.store() as store:
        # A `fraisier deploy` of svc elsewhere holds its lock: the worker must wait, not fail.
        store.acquire_lock("svc", "production", holder="elsewhere:1", lease_seconds=300)
    _, first = server.push("github", site.push_body(c1), delivery="s-1")
    app_first, svc_first = (d["id"] for d in first["deployments"])
    wait_for(lambda: (site.out_dir / f"started-app-{app_first}").exists(), what="first running")
    _, second = server.push("github", site.push_body(c2), delivery="s-2")
    _, third = server.push("github", site.push_body(c3), delivery="s-3")
    app_second, svc_second = (d["id"] for d in second["deployments"])
    app_third, svc_third = (d["id"] for d in third["deployments"])
    with site.store() as store:
        assert statuses(store, [app_first, svc_first, app_second, svc_second]) == {
            app_first: "running",
            svc_first: "superseded",
            app_second: "superseded",
            svc_second: "superseded",
        }
        site.gate.touch()
        wait_for(lambda: store.deployment(app_third)["status"] == "successful", what="app c3")
        assert store.deployment(app_first)["status"] == "successful"
        # svc is still locked by the CLI: its newest push waits in the queue.
        assert store.deployment(svc_third)["status"] == "queued"
        store.release_lock("svc", "production", holder="elsewhere:1")
        wait_for(lambda: store.deployment(svc_third)["status"] == "successful", what="svc c3")
        assert (site.out_dir / f"done-svc-{svc_third}").read_text() == c3
    # Superseded deployments never ran.
    for never in (svc_first, app_second, svc_second):
        assert not list(site.out_dir.glob(f"started-*-{never}"))


def test_kill_9_then_restart_runs_accepted_and_interrupts_running(site):
    server = site.start("--workers", "1")
    c1 = site.commits[0]
    status, answer = server.push("github", site.push_body(c1), delivery="crash-1")
    assert status == 202
    running_id, waiting_id = (d["id"] for d in answer["deployments"])
    wait_for(lambda: (site.out_dir / f"started-app-{running_id}").exists(), what="running")
    with site.store() as store:
        assert statuses(store, [running_id, waiting_id]) == {
            running_id: "running",
            waiting_id: "queued",
        }
    server.kill()
    server.wait_port_free()
    # The orphaned playbook of the killed receiver must not finish the deployment's story.
    for pid in processes_mentioning(str(site.root / "work")):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    site.gate.touch()
    restarted = site.start("--workers", "1")
    with site.store() as store:
        wait_for(
            lambda: store.deployment(waiting_id)["status"] == "successful",
            what="accepted deployment run after restart",
        )
        interrupted = store.deployment(running_id)
        assert interrupted["status"] == "interrupted"
        assert "gone" in interrupted["error"]
    # The redelivery of the same push after the restart is still a duplicate.
    status, again = restarted.push("github", site.push_body(c1), delivery="crash-1")
    assert (status, again["status"]) == (200, "duplicate")
