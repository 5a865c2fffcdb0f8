"""``dicomnode serve``: run the node in the foreground."""

from __future__ import annotations

import sys

import click

from dicomnode.cli import CliState, pass_state, setup_logging, with_config
from dicomnode.policy import ConformanceError, load_policy
from dicomnode.status import ExitCode


@click.command("serve")
@with_config
@pass_state
def serve_cmd(state: CliState) -> None:
    """Run the node in the foreground until SIGTERM or Ctrl-C.

    Prints one line to stdout when it is listening: "listening on HOST:PORT" (with several
    workers: once every worker accepts). Exits 0 once stopped by a signal, 1 when the node could
    not start or a worker had to be killed at stop.
    """
    from dicomnode.ae import serve

    config = state.config
    setup_logging(state.verbosity, default=config.log_level)
    try:
        policy = load_policy(config.conformance)
    except ConformanceError as exc:
        click.echo(f"dicomnode: {exc}", err=True)
        sys.exit(ExitCode.USAGE)

    def ready(host: str, port: int) -> None:
        click.echo(f"{config.ae_title} listening on {host}:{port}")
        sys.stdout.flush()

    status = serve(config, policy, ready)
    if status:
        sys.exit(status)


COMMANDS: list[click.Command] = [serve_cmd]
