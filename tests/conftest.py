"""Shared fixtures: a real node per test (or per module), pydicom's shipped test data."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import reliability
from tests.support.node import RunningNode, run_node


def pytest_sessionstart(session: pytest.Session) -> None:
    reliability.start_session()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    args = " ".join(str(a) for a in session.config.invocation_params.args)
    report = reliability.finish_session(f"pytest {args}".strip())
    if report is not None:
        writer = session.config.get_terminal_writer()
        writer.line()
        writer.line(f"reliability report: {report}")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningNode]:
    """A fresh node with the built-in policy, its own storage and index under tmp_path."""
    with run_node(tmp_path / "node") as running:
        yield running


def require_dcmtk(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing and os.environ.get("CI"):
        pytest.fail(f"DCMTK tools missing in CI: {', '.join(missing)}")
    if missing:
        pytest.skip(f"DCMTK tools not installed: {', '.join(missing)} (scripts/test installs them)")
