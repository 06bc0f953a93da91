"""Fetching a fraise's repository into a local mirror and cutting one release archive from it.

Every value that reaches a git command line (branch, commit, URL) is validated here first, so
that nothing coming from a webhook or a config file can be read by git as an option.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from fraisier.errors import SourceError

log = logging.getLogger(__name__)

__all__ = [
    "Mirror",
    "ReleaseArchive",
    "make_release_id",
    "scrub_credentials",
    "validate_branch",
    "validate_repository_url",
    "validate_sha",
]

DEFAULT_TIMEOUT = 300.0
_FETCH_REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
# Commits fetched by sha alone are kept under their own ref so that gc cannot drop them
# while a rollback may still need them.
_PINNED_PREFIX = "refs/fraisier/fetched/"
# Defence in depth behind validate_repository_url: git itself refuses every other transport,
# ext:: and fd:: included.
_ALLOWED_PROTOCOLS = "file:git:http:https:ssh"
_ALLOWED_SCHEMES = frozenset({"file", "git", "http", "https", "ssh", "git+ssh", "ssh+git"})

_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_RELEASE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HELPER_TRANSPORT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+.-]*::")
_CREDENTIALS_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_REFNAME_FORBIDDEN = frozenset(" ~^:?*[\\\x7f")


def scrub_credentials(text: str) -> str:
    """Replace the user:password part of every URL in `text` with '***'."""
    return _CREDENTIALS_RE.sub(r"\g<scheme>***@", text)


def _show(value: object, limit: int = 100) -> str:
    """Quote an untrusted value for an error message: escaped, scrubbed and shortened."""
    text = scrub_credentials(str(value))
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)


def _refname_problem(name: str) -> str | None:
    """Why `name` breaks git's check-ref-format rules for a branch, or None when it is valid."""
    if not name:
        return "it is empty"
    if name.startswith("-"):
        return "it starts with '-'"
    if name == "@":
        return "it is '@'"
    if name == "HEAD":
        return "'HEAD' is not a branch name"
    if any(ord(c) < 0o40 for c in name):
        return "it contains a control character"
    bad = sorted({c for c in name if c in _REFNAME_FORBIDDEN})
    if bad:
        return "it contains " + ", ".join(repr(c) for c in bad)
    if ".." in name:
        return "it contains '..'"
    if "@{" in name:
        return "it contains '@{'"
    if name.endswith("."):
        return "it ends with '.'"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "it has an empty path component"
    for component in name.split("/"):
        if component.startswith("."):
            return f"component {component!r} starts with '.'"
        if component.endswith(".lock"):
            return f"component {component!r} ends with '.lock'"
    return None


def validate_branch(name: str, *, where: str = "branch") -> str:
    """Return `name` if it is a valid git branch name, else raise SourceError."""
    problem = "it is not a string" if not isinstance(name, str) else _refname_problem(name)
    if problem:
        raise SourceError(
            f"{where} is not a valid git branch name: {_show(name)} ({problem}); "
            "use a name that `git check-ref-format --branch` accepts"
        )
    return name


def validate_sha(value: str, *, where: str = "commit") -> str:
    """Return `value` lower-cased if it is a full or abbreviated (>= 7) commit sha, else raise."""
    ok = (
        isinstance(value, str)
        and _HEX_RE.fullmatch(value) is not None
        and (7 <= len(value) <= 40 or len(value) == 64)
    )
    if not ok:
        raise SourceError(
            f"{where} is not a commit sha: {_show(value)}; "
            "give 7 to 40 hexadecimal digits (64 for a sha256 repository)"
        )
    return value.lower()


def _is_local_path(url: str) -> bool:
    """Mirror git's own rule: no '://' and no colon before the first slash means a local path."""
    if "://" in url:
        return False
    colon = url.find(":")
    slash = url.find("/")
    return colon < 0 or (0 <= slash < colon)


