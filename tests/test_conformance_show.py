"""`dicomnode conformance show` against a real node: every presentation context the statement lists
is accepted in a real association, in the listed transfer syntax; what it does not list is
rejected; the role selection and the implementation identity it claims are what the node does.

The statement is rendered by the CLI from the same configuration file the node was started with,
and read back out of the Markdown (UIDs in code spans, one per table cell), so a statement that
drifts from negotiation fails here.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
import yaml
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)
from pynetdicom import AE, build_context, build_role
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation

from dicomnode.config import Service, load_config
from dicomnode.policy import SOP_CLASS_GROUPS, TRANSFER_SYNTAX_GROUPS, load_policy
from dicomnode.statement import build_statement, render_markdown
from dicomnode.status import ExitCode
from tests.support.node import RunningNode, run_node, write_config
from tests.support.tls import make_pki

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT, IMPLICIT = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)
J2K = str(JPEG2000Lossless)
BATCH = 128  # PS3.8 9.3.2.2: at most 128 presentation contexts in one association
CALLER = "TESTSCU"  # not a configured peer: it gets unknown_peers, set to every service here
ALL_SERVICES = [s.value for s in Service]

# Only CT (JPEG 2000 lossless preferred, then explicit VR little endian) and Verification, both
# roles agreed for CT; OLDCT is held to explicit VR little endian, CTJ2K may send CT only, and
# only as JPEG 2000 lossless (its own accept list).
RESTRICTED: dict[str, Any] = {
    "accept": [
        {"sop_classes": ["verification"], "transfer_syntaxes": ["ExplicitVRLittleEndian"]},
        {
            "sop_classes": ["CTImageStorage"],
            "transfer_syntaxes": ["JPEG2000Lossless", "ExplicitVRLittleEndian"],
        },
    ],
    "roles": [{"sop_classes": ["CTImageStorage"], "scu": True, "scp": True}],
    "peers": {
        "OLDCT": {"transfer_syntaxes": ["ExplicitVRLittleEndian"]},
        "CTJ2K": {
            "accept": [
                {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["JPEG2000Lossless"]}
            ]
        },
    },
}


# --- reading the statement back ----------------------------------------------------------------

_UID_CELL = re.compile(r"^`([0-9]+(?:\.[0-9]+)+)`$")
_CALLER_HEADING = re.compile(r"Calling AE title `([^`]+)`")


@dataclass
class Group:
    """One presentation context table: SOP classes (with their role cells) and syntaxes."""

    sop_classes: list[str] = field(default_factory=list)
    roles: dict[str, tuple[str, str]] = field(default_factory=dict)
    transfer_syntaxes: list[str] = field(default_factory=list)


def context_tables(markdown: str) -> dict[str | None, list[Group]]:
    """The presentation context tables of the statement by caller: None for the general policy,
    else the calling AE title of an override."""
    tables: dict[str | None, list[Group]] = {}
    scope: str | None = None
    in_tables = False
    group: Group | None = None
    kind = ""
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            caller = _CALLER_HEADING.search(title)
            if title.endswith("Presentation Context Tables"):
                scope, in_tables = None, True
            elif caller:
                scope, in_tables = caller.group(1), True
            elif "Presentation contexts:" in title and in_tables:
                group = Group()
                tables.setdefault(scope, []).append(group)
            else:
                in_tables = False
            if not ("Presentation contexts:" in title and in_tables):
                group = None
            kind = ""
            continue
        if group is None or not line.startswith("|"):
            kind = ""
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if "SOP Class UID" in cells:
            kind = "sop"
            continue
        if "Transfer Syntax UID" in cells:
            kind = "ts"
            continue
        uids = [m.group(1) for c in cells if (m := _UID_CELL.match(c))]
        if not uids:
            continue
        if kind == "sop":
            group.sop_classes.append(uids[0])
            group.roles[uids[0]] = (cells[2], cells[3])
        elif kind == "ts":
            group.transfer_syntaxes.append(uids[0])
    return tables


def pairs(groups: Iterable[Group]) -> list[tuple[str, str]]:
    return [(sop, ts) for g in groups for sop in g.sop_classes for ts in g.transfer_syntaxes]


def table_value(markdown: str, item: str) -> str:
    """The code-span value of a two-column ``| item | `value` |`` row."""
    match = re.search(rf"^\| {re.escape(item)} \| `([^`]+)` \|$", markdown, re.MULTILINE)
    assert match, f"no {item!r} row in the statement"
    return match.group(1)


# --- proposing them ----------------------------------------------------------------------------


def negotiate(
    node: RunningNode, proposed: list[tuple[str, str]], calling_ae: str = CALLER
) -> set[tuple[str, str]]:
    """Propose each (SOP class, transfer syntax) as a context of its own, at most 128 per
    association; return the pairs the node accepted (with the syntax it accepted)."""
    accepted: set[tuple[str, str]] = set()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    try:
        for start in range(0, len(proposed), BATCH):
            batch = proposed[start : start + BATCH]
            contexts = [build_context(sop, [ts]) for sop, ts in batch]
            assoc = ae.associate(node.host, node.port, contexts=contexts, ae_title=node.ae_title)
            if assoc.is_established:
                accepted |= {
                    (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.accepted_contexts
                }
                assoc.release()
            else:
                # pynetdicom aborts an association in which nothing was accepted; a rejected
                # association is a failure of the caller's right to call, not of a context.
                assert not assoc.is_rejected, f"association from {calling_ae} rejected"
    finally:
        ae.shutdown()
    return accepted


# --- the nodes ---------------------------------------------------------------------------------


@dataclass
class Shown:
    node: RunningNode
    markdown: str
    html: str


def _show(node: RunningNode, tmp: Path) -> Shown:
    done = node.cli("conformance", "show")
    assert done.returncode == 0, done.stderr
    out = tmp / "statement.html"
    done_html = node.cli("conformance", "show", "--format", "html", "--output", str(out))
    assert done_html.returncode == 0 and done_html.stdout == "", done_html.stderr
    return Shown(node, done.stdout, out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=["default", "restricted"])
def shown(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Shown]:
    """A node with the built-in policy, or with RESTRICTED, and its statement as the CLI renders
    it from the node's own configuration file."""
    root = tmp_path_factory.mktemp(request.param)
    settings: dict[str, Any] = {
        "unknown_peers": ALL_SERVICES,
        "limits": {"max_pdu_size": 65536, "max_associations": 7},
    }
    conformance = RESTRICTED if request.param == "restricted" else None
    with run_node(root / "node", conformance=conformance, **settings) as node:
        yield _show(node, root)


