"""dicomnode.reactor: pynetdicom's association loops, event-driven instead of polling.

The SCU side of these tests runs in this process with the hooks installed (as every dicomnode SCU
does), so both ends of each association use the replaced loops: the node in its subprocess, the
test's pynetdicom AE here.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pynetdicom.association
import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode.reactor import EventDIMSE, EventDUL, install_reactor_hooks
from dicomnode.status import Status
from tests.support.corpus import TEST_FILES
from tests.support.dimse import UNCOMPRESSED
from tests.support.node import RunningNode, run_node


@pytest.fixture(autouse=True)
def _hooks() -> None:
    install_reactor_hooks()


def _ae(**timeouts: float) -> AE:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for name, value in timeouts.items():
        setattr(ae, name, value)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, list(UNCOMPRESSED))
    return ae


def test_hooks_replace_the_polling_providers() -> None:
    assert pynetdicom.association.DULServiceProvider is EventDUL  # type: ignore[attr-defined]
    assert pynetdicom.association.DIMSEServiceProvider is EventDIMSE  # type: ignore[attr-defined]


def test_many_messages_back_to_back_on_one_association(node: RunningNode) -> None:
    """Every request is answered: no wake-up is lost between one message and the next (a lost
    one would stall the loop until the DIMSE timeout, and fail the association)."""
    ae = _ae()
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    try:
        assert assoc.is_established
        assert isinstance(assoc.dul, EventDUL)
        statuses = [assoc.send_c_echo().Status for _ in range(300)]
        assert statuses == [Status.SUCCESS] * 300
        ds = _ct_dataset()
        for i in range(30):
            ds.SOPInstanceUID = f"{ds.SOPInstanceUID.rsplit('.', 1)[0]}.{i + 1}"
            assert assoc.send_c_store(ds).Status == Status.SUCCESS
        # Every queued P-DATA was sent (the count that lets responses bypass the queue is
        # balanced), so a response could now go straight to the socket.
        assert assoc.dul._pdata_pending == 0
        assert assoc.dul.send_direct([])
        assoc.release()
        assert assoc.is_released
        assert not assoc.dul.send_direct([])  # no longer in Sta6: the queue decides
    finally:
        ae.shutdown()
    assert node.rows("SELECT COUNT(*) AS n FROM instance")[0]["n"] == 30


def test_release_and_abort_end_both_threads_and_close_the_wake_pipes(node: RunningNode) -> None:
    ae = _ae()
    try:
        for i in range(20):
            assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
            assert assoc.is_established
            assert assoc.send_c_echo().Status == Status.SUCCESS
            if i % 2:
                assoc.abort()
                assert assoc.is_aborted
            else:
                assoc.release()
                assert assoc.is_released
            assoc.join(timeout=10)
            assoc.dul.join(timeout=10)
            assert not assoc.is_alive()
            assert not assoc.dul.is_alive()
            # The DUL closed its wake-up pipe on the way out (not left to garbage collection).
            assert not assoc.dul._wake._finalizer.alive
    finally:
        ae.shutdown()
    log = node.wait_for_log("aborted")
    assert "Traceback" not in log


def test_network_timeout_still_ends_an_idle_association(tmp_path: Path) -> None:
    """The idle timer is checked by polling in pynetdicom; our loops must still wake for it."""
    with run_node(tmp_path / "node", limits={"network_timeout": 1}) as node:
        ae = _ae()
        ended = threading.Event()
        handlers = [
            (evt.EVT_RELEASED, lambda e: ended.set()),
            (evt.EVT_ABORTED, lambda e: ended.set()),
        ]
        try:
            assoc = ae.associate(
                node.host, node.port, ae_title=node.ae_title, evt_handlers=handlers
            )
            assert assoc.is_established
            # The node gives up on the silent association and ends it; we only wait for that.
            assert ended.wait(timeout=30), "the node did not end an idle association"
            assoc.join(timeout=10)
            assert not assoc.is_established
        finally:
            ae.shutdown()
        assert "Network timeout reached" in node.wait_for_log("Network timeout reached")


def test_our_scu_side_honours_its_own_network_timeout(node: RunningNode) -> None:
    """The requestor's loop (ours too, in this process) ends its own idle association."""
    ae = _ae(network_timeout=1)
    try:
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        assert assoc.is_established
        assoc.join(timeout=30)
        assert not assoc.is_alive()
        assert assoc.is_aborted or assoc.is_released
    finally:
        ae.shutdown()


def _ct_dataset() -> Dataset:
    return dcmread(TEST_FILES / "CT_small.dcm")
