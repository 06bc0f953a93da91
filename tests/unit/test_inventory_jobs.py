"""Role variables of etl, scheduled and backup fraises, and the bad input they refuse."""

from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner

from fraisier.cli import cli
from fraisier.config import load_config
from fraisier.errors import ConfigError
from fraisier.inventory import DeploymentRequest, build_extravars, job_units, role_vars

CONFIG = """
fraises:
  reports:
    type: scheduled
    repository: /srv/git/reports.git
    environments:
      production:
        name: reports.example.com
        app_path: /opt/reports
        vars:
          env: {REPORT_LANG: fr, DEBUG: false, EMPTY: null}
        jobs:
          daily_stats:
            schedule: "0 2 * * *"
            command: ./bin/daily-stats
            user: reports
            systemd_service: reports-daily-stats.service
            persistent: true
            randomized_delay: 300
          friday13:
            schedule: "0 0 13 * fri"
            script_path: bin/friday
            depends_on: [daily_stats]
            enabled: false
            persistent: false
            description: Friday or the 13th
  db_backups:
    type: backup
    repository: /srv/git/backups.git
    environments:
      production:
        name: db.example.com
        app_path: /opt/backups
        jobs:
          dump:
            schedule: "@daily"
            script_path: scripts/backup_db
            backup_dir: /var/backups/shop
            retention_days: 7
          offsite:
            schedule: "0 */6 * * *"
            script_path: scripts/sync_offsite
            backup_dir: /var/backups/shop
            remote: backup@vault.example.com:/srv/backups/shop
            depends_on: dump
  nightly_etl:
    type: etl
    repository: /srv/git/etl.git
    environments:
      production:
        name: etl.example.com
        app_path: /opt/etl
        script_path: scripts/run_etl
        run_on: all
        timeout: 900
        database: {name: warehouse}
        vars:
          env: {BATCH: "500"}
"""


def load(tmp_path, text=CONFIG):
    path = tmp_path / "fraises.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, environ={})


def vars_for(config, fraise, env="production"):
    return role_vars(config.fraise(fraise), config.environment(fraise, env))


def test_scheduled_jobs_are_converted_for_the_role(tmp_path):
    out = vars_for(load(tmp_path), "reports")
    assert out["fraise_release_app_path"] == "/opt/reports"
    assert "fraise_scheduled_config" not in out
    assert out["fraise_scheduled_environment"] == {
        "REPORT_LANG": "fr",
        "DEBUG": "false",
        "EMPTY": "",
    }
    daily, friday = out["fraise_scheduled_jobs"]
    assert daily == {
        "name": "daily_stats",
        "service": "reports-daily-stats.service",
        "timer": "reports-daily-stats.timer",
        "schedule": "0 2 * * *",
        "on_calendar": ["*-*-* 02:00:00"],
        "command": "./bin/daily-stats",
        "user": "reports",
        "persistent": True,
        "randomized_delay": 300,
        "enabled": True,
        "requires": [],
    }
    assert friday == {
        "name": "friday13",
        "service": "reports-friday13.service",
        "timer": "reports-friday13.timer",
        "schedule": "0 0 13 * fri",
        # Cron's "13th or Friday": one line per day field.
        "on_calendar": ["Fri *-*-* 00:00:00", "*-*-13 00:00:00"],
        "description": "Friday or the 13th",
        "script_path": "bin/friday",
        "persistent": False,
        "enabled": False,
        "requires": ["reports-daily-stats.service"],
    }


def test_backup_jobs_carry_retention_and_remote(tmp_path):
    out = vars_for(load(tmp_path), "db_backups")
    dump, offsite = out["fraise_backup_jobs"]
    assert dump["service"] == "db_backups-dump.service"
    assert dump["on_calendar"] == ["*-*-* 00:00:00"]
    assert (dump["backup_dir"], dump["retention_days"]) == ("/var/backups/shop", 7)
    assert "remote" not in dump
    assert offsite["remote"] == "backup@vault.example.com:/srv/backups/shop"
    assert offsite["on_calendar"] == ["*-*-* 00/6:00:00"]
    assert offsite["requires"] == ["db_backups-dump.service"]
    assert out["fraise_backup_environment"] == {}


def test_etl_variables(tmp_path):
    out = vars_for(load(tmp_path), "nightly_etl")
    assert {k: v for k, v in out.items() if k.startswith("fraise_etl_")} == {
        "fraise_etl_script_path": "scripts/run_etl",
        "fraise_etl_run_on": "all",
        "fraise_etl_timeout": 900,
        "fraise_etl_environment": {"BATCH": "500"},
        "fraise_etl_database": "warehouse",
    }


