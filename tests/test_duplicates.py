"""The same SOP Instance UID received twice: identical content is a no-op success; different
content follows the configured policy (keep, replace, reject), logged, never a silent overwrite.
pydicom's MR_small.dcm and MR_small_implicit.dcm are one instance in two encodings."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomnode.status import Status
from tests.support.corpus import dataset_bytes
from tests.support.dimse import UNCOMPRESSED, associate, store_file
from tests.support.node import RunningNode, run_node

MR = "1.2.840.10008.5.1.4.1.1.4"
FIRST = Path(get_testdata_file("MR_small.dcm"))  # explicit VR little endian
SECOND = Path(get_testdata_file("MR_small_implicit.dcm"))  # implicit VR, same SOP Instance UID
UID = str(pydicom.dcmread(FIRST).SOPInstanceUID)


def send(node: RunningNode, path: Path) -> int:
    with associate(node, [(MR, UNCOMPRESSED[:1]), (MR, UNCOMPRESSED[1:])]) as assoc:
        return store_file(assoc, path)


def stored(node: RunningNode) -> tuple[bytes, str]:
    files = node.stored_files()
    assert len(files) == 1, files
    row = node.instance(UID)
    assert row is not None
    assert node.storage / row["path"] == files[0]
    assert node.rows("SELECT COUNT(*) AS n FROM instance")[0]["n"] == 1
    return dataset_bytes(files[0]), row["transfer_syntax"]


def test_pair_is_one_instance_with_different_content() -> None:
    assert pydicom.dcmread(SECOND).SOPInstanceUID == UID
    assert dataset_bytes(FIRST) != dataset_bytes(SECOND)


def test_identical_duplicate_is_a_no_op_success(node: RunningNode) -> None:
    assert send(node, FIRST) == Status.SUCCESS
    first_row = node.instance(UID)
    assert send(node, FIRST) == Status.SUCCESS
    assert stored(node)[0] == dataset_bytes(FIRST)
    assert node.instance(UID)["path"] == first_row["path"]  # type: ignore[index]
    assert "different content" not in node.log()


@pytest.mark.parametrize(
    ("policy", "status", "kept"),
    [
        ("keep", Status.SUCCESS, FIRST),
        ("replace", Status.SUCCESS, SECOND),
        ("reject", Status.DUPLICATE_SOP_INSTANCE, FIRST),
    ],
)
def test_different_duplicate_follows_the_policy(
    tmp_path: Path, policy: str, status: Status, kept: Path
) -> None:
    with run_node(tmp_path / "node", store={"duplicates": policy}) as node:
        assert send(node, FIRST) == Status.SUCCESS
        assert send(node, SECOND) == status
        data, syntax = stored(node)
        assert data == dataset_bytes(kept)
        assert syntax == str(pydicom.dcmread(kept).file_meta.TransferSyntaxUID)
        log = node.wait_for_log(f"duplicates policy '{policy}'")
        assert "received again with different content" in log
        assert node.temp_files() == []
