"""Every file a run writes goes through here (checkpoints too, via `checkpointing.AtomicCheckpointIO`):

- atomic: a reader sees the previous complete file or directory, or the new complete one; a crash, a kill or a
  full disk leaves the previous one and at most a dot-prefixed temporary beside it;
- a write that fails for want of space or permission raises `WriteError` naming the target, whichever library
  did the writing (torch reports a full disk as a RuntimeError, safetensors as a SafetensorError);
- files and directories get the user's umask (`tempfile`'s staging directories are created 0700).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


class WriteError(OSError):
    """Writing `filename` failed (ENOSPC, EACCES, EROFS, ...); whatever was there before is intact.

    `existed`: whether a previous version of the target was there (and so is still there, whole); None: unknown.
    """

    def __init__(self, code: int, target: Path, existed: bool | None) -> None:
        super().__init__(code, os.strerror(code), str(target))
        self.existed = existed


def os_error_code(exc: BaseException) -> int | None:
    """The errno behind `exc`: its own, one of its causes', or the `os error N` a Rust or C++ writer put in its text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        found = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(exc))
        if found:
            return int(found.group(1) or found.group(2))
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def writing(target: Path):
    """Turn a failed write of `target` (any exception carrying an errno) into one `WriteError` naming it."""
    existed = Path(target).exists()
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        code = os_error_code(e)
        if code is None:
            raise
        raise WriteError(code, Path(target), existed) from e


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (no window for another thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_to_umask(directory: Path) -> None:
    """Give `directory` and everything in it the modes a plain mkdir/open would: mkdtemp makes 0700 and
    safetensors writes 0600, so colleagues on a shared filesystem could not read an adapter, export or report."""
    mask = current_umask()
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then swap `tmp_dir` into place; a crash leaves only a dot-prefixed temporary."""
    target = Path(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            write(staging)
            open_to_umask(staging)
            if target.exists():
                retired = target.with_name(f".{target.name}.old-{os.getpid()}")
                target.rename(retired)
                staging.rename(target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def write_file_atomically(target: Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write(f)` into `<dir>/.<name>.tmp-<pid>`, fsync, rename over `target`: readers never see part of a file.

    The temporary lies beside the target, on the same filesystem, so the rename is atomic (a copy from /tmp
    across filesystems would not be); it is created by `open`, so it gets the user's umask.
    """
    target = Path(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic on POSIX: the old file or the new one, never a part
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return target


def write_jsonl_atomically(target: Path, rows: list[dict]) -> Path:
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    return write_file_atomically(target, lambda f: f.write(data))


def write_text_atomically(target: Path, text: str) -> Path:
    """Write `text` (UTF-8) to a temporary beside `target` and rename it over `target`: no half-written file."""
    data = text.encode("utf-8")
    return write_file_atomically(target, lambda f: f.write(data))


def append_jsonl(target: Path, rows: list[dict]) -> None:
    """Append rows; a write that fails part-way (a full disk) is cut back, so the file keeps only whole rows."""
    target = Path(target)
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        size = target.stat().st_size if target.exists() else None
        try:
            with target.open("ab") as f:
                f.write(data)
        except BaseException:
            try:
                if size is None:
                    target.unlink(missing_ok=True)
                else:
                    os.truncate(target, size)
            except OSError:
                pass  # e.g. the filesystem went read-only: nothing more can be done here
            raise


# errno -> what to tell a person about it (the one line names the path and these words).
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only filesystem",
    errno.EFBIG: "file too large for the filesystem or the process's file-size limit",
    errno.EIO: "input/output error (a failing disk or a lost network filesystem)",
}
