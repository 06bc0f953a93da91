"""Mirror, resolve and archive against real git repositories made in tmp_path."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import tarfile
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from fraisier.errors import SourceError
from fraisier.source import (
    Mirror,
    ReleaseArchive,
    make_release_id,
    scrub_credentials,
    validate_branch,
    validate_repository_url,
    validate_sha,
)

GIT_ID = ["-c", "user.name=Test Author", "-c", "user.email=author@example.invalid"]


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` and return its stripped stdout."""
    res = subprocess.run(
        ["git", "-C", str(repo), *GIT_ID, *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return res.stdout.strip()


def commit_files(repo: Path, files: dict[str, str], message: str) -> str:
    """Write `files` into `repo`, commit them all and return the new sha."""
    for name, content in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """A repository with main (two commits), a feature branch and a tag."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commit_files(
        repo,
        {
            "app.py": "print('v1')\n",
            ".gitattributes": "secret.txt export-ignore\ntests/ export-ignore\n",
            "secret.txt": "not for hosts\n",
            "tests/test_app.py": "def test(): pass\n",
        },
        "First commit",
    )
    commit_files(repo, {"app.py": "print('v2')\n"}, "Second commit\n\nWith a body line.")
    git(repo, "branch", "feature")
    git(repo, "tag", "v2")
    return repo


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path / "work"


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["main", "release/1.2", "feature/x-y_z", "v1.0", "été", "a.b/c.d", "@x"]
)
def test_valid_branch_names_pass(name):
    assert validate_branch(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "-x",
        "--upload-pack=touch /tmp/x",
        "a..b",
        "a b",
        "refs/heads/../x",
        "a@{1}",
        "@",
        "HEAD",
        "x~1",
        "x^",
        "x:y",
        "x?",
        "x*",
        "x[",
        "x\\y",
        "x\ny",
        "x\x7f",
        "x.lock",
        "a/b.lock/c",
        "x/",
        "/x",
        "a//b",
        "x.",
        ".hidden",
        "a/.b",
    ],
)
def test_hostile_branch_names_rejected(name):
    with pytest.raises(SourceError) as exc:
        validate_branch(name, where="branch from the webhook")
    message = str(exc.value)
    assert message.startswith("branch from the webhook is not a valid git branch name")
    assert "\n" not in message


def test_non_string_branch_rejected():
    with pytest.raises(SourceError, match="not a string"):
        validate_branch(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["abcdef1", "ABCDEF1234", "a" * 40, "b" * 64])
def test_valid_shas_lowercased(value):
    assert validate_sha(value) == value.lower()


@pytest.mark.parametrize(
    "value", ["", "abc123", "a" * 41, "a" * 63, "g" * 40, "-abcdef1", "abcdef1 ", "HEAD"]
)
def test_invalid_shas_rejected(value):
    with pytest.raises(SourceError, match=r"^--commit is not a commit sha"):
        validate_sha(value, where="--commit")


@pytest.mark.parametrize(
    "url",
    [
        "/srv/git/app.git",
        "relative/app",
        "./x:y",
        "file:///srv/git/app.git",
        "https://example.invalid/org/app.git",
        "http://127.0.0.1:8080/app.git",
        "ssh://git@example.invalid:2222/org/app.git",
        "git@example.invalid:org/app.git",
        "example.invalid:app.git",
    ],
)
def test_accepted_urls(url):
    assert validate_repository_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "",
        "-uhost",
        "--upload-pack=touch x",
        "ext::sh -c touch% /tmp/pwned",
        "fd::17",
        "ftp://example.invalid/app.git",
        "ssh://-oProxyCommand=touch%20x/app",
        "-oProxyCommand=x:app",
        "https:///nohost",
        "https://example.invalid/a\nb",
    ],
)
def test_hostile_urls_rejected(url):
    with pytest.raises(SourceError, match=r"^repository of fraise 'api' is not an accepted"):
        validate_repository_url(url, where="repository of fraise 'api'")


def test_ext_transport_url_executes_nothing(tmp_path, work):
    marker = tmp_path / "pwned"
    with pytest.raises(SourceError, match="remote helpers"):
        Mirror(f"ext::sh -c touch% {marker}", work)
    assert not marker.exists()
    assert not work.exists()


def test_git_itself_refuses_other_transports(upstream, work, tmp_path):
    # Behind the URL check, git is told to allow only file, git, http(s) and ssh.
    marker = tmp_path / "pwned"
    mirror = Mirror(str(upstream), work, timeout=30)
    mirror.url = f"ext::sh -c touch% {marker}"
    with pytest.raises(SourceError, match="failed"):
        mirror.fetch()
    assert not marker.exists()


def test_hostile_branch_executes_nothing(upstream, work, tmp_path):
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    marker = tmp_path / "x"
    for name in (f"--upload-pack=touch {marker}", "-x", "a..b", "a b", "refs/heads/../x"):
        with pytest.raises(SourceError, match="from the webhook is not a valid"):
            mirror.resolve(branch=name, branch_where="branch from the webhook")
        with pytest.raises(SourceError):
            mirror.is_ancestor("a" * 40, name)
    assert not marker.exists()


# -- mirror, fetch, resolve -----------------------------------------------------------------------


def test_mirror_created_then_updated(upstream, work):
    mirror = Mirror(str(upstream), work)
    assert mirror.path.parent == work / "mirrors"
    assert re.fullmatch(r"[0-9a-f]{16}-upstream\.git", mirror.path.name)
    mirror.fetch()
    first = git(upstream, "rev-parse", "main")
    assert mirror.resolve(branch="main") == first
    assert mirror.resolve(branch="feature") == first

    second = commit_files(upstream, {"new.txt": "x\n"}, "Third commit")
    git(upstream, "branch", "-D", "feature")
    assert mirror.resolve(branch="main") == first  # nothing changes until fetched
    mirror.fetch()
    assert mirror.resolve(branch="main") == second
    with pytest.raises(SourceError, match="'feature' does not exist"):
        mirror.resolve(branch="feature")  # pruned
    refs = subprocess.run(
        ["git", "--git-dir", str(mirror.path), "for-each-ref", "--format=%(refname)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(refs) == ["refs/heads/main", "refs/tags/v2"]
    # No leftover temporary directories beside the mirror.
    assert sorted(p.name for p in (work / "mirrors").iterdir()) == sorted(
        [mirror.path.name, mirror.path.name + ".lock"]
    )


def test_file_url_and_relative_path_map_to_working_mirrors(upstream, work, monkeypatch):
    monkeypatch.chdir(upstream.parent)
    relative = Mirror("upstream", Path(work.name))
    relative.fetch()
    by_url = Mirror(f"file://{upstream}", work)
    by_url.fetch()
    head = git(upstream, "rev-parse", "main")
    assert relative.resolve(branch="main") == by_url.resolve(branch="main") == head


def test_missing_repository_error_names_it(tmp_path, work):
    mirror = Mirror(str(tmp_path / "nope"), work)
    with pytest.raises(SourceError) as exc:
        mirror.fetch()
    message = str(exc.value)
    assert message.startswith(f"fetch of {tmp_path / 'nope'} failed: fatal: ")
    assert "does not appear to be a git repository" in message
    assert "\n" not in message
    assert not mirror.path.exists()


def test_resolve_requires_fetch_first(upstream, work):
    with pytest.raises(SourceError, match="fetch it before resolving"):
        Mirror(str(upstream), work).resolve(branch="main")


def test_resolve_needs_branch_or_commit(upstream, work):
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    with pytest.raises(SourceError, match="give a branch or a commit"):
        mirror.resolve()


def test_resolve_pushed_sha_and_abbreviation(upstream, work):
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    first = git(upstream, "rev-parse", "main~1")
    assert mirror.resolve(commit=first) == first
    assert mirror.resolve(commit=first[:7]) == first
    assert mirror.resolve(commit=first[:10].upper()) == first
    assert mirror.resolve(branch="main", commit=first[:9]) == first


def test_abbreviated_sha_is_not_confused_with_a_branch_name(upstream, work):
    first = git(upstream, "rev-parse", "main~1")
    head = git(upstream, "rev-parse", "main")
    # A branch whose name is the head's prefix must not hijack the lookup of that prefix.
    git(upstream, "branch", head[:8], first)
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    assert mirror.resolve(commit=head[:8]) == head


def test_unknown_sha_raises_naming_repository_and_sha(upstream, work):
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    missing = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(SourceError) as exc:
        mirror.resolve(commit=missing, commit_where="commit from the webhook")
    assert missing in str(exc.value)
    assert str(upstream) in str(exc.value)
    assert str(exc.value).startswith("commit from the webhook")
    with pytest.raises(SourceError, match="matches no commit"):
        mirror.resolve(commit="0123456")


def test_tree_sha_is_not_a_commit(upstream, work):
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    tree = git(upstream, "rev-parse", "main^{tree}")
    with pytest.raises(SourceError, match="matches no commit"):
        mirror.resolve(commit=tree[:12])


def test_ambiguous_abbreviation(upstream, work):
    # Two real commits whose ids share 7 hex digits: hash candidate commit objects in Python
    # (a birthday search needs some tens of thousands), then write just the colliding pair.
    tree = git(upstream, "rev-parse", "main^{tree}")
    parent = git(upstream, "rev-parse", "main")
    seen: dict[str, bytes] = {}
    pair: list[bytes] = []
    for n in range(2_000_000):
        body = (
            f"tree {tree}\nparent {parent}\n"
            f"author A <a@example.invalid> 1700000000 +0000\n"
            f"committer A <a@example.invalid> 1700000000 +0000\n\nCandidate {n}\n"
        ).encode()
        sha = hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()
        if sha[:7] in seen:
            pair = [seen[sha[:7]], body]
            break
        seen[sha[:7]] = body
    shas = []
    for i, body in enumerate(pair):
        res = subprocess.run(
            ["git", "-C", str(upstream), "hash-object", "-t", "commit", "-w", "--stdin"],
            input=body,
            capture_output=True,
            check=True,
        )
        shas.append(res.stdout.decode().strip())
        git(upstream, "branch", f"twin{i}", shas[-1])
    assert shas[0][:7] == shas[1][:7] and shas[0] != shas[1]

    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    with pytest.raises(SourceError, match=f"commit {shas[0][:7]} is ambiguous"):
        mirror.resolve(commit=shas[0][:7])
    longest = next(i for i in range(7, 40) if shas[0][i] != shas[1][i]) + 1
    assert mirror.resolve(commit=shas[1][:longest]) == shas[1]


def test_commit_pushed_then_force_pushed_away_is_fetched_by_sha(upstream, work):
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    orphan = commit_files(upstream, {"hotfix.txt": "x\n"}, "Pushed then rewritten")
    git(upstream, "reset", "-q", "--hard", "HEAD~1")
    # The webhook named `orphan`, but by the time we fetch no branch points at it.
    mirror.fetch()
    assert mirror.resolve(commit=orphan) == orphan
    assert not mirror.is_ancestor(orphan, "main")
    # Kept under its own ref: a later pruning fetch does not lose it.
    mirror.fetch()
    assert mirror._has_commit(orphan)


def test_is_ancestor(upstream, work):
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    git(upstream, "checkout", "-q", "-b", "other", "main~1")
    side = commit_files(upstream, {"side.txt": "x\n"}, "Side commit")
    mirror.fetch()
    first = git(upstream, "rev-parse", "main~1")
    assert mirror.is_ancestor(first, "main")
    assert not mirror.is_ancestor(side, "main")
    assert mirror.resolve(branch="main", commit=side) == side  # warns, does not refuse


def test_commit_info(upstream, work):
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    head = git(upstream, "rev-parse", "main")
    info = mirror.commit_info(head[:8])
    assert info["sha"] == head
    assert info["author"] == "Test Author"
    assert info["author_email"] == "author@example.invalid"
    assert info["subject"] == "Second commit"
    assert info["message"] == "Second commit\n\nWith a body line."
    committed = datetime.fromisoformat(info["committed_at"])
    assert abs(committed - datetime.now(UTC)) < timedelta(minutes=5)


def test_head_info_resolves_and_reads_the_branch_head_at_once(upstream, work):
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    head = git(upstream, "rev-parse", "main")
    assert mirror.head_info("main") == mirror.commit_info(head)
    with pytest.raises(SourceError, match="branch from the webhook 'gone' does not exist"):
        mirror.head_info("gone", where="branch from the webhook")
    with pytest.raises(SourceError, match="branch"):
        mirror.head_info("--output=/tmp/x")
    with pytest.raises(SourceError, match="fetch it before resolving"):
        Mirror(str(upstream), work / "other").head_info("main")


def child_pids() -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            pids.append(int(stat.parent.name))
    return pids


def test_fetch_runs_meanwhile_while_git_works(upstream, work):
    mirror = Mirror(str(upstream), work)
    seen = []

    def meanwhile():
        seen.append(child_pids())  # git is still running while the callable runs

    mirror.fetch(meanwhile=meanwhile)  # first fetch: creates the mirror
    mirror.fetch(meanwhile=meanwhile)
    assert len(seen) == 2 and all(len(pids) == 1 for pids in seen)
    assert mirror.head_info("main")["sha"] == git(upstream, "rev-parse", "main")


def test_fetch_kills_git_when_meanwhile_fails(work):
    # A listener that never answers: only the failing callable can end the fetch early.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def meanwhile():
        raise ImportError("no module named ansible_runner")

    try:
        mirror = Mirror(f"http://127.0.0.1:{port}/app.git", work, timeout=60)
        start = time.monotonic()
        with pytest.raises(ImportError, match="ansible_runner"):
            mirror.fetch(meanwhile=meanwhile)
        assert time.monotonic() - start < 10
        assert child_pids() == []
        assert not mirror.path.exists()
        assert [p.name for p in (work / "mirrors").iterdir()] == [mirror.path.name + ".lock"]
    finally:
        server.close()


# -- archive ------------------------------------------------------------------------------------


def test_archive_holds_the_commit_not_the_later_head(upstream, work, tmp_path):
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    wanted = git(upstream, "rev-parse", "main")
    commit_files(upstream, {"app.py": "print('v3')\n"}, "Later commit")
    mirror.fetch()
    release_id = make_release_id(wanted, datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC))
    result = mirror.archive(wanted, tmp_path / "releases", release_id)

    assert isinstance(result, ReleaseArchive)
    assert result.path == tmp_path / "releases" / f"{release_id}.tar.gz"
    assert result.commit == wanted
    data = result.path.read_bytes()
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    members = tar_members(result.path)
    assert members["app.py"] == b"print('v2')\n"
    assert members["REVISION"] == f"{wanted}\n".encode()
    assert "secret.txt" not in members  # export-ignore
    assert not any(name.startswith("tests/") for name in members)
    assert sorted(members) == [".gitattributes", "REVISION", "app.py"]
    assert [p.name for p in result.path.parent.iterdir()] == [result.path.name]


def test_archive_is_reproducible(upstream, work, tmp_path):
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    sha = mirror.resolve(branch="main")
    a = mirror.archive(sha, tmp_path / "a", "r1")
    b = mirror.archive(sha, tmp_path / "b", "r1")
    assert a.sha256 == b.sha256


def test_archive_refuses_bad_input(upstream, work, tmp_path):
    mirror = Mirror(str(upstream), work)
    mirror.fetch()
    sha = mirror.resolve(branch="main")
    with pytest.raises(SourceError, match="full commit sha"):
        mirror.archive(sha[:7], tmp_path, "r1")
    for bad in ("../escape", "-r", "a/b", ""):
        with pytest.raises(SourceError, match="release id"):
            mirror.archive(sha, tmp_path, bad)
    with pytest.raises(SourceError, match="not in the mirror"):
        mirror.archive("0" * 40, tmp_path, "r1")
    assert list(tmp_path.glob("*r1*")) == []  # no partial archive left


def test_release_id_format():
    sha = "0123456789abcdef0123456789abcdef01234567"
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert make_release_id(sha, when) == "20240102T010405Z-0123456789ab"
    assert make_release_id(sha.upper(), datetime(2024, 1, 2, 3, 4, 5)) == (
        "20240102T030405Z-0123456789ab"
    )
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{12}", make_release_id(sha))
    with pytest.raises(SourceError):
        make_release_id("abcdef1")


# -- concurrency, credentials, timeouts ---------------------------------------------------------


def test_concurrent_first_fetch_is_safe(upstream, work):
    head = git(upstream, "rev-parse", "main")
    errors: list[BaseException] = []

    def run():
        try:
            Mirror(str(upstream), work).fetch()
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Mirror(str(upstream), work).resolve(branch="main") == head


def test_fetch_waits_for_the_mirror_lock(upstream, work):
    holder = Mirror(str(upstream), work)
    done = threading.Event()

    def fetch():
        Mirror(str(upstream), work).fetch()
        done.set()

    with holder._locked():
        thread = threading.Thread(target=fetch)
        thread.start()
        assert not done.wait(0.5)
    thread.join(timeout=30)
    assert done.is_set()


def test_lock_wait_is_bounded(upstream, work):
    holder = Mirror(str(upstream), work)
    waiter = Mirror(str(upstream), work, timeout=0.3)
    with holder._locked(), pytest.raises(SourceError, match="stayed locked"):
        waiter.fetch()


def test_scrub_credentials():
    text = "fatal: unable to access 'https://bob:t0ken@git.example.invalid/a.git/': x"
    assert scrub_credentials(text) == (
        "fatal: unable to access 'https://***@git.example.invalid/a.git/': x"
    )
    assert scrub_credentials("ssh://git@host/x") == "ssh://***@host/x"
    assert scrub_credentials("no url here") == "no url here"


def test_credentials_never_in_errors_or_paths(work):
    # Port 1 on loopback refuses at once.
    url = "https://bob:s3cr3t-t0ken@127.0.0.1:1/org/app.git"
    mirror = Mirror(url, work, timeout=30)
    assert "s3cr3t" not in str(mirror.path)
    assert "s3cr3t" not in repr(mirror)
    with pytest.raises(SourceError) as exc:
        mirror.fetch()
    message = str(exc.value)
    assert "s3cr3t" not in message
    assert "https://***@127.0.0.1:1/org/app.git" in message
    assert "failed:" in message
    assert not mirror.path.exists()
    assert [p.name for p in (work / "mirrors").iterdir()] == [mirror.path.name + ".lock"]
    for cfg in (work / "mirrors").rglob("config"):
        assert "s3cr3t" not in cfg.read_text()


def test_timeout_kills_git_and_raises(work):
    # A loopback listener that accepts and never answers: git would hang forever.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        mirror = Mirror(f"http://127.0.0.1:{port}/app.git", work, timeout=1)
        start = time.monotonic()
        with pytest.raises(SourceError, match=r"timed out after 1s"):
            mirror.fetch()
        assert time.monotonic() - start < 10
    finally:
        server.close()


def test_missing_ssh_key_is_reported(tmp_path, work):
    with pytest.raises(SourceError, match="FRAISIER_SSH_KEY"):
        Mirror("git@example.invalid:org/app.git", work, ssh_key=str(tmp_path / "nope"))


def test_ssh_key_goes_to_git_only(tmp_path, work, monkeypatch):
    monkeypatch.delenv("GIT_SSH_COMMAND", raising=False)
    key = tmp_path / "deploy key"
    key.write_text("not a real key\n")
    mirror = Mirror("git@example.invalid:org/app.git", work, ssh_key=str(key))
    assert mirror._env["GIT_SSH_COMMAND"] == (
        f"ssh -i '{key}' -o IdentitiesOnly=yes -o BatchMode=yes"
    )
    assert mirror._env["GIT_TERMINAL_PROMPT"] == "0"
    assert "GIT_SSH_COMMAND" not in os.environ