# --- the tests ---------------------------------------------------------------------------------


def test_every_listed_context_is_accepted_in_its_syntax(shown: Shown) -> None:
    """Every (SOP class, transfer syntax) of every table is accepted, from the caller the table
    is for, in exactly that syntax: one context per pair, in batches of 128."""
    tables = context_tables(shown.markdown)
    assert None in tables, "no general presentation context tables in the statement"
    for caller, groups in tables.items():
        listed = pairs(groups)
        assert listed, caller
        assert len(set(listed)) == len(listed), f"{caller}: a pair listed twice"
        accepted = negotiate(shown.node, listed, caller or CALLER)
        assert accepted == set(listed), (caller, sorted(set(listed) - accepted)[:5])


def test_statement_lists_what_the_policy_accepts(shown: Shown) -> None:
    """The Markdown holds exactly the pairs of the Statement built from the same files."""
    config = load_config(shown.node.config_path)
    statement = build_statement(config, load_policy(config.conformance))
    assert set(pairs(context_tables(shown.markdown)[None])) == statement.accepted_pairs()
    assert render_markdown(statement) == shown.markdown


def test_what_is_not_listed_is_rejected(shown: Shown) -> None:
    tables = context_tables(shown.markdown)
    listed = set(pairs(tables[None]))
    listed_classes = {sop for sop, _ in listed}
    every_class = [uid for group in SOP_CLASS_GROUPS.values() for uid in group]
    unlisted_class = next(uid for uid in every_class if uid not in listed_classes)
    ct_syntaxes = {ts for sop, ts in listed if sop == CT}
    # Every syntax pydicom knows is listed for CT in the default policy; GE's private implicit
    # VR big endian syntax is in no policy.
    candidates = [*TRANSFER_SYNTAX_GROUPS["all"], "1.2.840.113619.5.2"]
    unlisted_syntax = next(ts for ts in candidates if ts not in ct_syntaxes)
    probes = [(unlisted_class, EXPLICIT), (unlisted_class, IMPLICIT)]
    if ct_syntaxes:
        probes.append((CT, unlisted_syntax))
    verification_syntaxes = {ts for sop, ts in listed if sop == VERIFICATION}
    probes.append(
        (VERIFICATION, next(ts for ts in (IMPLICIT, J2K) if ts not in verification_syntaxes))
    )
    # One listed pair keeps the association up, so each probe is answered on its own.
    accepted = negotiate(shown.node, [(VERIFICATION, EXPLICIT), *probes])
    assert accepted == {(VERIFICATION, EXPLICIT)}
    if "OLDCT" in tables:
        # Restricted policy: MR is in no table, CT not as JPEG baseline, and not as JPEG 2000
        # from OLDCT (its override narrows to explicit VR little endian).
        assert (MR, EXPLICIT) not in listed and (CT, str(JPEGBaseline8Bit)) not in listed
        assert (CT, J2K) not in set(pairs(tables["OLDCT"]))
        assert negotiate(shown.node, [(VERIFICATION, EXPLICIT), (CT, J2K)], "OLDCT") == {
            (VERIFICATION, EXPLICIT)
        }
        # CTJ2K's own accept list has no Verification: the statement says so and the node
        # agrees.
        assert VERIFICATION not in {sop for sop, _ in pairs(tables["CTJ2K"])}
        assert negotiate(shown.node, [(CT, J2K), (VERIFICATION, EXPLICIT)], "CTJ2K") == {(CT, J2K)}


