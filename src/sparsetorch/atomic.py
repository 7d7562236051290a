"""Atomic, non-destructive writes of output files and folders.

Rules every writer in sparsetorch follows (through this module, so no caller can forget them):

* **Atomic.** Output is written into a temporary file/folder next to the target and swapped in
  by one rename; readers see the old output or the new one, never a half-written one.
* **Nothing we did not ask to replace is lost.** :func:`atomic_dir` refuses an existing folder
  that is not empty unless ``overwrite=True`` -- even a folder sparsetorch wrote earlier (silently
  replacing an earlier run loses work too). It always refuses an output that is, contains or lies
  inside one of the ``inputs`` (replacing it would delete the model being read). :func:`atomic_path`
  (single files written by name: ``sparsetorch.save``, ``MaskSet.save``, ``--json`` reports)
  replaces an existing file by default, like ``open(path, "w")``; the CLI passes
  ``overwrite=False`` unless ``--overwrite`` is given. A folder is never replaced by a file.
* **Recoverable swaps.** Replacing a folder uses ``renameat2(RENAME_EXCHANGE)`` where Linux and
  the filesystem offer it (one atomic step). Elsewhere it takes two renames (``DIR`` ->
  ``.DIR.old-PID.RAND``, temp -> ``DIR``); if the process dies between them, the next
  :func:`atomic_dir` on the same path, or :func:`recover_dir` (called by the folder readers),
  puts ``.DIR.old-*`` back.
* **Killed runs are cleaned up.** Temporary names carry the writer's pid and host
  (``.NAME.PID-HOST.RAND.tmp``); temporaries of dead writers on this host are removed by the next
  write to the same name.
* **One writer per folder.** :func:`atomic_dir` holds an exclusive ``flock`` on ``.NAME.lock``
  next to the output for the whole write; a second writer gets :class:`OutputLockedError`
  naming the first one (pid, host) at once instead of racing it.
* **Permissions follow the umask** like any ordinary file write (``0o666 & ~umask`` for files,
  ``0o777 & ~umask`` for folders), not ``mkstemp``'s private 0600/0700.
* Every folder :func:`atomic_dir` writes gets a small marker file :data:`MARKER` (JSON: library,
  version, pid, time) so messages can tell an earlier sparsetorch output from someone else's files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError, OutputExistsError, OutputLockedError

try:  # pragma: no cover - always present on Linux/macOS
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking
    fcntl = None  # type: ignore[assignment]

#: name of the marker file written into every folder :func:`atomic_dir` creates
MARKER = ".sparsetorch"
MARKER_VERSION = 1

PathLike = str | os.PathLike[str]

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


# --------------------------------------------------------------------------- naming
def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def _writer_tag() -> str:
    return f"{os.getpid()}-{_host_tag()}"


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{_writer_tag()}.{secrets.token_hex(4)}.tmp")


def _old_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old-{_writer_tag()}.{secrets.token_hex(4)}")


def _lock_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:  # pragma: no cover - be conservative
        return True
    return True


def _dead_writer(tag: str) -> bool:
    """True when the ``PID-HOST`` tag names a process of this host that no longer runs."""
    pid, _, host = tag.partition("-")
    return host == _host_tag() and pid.isdigit() and not _pid_alive(int(pid))


def _siblings(target: Path, kind: str) -> list[tuple[Path, str]]:
    """``(path, writer tag)`` of our temporaries (``kind="tmp"``) or old copies (``"old"``) of target."""
    name = re.escape(target.name)
    if kind == "tmp":
        rx = re.compile(rf"^\.{name}\.(\d+-[0-9a-f]+)\.[0-9a-f]+\.tmp$")
    else:
        rx = re.compile(rf"^\.{name}\.old-(\d+(?:-[0-9a-f]+)?)(?:\.[0-9a-f]+)?$")  # + legacy .old-PID
    found = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    for e in entries:
        m = rx.match(e.name)
        if m:
            found.append((Path(e.path), m.group(1)))
    return found


def _remove(path: Path) -> None:
    """Delete a file, symlink or folder; missing is fine."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def clean_stale(path: PathLike) -> list[Path]:
    """Remove temporaries (``.NAME.PID-HOST.*.tmp``) that dead writers on this host left next to
    ``path``; return what was removed. Live writers' temporaries are never touched."""
    target = Path(path).expanduser().absolute()
    removed = []
    for p, tag in _siblings(target, "tmp"):
        if _dead_writer(tag):
            with contextlib.suppress(OSError):
                _remove(p)
                removed.append(p)
    return removed


