"""Command line interface: a Click group; business rules live elsewhere.

Read commands (list, status, history, config) import neither Ansible nor Flask:
the deploy commands import `fraisier.deploys` inside their bodies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

from fraisier import __version__
from fraisier.errors import FraisierError, NotFoundError


class AppContext:
    """What every command shares: where the config is, and lazy access to it and the store."""

    def __init__(self, config_path: str | None):
        self.config_path = config_path
        self._config = None

    def config(self):
        """Load fraises.yaml once (lookup order: --config, $FRAISIER_CONFIG, ./, /etc/fraisier/)."""
        if self._config is None:
            from fraisier.config import load_config

            self._config = load_config(self.config_path)
        return self._config

    def optional_config(self):
        """The config if one is found, else None; a broken config is an error."""
        from fraisier.config import find_config_path

        try:
            find_config_path(self.config_path)
        except FraisierError:
            if self.config_path:
                raise
            return None
        return self.config()

    def open_store(self, *, readonly: bool):
        """Open the store: FRAISIER_DATABASE_URL, FRAISIER_DB_PATH or the default path."""
        from fraisier.store import Store

        return Store.open(readonly=readonly)


class FraisierGroup(click.Group):
    """Turns every FraisierError into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FraisierError as exc:
            click.echo(f"fraisier: error: {exc.message}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("fraisier: interrupted", err=True)
            ctx.exit(130)


def json_option(func: Callable) -> Callable:
    """Add `--json` to a command."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        func
    )


def emit_json(data: Any) -> None:
    """Print data as JSON on stdout."""
    click.echo(json.dumps(data, indent=2, default=str))


STATUS_COLOURS = {
    "successful": "green",
    "running": "cyan",
    "queued": "cyan",
    "failed": "red",
    "rollback_failed": "red",
    "timeout": "red",
    "interrupted": "yellow",
    "rolled_back": "yellow",
    "canceled": "yellow",
    "superseded": "bright_black",
}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def print_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    styles: dict[int, Callable[[str], str | None]] | None = None,
) -> None:
    """Print an aligned table; colour is applied per column and dropped when stdout is no TTY."""
    text_rows = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    click.echo("  ".join(h.upper().ljust(widths[i]) for i, h in enumerate(headers)).rstrip())
    for row in text_rows:
        cells = []
        for i, value in enumerate(row):
            padded = value.ljust(widths[i])
            colour = styles.get(i)(value) if styles and i in styles else None
            cells.append(click.style(padded, fg=colour) if colour else padded)
        click.echo("  ".join(cells).rstrip())


def _status_colour(value: str) -> str | None:
    return STATUS_COLOURS.get(value)


def short_sha(value: str | None) -> str | None:
    """First 12 hex digits of a commit, for tables."""
    return value[:12] if value else value


def check_names(
    app: AppContext, store, fraise: str | None, environment: str | None
) -> list[dict] | None:
    """Refuse an unknown fraise or environment named on the command line; return the
    unfiltered `store.status()` rows when they had to be read for that, else None."""
    if fraise is None:
        return None
    config = app.optional_config()
    if config is not None:
        if environment is None:
            config.fraise(fraise)
        else:
            config.environment(fraise, environment)
        return None
    # Without a config file the store is the only list of names there is.
    rows = store.status()
    known = {(row["fraise"], row["environment"]) for row in rows}
    if not any(f == fraise for f, _ in known):
        raise NotFoundError(
            f"unknown fraise '{fraise}': no fraises.yaml found and the store has no deployment"
            " of it; pass --config or check the name"
        )
    if environment is not None and (fraise, environment) not in known:
        envs = ", ".join(sorted(e for f, e in known if f == fraise))
        raise NotFoundError(
            f"unknown environment '{environment}' of fraise '{fraise}' (known: {envs})"
        )
    return rows


@click.group(cls=FraisierGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fraisier")
@click.option(
    "-c",
    "--config",
    "config_path",
    metavar="PATH",
    envvar=None,
    help="fraises.yaml to use (default: $FRAISIER_CONFIG, ./fraises.yaml, "
    "/etc/fraisier/fraises.yaml).",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Fraisier: deploy fraises (services) with Ansible, from Git pushes or by hand."""
    ctx.obj = AppContext(config_path)


@cli.command("list")
@json_option
@click.pass_obj
def list_cmd(app: AppContext, as_json: bool) -> None:
    """List the fraises of fraises.yaml with their environments."""
    config = app.config()
    data = [
        {
            "fraise": fraise.name,
            "type": fraise.type,
            "description": fraise.description,
            "environments": [
                {"name": env.key, "branch": env.branch, "hosts": env.host_names()}
                for env in fraise.environments.values()
            ],
        }
        for fraise in config.fraises.values()
    ]
    if as_json:
        emit_json(data)
        return
    rows = []
    for item in data:
        for env in item["environments"] or [{"name": None, "branch": None, "hosts": []}]:
            rows.append([item["fraise"], item["type"], env["name"], env["branch"], env["hosts"]])
    print_table(["fraise", "type", "environment", "branch", "hosts"], rows)


@cli.command()
@click.argument("fraise", required=False)
@click.argument("environment", required=False)
@json_option
@click.pass_obj
def status(app: AppContext, fraise: str | None, environment: str | None, as_json: bool) -> None:
    """Show the latest deployment of each fraise and environment."""
    with app.open_store(readonly=True) as store:
        every_pair = check_names(app, store, fraise, environment)
        if every_pair is None:
            rows = store.status(fraise=fraise, environment=environment)
        else:
            rows = [
                row
                for row in every_pair
                if row["fraise"] == fraise and environment in (None, row["environment"])
            ]
    if as_json:
        emit_json(rows)
        return
    print_table(
        ["fraise", "environment", "status", "commit", "branch", "deployment", "completed"],
        (
            [
                r["fraise"],
                r["environment"],
                r["status"],
                short_sha(r["commit"]),
                r["branch"],
                r["deployment_id"],
                r["completed_at"] or r["started_at"],
            ]
            for r in rows
        ),
        styles={2: _status_colour},
    )


@cli.command()
@click.argument("fraise", required=False)
@click.argument("environment", required=False)
@click.option("--limit", "-n", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--status", "status_filter", metavar="STATUS", help="Only deployments in STATUS.")
@json_option
@click.pass_obj
def history(
    app: AppContext,
    fraise: str | None,
    environment: str | None,
    limit: int,
    status_filter: str | None,
    as_json: bool,
) -> None:
    """Show past deployments, newest first."""
    from fraisier.store import STATUSES

    if status_filter is not None and status_filter not in STATUSES:
        raise click.BadParameter(
            f"'{status_filter}' is not a status (one of: {', '.join(STATUSES)})",
            param_hint="--status",
        )
    with app.open_store(readonly=True) as store:
        check_names(app, store, fraise, environment)
        rows = store.history(
            fraise=fraise, environment=environment, limit=limit, status=status_filter
        )
    if as_json:
        emit_json(rows)
        return
    print_table(
        ["id", "fraise", "environment", "status", "trigger", "commit", "started", "error"],
        (
            [
                r["id"],
                r["fraise"],
                r["environment"],
                r["status"] + (" (dry run)" if r["dry_run"] else ""),
                r["trigger"],
                short_sha(r["commit"]),
                r["started_at"],
                (r["error"] or "")[:60] or None,
            ]
            for r in rows
        ),
        styles={3: lambda v: _status_colour(v.split(" ")[0])},
    )


@cli.group("config")
def config_group() -> None:
    """Show or validate fraises.yaml."""


@config_group.command("show")
@json_option
@click.pass_obj
def config_show(app: AppContext, as_json: bool) -> None:
    """Print the effective configuration, every secret shown as ***."""
    config = app.config()
    data = config.redacted()
    if as_json:
        emit_json(data)
        return
    import yaml

    click.echo(f"# {config.path}")
    click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())


@config_group.command("validate")
@click.option("--file", "-f", "file_path", metavar="PATH", help="File to validate.")
@click.option(
    "--strict", is_flag=True, help="Treat warnings (unknown keys, unset variables) as errors."
)
@json_option
@click.pass_obj
def config_validate(app: AppContext, file_path: str | None, strict: bool, as_json: bool) -> None:
    """Check fraises.yaml and report every problem with its key path and line."""
    from fraisier.config import load_config
    from fraisier.errors import ConfigError

    try:
        config = load_config(file_path or app.config_path, strict=strict)
    except ConfigError as exc:
        problems = list(getattr(exc, "problems", None) or [exc.message])
        if as_json:
            emit_json(
                {
                    "valid": False,
                    "errors": problems,
                    "warnings": list(getattr(exc, "warnings", None) or []),
                }
            )
            sys.exit(1)
        for warning in getattr(exc, "warnings", None) or []:
            click.echo(f"warning: {warning}", err=True)
        for problem in problems:
            click.echo(f"fraisier: error: {problem}", err=True)
        sys.exit(1)
    warnings = list(config.warnings)
    if as_json:
        emit_json({"valid": True, "path": str(config.path), "errors": [], "warnings": warnings})
        return
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    count = len(config.fraises)
    envs = sum(len(f.environments) for f in config.fraises.values())
    click.echo(
        f"{config.path}: valid ({count} fraises, {envs} environments, {len(warnings)} warnings)"
    )


def _event_line(event: dict[str, Any], verbose: bool) -> str | None:
    """One line per task result: host, task, ok/changed/failed/skipped/unreachable."""
    kind = event.get("event", "")
    data = event.get("event_data") or {}
    if kind == "playbook_on_play_start":
        return click.style(f"PLAY {data.get('play') or data.get('name') or ''}", bold=True)
    if kind not in EVENT_OUTCOMES:
        return None
    res = data.get("res") or {}
    outcome = EVENT_OUTCOMES[kind]
    if outcome == "ok" and res.get("changed"):
        outcome = "changed"
    if outcome == "failed" and data.get("ignore_errors"):
        outcome = "ignored"
    if (
        outcome in ("ok", "skipped")
        and not verbose
        and data.get("task_action")
        in (
            "ansible.builtin.debug",
            "debug",
        )
    ):
        return None
    host = data.get("host", "?")
    item = res.get("item") if kind.startswith("runner_item") else None
    label = f"{data.get('task', '?')}" + (f" ({item})" if item not in (None, "") else "")
    line = f"  {host:<20} {click.style(f'{outcome:<11}', fg=OUTCOME_COLOURS.get(outcome))} {label}"
    if outcome in ("failed", "unreachable") or verbose:
        msg = res.get("msg") or res.get("stderr")
        if msg:
            line += f": {' '.join(str(msg).split())[:300]}"
    return line


EVENT_OUTCOMES = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_skipped": "skipped",
    "runner_on_unreachable": "unreachable",
    "runner_item_on_failed": "failed",
}
OUTCOME_COLOURS = {
    "ok": "green",
    "changed": "yellow",
    "failed": "red",
    "unreachable": "red",
    "skipped": "cyan",
    "ignored": "cyan",
}


