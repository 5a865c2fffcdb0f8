"""The file store: where instances live on disk, and how they get there atomically.

Layout under ``storage_dir``::

    objects/ab/cd/abcd....dcm   one Part 10 file per instance, named by a random id we generate
    tmp/                        files being received or written; emptied at start-up

Nothing here is named after a UID, an AE title or any other value a peer sent. A file enters
``objects/`` only by rename from ``tmp/`` (same filesystem) after an fsync, and the folder is
fsynced after the rename, so a file under ``objects/`` is complete and durable or absent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_OBJECTS = "objects"
_TMP = "tmp"


class StorageError(OSError):
    """A file could not be written or moved into the store."""


@dataclass(frozen=True)
class StoredFile:
    """A file found under ``objects/``: its path relative to ``storage_dir`` (as the index
    records it), absolute path, size and modification time (seconds since the epoch)."""

    relative: str
    path: Path
    size: int
    mtime: float


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (POSIX: fsync the folder itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Storage:
    """Instance files under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / _OBJECTS
        self.tmp = root / _TMP

    def prepare(self, clean: bool = True) -> int:
        """Create the folders and remove what an earlier run left in ``tmp/``; returns the count.

        ``clean=False`` only creates the folders: a worker process of a node with several
        (``dicomnode.ae``) must never clean, or it would delete another worker's receive in
        flight; their parent cleans once, before any worker starts.
        """
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        if not clean:
            return 0
        removed = 0
        for leftover in self.tmp.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("removed %d leftover temporary file(s) from %s", removed, self.tmp)
        return removed

    def free_space(self) -> int:
        """Bytes available to us on the storage filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def temp_path(self, prefix: str = "tmp-") -> Path:
        """A fresh, unused name in ``tmp/`` (the file is not created)."""
        return self.tmp / f"{prefix}{secrets.token_hex(16)}.part"

    def resolve(self, relative: str) -> Path:
        """The absolute path of a stored file, refusing anything outside ``objects/``."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.objects.resolve()):
            raise StorageError(f"stored path {relative!r} is outside the object store")
        return path

    def commit(self, temp: Path) -> str:
        """Move a complete file from ``tmp/`` into the store durably; returns its relative path.

        The caller has finished writing ``temp``. Its data is fsynced, it is renamed to a new
        random name, and the folders that changed are fsynced.
        """
        name = secrets.token_hex(16)
        folder = self.objects / name[:2] / name[2:4]
        target = folder / f"{name}.dcm"
        try:
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            created = self._make_folders(folder)
            # os.link + unlink would refuse to overwrite, but a 128-bit random name cannot clash
            # in practice; rename keeps it one atomic step.
            os.rename(temp, target)
            fsync_dir(folder)
            for parent in created:
                fsync_dir(parent.parent)
        except OSError as exc:
            raise StorageError(f"cannot move a received file into the store: {exc}") from exc
        return str(target.relative_to(self.root))

    def remove(self, relative: str) -> None:
        """Delete a stored file durably (used to undo a commit, or on replace)."""
        path = self.resolve(relative)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fsync_dir(path.parent)

    def remove_many(self, relatives: list[str]) -> list[str]:
        """Delete stored files (already missing ones count as deleted), each folder fsynced once
        after its unlinks; returns the paths that are gone now. A path outside ``objects/`` or a
        file that cannot be unlinked is logged and left (its journal entry stays)."""
        gone: list[str] = []
        folders: set[Path] = set()
        for relative in relatives:
            try:
                path = self.resolve(relative)
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.error("cannot delete a stored file: %s", exc)
                continue
            folders.add(path.parent)
            gone.append(relative)
        for folder in folders:
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(folder)
        return gone

    def files(self) -> Iterator[StoredFile]:
        """Every regular file under ``objects/`` (symbolic links are not followed), in no
        particular order: what ``index rebuild`` and ``index verify`` walk."""
        stack = [self.objects]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # removed while we walk
                        continue
                    relative = str(Path(entry.path).relative_to(self.root))
                    yield StoredFile(relative, Path(entry.path), st.st_size, st.st_mtime)

    def discard(self, temp: Path) -> None:
        """Delete a temporary file that will not be stored."""
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()

    def _make_folders(self, folder: Path) -> list[Path]:
        """Create ``folder`` and missing parents below ``objects/``; returns those created."""
        created: list[Path] = []
        path = folder
        while not path.exists() and path != self.objects:
            created.append(path)
            path = path.parent
        for path in reversed(created):
            with contextlib.suppress(FileExistsError):  # another association made it first
                path.mkdir()
        return created
