"""``dicomnode serve``: run the node in the foreground."""

from __future__ import annotations

import sys

import click

from dicomnode.cli import CliState, pass_state, setup_logging, with_config
from dicomnode.policy import ConformanceError, load_policy
from dicomnode.status import ExitCode

# The lines on stdout that say the node serves, one per listener.
LISTENING = "listening on"
LISTENING_TLS = "listening for DICOM TLS on"


@click.command("serve")
@with_config
@pass_state
def serve_cmd(state: CliState) -> None:
    """Run the node in the foreground until SIGTERM or Ctrl-C; SIGHUP reloads the configuration.

    Prints a line to stdout for each listener once it serves (with several workers: once every
    worker accepts): "AET listening on HOST:PORT", and "AET listening for DICOM TLS on
    HOST:PORT". Under systemd (Type=notify) it also reports readiness, reloads and stopping.
    Exits 0 once stopped by a signal (associations still open after service.stop_grace are
    aborted), 1 when the node could not start or a worker had to be killed at stop.
    """
    from dicomnode.ae import serve

    config = state.config
    setup_logging(state.verbosity, default=config.log_level)
    try:
        policy = load_policy(config.conformance)
    except ConformanceError as exc:
        click.echo(f"dicomnode: {exc}", err=True)
        sys.exit(ExitCode.USAGE)

    def ready(addresses: list[tuple[str, int, bool]]) -> None:
        for host, port, tls in addresses:
            click.echo(f"{config.ae_title} {LISTENING_TLS if tls else LISTENING} {host}:{port}")
        sys.stdout.flush()

    status = serve(config, policy, ready)
    if status:
        sys.exit(status)


COMMANDS: list[click.Command] = [serve_cmd]