# --------------------------------------------------------------------------- low-level renames
def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the OS, libc or filesystem does not support it."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - old glibc / musl
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    for flags in (os.O_RDONLY, os.O_WRONLY):  # a file the umask left write-only or read-only
        try:
            fd = os.open(path, flags)
        except PermissionError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return


# --------------------------------------------------------------------------- checks
def _resolved(p: PathLike) -> Path:
    return Path(p).expanduser().resolve(strict=False)


def _check_inputs(out: Path, inputs: Iterable[PathLike], *, folder: bool) -> None:
    real = _resolved(out)
    for inp in inputs:
        src = _resolved(inp)
        if real == src:
            raise OutputExistsError(
                f"the output {out} is the input {inp}; it is read while the output is written. "
                "Choose another output path."
            )
        if folder and src in real.parents:
            raise OutputExistsError(
                f"the output folder {out} is inside the input {inp}. Choose an output outside it."
            )
        if real in src.parents:
            raise OutputExistsError(
                f"the input {inp} is inside the output {out}; replacing the output would delete "
                "it. Choose an output that does not contain the input."
            )


def is_sparsetorch_dir(path: PathLike) -> bool:
    """True when ``path`` is a folder sparsetorch wrote (it holds the :data:`MARKER` file)."""
    try:
        info = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("library") == "sparsetorch"


def _check_writable_parent(target: Path) -> None:
    """Raise :class:`OutputError` when ``target`` cannot be created: an ancestor is a file, or the
    nearest existing ancestor is not a writable folder. Nothing is created."""
    parent = target.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {target}: {parent} is a file, not a folder. Choose another output path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: no permission to create files in {parent}. "
                          "Choose a folder you can write to.")


def _make_parent(target: Path) -> None:
    """Create ``target``'s parent folders; file-system refusals become :class:`OutputError`."""
    _check_writable_parent(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder {target.parent} for {target}: {exc.strerror or exc}. "
                          "Choose another output path.") from None


def check_output_dir(
    out: PathLike, *, inputs: Iterable[PathLike] = (), overwrite: bool = False
) -> Path:
    """Return the absolute output folder, or raise :class:`OutputExistsError` if writing it would
    lose files.

    Refused unless ``overwrite``: ``out`` exists and is anything but an empty folder (a file, a
    symlink, or a folder with entries -- an earlier sparsetorch output included). Always refused,
    whatever ``overwrite`` says: ``out`` equals, lies inside or contains one of ``inputs``.
    Call it at the start of a long command to fail before the work; :func:`atomic_dir` calls it
    again under its lock.
    """
    target = Path(out).expanduser().absolute()
    _check_inputs(target, inputs, folder=True)
    _check_writable_parent(target)
    if not os.path.lexists(target) or overwrite:
        return target
    if target.is_dir() and not target.is_symlink():
        try:
            empty = not any(target.iterdir())
        except OSError:
            empty = False
        if empty:
            return target
        what = (
            "an earlier sparsetorch output" if is_sparsetorch_dir(target)
            else "files sparsetorch did not write"
        )
        raise OutputExistsError(
            f"{target} already exists and holds {what}; nothing was changed. Pass "
            "overwrite=True (--overwrite) to replace it, or choose a new or empty folder."
        )
    raise OutputExistsError(
        f"{target} already exists and is not a folder; nothing was changed. Pass overwrite=True "
        "(--overwrite) to replace it, or choose another output path."
    )


