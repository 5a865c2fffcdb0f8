"""``dicomnode conformance show``: the conformance statement of the running policy."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dicomnode.cli import CliState, pass_state, with_config
from dicomnode.status import ExitCode


@click.command("show")
@with_config
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["markdown", "html"]),
    default="markdown",
    show_default=True,
    help="Markdown (pipe tables), or one self-contained HTML page.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the statement to this file instead of stdout.",
)
@pass_state
def show_cmd(state: CliState, fmt: str, output: Path | None) -> None:
    """The node's DICOM Conformance Statement (PS3.2), generated from the configuration and
    conformance policy `dicomnode serve` would use: SOP classes and transfer syntaxes per
    caller, roles, association limits, query keys and matching, MWL, MPPS, character sets,
    TLS, access control and audit.

    Exits 0, or 4 with what is wrong when the configuration or the conformance file cannot be
    used (as check-config), or the output file cannot be written.
    """
    from dicomnode.policy import ConformanceError, load_policy
    from dicomnode.statement import build_statement, render_html, render_markdown

    config = state.config  # a configuration error exits 4 here, with its message
    try:
        policy = load_policy(config.conformance)
    except ConformanceError as exc:
        click.echo(f"dicomnode: {exc}", err=True)
        sys.exit(ExitCode.USAGE)
    statement = build_statement(config, policy)
    text = render_html(statement) if fmt == "html" else render_markdown(statement)
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        click.echo(f"dicomnode: {output}: cannot write the statement: {exc.strerror}", err=True)
        sys.exit(ExitCode.USAGE)