class EventPrinter:
    """Prints runner events from a queue on its own thread: a slow terminal never stalls Ansible."""

    def __init__(self, verbose: bool, enabled: bool):
        import queue

        self.verbose = verbose
        self.enabled = enabled
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        if enabled:
            self.thread.start()

    def put(self, event: dict[str, Any]) -> None:
        """Hand an event over; called from inside ansible-runner's output loop."""
        if self.enabled:
            self.queue.put(event)

    def _loop(self) -> None:
        while True:
            event = self.queue.get()
            if event is None:
                return
            line = _event_line(event, self.verbose)
            if line:
                click.echo(line)

    def close(self) -> None:
        """Print what is left and stop."""
        if self.enabled:
            self.queue.put(None)
            self.thread.join(timeout=10)


def _print_recap(result) -> None:
    if result.host_stats:
        click.echo("RECAP")
        print_table(
            ["host", "ok", "changed", "failed", "unreachable", "skipped", "rescued"],
            (
                [
                    host,
                    s.get("ok"),
                    s.get("changed"),
                    s.get("failures"),
                    s.get("unreachable"),
                    s.get("skipped"),
                    s.get("rescued"),
                ]
                for host, s in result.host_stats.items()
            ),
        )
    colour = STATUS_COLOURS.get(result.status)
    what = "dry run " if result.dry_run else ""
    line = (
        f"{what}deployment {result.deployment_id} of {result.fraise}/{result.environment}:"
        f" {click.style(result.status, fg=colour)}"
    )
    if result.release_id:
        line += f" (release {result.release_id})"
    click.echo(line)
    if result.error:
        click.echo(f"error: {result.error}", err=True)


