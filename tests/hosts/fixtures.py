"""Pytest fixtures for real systemd test hosts.

`hosts(n)` boots n hosts for one test and stops them when the test ends, whatever its
outcome; `module_hosts(n)` does the same for a whole test module. Tests that need hosts
carry the `hosts` marker: without root or the Debian packages they skip with one message
naming what to install, except in CI (`CI=true`), where they fail with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from .env import in_ci, missing_requirements
from .machines import Host, boot_hosts, stop_hosts
from .rootfs import Root, ensure_root


def require_hosts() -> None:
    """Skip the current test (fail it in CI) when this machine cannot run test hosts."""
    problem = missing_requirements()
    if problem is None:
        return
    if in_ci():
        pytest.fail(f"test hosts unavailable in CI: {problem}", pytrace=False)
    pytest.skip(f"test hosts unavailable: {problem}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Apply the environment check to every test marked `hosts`."""
    if item.get_closest_marker("hosts") is not None:
        require_hosts()


class HostFactory:
    """Callable that boots hosts and remembers them, so that its owner can stop them all."""

    def __init__(self, root: Root):
        self.root = root
        self.booted: list[Host] = []

    def __call__(self, count: int = 1, names: Sequence[str] | None = None) -> list[Host]:
        """Boot `count` hosts (named `names` if given) and wait until they are ready."""
        booted = boot_hosts(count, names=names, root=self.root)
        self.booted.extend(booted)
        return booted

    def stop_all(self) -> None:
        """Stop every host this factory booted; those already stopped are skipped."""
        booted, self.booted = self.booted, []
        stop_hosts(booted)


@pytest.fixture(scope="session")
def testhost_root() -> Root:
    """The cached Debian root and SSH key pair, built on first use."""
    require_hosts()
    return ensure_root()


@pytest.fixture
def hosts(testhost_root: Root) -> Iterator[HostFactory]:
    """Factory: `hosts(n)` boots n hosts that are stopped at the end of this test."""
    factory = HostFactory(testhost_root)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def module_hosts(testhost_root: Root) -> Iterator[HostFactory]:
    """Factory: `module_hosts(n)` boots n hosts shared by the tests of one module."""
    factory = HostFactory(testhost_root)
    try:
        yield factory
    finally:
        factory.stop_all()
