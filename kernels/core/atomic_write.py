"""Write a file whole or not at all: a temporary file in the same folder, flushed to disk, renamed into place.

A reader (or a resumed run) sees either the previous file or the new one, never a half-written one, also when the
writing process is killed (``kill -9``, power loss after the rename returned). The new file is written inside a
private folder ``.NAME.PID.RANDOM.tmp`` beside the target (safetensors' own writer makes a temporary file beside
the file it writes, so a folder keeps both in one place); one left behind by a killed process is removed by the
next write of the same file once that process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary folders of ``path`` whose writing process no longer runs (it was killed mid-write)."""
    p = Path(path)
    if not p.parent.is_dir():
        return []
    found = []
    for f in p.parent.iterdir():
        m = _TEMP.match(f.name)
        if m and m["name"] == p.name and not _alive(int(m["pid"])):
            found.append(f)
    return found


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened (e.g. on Windows)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(temporary_path)`` then rename over ``path``. The file gets ordinary permissions (0666 less the
    umask, not the owner-only ones of a temporary file); on any failure (or Ctrl-C) the temporary folder is removed
    and ``path`` is untouched."""
    p = Path(path)
    for old in stale_temporaries(p):
        shutil.rmtree(old, ignore_errors=True)
    folder = p.parent / f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    folder.mkdir()
    tmp = folder / p.name
    try:
        write(str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _fsync_folder(p.parent)
    return p


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)
