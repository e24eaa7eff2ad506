"""Folder commits: several files of a folder change together, and readers never write.

The layout of a folder written by `commit_files` (an adapter folder, a quantized model)::

    <folder>/adapter_config.json, adapter_model.safetensors, README.md   the visible files, as peft writes them
    <folder>/.peftkit/lock            flock: a writer's commit holds it exclusive, a reader's snapshot shared
    <folder>/.peftkit/journal.json    the commit point of a commit in progress: {"stage", "replace", "remove"}
    <folder>/.peftkit/stage-XXXX/     one per save in progress, with everything that save writes (its
                                      `owner` file is flock-ed by the saving process while it lives)

Writer (`commit_files`)::

    1. under the lock (shared): make its own stage folder and lock its `owner` file
    2. write every file into the stage (no lock held: big weights do not block readers)
    3. under the lock (exclusive):
         finish a commit a crashed writer left (its journal), delete stages whose owner died,
         write the journal (the commit point), rename each staged file over the visible one,
         delete the files named in `remove`, delete the journal
    4. delete its stage (also when anything above failed)

Reader (`read_snapshot`): runs the read under the lock (shared), so it sees the visible files of one
commit or of the next, never a mix, and never renames, deletes or repairs anything. Visible files
always win: staged files are never read. A journal seen by a reader belongs to a writer that died
inside step 3 (a live one would hold the lock): if none or all of its renames happened, the visible
files are one whole commit and are read; if some did, the reader raises `CheckpointError` and the
next save (or `recover_interrupted_save`) finishes the commit.

Two writers: each commit is whole, the later one wins. A killed save leaves at most its stage,
which the next save deletes. peft and other readers that take no lock see the visible files, which
only ever change by whole-file renames.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Optional, TypeVar

from ..errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: renames stay atomic, but without the locks
    fcntl = None  # type: ignore[assignment]

AREA = ".peftkit"  # the folder's private area: a lock, a journal, the stages of saves in progress
_LOCK = "lock"
_JOURNAL = "journal.json"
_STAGE_PREFIX = "stage-"
_OWNER = "owner"
_LEGACY = (".peftkit-commit.json", ".peftkit-pending")  # peftkit <= 0.1's journal and pending suffix
LOCK_TIMEOUT_S = 120.0  # a commit holds the lock for a few renames; this long means something is stuck

T = TypeVar("T")


# ---------------------------------------------------------------------- locks
@contextlib.contextmanager
def _flock(fd: int, exclusive: bool, what: str) -> Iterator[None]:
    """Hold a shared or exclusive flock on `fd`, waiting up to LOCK_TIMEOUT_S."""
    if fcntl is None:
        yield
        return
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"{what} has been locked by another process's save for {LOCK_TIMEOUT_S:.0f} s; "
                    "wait for that save to finish, or stop it."
                ) from None
            time.sleep(0.005)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def _writer_lock(directory: str, exclusive: bool) -> Iterator[None]:
    area = os.path.join(directory, AREA)
    os.makedirs(area, exist_ok=True)
    fd = os.open(os.path.join(area, _LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        with _flock(fd, exclusive, directory):
            yield
    finally:
        os.close(fd)


def _is_alive(stage: str) -> bool:
    """Whether the process that owns `stage` still holds its owner lock."""
    if fcntl is None:
        return True  # cannot tell: never delete another save's stage
    try:
        fd = os.open(os.path.join(stage, _OWNER), os.O_RDONLY)
    except OSError:
        return False  # no owner file: the writer died before it locked one (or it was deleted)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# ---------------------------------------------------------------------- writing
def commit_files(
    directory: str, writers: Mapping[str, Callable[[str], None]], remove: Iterable[str] = ()
) -> None:
    """Replace the files `writers` names in `directory` (and delete those in `remove`) as one commit.

    `writers[name](path)` writes the new content of `name` to `path`. If anything fails or the
    process dies before the commit point, the folder keeps its previous files exactly; after it,
    the commit completes (here, or on the next save).
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"save_directory {directory!r} is a file; pass a directory path.")
    for name in list(writers) + list(remove):
        if not _is_plain_name(name):
            raise CheckpointError(f"Cannot commit {name!r}: only plain file names inside the folder are allowed.")
    os.makedirs(directory, exist_ok=True)
    with _writer_lock(directory, exclusive=False):
        stage = tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=os.path.join(directory, AREA))
        owner = os.open(os.path.join(stage, _OWNER), os.O_RDWR | os.O_CREAT, 0o600)
        if fcntl is not None:
            fcntl.flock(owner, fcntl.LOCK_EX)
    try:
        for name, write in writers.items():
            path = os.path.join(stage, name)
            write(path)
            _fsync_file(path)
            os.chmod(path, 0o666 & ~_umask())
        with _writer_lock(directory, exclusive=True):
            _finish_interrupted(directory)
            _sweep_dead_stages(directory, keep=stage)
            journal = {"stage": os.path.basename(stage), "replace": sorted(writers), "remove": sorted(set(remove))}
            _write_journal(directory, journal)
            _apply(directory, journal)
    finally:
        os.close(owner)
        shutil.rmtree(stage, ignore_errors=True)


