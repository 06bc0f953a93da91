"""Command line interface: a Click group; business rules live elsewhere."""

from __future__ import annotations

import click

from fraisier import __version__


@click.group()
@click.version_option(__version__, prog_name="fraisier")
def cli() -> None:
    """Fraisier: deploy fraises (services) with Ansible from Git pushes or by hand."""


def main() -> None:
    """Console script entry point."""
    cli()
