"""Reading and validating fraises.yaml."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fraisier.config as config_module
from fraisier.config import (
    SECRET_MASK,
    Config,
    Environment,
    Target,
    find_config_path,
    load_config,
)
from fraisier.errors import ConfigError, NotFoundError

REPO = Path(__file__).resolve().parents[2]

SEED = """\
git:
  provider: github
  github:
    webhook_secret: ${FRAISIER_WEBHOOK_SECRET}
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
        database:
          name: myapp_production
          strategy: apply
        health_check:
          url: https://api.example.com/health
  etl_job:
    type: etl
    environments:
      production:
        script_path: scripts/etl/run_etl
        database: { name: myapp_prod }
  stats:
    type: scheduled
    environments:
      production:
        jobs:
          daily_stats:
            schedule: "0 2 * * *"
            systemd_service: stats.service
            systemd_timer: stats.timer
  backups:
    type: backup
    environments:
      production:
        jobs:
          db_backup:
            schedule: "0 */6 * * *"
            script_path: scripts/backup_db
            retention_days: 7
branch_mapping:
  main:
    fraise: my_service
    environment: production
"""

SECRET_ENV = {"FRAISIER_WEBHOOK_SECRET": "s3cret-value"}

MINIMAL = """\
fraises:
  app:
    type: api
    environments:
      production:
        name: app.example.com
{extra}
"""


def write(tmp_path: Path, text: str, name: str = "fraises.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str, environ=None, strict: bool = False) -> Config:
    return load_config(write(tmp_path, text), environ=environ or {}, strict=strict)


def problems(tmp_path: Path, text: str, environ=None, strict: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, environ, strict)
    assert caught.value.message == caught.value.problems[0]
    assert "\n" not in caught.value.message
    return caught.value.problems


def env_text(body: str) -> str:
    """MINIMAL with `body` added to fraises.app.environments.production."""
    extra = textwrap.indent(textwrap.dedent(body), " " * 8)
    return MINIMAL.format(extra=extra)


# --------------------------------------------------------------------------- the seed


def test_seed_validates_with_secret_set(tmp_path):
    config = load(tmp_path, SEED, SECRET_ENV)
    assert config.warnings == ()
    assert config.path == tmp_path / "fraises.yaml"
    assert list(config.fraises) == ["my_service", "etl_job", "stats", "backups"]
    service = config.fraise("my_service")
    assert (service.name, service.type, service.description) == (
        "my_service",
        "api",
        "My GraphQL API",
    )
    prod = config.environment("my_service", "production")
    assert isinstance(prod, Environment)
    assert (prod.key, prod.fraise, prod.name, prod.branch) == (
        "production",
        "my_service",
        "api.example.com",
        "main",
    )
    assert prod.app_path == "/var/www/api"
    assert prod.systemd_service == "api.service"
    assert prod.database.name == "myapp_production"
    assert prod.database.strategy == "apply"
    assert prod.health_check.url == "https://api.example.com/health"
    assert prod.health_check.status_code == (200,)
    assert prod.health_check.from_ == "host"
    assert prod.keep_releases == 5
    assert prod.hosts is None
    assert prod.host_names() == ["api.example.com"]
    assert config.environment("etl_job", "production").database.name == "myapp_prod"
    assert config.environment("etl_job", "production").script_path == "scripts/etl/run_etl"
    job = config.environment("stats", "production").jobs["daily_stats"]
    assert (job.key, job.systemd_service, job.systemd_timer) == (
        "daily_stats",
        "stats.service",
        "stats.timer",
    )
    assert job.cron.hour == (2,)
    backup = config.environment("backups", "production").jobs["db_backup"]
    assert backup.retention_days == 7
    assert backup.cron.hour == (0, 6, 12, 18)
    assert config.branch_mapping == {
        "main": (Target(fraise="my_service", environment="production"),)
    }
    assert config.targets_for_branch("main") == (
        Target(fraise="my_service", environment="production"),
    )
    assert config.webhook_secrets("github") == ("s3cret-value",)
    # No gitlab section: the FRAISIER_WEBHOOK_SECRET fallback applies.
    assert config.webhook_secrets("gitlab") == ("s3cret-value",)
    assert config.git.provider == "github"
    assert config.git.max_body_bytes == 25 * 1024 * 1024
    assert config.git.providers["github"].allow_sha1 is False


def test_seed_loads_with_secret_unset_and_fails_only_where_needed(tmp_path):
    config = load(tmp_path, SEED, {})
    assert config.warnings == (
        "git.github.webhook_secret: environment variable FRAISIER_WEBHOOK_SECRET is not set "
        "(fraises.yaml:4)",
    )
    assert config.fraise("stats").type == "scheduled"
    assert [(u.key_path, u.variable, u.line) for u in config.unresolved] == [
        ("git.github.webhook_secret", "FRAISIER_WEBHOOK_SECRET", 4)
    ]
    with pytest.raises(ConfigError) as caught:
        config.webhook_secrets("github")
    assert caught.value.message.startswith(
        "git.github.webhook_secret: environment variable FRAISIER_WEBHOOK_SECRET is not set"
    )
    # a deployment needs no webhook secret
    assert config.require_resolved("my_service", "production").key == "production"


def test_strict_turns_an_unset_variable_into_an_error(tmp_path):
    found = problems(tmp_path, SEED, {}, strict=True)
    assert found == [
        "git.github.webhook_secret: environment variable FRAISIER_WEBHOOK_SECRET is not set "
        "(fraises.yaml:4)"
    ]


# --------------------------------------------------------------------------- earlier spellings


def test_earlier_spellings(tmp_path):
    text = """\
    git:
      provider: gitlab
      gitlab:
        secret_token: !envvar GITLAB_TOKEN
      github:
        webhook_secret: !envvar GH_SECRET
    fraises:
      app:
        type: api
        clone_url: git@example.com:team/app.git
        environments:
          production:
            name: app.example.com
            branch: main
            health_check:
              url: https://app.example.com/health
              timeout: 30
              retries: 4
          staging:
            name: staging.example.com
            clone_url: /srv/git/app.git
    branch_mapping:
      main:
        - fraise: app
          environment: production
        - fraise: app
          environment: staging
    """
    config = load(tmp_path, text, {"GITLAB_TOKEN": "gl-token", "GH_SECRET": "gh"})
    assert config.warnings == ()
    assert config.webhook_secrets("gitlab") == ("gl-token",)
    assert config.webhook_secrets("github") == ("gh",)
    assert config.fraise("app").repository == "git@example.com:team/app.git"
    prod = config.environment("app", "production")
    assert prod.repository == "git@example.com:team/app.git"
    assert config.environment("app", "staging").repository == "/srv/git/app.git"
    assert (prod.health_check.timeout, prod.health_check.retries) == (30, 4)
    assert config.targets_for_branch("main") == (
        Target(fraise="app", environment="production"),
        Target(fraise="app", environment="staging"),
    )


def test_envvar_tag_unset_is_a_warning_and_an_error_when_used(tmp_path):
    text = """\
    git:
      gitlab:
        secret_token: !envvar GITLAB_TOKEN
    fraises: {}
    """
    config = load(tmp_path, text)
    assert config.warnings == (
        "git.gitlab.secret_token: environment variable GITLAB_TOKEN is not set (fraises.yaml:3)",
    )
    with pytest.raises(ConfigError, match=r"^git\.gitlab\.secret_token: .*GITLAB_TOKEN"):
        config.webhook_secrets("gitlab")


def test_repository_and_clone_url_together_is_an_error(tmp_path):
    text = env_text("repository: /a.git\nclone_url: /b.git\n")
    assert problems(tmp_path, text) == [
        "fraises.app.environments.production: give either repository or clone_url, not both "
        "(fraises.yaml:5)"
    ]


def test_webhook_secret_list_for_rotation_and_provider_fallbacks(tmp_path):
    text = """\
    git:
      provider: forgejo
      github:
        webhook_secret: [new-secret, old-secret]
        allow_sha1: true
      gitea:
        webhook_secret: gitea-secret
    fraises: {}
    """
    config = load(tmp_path, text)
    assert config.webhook_secrets("github") == ("new-secret", "old-secret")
    assert config.git.providers["github"].allow_sha1 is True
    assert config.webhook_secrets("forgejo") == ("gitea-secret",)
    assert config.webhook_secrets("bitbucket_server") == ()


def test_empty_webhook_secret_is_refused(tmp_path):
    text = "git:\n  github:\n    webhook_secret: ${S:-}\nfraises: {}\n"
    assert problems(tmp_path, text) == [
        "git.github.webhook_secret: a webhook secret cannot be empty (fraises.yaml:3)"
    ]


# --------------------------------------------------------------------------- ${VAR}


def test_variable_expansion_forms(tmp_path):
    text = env_text(
        """\
        app_path: ${APP_ROOT:-/srv}/app
        branch: ${BRANCH}
        vars:
          literal: "$${NOT_EXPANDED}"
          empty_default: "${EMPTY:-fallback}"
          shell: "echo $HOME $$"
          jinja: "{{ ansible_host }}"
        """
    )
    config = load(tmp_path, text, {"BRANCH": "release/2.0", "EMPTY": ""})
    env = config.environment("app", "production")
    assert env.app_path == "/srv/app"
    assert env.branch == "release/2.0"
    assert env.vars == {
        "literal": "${NOT_EXPANDED}",
        "empty_default": "fallback",
        "shell": "echo $HOME $$",
        "jinja": "{{ ansible_host }}",
    }
    assert config.warnings == ()


def test_invalid_variable_reference(tmp_path):
    text = env_text("app_path: ${not a name}\n")
    assert problems(tmp_path, text) == [
        "fraises.app.environments.production.app_path: invalid variable reference "
        "'${not a name}' (fraises.yaml:7)"
    ]


def test_unset_variable_where_a_number_is_needed_names_the_variable(tmp_path):
    text = env_text("keep_releases: ${KEEP}\n")
    assert problems(tmp_path, text) == [
        "fraises.app.environments.production.keep_releases: environment variable KEEP is not set "
        "(fraises.yaml:7)"
    ]


def test_require_resolved_names_the_first_unset_variable_of_that_environment(tmp_path):
    text = """\
    fraises:
      app:
        type: api
        repository: ${REPO_URL}
        environments:
          production:
            name: a.example.com
          staging:
            name: b.example.com
            repository: /srv/git/app.git
      other:
        type: api
        environments:
          production:
            name: c.example.com
            app_path: ${OTHER_PATH}
    """
    config = load(tmp_path, text)
    assert len(config.warnings) == 2
    with pytest.raises(ConfigError) as caught:
        config.require_resolved("app", "production")
    assert caught.value.message == (
        "fraises.app.repository: environment variable REPO_URL is not set; it is needed to "
        "deploy app/production (fraises.yaml:4)"
    )
    with pytest.raises(ConfigError, match="REPO_URL"):
        config.require_resolved("app", "staging")
    with pytest.raises(ConfigError, match=r"fraises\.other\.environments\.production\.app_path"):
        config.require_resolved("other", "production")


# --------------------------------------------------------------------------- errors


def test_wrong_type_names_key_path_and_line(tmp_path):
    text = env_text(
        """\
        health_check:
          url: https://app.example.com/health
          retries: five
        """
    )
    assert problems(tmp_path, text) == [
        "fraises.app.environments.production.health_check.retries: expected an integer, "
        "got 'five' (fraises.yaml:9)"
    ]


def test_unknown_key_warns_with_did_you_mean_and_strict_refuses(tmp_path):
    text = env_text(
        """\
        helth_check:
          url: https://app.example.com/health
        """
    )
    config = load(tmp_path, text)
    expected = (
        "fraises.app.environments.production.helth_check: unknown key "
        "(did you mean 'health_check'?) (fraises.yaml:7)"
    )
    assert config.warnings == (expected,)
    assert config.environment("app", "production").health_check is None
    assert problems(tmp_path, text, strict=True) == [expected]


def test_unknown_keys_at_every_level(tmp_path):
    text = """\
    name: myapp
    git:
      max_body_byte: 10
      github:
        webhook_secert: x
    ansible:
      forsk: 3
    fraises:
      app:
        type: api
        descripton: typo
        environments:
          production:
            name: a.example.com
            database: {name: db, stratgy: apply}
    """
    config = load(tmp_path, text)
    assert config.warnings == (
        "name: unknown key (fraises.yaml:1)",
        "git.max_body_byte: unknown key (did you mean 'max_body_bytes'?) (fraises.yaml:3)",
        "git.github.webhook_secert: unknown key (did you mean 'webhook_secret'?) (fraises.yaml:5)",
        "ansible.forsk: unknown key (did you mean 'forks'?) (fraises.yaml:7)",
        "fraises.app.descripton: unknown key (did you mean 'description'?) (fraises.yaml:11)",
        "fraises.app.environments.production.database.stratgy: unknown key "
        "(did you mean 'strategy'?) (fraises.yaml:15)",
    )


def test_several_errors_first_is_the_message_all_are_listed(tmp_path):
    text = """\
    fraises:
      app:
        type: website
        environments:
          production:
            keep_releases: 0
            run_on: some
      other:
        environments: {}
    """
    found = problems(tmp_path, text)
    assert found == [
        "fraises.app.type: expected 'api', 'etl', 'scheduled' or 'backup', got 'website' "
        "(fraises.yaml:3)",
        "fraises.app.environments.production.keep_releases: must be at least 1, got 0 "
        "(fraises.yaml:6)",
        "fraises.app.environments.production.run_on: expected 'first' or 'all', got 'some' "
        "(fraises.yaml:7)",
        "fraises.other.type: required key is missing (fraises.yaml:8)",
        "fraises.other.environments: must not be empty (fraises.yaml:9)",
    ]


def test_errors_carry_the_warnings_too(tmp_path):
    text = env_text("helth_check: {}\nkeep_releases: nope\n")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert caught.value.problems[0].startswith("fraises.app.environments.production.keep_releases")
    assert caught.value.warnings[0].startswith("fraises.app.environments.production.helth_check")


def test_cron_error_names_the_job_and_line(tmp_path):
    text = SEED.replace('"0 2 * * *"', '"61 * * * *"')
    assert problems(tmp_path, text, SECRET_ENV) == [
        "fraises.stats.environments.production.jobs.daily_stats.schedule: invalid cron "
        "expression '61 * * * *': minute 61 out of range 0-59 (fraises.yaml:32)"
    ]


def test_reboot_is_refused_with_a_reason(tmp_path):
    text = SEED.replace('"0 2 * * *"', "'@reboot'")
    (found,) = problems(tmp_path, text, SECRET_ENV)
    assert "@reboot is not supported" in found
    assert "systemd timers" in found


@pytest.mark.parametrize(
    ("branch", "reason"),
    [
        ("-main", "cannot start with '-'"),
        ("a..b", "cannot contain '..'"),
        ("'with space'", "cannot contain ' '"),
        ("feature/", "cannot start or end with '/'"),
        ("topic.lock", "end with '.lock'"),
        ("'a:b'", "cannot contain ':'"),
        ("'@'", "cannot be '@'"),
    ],
)
def test_bad_branch_names(tmp_path, branch, reason):
    (found,) = problems(tmp_path, env_text(f"branch: {branch}\n"))
    assert found.startswith("fraises.app.environments.production.branch: invalid branch")
    assert reason in found
    assert found.endswith("(fraises.yaml:7)")


def test_good_branch_names(tmp_path):
    for branch in ("main", "release/1.x", "feature/JIRA-12_fix", "v2.0"):
        config = load(tmp_path, env_text(f"branch: {branch}\n"))
        assert config.environment("app", "production").branch == branch


def test_branch_mapping_targets_must_exist(tmp_path):
    text = SEED.replace("fraise: my_service", "fraise: nope")
    assert problems(tmp_path, text, SECRET_ENV) == [
        "branch_mapping.main: unknown fraise 'nope' (known: my_service, etl_job, stats, backups) "
        "(fraises.yaml:45)"
    ]
    text = SEED.replace("environment: production", "environment: prod")
    assert problems(tmp_path, text, SECRET_ENV) == [
        "branch_mapping.main: fraise 'my_service' has no environment 'prod' (known: production) "
        "(fraises.yaml:45)"
    ]


def test_branch_without_mapping_deploys_environments_on_that_branch(tmp_path):
    text = """\
    fraises:
      a:
        type: api
        environments:
          production: {branch: main}
          staging: {branch: develop}
      b:
        type: etl
        environments:
          production: {branch: main}
    branch_mapping:
      develop: {fraise: b, environment: production}
    """
    config = load(tmp_path, text)
    assert config.targets_for_branch("main") == (
        Target(fraise="a", environment="production"),
        Target(fraise="b", environment="production"),
    )
    # an explicit mapping wins over the environments' branch keys
    assert config.targets_for_branch("develop") == (Target(fraise="b", environment="production"),)
    assert config.targets_for_branch("other") == ()


def test_job_names_depends_on_and_cycles(tmp_path):
    base = (
        "fraises:\n  s:\n    type: scheduled\n    environments:\n      production:\n"
        "        jobs:\n{jobs}"
    )
    bad_name = '          "nightly stats": {schedule: "@daily"}\n'
    (found,) = problems(tmp_path, base.format(jobs=bad_name))
    assert found.startswith(
        "fraises.s.environments.production.jobs.nightly stats: invalid job name 'nightly stats'"
    )
    assert found.endswith("(fraises.yaml:7)")

    unknown = '          a: {schedule: "@daily", depends_on: b}\n'
    assert problems(tmp_path, base.format(jobs=unknown)) == [
        "fraises.s.environments.production.jobs.a.depends_on: unknown job 'b' in this "
        "environment (known: none) (fraises.yaml:7)"
    ]
    itself = '          a: {schedule: "@daily", depends_on: [a]}\n'
    assert problems(tmp_path, base.format(jobs=itself)) == [
        "fraises.s.environments.production.jobs.a.depends_on: a job cannot depend on itself "
        "(fraises.yaml:7)"
    ]
    cycle = (
        '          a: {schedule: "@daily", depends_on: c}\n'
        '          b: {schedule: "@daily", depends_on: a}\n'
        '          c: {schedule: "@daily", depends_on: b}\n'
    )
    assert problems(tmp_path, base.format(jobs=cycle)) == [
        "fraises.s.environments.production.jobs.a.depends_on: jobs depend on each other in a "
        "circle: a -> c -> b -> a (fraises.yaml:7)"
    ]
    good = (
        '          dump: {schedule: "@daily"}\n'
        '          sync: {schedule: "@daily", depends_on: dump}\n'
    )
    config = load(tmp_path, base.format(jobs=good))
    assert config.environment("s", "production").jobs["sync"].depends_on == ("dump",)


def test_scheduled_fraise_needs_jobs_and_api_jobs_warn(tmp_path):
    text = "fraises:\n  s:\n    type: backup\n    environments:\n      production: {}\n"
    assert problems(tmp_path, text) == [
        "fraises.s.environments.production: a backup fraise needs at least one job under jobs "
        "(fraises.yaml:5)"
    ]
    config = load(tmp_path, env_text('jobs: {x: {schedule: "@daily"}}\n'))
    assert config.warnings == (
        "fraises.app.environments.production.jobs: jobs only run for fraises of type scheduled "
        "or backup, not api (fraises.yaml:7)",
    )


def test_malformed_yaml_gives_file_line_and_column(tmp_path):
    text = "fraises:\n  app:\n    type: api\n   bad: [\n"
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    message = caught.value.message
    assert message.startswith(f"{tmp_path / 'fraises.yaml'}: invalid YAML at line ")
    assert ", column " in message
    assert "\n" not in message


def test_unquoted_cron_star_is_a_yaml_error_with_position(tmp_path):
    text = (
        "fraises:\n  s:\n    type: scheduled\n    environments:\n      production:\n"
        "        jobs:\n          a:\n            schedule: */5 * * * *\n"
    )
    with pytest.raises(ConfigError, match=r"invalid YAML at line 8, column 24"):
        load(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "the top level must be a mapping"),
        ("just text\n", "the top level must be a mapping"),
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load(tmp_path, text)


def test_fraises_section_is_required(tmp_path):
    assert problems(tmp_path, "git:\n  provider: github\n") == ["fraises: required key is missing"]


def test_duplicate_key_is_a_warning(tmp_path):
    text = env_text("branch: a\nbranch: b\n")
    config = load(tmp_path, text)
    assert config.environment("app", "production").branch == "b"
    assert config.warnings == (
        "fraises.app.environments.production.branch: key given twice; the last one wins "
        "(fraises.yaml:8)",
    )


# --------------------------------------------------------------------------- environment keys


def test_hosts_as_list_and_as_mapping(tmp_path):
    config = load(tmp_path, env_text("hosts: [web1, web2]\n"))
    env = config.environment("app", "production")
    assert env.hosts == {"web1": {}, "web2": {}}
    assert env.host_names() == ["web1", "web2"]

    text = env_text(
        """\
        hosts:
          web1: {ansible_host: 127.0.2.5}
          web2:
          localhost:
        """
    )
    env = load(tmp_path, text).environment("app", "production")
    assert env.hosts == {
        "web1": {"ansible_host": "127.0.2.5"},
        "web2": {},
        "localhost": {},
    }


def test_bad_hosts(tmp_path):
    assert problems(tmp_path, env_text("hosts: [web1, 'bad host']\n")) == [
        "fraises.app.environments.production.hosts: 'bad host' is not a host name (fraises.yaml:7)"
    ]
    assert problems(tmp_path, env_text("hosts: {web1: 5}\n")) == [
        "fraises.app.environments.production.hosts: the variables of host 'web1' must be a "
        "mapping (fraises.yaml:7)"
    ]


def test_inventory_group_needs_the_ansible_inventory(tmp_path):
    text = env_text("inventory_group: web\n")
    assert problems(tmp_path, text) == [
        "fraises.app.environments.production.inventory_group: needs ansible.inventory, the "
        "inventory that defines the group (fraises.yaml:7)"
    ]
    (tmp_path / "inventory").mkdir()
    config = load(tmp_path, "ansible:\n  inventory: inventory\n" + text)
    env = config.environment("app", "production")
    assert env.host_names() == ["@web"]
    assert config.ansible.inventory == tmp_path / "inventory"
    both = "ansible:\n  inventory: inventory\n" + env_text("inventory_group: web\nhosts: [a]\n")
    (found,) = problems(tmp_path, both)
    assert "give either hosts or inventory_group, not both" in found


def test_missing_inventory_names_the_key(tmp_path):
    text = "ansible:\n  inventory: hosts.ini\nfraises: {}\n"
    (found,) = problems(tmp_path, text)
    assert found.startswith(f"ansible.inventory: inventory '{tmp_path / 'hosts.ini'}' does not")
    assert found.endswith("(fraises.yaml:2)")


def test_ansible_section(tmp_path):
    (tmp_path / "hosts.yml").write_text("all: {}\n")
    text = """\
    ansible:
      inventory: hosts.yml
      roles_path: [roles, /opt/roles]
      vars: {ansible_user: deploy, ansible_password: pw-123}
      forks: 7
      remote_user: deploy
      become: yes
      vault_password_file: vault.txt
    fraises: {}
    """
    config = load(tmp_path, text)
    ansible = config.ansible
    assert ansible.inventory == tmp_path / "hosts.yml"
    assert ansible.roles_path == (tmp_path / "roles", Path("/opt/roles"))
    assert ansible.vars == {"ansible_user": "deploy", "ansible_password": "pw-123"}
    assert (ansible.forks, ansible.remote_user, ansible.become) == (7, "deploy", True)
    assert ansible.vault_password_file == tmp_path / "vault.txt"
    assert ansible.private_key_file is None
    (found,) = problems(tmp_path, "ansible:\n  forks: 0\nfraises: {}\n")
    assert found == "ansible.forks: must be greater than 0, got 0 (fraises.yaml:2)"


def test_private_key_file_defaults_to_fraisier_ssh_key(tmp_path):
    config = load(tmp_path, "fraises: {}\n", {"FRAISIER_SSH_KEY": "/keys/deploy"})
    assert config.ansible.private_key_file == Path("/keys/deploy")
    config = load(tmp_path, "ansible:\n  private_key_file: k\nfraises: {}\n")
    assert config.ansible.private_key_file == tmp_path / "k"


def test_environment_options(tmp_path):
    (tmp_path / "site.yml").write_text("- hosts: all\n")
    text = env_text(
        """\
        keep_releases: 3
        serial: "30%"
        vars: {color: blue}
        playbook: site.yml
        build: {command: make}
        timeout: 120
        service:
          exec_start: /usr/bin/app
          user: app
          working_directory: /srv/app/current
          environment: {PORT: 8000, MODE: prod}
        shared_paths: [media, logs/app]
        script_path: bin/run
        run_on: all
        health_check:
          url: http://{{ ansible_host }}:8000/health
          status_code: [200, 204]
          from: controller
        """
    )
    env = load(tmp_path, text).environment("app", "production")
    assert (env.keep_releases, env.serial, env.timeout) == (3, "30%", 120)
    assert env.vars == {"color": "blue"}
    assert env.playbook == tmp_path / "site.yml"
    assert env.build_command == "make"
    assert env.service.environment == {"PORT": "8000", "MODE": "prod"}
    assert env.shared_paths == ("media", "logs/app")
    assert (env.script_path, env.run_on) == ("bin/run", "all")
    assert env.health_check.status_code == (200, 204)
    assert env.health_check.from_ == "controller"
    assert load(tmp_path, env_text("serial: 2\n")).environment("app", "production").serial == 2


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("serial: 0\n", "serial: serial must be at least 1, got 0"),
        ("serial: 150%\n", "serial: serial percentage must be 1%-100%"),
        ("serial: half\n", "serial: expected a positive integer or a percentage"),
        ("playbook: nope.yml\n", "playbook: playbook '"),
        ("app_path: srv/app\n", "app_path: expected an absolute path on the host"),
        ("systemd_service: 'my app'\n", "systemd_service: 'my app' is not a valid systemd unit"),
        ("shared_paths: [/etc]\n", "shared_paths: shared path '/etc' must be relative"),
        ("shared_paths: [../up]\n", "shared_paths: shared path '../up' must be relative"),
        ("timeout: -1\n", "timeout: must be greater than 0, got -1"),
        ("health_check: {url: ftp://x}\n", "health_check.url: expected an http:// or https://"),
        ("health_check: {url: http://x, status_code: 42}\n", "HTTP status 42 out of range"),
        ("health_check: {url: http://x, from: mars}\n", "health_check.from: expected 'host' or"),
        ("health_check: {retries: 2}\n", "health_check.url: required key is missing"),
        ("database: {strategy: drop}\n", "database.strategy: expected 'apply', 'rebuild' or"),
        ("database: {allow_rebuild: maybe}\n", "allow_rebuild: expected true or false"),
        ("service: {environment: {'BAD-NAME': x}}\n", "not a valid environment variable name"),
        ("vars: [a, b]\n", "vars: expected a mapping, got a list"),
        ("keep_releases: 2.5\n", "keep_releases: expected an integer, got 2.5"),
    ],
)
def test_environment_errors(tmp_path, body, expected):
    (found,) = problems(tmp_path, env_text(body))
    assert found.startswith("fraises.app.environments.production.")
    assert expected in found
    assert found.endswith(")") and "(fraises.yaml:" in found


def test_job_options(tmp_path):
    text = """\
    fraises:
      b:
        type: backup
        environments:
          production:
            jobs:
              dump:
                schedule: "0 3 * * *"
                command: pg_dump shop
                user: postgres
                persistent: false
                randomized_delay: 60
                enabled: false
                retention_days: 14
                backup_dir: /var/backups
                remote: backup@vault:/srv
                description: nightly dump
    """
    job = load(tmp_path, text).environment("b", "production").jobs["dump"]
    assert (job.command, job.user, job.persistent, job.enabled) == (
        "pg_dump shop",
        "postgres",
        False,
        False,
    )
    assert (job.randomized_delay, job.retention_days, job.backup_dir, job.remote) == (
        60,
        14,
        "/var/backups",
        "backup@vault:/srv",
    )
    (found,) = problems(tmp_path, text.replace("retention_days: 14", "retention_days: 0"))
    assert found == (
        "fraises.b.environments.production.jobs.dump.retention_days: must be at least 1, got 0 "
        "(fraises.yaml:14)"
    )


# --------------------------------------------------------------------------- lookups


def test_not_found_errors_list_what_is_known(tmp_path):
    config = load(tmp_path, SEED, SECRET_ENV)
    path = tmp_path / "fraises.yaml"
    with pytest.raises(NotFoundError) as caught:
        config.fraise("nope")
    assert caught.value.message == (
        f"unknown fraise 'nope' (known: my_service, etl_job, stats, backups) in {path}"
    )
    with pytest.raises(NotFoundError) as caught:
        config.environment("my_service", "staging")
    assert caught.value.message == (
        f"fraise 'my_service' has no environment 'staging' (known: production) in {path}"
    )


def test_models_are_frozen(tmp_path):
    config = load(tmp_path, SEED, SECRET_ENV)
    env = config.environment("my_service", "production")
    with pytest.raises(AttributeError, match="frozen"):
        env.branch = "other"
    with pytest.raises(AttributeError, match="frozen"):
        config.path = Path("/elsewhere")
    with pytest.raises(AttributeError, match="frozen"):
        del env.branch
    assert env.branch == "main"
    assert config.environment("my_service", "production") is env


# --------------------------------------------------------------------------- secrets


def test_redacted_masks_every_secret(tmp_path):
    text = """\
    git:
      github:
        webhook_secret: ["${FRAISIER_WEBHOOK_SECRET}", older-secret]
      gitlab:
        secret_token: ${GITLAB_TOKEN}
    ansible:
      vault_password_file: vault.txt
      vars:
        ansible_user: deploy
        ansible_password: ssh-pass-1
        ansible_become_password: become-pass-2
        ansible_become_pass: become-pass-3
    fraises:
      app:
        type: api
        environments:
          production:
            name: a.example.com
            vars: {api_token: tok-4, color: blue}
            service:
              environment: {DB_PASSWORD: db-pass-5, PORT: "80"}
    """
    config = load(tmp_path, text, SECRET_ENV)
    data = config.redacted()
    json.dumps(data)  # plain JSON data
    assert data["git"]["github"]["webhook_secret"] == [SECRET_MASK, SECRET_MASK]
    assert data["git"]["gitlab"]["webhook_secret"] == ["${GITLAB_TOKEN} (unset)"]
    ansible_vars = data["ansible"]["vars"]
    assert ansible_vars == {
        "ansible_user": "deploy",
        "ansible_password": SECRET_MASK,
        "ansible_become_password": SECRET_MASK,
        "ansible_become_pass": SECRET_MASK,
    }
    assert data["ansible"]["vault_password_file"] == str(tmp_path / "vault.txt")
    env = data["fraises"]["app"]["environments"]["production"]
    assert env["vars"] == {"api_token": SECRET_MASK, "color": "blue"}
    assert env["service"]["environment"] == {"DB_PASSWORD": SECRET_MASK, "PORT": "80"}
    dumped = json.dumps(data)
    secrets = config.secret_values()
    assert set(secrets) == {
        "s3cret-value",
        "older-secret",
        "ssh-pass-1",
        "become-pass-2",
        "become-pass-3",
        "tok-4",
        "db-pass-5",
    }
    for secret in secrets:
        assert secret not in dumped


# --------------------------------------------------------------------------- finding the file


def test_lookup_order(tmp_path, monkeypatch):
    explicit = write(tmp_path, "fraises: {}\n", "explicit.yaml")
    from_env = write(tmp_path, "fraises: {}\n", "from_env.yaml")
    system = write(tmp_path, "fraises: {}\n", "system.yaml")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG_PATH", system)
    environ = {"FRAISIER_CONFIG": str(from_env)}

    assert find_config_path(explicit, environ=environ) == explicit
    assert find_config_path(None, environ=environ) == from_env
    local = write(work, "fraises: {}\n")
    assert find_config_path(None, environ={}) == Path.cwd() / "fraises.yaml"
    local.unlink()
    assert find_config_path(None, environ={}) == system
    system.unlink()
    with pytest.raises(ConfigError) as caught:
        find_config_path(None, environ={})
    assert caught.value.message == (
        f"no fraises.yaml found (looked in {work / 'fraises.yaml'}, {system}); "
        "pass --config PATH or set FRAISIER_CONFIG"
    )


def test_named_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"config file {missing} does not exist \(given with"):
        find_config_path(missing, environ={})
    with pytest.raises(ConfigError, match=r"does not exist \(FRAISIER_CONFIG\)"):
        find_config_path(None, environ={"FRAISIER_CONFIG": str(missing)})


def test_a_folder_means_its_fraises_yaml(tmp_path):
    path = write(tmp_path, "fraises: {}\n")
    assert find_config_path(tmp_path, environ={}) == path


def test_load_config_uses_fraisier_config(tmp_path):
    path = write(tmp_path, SEED)
    config = load_config(environ={"FRAISIER_CONFIG": str(path), **SECRET_ENV})
    assert config.path == path


# --------------------------------------------------------------------------- the example


def test_example_validates_without_any_variable(tmp_path):
    config = load_config(REPO / "examples" / "fraises.yaml", environ={})
    # only the unset webhook secrets are reported
    assert all("environment variable" in w and "is not set" in w for w in config.warnings)
    assert {u.variable for u in config.unresolved} == {
        "FRAISIER_WEBHOOK_SECRET",
        "FRAISIER_GITLAB_TOKEN",
    }
    assert {f.type for f in config.fraises.values()} == {"api", "etl", "scheduled", "backup"}
    hello = config.environment("hello", "demo")
    assert config.fraise("hello").type == "api"
    assert hello.app_path == "/srv/hello"
    assert hello.systemd_service == "hello.service"
    assert hello.health_check.url == "http://{{ ansible_host }}:8000/health"
    assert hello.repository == "/var/lib/fraisier/demo/hello.git"
    assert config.require_resolved("hello", "demo") is hello
    assert config.targets_for_branch("main") == (Target(fraise="hello", environment="demo"),)


def test_example_with_variables_set_has_no_warnings():
    environ = {
        "FRAISIER_WEBHOOK_SECRET": "a",
        "FRAISIER_GITLAB_TOKEN": "b",
        "FRAISIER_DEMO_REPO": "/tmp/hello.git",
        "FRAISIER_DEMO_HOST": "127.0.2.3",
    }
    config = load_config(REPO / "examples" / "fraises.yaml", environ=environ, strict=True)
    assert config.warnings == ()
    hello = config.environment("hello", "demo")
    assert hello.repository == "/tmp/hello.git"
    assert hello.hosts == {"hello-1": {"ansible_host": "127.0.2.3"}}


def test_config_module_imports_no_ansible_or_flask():
    code = (
        "import sys, fraisier.config\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('ansible', 'ansible_runner', 'flask')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_webhook_secret_falls_back_to_the_environment(tmp_path):
    path = tmp_path / "fraises.yaml"
    path.write_text(
        "git:\n  gitlab:\n    secret_token: own-token\n"
        "fraises:\n  a:\n    type: api\n    environments:\n      prod: {name: h}\n"
    )
    env = {"FRAISIER_WEBHOOK_SECRET": "from-env-secret"}
    config = load_config(path, environ=env)
    assert config.webhook_secrets("github") == ("from-env-secret",)
    assert config.webhook_secrets("gitlab") == ("own-token",)
    assert "from-env-secret" in config.secret_values()
    assert "from-env-secret" not in str(config.redacted())
    assert load_config(path, environ={}).webhook_secrets("github") == ()