def _role_outcome(node: RunningNode, sop_class: str, syntax: str) -> tuple[bool, bool]:
    """Propose ``sop_class`` with a role selection item asking for the SCP role only (as a
    C-GET requestor does, PS3.7 D.3.3.4); the (as_scu, as_scp) the association ends up with."""
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(
        node.host, node.port, ae_title=node.ae_title, ext_neg=[build_role(sop_class, scp_role=True)]
    )
    try:
        assert assoc.is_established
        (cx,) = assoc.accepted_contexts
        return bool(cx.as_scu), bool(cx.as_scp)
    finally:
        assoc.release()
        ae.shutdown()


def test_role_selection_is_as_stated(shown: Shown) -> None:
    groups = context_tables(shown.markdown)[None]
    roles = {sop: g.roles[sop] for g in groups for sop in g.sop_classes}
    syntax = {sop: g.transfer_syntaxes[0] for g in groups for sop in g.sop_classes}
    # The statement claims the storage SCP role for CT, and no role reply for Verification.
    assert roles[CT] == ("agreed", "agreed")
    assert roles[VERIFICATION] == ("no reply (default role)", "no reply (default role)")
    assert _role_outcome(shown.node, CT, syntax[CT]) == (False, True)
    # No reply: the default roles stand, the caller is SCU only.
    assert _role_outcome(shown.node, VERIFICATION, EXPLICIT) == (True, False)


def test_implementation_identity_is_what_the_node_announces(shown: Shown) -> None:
    uid = table_value(shown.markdown, "Implementation Class UID")
    name = table_value(shown.markdown, "Implementation Version Name")
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(VERIFICATION, [EXPLICIT])
    # The statement says asynchronous operations are not supported: a window asked for is
    # answered with none (PS3.7 D.3.3.3), which leaves one operation at a time.
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 5
    assert "Asynchronous Nature\n\nNot supported" in shown.markdown
    assoc = ae.associate(
        shown.node.host, shown.node.port, ae_title=shown.node.ae_title, ext_neg=[window]
    )
    try:
        assert assoc.is_established
        assert not [
            item
            for item in assoc.acceptor.user_information
            if isinstance(item, AsynchronousOperationsWindowNegotiation)
        ]
        assert assoc.acceptor.implementation_class_uid == uid
        assert assoc.acceptor.implementation_version_name == name
        announced = re.search(
            r"^\| Maximum PDU size we announce \(PS3.8 D.1\) \| (\d+) bytes",
            shown.markdown,
            re.MULTILINE,
        )
        assert announced and assoc.acceptor.maximum_length == int(announced.group(1)) == 65536
    finally:
        assoc.release()
        ae.shutdown()
    assert uid != pynetdicom.PYNETDICOM_IMPLEMENTATION_UID
    assert name != pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION
    assert uid.startswith("2.25.")


class _Checker(HTMLParser):
    """Tags must nest and close (void elements aside); collects the text of <code> elements."""

    VOID = frozenset({"meta", "br", "hr", "img", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.codes: list[str] = []
        self.text: list[str] = []
        self.seen: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.seen.add(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.stack and self.stack[-1] == "code":
            self.codes.append(data)


def test_html_is_well_formed_and_says_the_same(shown: Shown) -> None:
    checker = _Checker()
    checker.feed(shown.html)
    checker.close()
    assert checker.stack == []
    assert {"html", "head", "style", "body", "table", "code"} <= checker.seen
    uid = re.compile(r"^[0-9]+(\.[0-9]+)+$")
    markdown_uids = {m for m in re.findall(r"`([^`]+)`", shown.markdown) if uid.match(m)}
    html_uids = {c for c in checker.codes if uid.match(c)}
    assert markdown_uids == html_uids
    sop_classes = {sop for groups in context_tables(shown.markdown).values() for g in groups
                   for sop in g.sop_classes}  # fmt: skip
    assert sop_classes <= html_uids
    text = "".join(checker.text)
    assert "65536 bytes" in text  # limits.max_pdu_size
    assert "Maximum simultaneous associations accepted" in text
    assert re.search(r"Maximum simultaneous associations accepted\s*7\b", text)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_tls_and_access_settings_are_rendered(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls_port = _free_port()
    config = write_config(
        tmp_path / "node",
        port=_free_port(),
        tls=pki.node_tls(port=tls_port, client_certificates="optional", min_version="1.3"),
        require_called_ae_title=True,
        peers={
            "pacs": {
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": 11113,
                "services": ["echo", "store", "move"],
                "hosts": ["10.1.2.0/24"],
                "tls": True,
            }
        },
        audit={"enabled": False},
    )
    done = _cli(config, "conformance", "show", "--format", "html")
    assert done.returncode == 0, done.stderr
    checker = _Checker()
    checker.feed(done.stdout)
    text = "".join(checker.text)
    assert re.search(rf"TLS port\s*{tls_port}\b", text)
    assert "TLS 1.3" in text and "optional" in text
    assert "10.1.2.0/24" in text and "PACS" in text
    assert "must be DICOMNODE" in text  # require_called_ae_title
    assert "Peers called over DICOM TLS: pacs" in text
    assert "Disabled (audit.enabled: false)" in text


def test_bad_conformance_file_exits_usage(tmp_path: Path) -> None:
    (tmp_path / "conformance.yaml").write_text(
        yaml.safe_dump({"accept": [{"sop_classes": ["NoSuchClass"], "transfer_syntaxes": ["all"]}]})
    )
    config = write_config(tmp_path, conformance="conformance.yaml")
    done = _cli(config, "conformance", "show")
    assert done.returncode == ExitCode.USAGE
    assert "unknown SOP class 'NoSuchClass'" in done.stderr and done.stdout == ""
    (tmp_path / "broken.yaml").write_text("ae_title: [")
    done = _cli(tmp_path / "broken.yaml", "conformance", "show")
    assert done.returncode == ExitCode.USAGE and "not valid YAML" in done.stderr


def test_service_sections_follow_the_policy(shown: Shown) -> None:
    """A service the policy gives no caller has no SOP Specific Conformance section, and the
    statement says it is not provided."""
    headings = [line for line in shown.markdown.splitlines() if line.startswith("#")]
    worklist = [h for h in headings if h.endswith("Modality Worklist SCP")]
    if "OLDCT" in context_tables(shown.markdown):  # restricted: verification and CT only
        assert not worklist
        assert re.search(
            r"Not provided with this policy .*: Query/Retrieve SCP: C-FIND", shown.markdown
        )
        assert any(h.endswith("Storage SCP") for h in headings)
    else:
        assert len(worklist) == 1
        assert "Not provided with this policy" not in shown.markdown


def test_association_limit_is_as_stated(shown: Shown) -> None:
    """The statement's maximum number of associations is where the node starts refusing:
    that many are accepted at once, one more is rejected-transient, local limit exceeded."""
    found = re.search(
        r"^\| Maximum simultaneous associations accepted \| (\d+) \|$", shown.markdown, re.MULTILINE
    )
    assert found
    limit = int(found.group(1))
    assert limit == 7
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(VERIFICATION, [EXPLICIT])
    held = []
    try:
        for _ in range(limit):
            assoc = ae.associate(shown.node.host, shown.node.port, ae_title=shown.node.ae_title)
            held.append(assoc)
            assert assoc.is_established
        extra = ae.associate(shown.node.host, shown.node.port, ae_title=shown.node.ae_title)
        assert extra.is_rejected
        answer = extra.acceptor.primitive
        assert (answer.result, answer.result_source, answer.diagnostic) == (2, 3, 2)
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        ae.shutdown()
