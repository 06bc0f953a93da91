"""The wheel carries the playbooks and roles, so `pip install fraisier` alone can deploy."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_playbooks_roles_and_console_scripts(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("fraisier-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for playbook in (ROOT / "playbooks").glob("*.yml"):
        assert f"fraisier/playbooks/{playbook.name}" in names
    for path in (ROOT / "roles").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            assert f"fraisier/{path.relative_to(ROOT)}" in names, path
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "fraisier = fraisier.cli:main" in text
    assert "fraisier-webhook = fraisier.web:main" in text
