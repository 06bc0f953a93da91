"""The read-side CLI through Click's CliRunner, on a temp store and a temp fraises.yaml."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from fraisier.cli import cli
from fraisier.store import Store

CONFIG = """
git:
  provider: github
  github:
    webhook_secret: ${FRAISIER_WEBHOOK_SECRET}
ansible:
  vars:
    ansible_become_password: hunter22
fraises:
  my_service:
    type: api
    description: My GraphQL API
    environments:
      production:
        name: api.example.com
        branch: main
        app_path: /var/www/api
        systemd_service: api.service
        health_check:
          url: https://api.example.com/health
      staging:
        branch: develop
        app_path: /var/www/api
        hosts: [s1, s2]
  etl_job:
    type: etl
    environments:
      production:
        script_path: scripts/etl/run_etl
branch_mapping:
  main:
    fraise: my_service
    environment: production
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    cfg = tmp_path / "fraises.yaml"
    cfg.write_text(textwrap.dedent(CONFIG))
    db = tmp_path / "state" / "fraisier.db"
    monkeypatch.setenv("FRAISIER_CONFIG", str(cfg))
    monkeypatch.setenv("FRAISIER_DB_PATH", str(db))
    monkeypatch.delenv("FRAISIER_DATABASE_URL", raising=False)
    monkeypatch.setenv("FRAISIER_WEBHOOK_SECRET", "topsecret-value")
    monkeypatch.chdir(tmp_path)
    return {"config": cfg, "db": db}


def seed(db_path):
    with Store.open(db_path) as store:
        ids = []
        for fraise, env, status, commit in [
            ("my_service", "production", "successful", "a" * 40),
            ("my_service", "production", "failed", "b" * 40),
            ("my_service", "staging", "successful", "c" * 40),
            ("etl_job", "production", "rolled_back", "d" * 40),
        ]:
            did = store.create_deployment(
                fraise=fraise, environment=env, trigger="cli", commit=commit, branch="main"
            )
            store.transition(did, "running")
            store.transition(did, status, error="boom" if status != "successful" else None)
            ids.append(did)
        return ids


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_list_json_shape(env):
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [d["fraise"] for d in data] == ["my_service", "etl_job"]
    svc = data[0]
    assert svc["type"] == "api"
    assert svc["environments"][0] == {
        "name": "production",
        "branch": "main",
        "hosts": ["api.example.com"],
    }
    assert svc["environments"][1]["hosts"] == ["s1", "s2"]


def test_list_table_is_aligned(env):
    result = invoke("list")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["FRAISE", "TYPE", "ENVIRONMENT", "BRANCH", "HOSTS"]
    assert lines[0].index("TYPE") == lines[1].index("api")
    assert "\x1b[" not in result.output


def test_list_works_without_the_webhook_secret(env, monkeypatch):
    monkeypatch.delenv("FRAISIER_WEBHOOK_SECRET")
    assert invoke("list").exit_code == 0


def test_status_and_history_json(env):
    ids = seed(env["db"])
    result = invoke("status", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {(r["fraise"], r["environment"], r["status"]) for r in rows} == {
        ("etl_job", "production", "rolled_back"),
        ("my_service", "production", "failed"),
        ("my_service", "staging", "successful"),
    }
    assert set(rows[0]) == {
        "fraise",
        "environment",
        "status",
        "commit",
        "branch",
        "deployment_id",
        "started_at",
        "completed_at",
    }
    assert rows[0]["completed_at"].endswith("Z")

    hist = json.loads(invoke("history", "my_service", "--json").output)
    assert [h["id"] for h in hist] == [ids[2], ids[1], ids[0]]
    assert set(hist[0]) == {
        "id",
        "fraise",
        "environment",
        "status",
        "trigger",
        "commit",
        "branch",
        "dry_run",
        "started_at",
        "completed_at",
        "error",
    }
    failed = json.loads(invoke("history", "--status", "failed", "--json").output)
    assert [h["id"] for h in failed] == [ids[1]]
    limited = json.loads(invoke("history", "--limit", "2", "--json").output)
    assert len(limited) == 2


def test_status_on_a_fresh_machine_writes_nothing(env):
    result = invoke("status")
    assert result.exit_code == 0
    assert not env["db"].exists()
    assert not env["db"].parent.exists()


def test_unknown_fraise_or_environment_is_one_line_exit_1(env):
    result = CliRunner().invoke(cli, ["status", "nope"])
    assert result.exit_code == 1
    assert "unknown fraise 'nope'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, ["history", "my_service", "qa"])
    assert result.exit_code == 1
    assert "qa" in result.output


def test_bad_status_filter_is_a_usage_error(env):
    assert CliRunner().invoke(cli, ["history", "--status", "great"]).exit_code == 2


def test_config_show_masks_secrets(env):
    result = invoke("config", "show", "--json")
    assert result.exit_code == 0
    assert "topsecret-value" not in result.output
    assert "hunter22" not in result.output
    data = json.loads(result.output)
    assert data["git"]["github"]["webhook_secret"] in ("***", ["***"])
    text = invoke("config", "show").output
    assert "topsecret-value" not in text and "***" in text


def test_config_validate_ok_and_strict(env, tmp_path, monkeypatch):
    result = invoke("config", "validate")
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
    monkeypatch.delenv("FRAISIER_WEBHOOK_SECRET")
    warn = CliRunner().invoke(cli, ["config", "validate"])
    assert warn.exit_code == 0
    assert "FRAISIER_WEBHOOK_SECRET" in warn.output
    strict = CliRunner().invoke(cli, ["config", "validate", "--strict"])
    assert strict.exit_code == 1
    assert "FRAISIER_WEBHOOK_SECRET" in strict.output


def test_config_validate_reports_line(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """
            fraises:
              svc:
                type: api
                environments:
                  production:
                    health_check:
                      url: http://x/health
                      retries: five
            """
        )
    )
    result = CliRunner().invoke(cli, ["config", "validate", "--file", str(bad)])
    assert result.exit_code == 1
    assert "fraises.svc.environments.production.health_check.retries" in result.output
    assert "bad.yaml:9" in result.output
    as_json = CliRunner().invoke(cli, ["config", "validate", "--file", str(bad), "--json"])
    assert json.loads(as_json.output)["valid"] is False


