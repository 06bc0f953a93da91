"""What the end-to-end deploy tests share: example repositories, the CLI, a private store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.name=Dev", "-c", "user.email=dev@example.com"]


class ExampleRepo:
    """A real git repository holding a copy of one of examples/, with one commit."""

    def __init__(self, path: Path, example: str, files: dict[str, str | None] | None = None):
        self.path = path
        shutil.copytree(REPO_ROOT / "examples" / example, path)
        self.git("init", "-q", "-b", "main")
        self.commit("version 1", files or {})

    def git(self, *args: str) -> str:
        """Run git in the repository and return its output."""
        out = subprocess.run(
            [*GIT, *args], cwd=self.path, check=True, capture_output=True, text=True
        )
        return out.stdout.strip()

    def commit(self, message: str, files: dict[str, str | None]) -> str:
        """Write (or, for None, delete) files and commit everything; return the new sha."""
        for name, content in files.items():
            target = self.path / name
            if content is None:
                target.unlink(missing_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")


def fraisier(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "fraisier", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )
