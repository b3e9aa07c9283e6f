"""`ensembler` commands of this group (see ensembler/cli/__init__.py)."""

from __future__ import annotations


def register(sub) -> None:
    """Add this group's commands to the top-level parser (none yet)."""
