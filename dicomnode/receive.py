"""Receiving C-STORE data sets straight into the storage ``tmp/`` folder.

pynetdicom's chunked receive (``_config.STORE_RECV_CHUNKED_DATASET``) writes each incoming data set
to a ``NamedTemporaryFile`` in the system temp folder, with pynetdicom's own File Meta. We replace
two names in ``pynetdicom.dimse_messages`` (pinned to pynetdicom 3.0.x in pyproject.toml):

- ``NamedTemporaryFile``: a :class:`ReceiveFile` in the receiving node's ``tmp/`` folder (the
  storage filesystem, so committing is a rename). When free space is under the floor it writes
  nothing and marks the message refused, so the handler answers A700 before anything is written.
- ``create_file_meta`` and ``write_file_meta_info``: the same File Meta bytes pydicom would write,
  with our Implementation Class UID and version name, encoded directly.

The node is found through the DUL thread that decodes the message (``thread.assoc.ae``); any other
AE in the process (an SCU) gets pynetdicom's behaviour unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.filewriter import write_file_meta_info as pydicom_write_file_meta_info
from pydicom.uid import UID
from pynetdicom import _config, dimse_messages, dsutils

from dicomnode.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.storage import Storage

log = logging.getLogger(__name__)

# Large writes: pynetdicom writes one PDV at a time (up to our max PDU size).
_BUFFER = 1024 * 1024
# Past this much unsynced data, start writing it back to disk while the rest arrives, so that
# the fsync before the C-STORE response has only the tail left to wait for (a 1 GB instance
# otherwise stays dirty in the page cache until that fsync: Linux starts background writeback
# only at a share of RAM).
_WRITEBACK_STEP = 8 * 1024 * 1024


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux sync_file_range(2) with SYNC_FILE_RANGE_WRITE (start writeback, do not wait), or
    None where there is no such call; it only schedules I/O, durability still comes from fsync."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        call(fd, offset, nbytes, write)  # a failure only means no head start

    return start_writeback


_start_writeback = _load_sync_file_range()


class ReceiveFile:
    """Stands in for the ``NamedTemporaryFile`` pynetdicom writes a received data set into.

    pynetdicom uses ``write``, ``file.flush()``, ``name`` and ``close()``. Flushing per PDV is
    left to the buffer; the archive fsyncs the whole file once, when it commits it.
    """

    def __init__(self, path: Path, owner: object, refused: str | None) -> None:
        self.name = str(path)
        self.path = path
        self.owner = owner  # the pynetdicom Association, to clean up after an abort
        self.refused = refused
        self.file = self
        self._fh = None if refused else path.open("xb", buffering=_BUFFER)
        self.size = 0
        self._written_back = 0

    def write(self, data: bytes) -> int:
        if self._fh is not None:
            try:
                self._fh.write(data)
            except OSError as exc:
                # The disk filled up (or failed) mid-transfer. Keep reading the message off the
                # wire so the association stays usable, write nothing more, and let the handler
                # answer A700 (PS3.4 B.2.3: refused, out of resources).
                self.refused = f"could not write the received data set: {exc.strerror or exc}"
                self.discard()
        self.size += len(data)
        if self.size - self._written_back >= _WRITEBACK_STEP:
            self._write_back()
        return len(data)

    def _write_back(self) -> None:
        if self._fh is None or _start_writeback is None:
            return
        try:
            self._fh.flush()
        except OSError:
            return  # the next write or close reports it
        _start_writeback(self._fh.fileno(), self._written_back, self.size - self._written_back)
        self._written_back = self.size

    def flush(self) -> None:
        """pynetdicom flushes after every fragment; the 1 MiB buffer makes that needless."""

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()  # flushes the buffer: the last write error can surface here
            except OSError as exc:
                self.refused = f"could not write the received data set: {exc.strerror or exc}"
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Receiver:
    """The files being received by one node, by name."""

    def __init__(self, storage: Storage, min_free_space: int) -> None:
        self.storage = storage
        self.min_free_space = min_free_space
        self._files: dict[str, ReceiveFile] = {}
        self._lock = threading.Lock()

    def open(self, owner: object) -> ReceiveFile:
        """A new file for the data set now arriving on ``owner`` (an association)."""
        refused = None
        free = self.storage.free_space()
        if free < self.min_free_space:
            refused = (
                f"free space {free // 2**20} MiB is under the floor "
                f"(store.min_free_space = {self.min_free_space // 2**20} MiB)"
            )
        rx = ReceiveFile(self.storage.temp_path("rx-"), owner, refused)
        with self._lock:
            self._files[rx.name] = rx
        return rx

    def take(self, name: str) -> ReceiveFile | None:
        """The completed file pynetdicom reports at ``name``, closed and ready to read."""
        with self._lock:
            rx = self._files.pop(name, None)
        if rx is not None:
            rx.close()
        return rx

    def abandon(self, owner: object) -> int:
        """Delete every file of ``owner`` that never completed (aborted or cut mid-transfer)."""
        with self._lock:
            mine = [rx for rx in self._files.values() if rx.owner is owner]
            for rx in mine:
                del self._files[rx.name]
        for rx in mine:
            rx.discard()
        return len(mine)


_pynetdicom_tempfile = tempfile.NamedTemporaryFile
_installed = False


def _temp_file(*args: Any, **kwargs: Any) -> Any:
    thread = threading.current_thread()
    assoc = getattr(thread, "assoc", None)
    receiver = getattr(getattr(assoc, "ae", None), "dicomnode_receiver", None)
    if isinstance(receiver, Receiver):
        return receiver.open(assoc)
    return _pynetdicom_tempfile(*args, **kwargs)


@dataclass(frozen=True)
class FileMeta:
    """The File Meta values of a received data set (PS3.10 7.1), before encoding."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def _file_meta(sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any) -> FileMeta:
    """Stands in for pynetdicom's ``create_file_meta`` (a pydicom FileMetaDataset)."""
    return FileMeta(str(sop_class_uid or ""), str(sop_instance_uid or ""), str(transfer_syntax))


