"""Atomic writes, the one helper every writer uses (checkpoints, config.yaml, metrics.json, summary.csv, shard
indexes): the content goes to a temporary file in the target's folder, is flushed and fsynced, then renamed over
the target, so a kill or a full disk never leaves a half-written file under a real name and the previous version
stays valid. Temporary names start with TMP_PREFIX, so leftovers of killed writes can be found and removed."""
import contextlib
import glob
import os
import tempfile
from typing import IO, Callable

TMP_PREFIX = ".tmp-"


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = True):
    """`write(f)` into a temporary file next to `path`, then renamed over `path`. Raises what writing raised
    (OSError for a full disk, ...), with no temporary file left behind."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1], dir=directory)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)  # the rename itself survives a power cut only once the folder is
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str):
    atomic_write(path, lambda f: f.write(text), binary=False)


def remove_temporaries(folder: str):
    """Temporary files of writes cut short by a kill: never valid files, only taking space."""
    for p in glob.glob(os.path.join(folder, TMP_PREFIX + "*")):
        os.remove(p)
