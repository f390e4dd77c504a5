"""Where a log goes: the path template, the rank, and opening the file without losing anyone's.

A log's path comes from ``watch(log=...)``, else ``MODEWATCH_LOG``, else a default in the working
directory; ``{rank}`` and ``{pid}`` are substituted. Several processes may be given the same path
(``torch.multiprocessing.spawn`` with a fixed ``MODEWATCH_LOG``, a forked child, two jobs): the
file is claimed with an advisory lock, and a log that another process is writing, or wrote while
this one ran, is never truncated; this process then writes ``NAME-PID.jsonl`` beside it and says so.
A log left by an earlier run (or by this process, earlier) is replaced, as users expect.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Iterator, Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the header and time checks still apply
    fcntl = None  # type: ignore[assignment]

DEFAULT_LOG = "modewatch-{pid}.jsonl"
DEFAULT_RANK_LOG = "modewatch-rank{rank}-{pid}.jsonl"  # in a distributed job
MAX_ALTERNATIVES = 100

# When this process began, as far as modewatch can tell: a log written after it by another
# process belongs to a process running beside this one, not to an earlier run.
_process_start = time.time()


def rank(environ=os.environ) -> Optional[int]:
    """The process's rank in a distributed job (torch.distributed, else RANK/LOCAL_RANK), or None."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
    except Exception:  # a half-initialised process group must not stop watch()
        pass
    for name in ("RANK", "LOCAL_RANK"):
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def world_size(environ=os.environ) -> Optional[int]:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
    except Exception:
        pass
    value = environ.get("WORLD_SIZE", "")
    return int(value) if value.isdigit() else None


def template(log: object = None) -> str:
    """The path template: ``log`` if given, else MODEWATCH_LOG, else the default."""
    if log is not None:
        return os.fspath(log)  # type: ignore[arg-type]
    return os.environ.get("MODEWATCH_LOG") or (DEFAULT_LOG if rank() is None else DEFAULT_RANK_LOG)


def substitute(path_template: str) -> str:
    """``{rank}`` and ``{pid}`` filled in."""
    r = rank()
    return path_template.replace("{rank}", "0" if r is None else str(r)).replace("{pid}", str(os.getpid()))


def unwritable(path: str) -> Optional[str]:
    """Why no log could be made at ``path`` (checked before anything is recorded, creating
    nothing), or None when it looks possible: the nearest existing folder on its way is not a
    folder, or is not writable. A full disk is found only when writing."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"cannot write the modewatch log {path!r}: {folder!r} is not a folder"
    if not os.access(folder, os.W_OK):
        try:
            read_only = bool(os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 0))
        except (OSError, AttributeError):
            read_only = False
        why = "is on a read-only file system" if read_only else "is not writable"
        return f"cannot write the modewatch log {path!r}: {folder!r} {why}"
    return None


def _alternatives(path: str) -> Iterator[str]:
    yield path
    stem, ext = os.path.splitext(path)
    pid = os.getpid()
    yield f"{stem}-{pid}{ext}"
    for n in range(2, MAX_ALTERNATIVES):
        yield f"{stem}-{pid}-{n}{ext}"


def _writer_pid(fd: int) -> Optional[int]:
    """The pid in the header of the log already in ``fd``, if it has one."""
    try:
        first = os.pread(fd, 4096, 0).split(b"\n", 1)[0]
        pid = json.loads(first).get("pid")
        return pid if type(pid) is int else None
    except (OSError, ValueError, AttributeError):
        return None


def _is_someone_elses(fd: int) -> bool:
    """Whether the file open as ``fd`` holds a record this process must not overwrite: locked by a
    live writer, or written since this process began by another process."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without locks: rely on the checks below
            pass
    info = os.fstat(fd)
    if info.st_size == 0 or info.st_mtime < _process_start:
        return False  # empty, or left by an earlier run
    return _writer_pid(fd) not in (None, os.getpid())


def _open(path: str) -> int:
    flags = os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, os.O_RDWR | flags, 0o666)  # read too: the header of a log already there
    except PermissionError:
        return os.open(path, os.O_WRONLY | flags, 0o666)


def claim(path: str) -> tuple[IO[str], str]:
    """Open a new log at ``path``, or beside it when ``path`` holds someone else's record; returns
    the open file and the path used. Folders are created. Raises OSError."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    holder = None  # the pid in the header of the first log found taken
    for candidate in _alternatives(path):
        fd = _open(candidate)
        try:
            regular = os.path.isfile(candidate)
            if regular and _is_someone_elses(fd):
                if holder is None:
                    holder = _writer_pid(fd)
                os.close(fd)
                continue
            if regular:
                os.ftruncate(fd, 0)
            file = os.fdopen(fd, "w", encoding="utf-8")
        except BaseException:
            os.close(fd)
            raise
        if candidate != path:
            other = ("another watcher of this process (MODEWATCH=1 and watch() with the same log?)"
                     if holder == os.getpid() else "another process running beside this one")
            _say(f"{path} holds the log of {other}; this process writes {candidate}")
        return file, candidate
    raise OSError(f"{path} and {MAX_ALTERNATIVES} names beside it are taken by other processes' logs")


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"modewatch: {message}\n")
    except Exception:
        pass
