"""Atomic file output: every file posbias writes goes through this module (standard library only).

A file is written to a temporary file in the target's own folder (``.NAME.PID-XXXXXX.tmp``), flushed and
fsync'ed, renamed over the target in one step (``os.replace``), and the folder is fsync'ed so the rename
survives a power cut. Whatever happens before the rename (an exception, a full disk, a kill) leaves the
old target untouched; every failure the process survives also removes the temporary file. A temporary
file left by a killed process (SIGKILL cannot be caught) is removed by the next write to the same
target, once no living process owns it.

Failures of the machine rather than of the input (full disk, quota, permission, read-only file system,
a vanished folder, a file where a folder should be) become :class:`posbias.errors.EnvironmentFault`:
one line naming the path, what happened and the fix; the command line exits with status 74.

The runtime and the artifacts import this module: it must never import numpy, h5py or anything outside
the standard library and :mod:`posbias.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from posbias.errors import EnvironmentFault

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "environment_fault",
    "fsync_dir",
    "fsync_file",
    "sweep_stale_temps",
    "temp_path",
    "ensure_folder",
    "check_writable",
    "check_space",
]

#: errno values that mean "the machine", not "the input"
_FIXES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose an output path on another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some of your quota or choose an output path on another disk"),
    errno.EFBIG: ("the file is too large for this file system", "choose an output path on another file system"),
    errno.EACCES: ("permission denied", "make the folder writable for this user or choose another output path"),
    errno.EPERM: ("the operation is not permitted", "make the folder writable for this user or choose another output path"),
    errno.EROFS: ("the file system is read-only", "choose an output path on a writable file system"),
    errno.ENOENT: ("its folder does not exist (removed while running?)", "create the folder or choose another output path"),
    errno.ENOTDIR: ("a file stands where a folder should be", "remove or rename that file, or choose another output path"),
    errno.EEXIST: ("a file stands where a folder should be", "remove or rename that file, or choose another output path"),
    errno.EISDIR: ("a folder stands where the file should be", "remove that folder or choose another output path"),
    errno.EIO: ("an input/output error occurred", "check the disk (dmesg) or choose another output path"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n)"),
    errno.ENAMETOOLONG: ("the path is too long", "choose a shorter output path"),
}
_H5_ERRNO = re.compile(r"errno = (\d+)")
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{6}\.tmp$")


def _errno_of(exc: BaseException) -> int | None:
    """errno of an OSError, also when (as with h5py's OSError and RuntimeError) it is only written inside
    the message."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return int(exc.errno)
    if isinstance(exc, (OSError, RuntimeError)):
        m = _H5_ERRNO.search(str(exc))
        if m:
            return int(m.group(1))
    return None


def environment_fault(exc: BaseException, path: str | os.PathLike[str] | None = None, *, resume: str = "") -> EnvironmentFault | None:
    """The one-line :class:`EnvironmentFault` for an OSError (or h5py's RuntimeError) caused by the machine,
    else None.

    ``path`` names the file being written (default: the error's own file name); ``resume`` is appended
    (e.g. "then run again with --resume").
    """
    if isinstance(exc, EnvironmentFault):
        return exc
    code = _errno_of(exc)
    if code is None or code not in _FIXES:
        return None
    what, fix = _FIXES[code]
    where = path if path is not None else getattr(exc, "filename", None)
    name = f"{where}" if where is not None else "an output file"
    tail = f"; {resume}" if resume else "; then run the command again"
    fault = EnvironmentFault(f"cannot write {name}: {what} ({errno.errorcode.get(code, code)}); {fix}{tail}")
    fault.errno = code
    return fault


def ensure_folder(folder: str | os.PathLike[str], *, create: bool = False) -> Path:
    """``folder`` as a Path after checking it is a folder (created, with parents, when ``create``)."""
    p = Path(folder)
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            pass
        except OSError as exc:
            raise environment_fault(exc, p) or exc from exc
    if p.exists() and not p.is_dir():
        raise environment_fault(OSError(errno.ENOTDIR, "not a folder"), p)  # type: ignore[misc]
    if not p.is_dir():
        raise environment_fault(OSError(errno.ENOENT, "no folder"), p)  # type: ignore[misc]
    return p


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """Create and remove a file in ``folder`` and look at its free space: a read-only file system, a folder
    without permission or a disk with no free block at all is found before a long run computes anything,
    not when it writes its first result. (A disk that fills up later is caught when the write fails.)"""
    p = ensure_folder(folder)
    probe = temp_path(p / "write-probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
        if hasattr(os, "statvfs"):
            st = os.statvfs(p)
            if st.f_blocks and (st.f_bfree if os.geteuid() == 0 else st.f_bavail) == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as exc:
        fault = environment_fault(exc, p)
        if fault is None:
            raise
        raise fault from exc
    return p


def check_space(folder: str | os.PathLike[str], nbytes: int) -> None:
    """Refuse to start writing about ``nbytes`` into ``folder`` when the disk (or the process's file size
    limit) cannot hold them: libraries that write in place (HDF5) fail untidily halfway, this fails first."""
    code = None
    if hasattr(os, "statvfs"):
        try:
            st = os.statvfs(folder)
        except OSError:
            st = None
        if st is not None and st.f_blocks:
            free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
            if nbytes > free:
                code = errno.ENOSPC
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY and nbytes > soft:
            code = errno.EFBIG
    except (ImportError, OSError, ValueError):
        pass
    if code is not None:
        raise environment_fault(OSError(code, os.strerror(code)), Path(folder))  # type: ignore[misc]


def temp_path(target: str | os.PathLike[str]) -> Path:
    """A fresh temporary path next to ``target`` (same folder, so the rename stays on one file system)."""
    t = Path(target)
    return t.with_name(f".{t.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_temps(target: str | os.PathLike[str]) -> int:
    """Remove temporary files of ``target`` left by processes that no longer run; returns how many."""
    t = Path(target)
    removed = 0
    try:
        entries = list(t.parent.iterdir())
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if not m or m.group("name") != t.name or _alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed += 1
    return removed


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a written file; file systems that cannot fsync (EINVAL) are accepted, real errors raise."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder so a rename in it is durable; best effort (some file systems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            return
        path.unlink()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, durable: bool = True, resume: str = "",
                expect_bytes: int = 0, sweep: bool = True) -> Iterator[Path]:
    """Yield a temporary path; when the block ends normally, publish it as ``target`` atomically.

    The block writes the whole new file to the yielded path (by any means: ``open``, h5py, matplotlib).
    On normal exit the file is fsync'ed (``durable``), renamed over ``target`` and the folder fsync'ed.
    On any exception the temporary file is removed and ``target`` is left as it was; an OSError caused
    by the machine is re-raised as :class:`EnvironmentFault` naming ``target``. ``expect_bytes``: about
    how much will be written, refused up front when it cannot fit (:func:`check_space`). ``sweep=False``
    skips looking for stale temporary files (a writer that cleaned its folder once, then writes many files).

    Examples
    --------
    >>> with atomic_path("out/report.html") as tmp:  # doctest: +SKIP
    ...     tmp.write_text(html, encoding="utf-8")
    """
    t = Path(target)
    ensure_folder(t.parent)
    if t.is_dir():
        raise environment_fault(OSError(errno.EISDIR, "is a folder"), t)  # type: ignore[misc]
    if sweep:
        sweep_stale_temps(t)
    if expect_bytes:
        check_space(t.parent, expect_bytes)
    tmp = temp_path(t)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, t)
    except BaseException as exc:
        _remove(tmp)
        fault = environment_fault(exc, t, resume=resume) if isinstance(exc, (OSError, RuntimeError)) else None
        if fault is not None and fault is not exc:
            raise fault from exc
        raise
    if durable:
        fsync_dir(t.parent)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_path`); returns ``target`` as a Path."""
    with atomic_path(target, durable=durable) as tmp:
        with open(tmp, "wb") as fh:
            view = memoryview(data)
            while view:
                n = os.write(fh.fileno(), view)
                view = view[n:]
    return Path(target)


def atomic_write_text(target: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", durable: bool = True) -> Path:
    """Write ``text`` to ``target`` atomically (see :func:`atomic_path`); returns ``target`` as a Path."""
    return atomic_write_bytes(target, text.encode(encoding), durable=durable)