def test_extravars_keep_job_variables_trusted(tmp_path):
    config = load(tmp_path)
    request = DeploymentRequest(
        deployment_id=1,
        fraise="reports",
        environment="production",
        commit="a" * 40,
        release_id="20261127T034501Z-aaaaaaaaaaaa",
        archive_path="/tmp/r.tar.gz",
    )
    extra = build_extravars(
        config.fraise("reports"), config.environment("reports", "production"), request
    )
    # Config strings stay plain (trusted); the request's are wrapped.
    assert extra["fraise_scheduled_jobs"][0]["command"] == "./bin/daily-stats"
    assert extra["fraise_release_id"] == {"__ansible_unsafe": request.release_id}


def replace(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "script_path: scripts/run_etl\n",
            "\n",
            "fraises.nightly_etl.environments.production.script_path is not set",
        ),
        (
            "script_path: scripts/run_etl\n",
            "script_path: ../outside\n",
            "fraises.nightly_etl.environments.production.script_path: '../outside' must be a"
            " path inside the release",
        ),
        (
            "systemd_service: reports-daily-stats.service",
            "systemd_service: reports-daily-stats",
            "fraises.reports.environments.production.jobs.daily_stats: 'reports-daily-stats'"
            " is not a valid systemd service unit name",
        ),
        (
            "systemd_service: reports-daily-stats.service",
            "systemd_service: reports-friday13.service",
            "fraises.reports.environments.production.jobs.friday13: unit"
            " reports-friday13.service is already used by job daily_stats",
        ),
        (
            "            command: ./bin/daily-stats\n            user: reports\n"
            "            systemd_service: reports-daily-stats.service\n",
            "",
            "fraises.reports.environments.production.jobs.daily_stats: give script_path or command",
        ),
        (
            "remote: backup@vault.example.com:/srv/backups/shop",
            "remote: -e sh:/x",
            "fraises.db_backups.environments.production.jobs.offsite.remote: '-e sh:/x' is not"
            " an rsync destination",
        ),
        (
            "remote: backup@vault.example.com:/srv/backups/shop",
            "remote: vault.example.com::shop",
            "fraises.db_backups.environments.production.jobs.offsite.remote:"
            " 'vault.example.com::shop' is not an rsync destination",
        ),
        (
            'env: {BATCH: "500"}',
            'env: {BATCH-SIZE: "500"}',
            "fraises.nightly_etl.environments.production.vars.env: 'BATCH-SIZE' is not an"
            " environment variable name",
        ),
    ],
)
def test_bad_job_settings_are_config_errors(tmp_path, old, new, message):
    config = load(tmp_path, replace(CONFIG, old, new))
    fraise = next(f for f in config.fraises if message.startswith(f"fraises.{f}."))
    with pytest.raises(ConfigError) as err:
        vars_for(config, fraise)
    assert str(err.value).startswith(message)


def test_too_long_unit_name_is_refused(tmp_path):
    config = load(tmp_path, replace(CONFIG, "  friday13:", "  " + "f" * 250 + ":"))
    with pytest.raises(ConfigError, match=r"jobs\.f+: 'reports-f+\.service' is not a valid"):
        job_units(config.fraise("reports"), config.environment("reports", "production"))


def test_invalid_cron_names_fraise_environment_job_and_field(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAISIER_DB_PATH", str(tmp_path / "state" / "fraisier.db"))
    path = tmp_path / "fraises.yaml"
    path.write_text(textwrap.dedent(replace(CONFIG, '"0 */6 * * *"', '"0 */6 * 13 *"')))
    result = CliRunner().invoke(cli, ["-c", str(path), "deploy", "db_backups", "production"])
    assert result.exit_code != 0
    assert (
        "fraises.db_backups.environments.production.jobs.offsite.schedule: invalid cron"
        " expression '0 */6 * 13 *': month 13 out of range 1-12"
    ) in result.output


def test_job_name_that_is_no_unit_name_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAISIER_DB_PATH", str(tmp_path / "state" / "fraisier.db"))
    path = tmp_path / "fraises.yaml"
    path.write_text(textwrap.dedent(replace(CONFIG, "  friday13:", "  friday/13:")))
    result = CliRunner().invoke(cli, ["-c", str(path), "deploy", "reports", "production"])
    assert result.exit_code != 0
    assert "jobs.friday/13: invalid job name 'friday/13'" in result.output
    # Refused while reading the config: no store, no deployment row, no run.
    assert not (tmp_path / "state").exists()
