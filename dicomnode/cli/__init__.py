"""The ``dicomnode`` command: a click group whose shared options are declared once, here.

Exit codes follow the DIMSE status category of what a command did (see ``dicomnode.status``):
0 success, 1 warning, 2 failure, 3 cancelled; 4 a usage or configuration error; 5 the peer could
not be reached or refused the association.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import click

from dicomnode.config import CONFIG_ENV, Config, ConfigError, load_config
from dicomnode.status import ExitCode

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class CliState:
    """What the group's options resolved to, handed to every subcommand."""

    config_path: Path | None
    verbosity: int
    _config: Config | None = None

    @property
    def config(self) -> Config:
        """The configuration, loaded on first use so commands that need none never fail on it."""
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as exc:
                click.echo(f"dicomnode: {exc}", err=True)
                sys.exit(ExitCode.USAGE)
        return self._config


pass_state = click.make_pass_decorator(CliState)


# syslog priorities (RFC 5424 6.2.1) by logging level, for journald's "<N>" line prefix.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


class JournalFormatter(logging.Formatter):
    """For stderr connected to journald: ``<priority>logger: message``, one line per event.

    journald stamps each line itself and reads the ``<N>`` prefix as the line's priority
    (SyslogLevelPrefix=, on by default), so ``journalctl -p warning`` works; a traceback is
    folded onto its event's line (" | " between its lines), as every newline would otherwise
    start a new journal entry of the default priority.
    """

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 2 if record.levelno > logging.ERROR else 7)
        return f"<{priority}>" + " | ".join(super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """Whether stderr is the stream systemd connected to journald ($JOURNAL_STREAM names its
    device and inode, systemd.exec(5)), and not, say, a pipe to a test or a terminal."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup_logging(verbosity: int, default: str = "WARNING") -> None:
    """Log to stderr, one line per event: with timestamps in a terminal or file, in journald's
    own form under systemd (:class:`JournalFormatter`)."""
    level = {-1: "ERROR", 0: default, 1: "INFO"}.get(verbosity, "DEBUG")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JournalFormatter() if stderr_is_journal() else logging.Formatter(LOG_FORMAT)
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # pynetdicom logs every PDU at DEBUG and identifiers at INFO; keep it one step quieter.
    logging.getLogger("pynetdicom").setLevel(max(logging.getLevelName(level), logging.WARNING))
    # peewee logs every SQL statement and pool hand-over at DEBUG.
    logging.getLogger("peewee").setLevel(logging.INFO)
    # pydicom logs each value it finds invalid at WARNING, quoted (a birth date written
    # 1937-06-11, a name as a date): the log says what was wrong, never the value. It also
    # repeats each of those lines as a Python warning, two raw lines on stderr: those are dropped.
    pydicom_log = logging.getLogger("pydicom")
    if not any(isinstance(f, WithholdValues) for f in pydicom_log.filters):
        pydicom_log.addFilter(WithholdValues())
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")


class WithholdValues(logging.Filter):
    """Rewrites pydicom's messages that quote a data element's value (PS3.5 6.2 VR checks) to
    name only the VR: no patient data in the operational log at WARNING (issue 6)."""

    # pydicom.valuerep: "Invalid value for VR DA: '...'." (after a length complaint, maybe) and
    # 'Value "..." is not valid for elements with a VR of IS'.
    _QUOTING = (
        (re.compile(r"Invalid value for VR (\w+): .*", re.DOTALL), r"Invalid value for VR \1"),
        (
            re.compile(r'Value ".*" is not valid for elements with a VR of (\w+)', re.DOTALL),
            r"Value not valid for VR \1",
        ),
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for pattern, replacement in self._QUOTING:
            if pattern.search(message):
                withheld = f"{replacement} (value withheld from the log)"
                record.msg, record.args = pattern.sub(withheld, message), None
                break
        return True


class _UsageError(click.UsageError):
    exit_code = int(ExitCode.USAGE)


class _Group(click.Group):
    """The group; a usage error anywhere exits with :attr:`ExitCode.USAGE` (click's own code 2
    is our FAILURE)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except _UsageError:
            raise
        except click.UsageError as exc:
            raise _UsageError(exc.format_message(), exc.ctx) from exc

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _UsageError(exc.format_message(), exc.ctx) from exc


def _config_here(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """``--config`` after a subcommand's name overrides the one before it."""
    if value is not None:
        state = ctx.find_object(CliState)
        if state is not None:
            state.config_path, state._config = value, None


_CONFIG_HELP = f"Configuration YAML (default: ${CONFIG_ENV}, else built-in defaults)."
_CONFIG_TYPE = click.Path(dir_okay=False, path_type=Path)
# The shared option, declared once: accepted before the subcommand (dicomnode --config F serve)
# and after it (dicomnode serve --config F), where ``with_config`` adds it.
with_config = click.option(
    "--config",
    type=_CONFIG_TYPE,
    expose_value=False,
    callback=_config_here,
    help=_CONFIG_HELP,
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=_CONFIG_TYPE, envvar=CONFIG_ENV, help=_CONFIG_HELP)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.version_option(package_name="dicomnode")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, verbose: int, quiet: bool) -> None:
    """dicomnode: a DICOM storage, query/retrieve and worklist node, and SCU tools."""
    ctx.obj = CliState(config_path=config_path, verbosity=-1 if quiet else verbose)


def _register() -> None:
    # Subcommands live in their own modules; importing them here (not at package import time of
    # dicomnode itself) keeps `import dicomnode` free of side effects.
    from dicomnode.cli import (
        archive_cmds,
        conformance_cmds,
        maintenance_cmds,
        probe_cmd,
        scu_cmds,
        serve_cmd,
        worklist_cmds,
    )

    modules = (serve_cmd, scu_cmds, archive_cmds, maintenance_cmds, worklist_cmds)
    for module in (*modules, conformance_cmds, probe_cmd):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