def test_malformed_yaml_is_one_line(env, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("fraises:\n  a: [1, 2\n")
    result = CliRunner().invoke(cli, ["-c", str(bad), "list"])
    assert result.exit_code == 1
    assert "broken.yaml" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unreadable_database_is_one_line(env):
    env["db"].parent.mkdir(parents=True)
    env["db"].write_bytes(b"this is not a database at all" * 100)
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1
    assert str(env["db"]) in result.output
    assert len(result.output.strip().splitlines()) == 1


READ_COMMANDS = [
    ["--help"],
    ["list"],
    ["status"],
    ["history", "--limit", "5"],
    ["config", "show"],
    ["config", "validate"],
]


@pytest.mark.parametrize("args", READ_COMMANDS, ids=lambda a: " ".join(a))
def test_read_commands_import_neither_ansible_nor_flask(env, args):
    code = (
        "import sys\n"
        "from fraisier.cli import cli\n"
        "try:\n"
        f"    cli({args!r}, prog_name='fraisier')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('ansible', 'ansible_runner', 'flask', 'werkzeug'))\n"
        "print('LOADED:' + ','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "LOADED:"


def test_deploy_without_a_branch_names_the_key_and_writes_nothing(env, tmp_path):
    cfg = tmp_path / "nobranch.yaml"
    cfg.write_text(
        "fraises:\n  svc:\n    type: api\n    repository: /nonexistent/repo\n"
        "    environments:\n      prod: {name: web1, app_path: /srv/svc}\n"
    )
    result = CliRunner().invoke(cli, ["-c", str(cfg), "deploy", "svc", "prod"])
    assert result.exit_code == 1
    assert "fraises.svc.environments.prod.branch is not set" in result.output
    assert not env["db"].exists()


def test_deploy_of_an_unknown_environment_is_one_line(env):
    result = CliRunner().invoke(cli, ["deploy", "my_service", "qa"])
    assert result.exit_code == 1
    assert "'qa'" in result.output and len(result.output.strip().splitlines()) == 1
    assert not env["db"].exists()


def test_console_entry_point_keeps_output_exit_codes_and_atexit(env, tmp_path):
    marker = tmp_path / "atexit-ran"
    # main() ends with os._exit: everything printed must still arrive, the exit code must
    # be the command's, and atexit handlers must still run.
    code = (
        "import atexit, pathlib, sys\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
        "from fraisier.cli import main\n"
        "sys.argv = ['fraisier'] + sys.argv[1:]\n"
        "main()\n"
    )
    ok = subprocess.run(
        [sys.executable, "-c", code, "history", "--limit", "500", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == []
    assert marker.read_text() == "yes"

    bad = tmp_path / "bad.yaml"
    bad.write_text("fraises:\n  svc:\n    type: nope\n")
    failed = subprocess.run(
        [sys.executable, "-c", code, "config", "validate", "--file", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode != 0
    assert "fraises.svc.type" in failed.stderr + failed.stdout
    usage = subprocess.run(
        [sys.executable, "-c", code, "no-such-command"], capture_output=True, text=True
    )
    assert usage.returncode == 2 and "No such command" in usage.stderr