def validate_repository_url(url: str, *, where: str = "repository") -> str:
    """Return `url` if it is a local path, file://, http(s)://, ssh://, git:// or scp-like URL."""

    def refuse(reason: str) -> SourceError:
        return SourceError(
            f"{where} is not an accepted repository URL: {_show(url)} ({reason}); "
            "use a local path or a file://, https://, ssh:// or user@host:path URL"
        )

    if not isinstance(url, str) or not url.strip():
        raise refuse("it is empty")
    if url.startswith("-"):
        raise refuse("it starts with '-'")
    if any(ord(c) < 0o40 or c == "\x7f" for c in url):
        raise refuse("it contains a control character")
    if _HELPER_TRANSPORT_RE.match(url):
        raise refuse("'<transport>::' remote helpers are not allowed")
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme.lower() not in _ALLOWED_SCHEMES:
            raise refuse(f"scheme {parts.scheme!r} is not allowed")
        if parts.scheme.lower() != "file":
            host = parts.hostname or ""
            if not host:
                raise refuse("it has no host")
            if host.startswith("-"):
                raise refuse("its host starts with '-'")
        return url
    if _is_local_path(url):
        return url
    # scp-like: [user@]host:path
    userhost = url.split(":", 1)[0]
    host = userhost.rsplit("@", 1)[-1]
    if not host or host.startswith("-") or userhost.startswith("-"):
        raise refuse("its host is empty or starts with '-'")
    return url


def make_release_id(commit: str, when: datetime | None = None) -> str:
    """Release id `YYYYmmddTHHMMSSZ-<12 hex of the commit>`, in UTC."""
    sha = validate_sha(commit)
    if len(sha) < 12:
        raise SourceError(
            f"commit {_show(commit)} is too short for a release id; resolve it to a full sha first"
        )
    when = datetime.now(UTC) if when is None else when
    if when.tzinfo is None:
        # A naive datetime is taken as UTC, which is what the store records.
        when = when.replace(tzinfo=UTC)
    return f"{when.astimezone(UTC):%Y%m%dT%H%M%SZ}-{sha[:12]}"


@dataclass(frozen=True)
class ReleaseArchive:
    """One release tarball: where it is, how big, its sha256, and the commit it holds."""

    path: Path
    size: int
    sha256: str
    commit: str


@dataclass(frozen=True)
class _Result:
    returncode: int
    stdout: bytes
    stderr: bytes


def _last_line(data: bytes) -> str:
    """The telling line of git's stderr: its first 'fatal:' line, else its last line."""
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    if not lines:
        return "no error output"
    # git follows a fatal line with advice ("...and the repository exists."), which says less.
    line = next((ln for ln in lines if ln.startswith("fatal:")), lines[-1])
    return scrub_credentials(line)[:300]


def _mirror_name(url: str) -> str:
    """Stable directory name: a hash of the URL (credentials removed) and a readable tail."""
    clean = scrub_credentials(url)
    digest = hashlib.sha256(clean.encode()).hexdigest()[:16]
    tail = re.split(r"[/:]", clean.rstrip("/"))[-1]
    tail = tail.removesuffix(".git")
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", tail).strip("._-")[:40] or "repo"
    return f"{digest}-{tail}.git"