def _run_deployment(app: AppContext, make, *, as_json: bool, verbose: bool) -> None:
    """Run a deployment built by `make(store, printer, progress)` with signals wired to cancel."""
    printer = EventPrinter(verbose=verbose, enabled=not as_json)

    def progress(message: str) -> None:
        if not as_json:
            click.echo(message, err=True)

    with app.open_store(readonly=False) as store:
        deployment = make(store, printer, progress)
        previous = {}

        def on_signal(signum, _frame):
            progress(f"received {signal.Signals(signum).name}: canceling")
            deployment.cancel(f"canceled by {signal.Signals(signum).name}")

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
        try:
            result = deployment.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            printer.close()
    if as_json:
        emit_json(result.to_dict())
    elif result.skipped:
        click.echo(
            f"{result.fraise}/{result.environment}: commit {short_sha(result.commit)} is already"
            f" live (deployment {result.deployment_id}); nothing to do (use --force to deploy"
            " it again)"
        )
    else:
        _print_recap(result)
    sys.exit(0 if result.ok else 1)


@cli.command()
@click.argument("fraise")
@click.argument("environment")
@click.option("--commit", metavar="SHA", help="Deploy this commit instead of the branch head.")
@click.option("--dry-run", is_flag=True, help="Ansible check mode with diff: change nothing.")
@click.option("--force", is_flag=True, help="Deploy even if the commit is already live.")
@click.option("--wait", is_flag=True, help="Wait for a running deployment of the pair to end.")
@click.option("--limit", multiple=True, metavar="HOST", help="Only these hosts (repeatable).")
@click.option("--verbose", "-v", is_flag=True, help="Show every task's message.")
@json_option
@click.pass_obj
def deploy(
    app: AppContext,
    fraise: str,
    environment: str,
    commit: str | None,
    dry_run: bool,
    force: bool,
    wait: bool,
    limit: tuple[str, ...],
    verbose: bool,
    as_json: bool,
) -> None:
    """Deploy FRAISE to ENVIRONMENT with Ansible and record every event."""
    from fraisier.deploys import Deployment

    config = app.config()
    config.environment(fraise, environment)
    hosts = [h for item in limit for h in item.split(",") if h]

    def make(store, printer, progress):
        deployment = Deployment(
            config,
            fraise,
            environment,
            store=store,
            commit=commit,
            dry_run=dry_run,
            force=force,
            wait=wait,
            limit=hosts,
            trigger="cli",
            requested_by=_whoami(),
            verbosity=1 if verbose else 0,
            on_event=printer.put,
            on_progress=progress,
        )
        return deployment

    # Bad input is refused before the store is opened: nothing is written, not even the file.
    make(None, EventPrinter(verbose=False, enabled=False), None).validate()
    _run_deployment(app, make, as_json=as_json, verbose=verbose)


