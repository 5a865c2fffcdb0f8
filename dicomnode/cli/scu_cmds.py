"""SCU commands: ``dicomnode echo``, ``dicomnode send``."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
