"""Writing the event log: one method per event, through a structlog logger of modewatch's own.

``structlog.wrap_logger`` with its own processors: the application's ``structlog.configure()`` is
never touched, and structlog is imported here only, when a log is written (never by the
analyzer or the CLI). The format itself is ``format``'s; docs/log-format.md describes every field.
"""

from __future__ import annotations

import os
from typing import IO, Any, Optional

import structlog

from ._version import __version__
from .format import HEADER_EVENT, SCHEMA


class _LineWriter:
    """The logger at the end of structlog's chain: appends rendered lines to a buffered file.

    structlog's own WriteLogger flushes after every line; the collector decides when to flush.
    """

    def __init__(self, file: IO[str]):
        self.file = file

    def msg(self, message: str) -> None:
        self.file.write(message + "\n")


def _event_first(_logger: Any, _name: str, event_dict: dict) -> dict:
    """Put the event name first, so that a person reading the log sees it first."""
    return {"event": event_dict.pop("event"), **event_dict}


class LogWriter:
    """Writes one log. Each method is one event; nothing is written per layer call."""

    def __init__(self, path: str, file: Optional[IO[str]] = None):
        self.path = path
        # Line-buffered would flush per event; a plain buffer and explicit flush() are cheaper.
        self._file = open(path, "w", encoding="utf-8") if file is None else file  # noqa: SIM115 - closed by close()
        self._log = structlog.wrap_logger(
            _LineWriter(self._file),
            processors=[_event_first, structlog.processors.JSONRenderer(separators=(",", ":"))],
            wrapper_class=structlog.BoundLogger,
            context_class=dict,
            cache_logger_on_first_use=False,
        )

    def header(self, **fields: Any) -> None:
        self._log.msg(HEADER_EVENT, schema=SCHEMA, modewatch=__version__, **fields)

    def model(self, id: int, name: str, site: Optional[int], copy_of: Optional[int] = None,
              parameters: Optional[int] = None) -> None:
        self._log.msg("model", id=id, name=name, site=site, copy_of=copy_of, parameters=parameters)

    def layer(self, id: int, name: str, kind: str, category: str, model: int, copy_of: Optional[int],
              site: Optional[int] = None, params: bool = False) -> None:
        extra: dict = {} if site is None else {"site": site}  # a functional dropout's call line
        if params:  # a norm layer with parameters of its own (which an optimizer may hold)
            extra["params"] = True
        self._log.msg("layer", id=id, name=name, kind=kind, category=category, model=model, copy_of=copy_of,
                      **extra)

    def optimized(self, step: int, models: list, layers: list) -> None:
        self._log.msg("optimized", step=step, models=models, layers=layers)

    def feeds(self, model: int, into: int) -> None:
        self._log.msg("feeds", model=model, into=into)

    def updated(self, model: int, step: int) -> None:
        self._log.msg("updated", model=model, step=step)

    def site(self, id: int, file: str, line: int, function: str) -> None:
        self._log.msg("site", id=id, file=file, line=line, function=function)

    def mode(self, id: int, site: Optional[int], call: str, mode: bool, target: Optional[str], scope: str,
             initial: bool = False, via: Optional[str] = None, kept: Optional[int] = None) -> None:
        extra: dict = {"initial": True} if initial else {}  # all three absent in the common case
        if via is not None:
            extra["via"] = via
        if kept is not None:
            extra["kept"] = kept
        self._log.msg("mode", id=id, site=site, call=call, mode=mode, target=target, scope=scope, **extra)

    def context(self, id: int, allow: list, recalibration: bool) -> None:
        self._log.msg("context", id=id, allow=allow, recalibration=recalibration)

    def calls(self, step: int, rows: list) -> None:
        self._log.msg("calls", step=step, rows=rows)

    def footer(self, **fields: Any) -> None:
        self._log.msg("end", **fields)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def abandon(self) -> None:
        """In a forked child: let go of the parent's file without writing to it, ever again.

        The descriptor is pointed at /dev/null, so that whatever the inherited file object still
        holds, and its eventual close, go nowhere.
        """
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._file.fileno())
        finally:
            os.close(null)
        self._file.close()