def recover_interrupted_save(directory: str) -> None:
    """Finish a commit whose writer died mid-way and delete what dead saves left (a writer's step, explicit).

    Reads never call this; the next `commit_files` into the folder does it anyway.
    """
    if not os.path.isdir(os.path.join(directory, AREA)):
        return
    with _writer_lock(directory, exclusive=True):
        _finish_interrupted(directory)
        _sweep_dead_stages(directory, keep=None)


def _finish_interrupted(directory: str) -> None:
    journal = _read_journal(directory)
    if journal is not None:
        _apply(directory, journal)
    for entry in os.listdir(directory):  # an older peftkit's hidden pending files: never read, so drop them
        if entry == _LEGACY[0] or entry.endswith(_LEGACY[1]):
            os.remove(os.path.join(directory, entry))


def _sweep_dead_stages(directory: str, keep: Optional[str]) -> None:
    area = os.path.join(directory, AREA)
    for entry in os.listdir(area):
        path = os.path.join(area, entry)
        if entry.startswith(_STAGE_PREFIX) and path != keep and os.path.isdir(path) and not _is_alive(path):
            shutil.rmtree(path, ignore_errors=True)


def _apply(directory: str, journal: dict) -> None:
    """Rename the journal's staged files into place, delete its `remove` files, then the journal."""
    stage = os.path.join(directory, AREA, journal["stage"])
    for name in journal["replace"]:
        staged = os.path.join(stage, name)
        if os.path.exists(staged):
            os.replace(staged, os.path.join(directory, name))
    for name in journal["remove"]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, name))
    _fsync_dir(directory)
    os.remove(os.path.join(directory, AREA, _JOURNAL))
    shutil.rmtree(stage, ignore_errors=True)


def _write_journal(directory: str, journal: dict) -> None:
    path = os.path.join(directory, AREA, _JOURNAL)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(journal, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.join(directory, AREA))


def _read_journal(directory: str) -> Optional[dict]:
    """The journal of an interrupted commit, or None (none, or one too damaged to name safe files)."""
    try:
        with open(os.path.join(directory, AREA, _JOURNAL), encoding="utf-8") as handle:
            journal = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        journal = None
    names_ok = lambda names: isinstance(names, list) and all(map(_is_plain_name, names))  # noqa: E731
    if (
        not isinstance(journal, dict)
        or not isinstance(journal.get("stage"), str)
        or not journal["stage"].startswith(_STAGE_PREFIX)
        or os.path.basename(journal["stage"]) != journal["stage"]
        or not names_ok(journal.get("replace"))
        or not names_ok(journal.get("remove"))
    ):
        # Written atomically, so damage means someone else wrote it: it names nothing we can trust.
        return {"stage": _STAGE_PREFIX + "unknown", "replace": [], "remove": []}
    return journal


def _is_plain_name(name: object) -> bool:
    """A file name directly inside the folder (not a path, not `.`/`..`, not the private area)."""
    return isinstance(name, str) and bool(name) and os.path.basename(name) == name and name not in (".", "..", AREA)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsync-ed
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- reading
def read_snapshot(directory: str, read: Callable[[], T]) -> T:
    """`read()` (which reads files of `directory`) against one commit's files, never a mix; writes nothing.

    Holds the folder's lock shared while `read` runs when the folder has one. A folder without a lock
    (written by peft, or never saved to) is read as is, and read again under the lock if a peftkit
    save created one meanwhile.
    """
    lock_path = os.path.join(directory, AREA, _LOCK)
    fd = _open_for_reading(lock_path)
    if fd is None:  # no lock (or not ours to open): nothing peftkit commits here, or a read-only copy
        result = read()
        fd = _open_for_reading(lock_path)  # a peftkit save started while we read: read again, under its lock
        if fd is None:
            return result
    try:
        with _flock(fd, exclusive=False, what=directory):
            _refuse_torn_commit(directory)
            return read()
    finally:
        os.close(fd)


def _open_for_reading(path: str) -> Optional[int]:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def _refuse_torn_commit(directory: str) -> None:
    """Raise if a dead writer's commit left the visible files half old, half new."""
    journal = _read_journal(directory)
    if journal is None:
        return
    stage = os.path.join(directory, AREA, journal["stage"])
    staged = [os.path.exists(os.path.join(stage, name)) for name in journal["replace"]]
    kept = [os.path.exists(os.path.join(directory, name)) for name in journal["remove"]]
    before = all(staged) and all(kept)  # nothing renamed yet: the previous commit, whole
    after = not any(staged) and not any(kept)  # every rename done: the new commit, whole
    if not (before or after):
        raise CheckpointError(
            f"The last save into {directory!r} was interrupted while it replaced its files, so they come from "
            "two different saves. Save the adapter again, or call "
            "peftkit.utils.commits.recover_interrupted_save(folder) to complete that save."
        )