def check_output_file(
    path: PathLike, *, inputs: Iterable[PathLike] = (), overwrite: bool = False
) -> Path:
    """Return ``path`` as given, or raise :class:`OutputExistsError`: it exists and ``overwrite``
    is False, it is a folder (never replaced by a file), or it is one of ``inputs``."""
    target = Path(path).expanduser()
    _check_inputs(target.absolute(), inputs, folder=False)
    _check_writable_parent(target)
    if target.is_dir():
        raise OutputExistsError(
            f"{target} is a folder; a file cannot replace it. Choose a file path "
            "(remove the folder yourself if it is no longer needed)."
        )
    if os.path.lexists(target) and not overwrite:
        raise OutputExistsError(
            f"{target} already exists; nothing was changed. Pass overwrite=True (--overwrite) to "
            "replace it, or choose another path."
        )
    return target


# --------------------------------------------------------------------------- lock
def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    since = info.get("since")
    when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    return f"process {info.get('pid')} on host {info.get('host', '?')}{when}"


@contextlib.contextmanager
def output_lock(path: PathLike) -> Iterator[None]:
    """Hold the exclusive writer lock of ``path`` (``flock`` on ``.NAME.lock`` next to it).

    Raises :class:`OutputLockedError` at once, naming the holder, when another process (or
    another open of the lock in this process) holds it. The lock file is removed on release.
    Without ``fcntl`` (Windows) nothing is locked.
    """
    target = Path(path).expanduser().absolute()
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock = _lock_name(target)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise OutputLockedError(
                f"{target} is being written by {who} (lock {lock}). Wait for it to finish or "
                "choose another output path; if no such process runs, delete the lock file."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # the previous holder unlinks the lock file on release: make sure ours is still the one
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.write(fd, json.dumps(info).encode("utf-8"))
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


# --------------------------------------------------------------------------- recovery
def _restore_old(target: Path) -> Path | None:
    """With the lock held: if ``target`` is missing, rename the newest complete ``.NAME.old-*``
    back. Returns the restored path (``target``) or None."""
    if os.path.lexists(target):
        return None
    olds = [p for p, _ in _siblings(target, "old")]
    if not olds:
        return None
    olds.sort(key=lambda p: p.lstat().st_mtime_ns, reverse=True)
    os.rename(olds[0], target)
    _fsync_dir(target.parent)
    return target


def recover_dir(path: PathLike) -> bool:
    """Put back a folder whose swap was interrupted (``path`` missing, ``.NAME.old-*`` present).

    Folder readers call this before reading; it does nothing while another writer holds the
    lock (that writer is mid-swap and finishes it). Returns True when something was restored.
    """
    target = Path(path).expanduser().absolute()
    if os.path.lexists(target) or not _siblings(target, "old"):
        return False
    try:
        with output_lock(target):
            return _restore_old(target) is not None
    except (OutputLockedError, OSError):
        return False


# --------------------------------------------------------------------------- single files
def _new_temp_file(target: Path) -> Path:
    """Create an empty temporary file next to ``target`` with mode 0o666 & ~umask, like an
    ordinary ``open(path, "w")`` of a new file."""
    while True:
        tmp = _temp_name(target)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
        os.close(fd)
        return tmp


def _existing_mode(target: Path) -> int | None:
    """Permission bits of the regular file ``target`` replaces (kept, as ``open(path, "w")``
    keeps them), or None."""
    try:
        st = os.stat(target)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None


def _link_noreplace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target`` only if ``target`` does not exist (atomic where possible)."""
    try:
        if _renameat2(tmp, target, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise OutputExistsError(
            f"{target} appeared while it was being written; nothing was replaced. Pass "
            "overwrite=True (--overwrite) to replace it."
        ) from None
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise OutputExistsError(
            f"{target} appeared while it was being written; nothing was replaced. Pass "
            "overwrite=True (--overwrite) to replace it."
        ) from None
    except OSError:  # filesystem without hard links
        check_output_file(target, overwrite=False)
        os.replace(tmp, target)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched, so a
    crash mid-save never leaves a half-written checkpoint behind. ``overwrite=True`` (the Python
    API default: a file written by name replaces the old one, like ``open(path, "w")``);
    ``overwrite=False`` refuses an existing ``path`` with :class:`OutputExistsError` (CLI outputs
    without ``--overwrite``). A folder at ``path`` is always refused. Temporaries of dead
    writers are cleaned up first.
    """
    target = Path(path).expanduser()
    _make_parent(target)
    check_output_file(target, overwrite=overwrite)
    clean_stale(target)
    tmp = _new_temp_file(target)
    try:
        yield tmp
        mode = _existing_mode(target)
        if mode is not None:  # after the writes: a read-only mode must not block the writer
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        if overwrite:
            if target.is_dir():
                check_output_file(target, overwrite=True)  # raises: never replace a folder
            os.replace(tmp, target)
        else:
            _link_noreplace(tmp, target)
        _fsync_dir(target.absolute().parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: PathLike, text: str, *, overwrite: bool = True) -> None:
    """Write a UTF-8 text file atomically (see :func:`atomic_path` for ``overwrite``)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- folders
def _new_temp_dir(target: Path) -> Path:
    """Create an empty temporary folder next to ``target`` with mode 0o777 & ~umask."""
    while True:
        tmp = _temp_name(target)
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:  # pragma: no cover
            continue
        return tmp


def _write_marker(folder: Path) -> None:
    from . import __version__ as version

    info = {"library": "sparsetorch", "marker_version": MARKER_VERSION, "version": str(version),
            "pid": os.getpid(), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (folder / MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")


def _discard(path: Path) -> None:
    """Delete a replaced output: first renamed to a temp name (so an interrupted delete never
    leaves a half-deleted ``.old-*`` that recovery would restore), then removed."""
    if path.name.endswith(".tmp"):
        _remove(path)
        return
    doomed = _temp_name(path.with_name(path.name.rsplit(".old-", 1)[0][1:]))
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path
    _remove(doomed)


def _swap_in(tmp: Path, target: Path) -> None:
    """Make the complete folder ``tmp`` become ``target`` (replacing what is there)."""
    if os.path.lexists(target):
        if _renameat2(tmp, target, _RENAME_EXCHANGE):
            _fsync_dir(target.parent)
            _remove(tmp)  # tmp now holds the replaced output
            return
        old = _old_name(target)
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        _fsync_dir(target.parent)
        _discard(old)
        return
    try:
        done = _renameat2(tmp, target, _RENAME_NOREPLACE)
    except FileExistsError:
        raise OutputExistsError(
            f"{target} appeared while it was being written; nothing was replaced. Pass "
            "overwrite=True (--overwrite) to replace it."
        ) from None
    if not done:
        os.rename(tmp, target)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_dir(
    path: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` as a whole.

    Before anything is written: the writer lock is taken (:class:`OutputLockedError` if another
    process holds it), an interrupted earlier swap is recovered, dead writers' temporaries are
    removed and :func:`check_output_dir` runs (:class:`OutputExistsError` for an existing
    non-empty ``path`` without ``overwrite``, or one that is/contains/is inside an input).
    On success the :data:`MARKER` file is added, every file is fsynced and the folder is swapped
    in; on failure the temporary folder is removed and ``path`` is left as it was.
    """
    out = Path(path).expanduser().absolute()
    ins = list(inputs)
    check_output_dir(out, inputs=ins, overwrite=overwrite)  # fail before creating anything
    _make_parent(out)
    with output_lock(out):
        _restore_old(out)
        clean_stale(out)
        check_output_dir(out, inputs=ins, overwrite=overwrite)
        tmp = _new_temp_dir(out)
        try:
            yield tmp
            _write_marker(tmp)
            for f in tmp.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    _fsync_file(f)
            _fsync_dir(tmp)
            _swap_in(tmp, out)
        except BaseException:
            _remove(tmp)
            raise
