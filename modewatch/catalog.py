"""The ids that rows refer to (sites, mode calls, contexts; models and layers are numbered by the
registry), each defined once, and the definition events queued until the log is written.

Code objects are keyed by ``id()``, never hashed: hashing a code object hashes its bytecode
(about 0.4 µs), and a site is looked up on every forward. The catalog keeps the code objects it
has seen alive, so that their ids are never given to other code.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Optional


class Catalog:
    def __init__(self, listener: Optional[Callable[[dict], None]] = None):
        self.listener = listener  # also told every definition (a live analysis)
        self.pending: list = []  # (event, fields) not yet written
        self.written: list = []  # every (event, fields) written, to start a forked child's log
        self._ids: dict = {}  # (kind, key) -> id
        self._counts: collections.Counter = collections.Counter()  # ids given, per kind
        self._sites: dict = {}  # (id(code), instruction offset) -> (code, site id)

    def define(self, event: str, **fields: Any) -> None:
        self.pending.append((event, fields))
        if self.listener is not None:
            self.listener({"event": event, **fields})

    def intern(self, kind: str, key: Any, make: Callable[[int], None]) -> int:
        """The id of ``key`` among the definitions of ``kind``; ``make(id)`` defines a new one."""
        try:
            return self._ids[kind, key]
        except KeyError:
            ident = self._ids[kind, key] = self._counts[kind]
            self._counts[kind] += 1
            make(ident)
            return ident

    def site(self, frame: Any) -> Optional[int]:
        """The site id of a frame's current line (None for no frame). Looked up by the frame's
        instruction offset: ``f_lineno`` is worked out from the line table at each read."""
        if frame is None:
            return None
        code, offset = frame.f_code, frame.f_lasti
        known = self._sites.get((id(code), offset))
        if known is not None:
            return known[1]
        line = frame.f_lineno
        ident = self.intern("site", (id(code), line), lambda ident: self.define(
            "site", id=ident, file=code.co_filename, line=line, function=code.co_name))
        if len(self._sites) < 100_000:  # code of exec'd strings could be endless
            self._sites[id(code), offset] = (code, ident)
        return ident

    def context(self, allow: frozenset, recalibration: bool) -> int:
        """The context id of a forward (0: nothing allowed, no recalibration)."""
        if not allow and not recalibration:
            return 0
        return self.intern("context", (allow, recalibration), lambda ident: self.define(
            "context", id=ident + 1, allow=sorted(allow), recalibration=recalibration)) + 1

    def take(self) -> list:
        """The definitions not yet written, now counted as written."""
        taken, self.pending = self.pending, []
        self.written.extend(taken)
        return taken

    def start_over(self) -> None:
        """A new log (a forked child's): every definition must be written again."""
        self.pending[:0] = self.written
        self.written = []