class Mirror:
    """A bare mirror of one repository under `<work_dir>/mirrors/`, fetched under a file lock."""

    def __init__(
        self,
        url: str,
        work_dir: Path,
        *,
        ssh_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        validate_repository_url(url)
        if _is_local_path(url):
            # git runs with another working directory; a relative path must not change meaning.
            url = os.path.abspath(os.path.expanduser(url))
        self.url = url
        self.display_url = scrub_credentials(url)
        self.timeout = float(timeout)
        # Absolute: git runs with the mirrors directory as its working directory.
        self.mirrors_dir = Path(work_dir).absolute() / "mirrors"
        self.path = self.mirrors_dir / _mirror_name(url)
        self._lock_path = self.mirrors_dir / (self.path.name + ".lock")
        self._env = self._git_env(ssh_key)

    def __repr__(self) -> str:
        return f"Mirror({self.display_url!r}, path={str(self.path)!r})"

    # -- plumbing ---------------------------------------------------------------------------

    @staticmethod
    def _git_env(ssh_key: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            GIT_TERMINAL_PROMPT="0",
            GCM_INTERACTIVE="never",
            GIT_ALLOW_PROTOCOL=_ALLOWED_PROTOCOLS,
            LC_ALL="C",
        )
        env.pop("SSH_ASKPASS", None)
        env.pop("GIT_ASKPASS", None)
        if ssh_key:
            key = os.path.expanduser(ssh_key)
            if not os.path.isfile(key):
                raise SourceError(
                    f"SSH key {_show(ssh_key)} does not exist or is not a file; "
                    "set FRAISIER_SSH_KEY to the path of a private key"
                )
            env["GIT_SSH_COMMAND"] = (
                f"ssh -i {shlex.quote(key)} -o IdentitiesOnly=yes -o BatchMode=yes"
            )
            env.pop("GIT_SSH", None)
        elif "GIT_SSH_COMMAND" not in env and "GIT_SSH" not in env:
            env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes"
        return env

    def _git(
        self,
        *args: str,
        git_dir: Path | None = None,
        input: bytes | None = None,
        check: bool = True,
        what: str = "git",
        meanwhile: Callable[[], object] | None = None,
    ) -> _Result:
        """Run git on the mirror with a timeout; kill its whole process group if it runs over.

        `meanwhile` runs in this thread while git works, e.g. an import the caller needs next;
        if it raises, git is killed and the exception goes on.
        """
        cmd = ["git", "--git-dir", str(git_dir or self.path), *args]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                cwd=self.mirrors_dir,
                # Own session: a timeout kills ssh and helpers too, and ssh cannot reach a tty.
                start_new_session=True,
            )
        except OSError as exc:
            raise SourceError(f"cannot run git for {self.display_url}: {exc}") from exc
        deadline = time.monotonic() + self.timeout
        try:
            if meanwhile is not None:
                meanwhile()
            out, err = proc.communicate(input, timeout=max(deadline - time.monotonic(), 0.001))
        except subprocess.TimeoutExpired:
            self._kill(proc)
            raise SourceError(
                f"{what} of {self.display_url} timed out after {self.timeout:g}s; "
                "check that the repository is reachable or raise the timeout"
            ) from None
        except BaseException:
            self._kill(proc)
            raise
        if check and proc.returncode != 0:
            raise SourceError(f"{what} of {self.display_url} failed: {_last_line(err)}")
        return _Result(proc.returncode, out, err)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the mirror's file lock, waiting at most `timeout` seconds for it."""
        self.mirrors_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.timeout
            delay = 0.01
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise SourceError(
                            f"mirror {self.path} of {self.display_url} stayed locked for "
                            f"{self.timeout:g}s; another fetch is still running"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.2)
            yield
        finally:
            os.close(fd)

    def _fetch_into(
        self,
        git_dir: Path,
        *refspecs: str,
        prune: bool = True,
        meanwhile: Callable[[], object] | None = None,
    ) -> None:
        args = ["fetch", "--quiet", "--no-write-fetch-head"]
        if prune:
            args.append("--prune")
        self._git(
            *args, "--", self.url, *refspecs, git_dir=git_dir, what="fetch", meanwhile=meanwhile
        )

    # -- public -----------------------------------------------------------------------------

    def fetch(self, *, meanwhile: Callable[[], object] | None = None) -> None:
        """Create the mirror on first use, else fetch branches and tags with prune.

        `meanwhile` runs while the fetch is under way (see `_git`): a fetch over the network
        takes long enough to hide the caller's next imports behind it.
        """
        with self._locked():
            if (self.path / "HEAD").is_file():
                self._fetch_into(self.path, *_FETCH_REFSPECS, meanwhile=meanwhile)
                return
            # A bare repo filled by one fetch of heads and tags instead of `clone --mirror`:
            # no refs/pull/* clutter, and no URL (maybe with a token) written into its config.
            # Built aside and renamed so a failed first fetch never leaves a half mirror.
            tmp = Path(tempfile.mkdtemp(prefix=self.path.name + ".tmp-", dir=self.mirrors_dir))
            try:
                self._git("init", "--quiet", "--bare", git_dir=tmp, what="init")
                self._fetch_into(tmp, *_FETCH_REFSPECS, meanwhile=meanwhile)
                if self.path.exists():
                    shutil.rmtree(self.path)
                tmp.rename(self.path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def _require_mirror(self) -> None:
        if not (self.path / "HEAD").is_file():
            raise SourceError(
                f"no mirror of {self.display_url} at {self.path}; fetch it before resolving"
            )

    def _has_commit(self, sha: str) -> bool:
        res = self._git("cat-file", "-e", f"{sha}^{{commit}}", check=False, what="lookup")
        return res.returncode == 0

    def _commits_with_prefix(self, prefix: str) -> list[str]:
        # Resolving the prefix by listing objects, never by rev-parse of the bare string,
        # so that a branch or tag named like a hex prefix cannot stand in for the commit.
        res = self._git("rev-parse", f"--disambiguate={prefix}", check=False, what="lookup")
        candidates = res.stdout.decode().split()
        if not candidates:
            return []
        batch = self._git(
            "cat-file",
            "--batch-check=%(objectname) %(objecttype)",
            input=("\n".join(candidates) + "\n").encode(),
            what="lookup",
        )
        return sorted(
            name
            for name, kind in (ln.split() for ln in batch.stdout.decode().splitlines())
            if kind == "commit"
        )

    def _fetch_sha(self, sha: str) -> str | None:
        """Fetch one commit by sha; return why it failed, since a refusal is not yet an error."""
        try:
            with self._locked():
                self._fetch_into(self.path, f"+{sha}:{_PINNED_PREFIX}{sha}", prune=False)
        except SourceError as exc:
            return exc.message
        return None

    def _branch_head(self, branch: str, where: str) -> str:
        res = self._git(
            "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}",
            check=False, what="lookup",
        )  # fmt: skip
        if res.returncode != 0:
            raise self._no_branch(branch, where)
        return res.stdout.decode().strip()

    def _no_branch(self, branch: str, where: str) -> SourceError:
        return SourceError(
            f"{where} {branch!r} does not exist in {self.display_url}; "
            "push it or fix the branch in fraises.yaml"
        )

    def resolve(
        self,
        *,
        branch: str | None = None,
        commit: str | None = None,
        branch_where: str = "branch",
        commit_where: str = "commit",
    ) -> str:
        """Full sha of `commit` (full or abbreviated), or of the head of `branch`."""
        if branch is not None:
            validate_branch(branch, where=branch_where)
        if commit is None:
            if branch is None:
                raise SourceError("nothing to deploy: give a branch or a commit")
            self._require_mirror()
            return self._branch_head(branch, branch_where)
        sha = validate_sha(commit, where=commit_where)
        self._require_mirror()
        if len(sha) in (40, 64):
            if not self._has_commit(sha):
                failure = self._fetch_sha(sha)
                if not self._has_commit(sha):
                    detail = f" ({failure})" if failure else ""
                    raise SourceError(
                        f"{commit_where} {sha} is not in {self.display_url} even after fetching "
                        f"it by sha{detail}; check that it was pushed to this repository"
                    )
            full = sha
        else:
            found = self._commits_with_prefix(sha)
            if not found:
                raise SourceError(
                    f"{commit_where} {sha} matches no commit in {self.display_url}; "
                    "check the sha or give it in full"
                )
            if len(found) > 1:
                raise SourceError(
                    f"{commit_where} {sha} is ambiguous in {self.display_url} "
                    f"({', '.join(f[:12] for f in found[:5])}); give more digits"
                )
            full = found[0]
        if branch is not None and not self.is_ancestor(full, branch):
            log.warning(
                "commit %s is not on branch %r of %s; deploying it anyway",
                full,
                branch,
                self.display_url,
            )
        return full

    def is_ancestor(self, sha: str, branch: str) -> bool:
        """Whether commit `sha` is reachable from the head of `branch`."""
        sha = validate_sha(sha)
        validate_branch(branch)
        res = self._git(
            "merge-base", "--is-ancestor", sha, f"refs/heads/{branch}",
            check=False, what="ancestry check",
        )  # fmt: skip
        if res.returncode in (0, 1):
            return res.returncode == 0
        raise SourceError(
            f"cannot tell whether {sha} is on branch {branch!r} of {self.display_url}: "
            f"{_last_line(res.stderr)}"
        )

    def commit_info(self, sha: str) -> dict:
        """sha, author, author_email, subject, message, authored_at, committed_at (ISO 8601)."""
        return self._read_commit(f"{validate_sha(sha)}^{{commit}}", check=True)

    def head_info(self, branch: str, *, where: str = "branch") -> dict:
        """`commit_info` of the head of `branch`: the resolution and the read in one git call."""
        validate_branch(branch, where=where)
        self._require_mirror()
        info = self._read_commit(f"refs/heads/{branch}^{{commit}}", check=False)
        if info is None:
            raise self._no_branch(branch, where)
        return info

    def _read_commit(self, rev: str, *, check: bool) -> dict | None:
        res = self._git(
            "show", "-s", "--no-show-signature", "--no-notes",
            "--format=%H%x00%an%x00%ae%x00%aI%x00%cI%x00%B", rev, "--",
            check=check, what="reading commit",
        )  # fmt: skip
        if res.returncode != 0:
            return None
        full, author, email, authored, committed, message = res.stdout.decode(
            "utf-8", "replace"
        ).split("\x00", 5)
        message = message.rstrip("\n")
        return {
            "sha": full,
            "author": author,
            "author_email": email,
            "subject": message.split("\n", 1)[0],
            "message": message,
            "authored_at": authored,
            "committed_at": committed,
        }

    def archive(self, sha: str, dest_dir: Path, release_id: str) -> ReleaseArchive:
        """Write `<dest_dir>/<release_id>.tar.gz` of the commit's tree plus a REVISION file."""
        sha = validate_sha(sha)
        if len(sha) not in (40, 64):
            raise SourceError(f"archive needs a full commit sha, got {sha}; resolve it first")
        if not isinstance(release_id, str) or not _RELEASE_ID_RE.fullmatch(release_id):
            raise SourceError(
                f"release id {_show(release_id)} is not valid; use letters, digits, '.', '_', '-'"
            )
        self._require_mirror()
        dest_dir = Path(dest_dir).absolute()
        dest_dir.mkdir(parents=True, exist_ok=True)
        final = dest_dir / f"{release_id}.tar.gz"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{release_id}.", suffix=".tmp", dir=dest_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            # export-ignore and export-subst come from the archived tree's .gitattributes.
            res = self._git(
                "archive", "--format=tar.gz", f"--add-virtual-file=REVISION:{sha}\n",
                "-o", str(tmp), f"{sha}^{{commit}}",
                check=False, what="archive",
            )  # fmt: skip
            if res.returncode != 0:
                # Asked only now: a lookup before every archive is one git call more.
                if not self._has_commit(sha):
                    raise SourceError(f"commit {sha} is not in the mirror of {self.display_url}")
                raise SourceError(f"archive of {self.display_url} failed: {_last_line(res.stderr)}")
            digest = hashlib.sha256()
            size = 0
            with tmp.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            tmp.chmod(0o644)
            tmp.replace(final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ReleaseArchive(path=final, size=size, sha256=digest.hexdigest(), commit=sha)
