"""Pure translation from config + request to inventory and extra vars (no Ansible)."""

from __future__ import annotations

import json
import textwrap

import pytest

from fraisier.config import load_config
from fraisier.inventory import (
    TARGET_GROUP,
    UNSAFE_KEY,
    DeploymentRequest,
    build_extravars,
    build_inventory,
    unsafe,
)

CONFIG = """
ansible:
  remote_user: deploy
  become: true
  private_key_file: /keys/id_ed25519
  vars:
    ansible_python_interpreter: /usr/bin/python3
    ansible_user: override
fraises:
  api:
    type: api
    repository: https://git.example.com/api.git
    environments:
      production:
        app_path: /srv/api
        systemd_service: api.service
        keep_releases: 3
        serial: "50%"
        hosts:
          web1: {ansible_host: 10.0.0.5}
          web2:
        health_check:
          url: "http://{{ ansible_host }}:8000/health"
          retries: 2
          status_code: [200, 204]
        database: {name: api_prod, strategy: apply, migrate_command: "confiture migrate up"}
        build: {command: make build}
        service: {exec_start: /srv/api/current/run, user: api}
        vars: {fraise_api_extra: 1, custom_flag: yes}
      staging:
        name: staging.example.com
        app_path: /srv/api
      local:
        name: localhost
        app_path: /tmp/api
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "fraises.yaml"
    path.write_text(textwrap.dedent(CONFIG))
    return load_config(path, environ={})


def request(**overrides):
    base = dict(
        deployment_id=7,
        fraise="api",
        environment="production",
        commit="a" * 40,
        release_id="20261127T034501Z-aaaaaaaaaaaa",
        archive_path="/work/releases/r.tar.gz",
        branch="main",
        commit_message="fix: things",
        author="Dev <dev@example.com>",
    )
    base.update(overrides)
    return DeploymentRequest(**base)


def test_unsafe_wraps_every_string_deeply():
    value = {"a": "x", "b": ["y", {"c": "z"}], "n": 3, "t": True, "none": None}
    assert unsafe(value) == {
        "a": {UNSAFE_KEY: "x"},
        "b": [{UNSAFE_KEY: "y"}, {"c": {UNSAFE_KEY: "z"}}],
        "n": 3,
        "t": True,
        "none": None,
    }
    # Wrapping twice does not nest.
    assert unsafe(unsafe("x")) == {UNSAFE_KEY: "x"}


def test_hosts_mapping_and_group_vars(config):
    env = config.environment("api", "production")
    inv = build_inventory(config, env)
    group = inv["all"]["children"][TARGET_GROUP]
    assert group["hosts"] == {"web1": {"ansible_host": "10.0.0.5"}, "web2": {}}
    assert inv["all"]["vars"] == {
        "ansible_ssh_private_key_file": "/keys/id_ed25519",
        "ansible_user": "override",
        "ansible_become": True,
        "ansible_python_interpreter": "/usr/bin/python3",
    }
    json.dumps(inv)


def test_name_is_the_single_host_and_localhost_is_local(config):
    staging = build_inventory(config, config.environment("api", "staging"))
    assert staging["all"]["children"][TARGET_GROUP]["hosts"] == {"staging.example.com": {}}
    local = build_inventory(config, config.environment("api", "local"))
    host = local["all"]["children"][TARGET_GROUP]["hosts"]["localhost"]
    assert host["ansible_connection"] == "local"


def test_inventory_group_nests_the_users_group(tmp_path):
    (tmp_path / "hosts.ini").write_text("[web]\nweb1\n")
    path = tmp_path / "fraises.yaml"
    path.write_text(
        textwrap.dedent(
            """
            ansible: {inventory: hosts.ini}
            fraises:
              api:
                type: api
                environments:
                  prod: {inventory_group: web, app_path: /srv/api}
            """
        )
    )
    config = load_config(path, environ={})
    inv = build_inventory(config, config.environment("api", "prod"))
    assert inv["all"]["children"][TARGET_GROUP] == {"children": {"web": {}}}


def test_extravars_contract(config):
    fraise = config.fraise("api")
    env = config.environment("api", "production")
    ev = build_extravars(fraise, env, request())
    assert ev["fraise_release_app_path"] == "/srv/api"
    assert ev["fraise_release_keep"] == 3
    assert ev["fraisier_serial"] == "50%"
    assert ev["fraise_api_systemd_service"] == "api.service"
    assert ev["fraise_api_build_command"] == "make build"
    assert ev["fraise_api_database"] == {"name": "api_prod", "strategy": "apply"}
    assert ev["fraise_api_migrate_command"] == "confiture migrate up"
    assert ev["fraise_api_service"]["exec_start"] == "/srv/api/current/run"
    # Config strings are trusted templates and reach Ansible as they are.
    assert ev["fraise_api_health_check"]["url"] == "http://{{ ansible_host }}:8000/health"
    assert ev["fraise_api_health_check"]["status_code"] == [200, 204]
    assert ev["fraise_api_health_check"]["from"] == "host"
    assert ev["custom_flag"] is True
    assert ev["fraisier_deployment_id"] == 7
    json.dumps(ev)


def test_everything_from_outside_is_wrapped(config):
    hostile = '{{ lookup("pipe", "touch /tmp/pwned") }}'
    ev = build_extravars(
        config.fraise("api"),
        config.environment("api", "production"),
        request(commit_message=hostile, author=hostile, branch=hostile, requested_by=hostile),
    )
    for key in (
        "fraisier_commit_message",
        "fraisier_author",
        "fraisier_branch",
        "fraisier_requested_by",
        "fraisier_commit",
        "fraise_release_id",
        "fraise_release_archive",
        "fraisier_trigger",
    ):
        assert isinstance(ev[key], dict) and set(ev[key]) == {UNSAFE_KEY}, key
    assert ev["fraisier_commit_message"][UNSAFE_KEY] == hostile
    # No plain string anywhere holds the hostile text.
    assert hostile not in json.dumps({k: v for k, v in ev.items() if not isinstance(v, dict)})


def test_request_cannot_override_trusted_metadata(config):
    ev = build_extravars(
        config.fraise("api"),
        config.environment("api", "production"),
        request(extra={"fraisier_fraise": "other", "note": "{{ x }}"}),
    )
    assert ev["fraisier_fraise"] == "api"
    assert ev["note"] == {UNSAFE_KEY: "{{ x }}"}