@cli.command()
@click.argument("fraise")
@click.argument("environment")
@click.option("--to", "to_release", metavar="RELEASE", help="Release id to switch back to.")
@click.option("--wait", is_flag=True, help="Wait for a running deployment of the pair to end.")
@click.option("--verbose", "-v", is_flag=True, help="Show every task's message.")
@json_option
@click.pass_obj
def rollback(
    app: AppContext,
    fraise: str,
    environment: str,
    to_release: str | None,
    wait: bool,
    verbose: bool,
    as_json: bool,
) -> None:
    """Switch FRAISE in ENVIRONMENT back to the previous (or a named) release."""
    from fraisier.deploys import rollback as make_rollback

    config = app.config()
    config.environment(fraise, environment)
    if to_release is not None:
        from fraisier.deploys import validate_release_id

        validate_release_id(to_release, where="--to")

    def make(store, printer, progress):
        return make_rollback(
            config,
            fraise,
            environment,
            store=store,
            to=to_release,
            wait=wait,
            requested_by=_whoami(),
            on_event=printer.put,
            on_progress=progress,
        )

    _run_deployment(app, make, as_json=as_json, verbose=verbose)


@cli.command()
@click.argument("deployment_id", type=int)
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the deployment ends.")
@json_option
@click.pass_obj
def logs(app: AppContext, deployment_id: int, follow: bool, as_json: bool) -> None:
    """Print the recorded output of a deployment."""
    import time

    from fraisier.store import TERMINAL_STATUSES

    with app.open_store(readonly=True) as store:
        row = store.deployment(deployment_id)
        if row is None:
            raise NotFoundError(f"no deployment {deployment_id} in the store")
        if as_json:
            emit_json({**row, "events": store.events(deployment_id)})
            return
        seq = 0
        while True:
            for event in store.events(deployment_id, after_seq=seq):
                seq = max(seq, event.get("seq") or 0)
                text = (event.get("stdout") or "").rstrip()
                if text:
                    click.echo(text)
            row = store.deployment(deployment_id) or row
            if not follow or row["status"] in TERMINAL_STATUSES:
                break
            time.sleep(0.5)
    click.echo(
        f"deployment {deployment_id} of {row['fraise']}/{row['environment']}: {row['status']}"
        + (f": {row['error']}" if row.get("error") else "")
    )


