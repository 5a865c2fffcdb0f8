"""``dicomnode conformance check OURS THEIRS``: simulated negotiation with a peer.

Exit codes: 0 no mismatch; 2 (:attr:`ExitCode.FAILURE`) a mismatch (with ``--strict`` also a
gap): a negotiation that would fail, as an SCU command exits 2 when an operation failed; 4
(:attr:`ExitCode.USAGE`) a file that cannot be read or is not valid, the message naming the key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import yaml

from dicomnode.cli import CliState, pass_state, with_config
from dicomnode.config import Service
from dicomnode.policy import ConformanceError, load_policy
from dicomnode.status import ExitCode

_FILE = click.Path(dir_okay=False, path_type=Path)
_SERVICE_NAMES = [s.value for s in Service]


def _services(value: str) -> frozenset[Service]:
    if value.strip().lower() == "all":
        return frozenset(Service)
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in _SERVICE_NAMES]
    if unknown or not names:
        raise click.BadParameter(
            f"{', '.join(unknown) or value!r}: allowed: all, or a comma-separated list of "
            f"{', '.join(_SERVICE_NAMES)}",
            param_hint="--services",
        )
    return frozenset(Service(n) for n in names)


@click.command("check")
@click.argument("ours", type=_FILE)
@click.argument("theirs", type=_FILE)
@click.option(
    "--ae-title",
    "ae_title",
    help="The calling AE title the peer uses with us, which picks our profile for it (an "
    "override under peers: in OURS) and, with a configuration, its services. Default: "
    "device.ae_title of THEIRS.",
)
@click.option(
    "--services",
    "services_opt",
    help="What our node allows that caller: all, or a comma-separated list of "
    f"{', '.join(_SERVICE_NAMES)}. Default: from the configuration (--config: the peer with that "
    "AE title, else unknown_peers); with no configuration, all.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "yaml", "json"]),
    default="text",
    show_default=True,
    help="Report format.",
)
@click.option(
    "--strict", is_flag=True, help="Count gaps (a SOP class one side lacks) as mismatches."
)
@click.option("--all", "full", is_flag=True, help="Name every SOP class in the text report.")
@with_config
@pass_state
def check_cmd(
    state: CliState,
    ours: Path,
    theirs: Path,
    ae_title: str | None,
    services_opt: str | None,
    fmt: str,
    strict: bool,
    full: bool,
) -> None:
    """Pre-flight check of our conformance YAML (OURS, the form of config/conformance.yaml)
    against a peer's (THEIRS, the form of config/peers/*.yaml): association negotiation simulated
    in both directions, per SOP class, with every mismatch, its consequence and the YAML change
    to make. No network. Exit 0: no mismatch; 2: a mismatch; 4: a bad file."""
    # Imported here, not with the command table: every other command starts without it.
    from dicomnode.preflight import (
        ALL_SERVICES,
        check,
        exit_code,
        load_peer_conformance,
        render_text,
        report_data,
    )

    try:
        policy = load_policy(ours)
        peer = load_peer_conformance(theirs)
    except ConformanceError as exc:
        click.echo(f"dicomnode: {exc}", err=True)
        sys.exit(ExitCode.USAGE)
    aet = (peer.device.ae_title if ae_title is None else ae_title).strip()
    key = "peers.NAME.services, or unknown_peers"
    if services_opt is not None:
        services = _services(services_opt)
        source = "--services"
    elif state.config_path is not None:
        config = state.config
        known = config.peer_by_ae_title(aet) if aet else None
        services = config.services_for(aet)
        key = f"peers.{known.name}.services" if known is not None else "unknown_peers"
        source = f"{state.config_path}: {key}"
    else:
        services = ALL_SERVICES
        source = "no configuration given: all; --config applies its access rules"
    report = check(
        policy,
        peer,
        ours=str(ours),
        theirs=str(theirs),
        calling_ae_title=aet,
        services=services,
        services_source=source,
        services_key=key,
    )
    if fmt == "text":
        click.echo(render_text(report, strict=strict, full=full), nl=False)
    elif fmt == "json":
        click.echo(json.dumps(report_data(report, strict), indent=2))
    else:
        click.echo(
            yaml.safe_dump(report_data(report, strict), sort_keys=False, width=100), nl=False
        )
    sys.exit(exit_code(report, strict))
