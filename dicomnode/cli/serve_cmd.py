"""``dicomnode serve``: run the node in the foreground; ``dicomnode check-config``: check what
``serve`` (or a reload) would read, without serving."""

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


@click.command("check-config")
@with_config
@pass_state
def check_config_cmd(state: CliState) -> None:
    """Check the configuration as serve and a reload (SIGHUP) read it: the YAML, the
    conformance policy and the TLS files. Exits 0 when the node would start with it, 4 with
    what is wrong. Host names in peers' hosts are resolved and reported when they do not."""
    from dicomnode.access import AccessRules
    from dicomnode.tls import TlsError, client_context, server_context

    config = state.config  # a configuration error exits 4 here, with its message
    setup_logging(state.verbosity)
    try:
        policy = load_policy(config.conformance)
        if config.tls.enabled:
            server_context(config.tls)
        if any(peer.tls for peer in config.peers.values()):
            client_context(config.tls)
    except (ConformanceError, TlsError) as exc:
        click.echo(f"dicomnode: {exc}", err=True)
        sys.exit(ExitCode.USAGE)
    AccessRules(config)  # logs a warning for each host name that does not resolve
    where = config.source or "the built-in defaults"
    listeners = [] if config.tls.only else [f"port {config.port}"]
    if config.tls.enabled:
        listeners.append(f"DICOM TLS port {config.tls.port}")
    click.echo(
        f"{where}: OK ({config.ae_title} on {' and '.join(listeners)}, "
        f"{len(config.peers)} peers, {len(policy.accept)} SOP classes in the policy)"
    )


COMMANDS: list[click.Command] = [serve_cmd, check_config_cmd]
