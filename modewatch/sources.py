"""The source lines the HTML report shows: read only where the user allows.

A log names files (its call sites), and whoever wrote the log chose those names. A report that
showed any file it names would put /etc/shadow, an SSH key or /proc/self/environ into a page the
user may pass on. So a file's lines are shown only if its real path (symlinks resolved) lies in
an allowed folder (the working directory, each log's folder, each ``--source-root``), never
under /proc, /dev or /sys; it ends in ``.py``; it is a regular file; and it is at most
MAX_SOURCE bytes. Files are read here, not through linecache, which consults the import system
(loaders, zip archives). Imports no torch.
"""

from __future__ import annotations

import os
import stat

from .reader import SYSTEM_FOLDERS, inside

TYPE_CHECKING = False  # typing is for annotations only: the CLI starts without importing it
if TYPE_CHECKING:
    from typing import Iterable, Union


MAX_SOURCE = 2 << 20  # bytes of one file
MAX_TOTAL = 64 << 20  # bytes read for one report, however many files its findings name
MAX_SNIPPETS = 200  # snippets shown in one report: a log may make 10,000 findings cite one file
MAX_LINE_SHOWN = 240  # characters of one source line shown; a longer one is cut, with "..."

OUTSIDE = "outside the allowed folders"
NOT_PY = "not a .py file"
TOO_LARGE = "too large"
NOT_REGULAR = "not a regular file"
MISSING = "no such file here"
UNREADABLE = "cannot be read"
SPENT = "too much source in one report"
ENOUGH = f"{MAX_SNIPPETS} snippets shown already"


def folder_of(log: str) -> str:
    """The real path of the folder a log was found in: where its name is, not where a symlink
    of that name leads (a link planted beside a log must not allow its target's folder)."""
    return os.path.realpath(os.path.dirname(os.path.abspath(log)))


class Sources:
    """The source files a report may show, read once each."""

    def __init__(self, folders: Iterable[str]):
        self.folders = []
        for folder in folders:
            try:
                real = os.path.realpath(folder)
            except (OSError, ValueError):
                continue
            if not any(inside(real, system) for system in SYSTEM_FOLDERS):
                self.folders.append(real)
        self._files: dict = {}  # real path -> lines, or why they are not shown
        self._read = 0
        self._snippets = 0

    @classmethod
    def for_logs(cls, logs: Iterable[str], roots: Iterable[str] = ()) -> "Sources":
        """The working directory, the folder each log was found in, and ``roots``."""
        folders = [os.getcwd()]
        for log in logs:
            try:
                folders.append(folder_of(log))
            except (OSError, ValueError):
                pass
        return cls([*folders, *roots])

    def snippet(self, path: str, line: int, around: int = 2) -> Union[list, str]:
        """(number, text) of the lines around ``line`` of a file, each cut to MAX_LINE_SHOWN
        characters, or the reason they are not shown; at most MAX_SNIPPETS per report."""
        if self._snippets >= MAX_SNIPPETS:
            return ENOUGH
        text = self.lines(path)
        if isinstance(text, str):
            return text
        self._snippets += 1
        return [(number, _cut(text[number - 1])) for number in range(max(1, line - around),
                                                                      min(line + around + 1, len(text) + 1))]

    def lines(self, path: str) -> Union[list, str]:
        """The file's lines, or the reason they are not shown (one of the constants above)."""
        try:
            real = os.path.realpath(path)
        except (OSError, ValueError):  # ValueError: a NUL or a lone surrogate in the name
            return MISSING
        if any(inside(real, system) for system in SYSTEM_FOLDERS) or not any(inside(real, f) for f in self.folders):
            return OUTSIDE
        if real not in self._files:
            if len(self._files) >= 1024:  # a report shows few files; keep memory bounded anyway
                self._files.clear()
            self._files[real] = self._load(real)
        return self._files[real]

    def _load(self, real: str) -> Union[list, str]:
        try:
            mode = os.stat(real)
        except FileNotFoundError:
            return MISSING
        except (OSError, ValueError):
            return UNREADABLE
        if not real.endswith(".py"):
            return NOT_PY
        if not stat.S_ISREG(mode.st_mode):
            return NOT_REGULAR
        if mode.st_size > MAX_SOURCE:
            return TOO_LARGE
        if self._read + mode.st_size > MAX_TOTAL:
            return SPENT
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(real, flags)  # never a FIFO's wait, never a symlink put there since
        except OSError:
            return UNREADABLE
        try:
            with os.fdopen(fd, "rb") as file:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return NOT_REGULAR
                data = file.read(MAX_SOURCE + 1)
        except OSError:
            return UNREADABLE
        if len(data) > MAX_SOURCE:
            return TOO_LARGE
        self._read += len(data)
        return data.decode("utf-8", "replace").splitlines()


def _cut(line: str) -> str:
    return line if len(line) <= MAX_LINE_SHOWN else line[:MAX_LINE_SHOWN] + "..."
