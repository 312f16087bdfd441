"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A reader (or a process killed half-way) sees either the old complete file or the new one. A
temporary file left by a killed writer (`.NAME.pidPID.XXXX.tmp`) is ignored by readers and removed
by the next write of NAME once process PID is gone. A failed write (disk full, folder not writable)
raises `WriteError`, a MultiLoRAError (one line for the CLI) that is also an OSError, naming the
file and saying that the previous version is unchanged.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import MultiLoRAError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class WriteError(MultiLoRAError, OSError):
    """A write that failed (disk full, read-only or missing folder); `errno` says why when known."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


def write_errno(exc: BaseException) -> int | None:
    """The OS error number behind a failed write: an OSError's, or the "(os error N)" a Rust
    library (safetensors) puts in its message; None when `exc` is not an I/O error."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    text = str(exc)
    m = re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", text)
    if m:
        return int(m.group(1) or m.group(2))
    if "No space left on device" in text:
        return errno.ENOSPC
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk (or the quota) is full."""
    return write_errno(exc) in DISK_FULL


def write_failure(exc: BaseException, folder: str | os.PathLike) -> tuple[bool, str] | None:
    """(disk full?, why) when `exc` is a failed write into `folder`; None when it is something else (a bug).

    torch.save's writer raises a RuntimeError that does not say why; it counts as a full disk when
    `folder`'s file system has less than 64 MiB free.
    """
    code = write_errno(exc)
    if code is not None:
        return code in DISK_FULL, os.strerror(code)
    if isinstance(exc, RuntimeError) and re.search(r"PytorchStreamWriter|file write failed|inline_container", str(exc)):
        try:
            if shutil.disk_usage(folder).free < 64 * 2**20:
                return True, os.strerror(errno.ENOSPC)
        except OSError:
            pass
    return None


def failed_write(exc: BaseException, doing: str, folder: str | os.PathLike, kept: str,
                 then: str) -> WriteError | None:
    """The one-line WriteError for a write that failed while `doing` ("saving checkpoint step-4 to DIR"):
    why, what is `kept`, and how to go on ("free space" or "make the folder writable", then `then`);
    None when `exc` is not a failed write into `folder` (a bug: let its traceback show)."""
    failure = write_failure(exc, folder)
    if failure is None:
        return None
    full, why = failure
    head = f"no space left on device while {doing} (the disk is full)" if full else f"{doing} failed ({why})"
    return WriteError(f"{head}; {kept}; {'free space' if full else 'make the folder writable'}{then}",
                      write_errno(exc))


def _why(exc: BaseException) -> str:
    code = write_errno(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return os.strerror(code) if code else str(exc)


def write_error(path: str | os.PathLike, exc: BaseException, kept: str | None = None,
                fix: str | None = None) -> WriteError:
    """The WriteError for a failed write of `path`: what failed, what is kept, how to fix it."""
    path = Path(path)
    if kept is None:
        try:
            kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
        except OSError:
            kept = "nothing was written"
    if write_errno(exc) in (errno.EEXIST, errno.ENOTDIR):
        blocker = _file_ancestor(path.parent)
        if blocker is not None:
            return WriteError(f"cannot write {path}: {blocker} is a file, not a folder; {kept}; choose another path",
                              errno.ENOTDIR)
    if is_disk_full(exc):
        return WriteError(f"cannot write {path}: {os.strerror(write_errno(exc))} (the disk is full); {kept}; "
                          f"{fix or 'free space and retry'}", write_errno(exc))
    return WriteError(f"cannot write {path} ({_why(exc)}); {kept}; "
                      f"{fix or 'make the folder writable or choose another path'}", write_errno(exc))


def _nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing ancestor (the root at the latest)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _file_ancestor(folder: Path) -> Path | None:
    """The nearest existing ancestor of `folder` (itself included) if it is not a folder, else None."""
    p = _nearest_existing(folder)
    return p if p.exists() and not p.is_dir() else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete the temporary files of `path` left by writers that were killed (their process is gone)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.pid(\d+)\.[^.]+\.tmp")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    Any OSError (disk full, folder not writable), also one raised by the code writing the
    temporary file, becomes a WriteError naming `path`; `path` itself is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from e
    tmp_path = Path(tmp)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        try:
            yield tmp_path
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        except Exception as e:
            if isinstance(e, MultiLoRAError) or write_errno(e) is None:
                raise
            raise write_error(path, e) from e
        try:
            fsync_dir(path.parent)  # make the rename itself durable
        except OSError:
            pass
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it, a new file) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under `folder` (subfolders too), and the folders themselves, to disk."""
    for path in Path(folder).iterdir():
        if path.is_dir() and not path.is_symlink():
            fsync_tree(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def check_writable_dir(folder: str | os.PathLike, label: str = "output folder") -> None:
    """Refuse now, naming `folder`, when it cannot be created or written (a parent that is a file, a
    read-only or immutable folder, no permission), instead of failing at the first save.

    Writes and deletes one empty probe file in `folder`, or in its nearest existing parent when
    `folder` does not exist yet (nothing is created then). A `folder` that is an existing file is
    left to the caller.
    """
    folder = Path(folder)
    probe_in = folder
    if not folder.is_dir():
        blocker = _file_ancestor(folder.parent)
        if blocker is not None:
            raise WriteError(f"cannot create the {label} {folder}: {blocker} is a file, not a folder; "
                             "choose another path", errno.ENOTDIR)
        probe_in = _nearest_existing(folder.parent)
    try:
        fd, probe = tempfile.mkstemp(prefix=".multilora-write-test.", suffix=".tmp", dir=probe_in)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "" if probe_in == folder else f" (in {probe_in})"
        raise WriteError(f"cannot write to the {label} {folder}{where}: {_why(e)}; make it writable or choose "
                         "another path", e.errno) from None


def read_json_object(path: str | os.PathLike, fix: str = "fix or re-save it") -> dict[str, Any]:
    """The JSON object in `path`, or a MultiLoRAError naming the file and what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise MultiLoRAError(f"cannot read {path} ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, numbers too long, nesting too deep
        raise MultiLoRAError(f"{path} is not valid JSON ({' '.join(str(e).split())[:200]}); {fix}") from None
    if not isinstance(data, dict):
        raise MultiLoRAError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
