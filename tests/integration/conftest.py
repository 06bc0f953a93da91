"""Fixtures of the end-to-end deploy tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A private store and work dir for one test."""
    monkeypatch.setenv("FRAISIER_DB_PATH", str(tmp_path / "state" / "fraisier.db"))
    monkeypatch.setenv("FRAISIER_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("FRAISIER_DATABASE_URL", raising=False)
    return tmp_path