@cli.command()
@click.argument("deployment_id", type=int)
@json_option
@click.pass_obj
def cancel(app: AppContext, deployment_id: int, as_json: bool) -> None:
    """Cancel a queued or running deployment."""
    from fraisier.deploys import cancel as cancel_deployment

    with app.open_store(readonly=False) as store:
        status = cancel_deployment(store, deployment_id)
    if as_json:
        emit_json({"deployment_id": deployment_id, "status": status})
    else:
        click.echo(f"deployment {deployment_id}: {status}")


def _whoami() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def main() -> None:
    """Console script entry point."""
    try:
        cli.main(prog_name="fraisier")
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    exit_promptly(code)


def exit_promptly(code: int | str | None) -> None:
    """End the process with `code` as sys.exit would, without tearing Python down module by
    module.

    That teardown took about 0.1 s after a deployment, whose imports (peewee, click,
    ansible-runner) are many: a measurable part of Fraisier's time beyond ansible-playbook's.
    Nothing needs it here: every write is committed when a command returns, atexit handlers
    still run and output is flushed below. A non-daemon thread still running (none of
    Fraisier's) gets the ordinary exit, which waits for it.
    """
    import atexit
    import logging

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    code = 0 if code is None else int(code)
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(t.is_alive() and not t.daemon for t in others):
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # A closed pipe (`fraisier history | head`): the reader has all it wanted.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
