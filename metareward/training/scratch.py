"""A training's scratch folder: the job's files and the trainer's local checkpoints before their
upload, in the system's temporary folder (`TMPDIR`).

A checkpoint with its optimizer state is several times the model (1.6 GB for the 135M seed model,
about 100 GB for an 8B one). A training killed outright (SIGKILL, the OOM killer, a preempted
machine: the cases resuming exists for) runs no clean-up, so its folder would stay for good. Each
folder therefore holds an exclusive `flock` on a file inside it for as long as its process lives; the
kernel drops the lock however the process ends. Every new training first removes the folders whose
lock nobody holds, and logs what it freed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "metareward-train-"
OWNER_LOCK = ".owner.lock"


def scratch_path(name: str, root: str | None = None) -> Path:
    """Where `scratch_folder(root, name)` puts its folder."""
    return Path(root or tempfile.gettempdir()) / f"{PREFIX}{name}"


@contextmanager
def scratch_folder(root: str | None = None, name: str | None = None) -> Iterator[Path]:
    """A new scratch folder under `root` (default: the temporary folder), locked while this process
    uses it and removed after; abandoned folders of killed trainings are removed first. `name`: a
    fixed name (`scratch_path`), for processes that find the folder without being told (the Ray
    Train workers of one node); default: a unique one."""
    remove_abandoned(root)
    if name is None:
        path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
    else:
        path = scratch_path(name, root)
        path.mkdir(mode=0o700)
    lock = open(path / f"{OWNER_LOCK}.new", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # only now under the name a sweeper opens: it never finds the file before it is locked
        os.rename(lock.name, path / OWNER_LOCK)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        lock.close()  # after the removal: a sweeper never sees a finished training's folder unlocked


def remove_abandoned(root: str | None = None) -> list[Path]:
    """Remove the scratch folders under `root` whose owner has died; the removed folders.

    A folder without a lock file is left alone: it is being created, or was made by a version that
    did not lock it."""
    removed, freed = [], 0
    for path in sorted(Path(root or tempfile.gettempdir()).glob(PREFIX + "*")):
        try:
            descriptor = os.open(path / OWNER_LOCK, os.O_RDONLY)
        except OSError:  # no lock file, or another user's folder
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not path.is_dir():  # its training ended normally while this looked
                continue
            freed += _size(path)
        except BlockingIOError:  # its training is running
            continue
        finally:
            # closing drops the lock again, which is fine: the owner is dead and no one reuses the name
            os.close(descriptor)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.warning(
            "removed %d scratch folder(s) of killed trainings (%.1f GB): %s",
            len(removed), freed / 1e9, ", ".join(str(path) for path in removed),
        )  # fmt: skip
    return removed


def _size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file() and not file.is_symlink())
