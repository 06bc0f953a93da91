"""Fraisier: deployments driven by Git pushes, carried out by Ansible."""

__version__ = "0.1.0"