def _short(tag: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def encode_file_meta(meta: FileMeta) -> bytes:
    """The File Meta group as pydicom's ``write_file_meta_info`` writes it for pynetdicom's File
    Meta with our implementation identity: Explicit VR Little Endian, group length first
    (PS3.10 7.1); tests/test_receive.py compares the bytes. Raises ValueError for a UID that is
    not ASCII or too long for a 16-bit length (pydicom then writes it, as it always did)."""
    version = IMPLEMENTATION_VERSION_NAME.encode("ascii")
    if len(version) % 2:
        version += b" "
    uids = [_uid(meta.sop_class_uid), _uid(meta.sop_instance_uid), _uid(meta.transfer_syntax)]
    if any(len(u) > 0xFFFF for u in uids):
        raise ValueError("UID too long for File Meta")
    body = (
        struct.pack("<HH", 0x0002, 0x0001)
        + b"OB\x00\x00"
        + struct.pack("<I", 2)
        + b"\x00\x01"
        + _short(0x00020002, b"UI", uids[0])
        + _short(0x00020003, b"UI", uids[1])
        + _short(0x00020010, b"UI", uids[2])
        + _short(0x00020012, b"UI", _uid(IMPLEMENTATION_CLASS_UID))
        + _short(0x00020013, b"SH", version)
    )
    return _short(0x00020000, b"UL", struct.pack("<I", len(body))) + body


def _write_file_meta(fp: Any, meta: Any, enforce_standard: bool = True) -> None:
    """Stands in for pydicom's ``write_file_meta_info`` in pynetdicom's receive: our encoder for
    our :class:`FileMeta` (pydicom's generic writer cost about 0.3 ms per instance), pydicom's
    for anything else."""
    if isinstance(meta, FileMeta):
        try:
            fp.write(encode_file_meta(meta))
            return
        except (UnicodeEncodeError, ValueError):
            meta = _pydicom_file_meta(meta)
    _pydicom_write_file_meta(fp, meta, enforce_standard=enforce_standard)


def _pydicom_file_meta(meta: FileMeta) -> Any:
    return dsutils.create_file_meta(
        sop_class_uid=UID(meta.sop_class_uid),
        sop_instance_uid=UID(meta.sop_instance_uid),
        transfer_syntax=UID(meta.transfer_syntax),
        implementation_uid=UID(IMPLEMENTATION_CLASS_UID),
        implementation_version=IMPLEMENTATION_VERSION_NAME,
    )


_pydicom_write_file_meta = pydicom_write_file_meta_info


def install_receive_hooks() -> None:
    """Route chunked C-STORE receives to the node's :class:`Receiver` (idempotent).

    Called by ``dicomnode.ae`` when a node starts, never at import time.
    """
    global _installed
    if _installed:
        return
    if not hasattr(dimse_messages, "NamedTemporaryFile") or not hasattr(
        dimse_messages, "create_file_meta"
    ):
        raise RuntimeError("this pynetdicom version lacks the chunked-receive names we hook")
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _temp_file
    dimse_messages.create_file_meta = _file_meta  # type: ignore[attr-defined,assignment]
    dimse_messages.write_file_meta_info = _write_file_meta  # type: ignore[attr-defined,assignment]
    _installed = True
    log.debug("chunked receive hooks installed (pid %d)", os.getpid())
