"""Reading the event log (its format: ``format``; writing it: ``writer``). Imports no torch.

Reading is defensive: a log may be truncated by a killed job, or written by anyone, so every
field is checked, every table is bounded, and a line that does not parse is counted, not fatal.
"""

from __future__ import annotations

import collections
import json
import math
import os
import stat

TYPE_CHECKING = False  # typing is for annotations only: the CLI starts without importing it
if TYPE_CHECKING:
    from typing import IO, Any, Iterator, Optional

from ._version import __version__
from .errors import LogFormatError
from .format import (ALL_FLAGS, CATEGORIES, FORWARD_KINDS, FROZEN, GRAD_ENABLED, HEADER_EVENT, INFERENCE, PARAMS_MOVED,
                     ROW_LENGTH, SCHEMA, SCOPES, STATS_CHANGED, TRAINING, is_log_name)


# ----------------------------------------------------------------------------- reading

MAX_LINE = 8 << 20  # bytes; a longer line is skipped, never held whole
MAX_TABLE = 200_000  # entries per id table; past it, definitions are skipped
# Distinct row states cached under one hash value. The hashes of ints and floats are the same in
# every process, and a tuple's hash can be solved for: a log could make every state collide, and
# each look-up walk all of them. Past this many, a state is resolved each time it is read.
MAX_SAME_HASH = 8
MAX_TEXT = 4096  # characters of a name or path that are kept
MAX_TEXT_KEPT = 64 << 20  # characters of all the definitions of one log; past it, they are skipped
# The largest integer any field may hold (int64): sums of such counts stay far below Python's
# int-to-str digit limit, so no report can fail to print them, and p always converts to float.
MAX_INT = (1 << 63) - 1
# A killed job cuts its last line mid-way; that line begins like every line the writer writes.
EVENT_START = b'{"event":"'


def _record(name: str, fields: str, doc: str, defaults: tuple = ()) -> type:
    """An immutable record: a named tuple (cheaper to make and to read than typing.NamedTuple,
    whose import alone would cost the CLI's start-up more than all of its own)."""
    record = collections.namedtuple(name, fields.split(), defaults=defaults)
    record.__doc__ = doc
    return record


Header = _record("Header", "schema modewatch torch python pid argv rank world_size", "A log's first line.")
Site = _record("Site", "file line function", "A line of user code.")
Layer = _record("Layer", "name kind category model copy site params", """A watched layer: its qualified name, class
(`kind`), category ("dropout" or "norm"), model id; `copy`: a deep copy of a watched layer, found when first called;
`site`: for a functional dropout, the line that calls the function; `params`: a norm layer with parameters of its
own.""", defaults=(None, False))
Model = _record("Model", "name site copy_of parameters", """A watched model: its class, the line that watched it
(or made it, for a deep copy), the id of the model it is a deep copy of, and how many numbers its parameters hold
(for likeness).""", defaults=(None,))
ModeSet = _record("ModeSet", "site call mode target scope initial via kept", """One `.train()`/`.eval()` call:
its site, `call` ("train" or "eval"), the `mode` it set, the qualified name of the module it was called on
(`target`; None if outside), `scope` ("model", "submodule", "layer", "outside": a wrapper above the model);
`initial`: not a call that was seen but the mode a model was already in when watching began (site: where watching
began); `via`: the library function the user's line called, which made the call; `kept`: the earlier call whose
mode this library call only kept.""", defaults=(False, None, None))
Context = _record("Context", "allow recalibration", "What ran around a forward: rules allowed, recalibration.")
Calls = _record("Calls", "layer forward_kind training grad inference stats_changed batch param mode site context "
                "frozen moved state first_step last_step first_forward forwards calls", """A run of identical layer
calls, with every reference resolved: its state (the fields before `state`: `param` is dropout p or BatchNorm
momentum, None for a cumulative average; `frozen`: a norm layer whose parameters all had requires_grad=False;
`moved`: ... and changed since its previous call all the same), `state`: a number the reader gives each distinct
state (one per state in one log: what per-state work is keyed by, cheaper than hashing the state; None past
MAX_TABLE states), and its counts.""")

# The fields of Calls before `state`: what a run of calls was.
STATE_LENGTH = Calls._fields.index("state")

NO_CONTEXT = Context(frozenset(), False)


def add_bounded(table: set, item: Any) -> None:
    """Add ``item`` to a set that a log fills, unless MAX_TABLE entries are in it already."""
    if len(table) < MAX_TABLE:
        table.add(item)


def _text_size(record: tuple) -> int:
    """Characters of the strings a definition keeps (its fields, and the rules of a context)."""
    return sum(len(v) if type(v) is str else sum(map(len, v)) if type(v) is frozenset else 0 for v in record)


class Facts:
    """What a log says of its models as a whole, beside its rows: which models and norm layers
    an optimizer steps, and which models changed in place with none stepping them (EMA
    targets). Filled in as the log is read; the analysis settles some findings on it."""

    def __init__(self) -> None:
        self.models: dict = {}  # model id -> Model
        self.optimized_models: set = set()  # model ids an optimizer holds parameters of
        self.optimized_layers: set = set()  # (model id, layer name) of norm layers an optimizer holds
        self.updated_models: set = set()  # model ids updated in place with no optimizer stepping them
        self.feeds: dict = {}  # model id -> {ids of the models called on its outputs}
        self.held_by: dict = {}  # model id -> {numbers of the optimizers that hold it}
        self.optimizers = 0  # optimizers told (optimized events that name models)
        self.pairs = 0  # entries in the sets of feeds and held_by: at most MAX_TABLE
        self.layers: dict = {}  # model id -> {(layer name, kind)} of its norm layers, for likeness
        self.norm_layers = 0  # entries in all of those sets: at most MAX_TABLE
        # Optimizer steps completed, as far as the log's calls and closing events have told (None:
        # they told none, as in a log written by hand).
        self.steps: Optional[int] = None

    def add_pair(self, table: dict, key: int, value: int) -> None:
        """``value`` into the set of ``key`` in ``table`` (feeds, held_by), all of them bounded."""
        values = table.get(key)
        if values is None:
            if self.pairs >= MAX_TABLE:
                return
            values = table[key] = set()
        if self.pairs < MAX_TABLE and value not in values:
            values.add(value)
            self.pairs += 1

    def generator(self, model: int) -> bool:
        """Whether another model is called on ``model``'s outputs and no one optimizer holds both
        (a GAN's discriminator has an optimizer of its own; a head trained with its backbone, two
        models of one pipeline, has not). At most MAX_TABLE set look-ups in all."""
        held = self.held_by.get(model, set())
        return any(held.isdisjoint(self.held_by.get(into, ())) for into in self.feeds.get(model, ()))

    def note_steps(self, steps: Any) -> None:
        """A ``calls`` or closing event's count of optimizer steps completed (ignored unless a
        plausible count, and never lowered)."""
        if type(steps) is int and 0 <= steps <= MAX_INT and (self.steps is None or steps > self.steps):
            self.steps = steps

    def add_norm_layer(self, model: int, name: str, kind: str) -> None:
        names = self.layers.get(model)
        if names is None:
            if len(self.layers) >= MAX_TABLE:
                return
            names = self.layers[model] = set()
        if self.norm_layers < MAX_TABLE and (name, kind) not in names:
            names.add((name, kind))
            self.norm_layers += 1




def job_rank(header: Header) -> Optional[int]:
    """The rank a log speaks for in a distributed job; None for a log of a single process."""
    return header.rank if header.world_size not in (None, 1) else None


_new_calls = tuple.__new__  # NamedTuple's own __new__ is a Python function: too slow for rows
_END = object()  # no line at all, as opposed to a line that is not JSON (None)


class _Bad(Exception):
    """A line or field that is not what the format says (counted, then skipped)."""


class _Full(_Bad):
    """A well-formed definition past MAX_TABLE: skipped and counted, but not damage."""


def _int(value: Any, low: int = 0) -> int:
    if type(value) is not int or not low <= value <= MAX_INT:
        raise _Bad
    return value


def _opt_int(value: Any) -> Optional[int]:
    return None if value is None else _int(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad
    return value[:MAX_TEXT]


def _opt_text(value: Any) -> Optional[str]:
    return None if value is None else _text(value)


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _Bad
    return value


def _opt_float(value: Any) -> Optional[float]:
    if value is None:
        return None
    if type(value) is int:
        if not -MAX_INT <= value <= MAX_INT:  # float() of a larger one may overflow
            raise _Bad
    elif type(value) is not float or not math.isfinite(value):
        raise _Bad
    return float(value)


class LogReader:
    """Iterates over one log: yields the Header first, then one Calls per row.

    Raises LogFormatError before yielding anything when the file is missing, unreadable, neither
    a regular file nor a pipe, empty, not a modewatch log, or of a schema this version cannot
    read; and after the last record when the log is mostly damaged: more damaged lines than
    good ones after the header, a killed job's cut-off last line not counted. After iteration,
    ``skipped`` counts what was not understood and ``truncated`` says whether the last line was
    cut off. ``named=False`` (a file found in a folder, not named by the user) refuses pipes and
    system files too: a FIFO or a link to /proc/kmsg in a folder is not a log.
    """

    def __init__(self, path: str, named: bool = True):
        self.path = path
        self.named = named
        self.skipped = 0
        self.truncated = False
        self.ended = False  # the writer closed the log properly
        self.steps: Optional[int] = None  # optimizer steps, from the closing event
        self.models: Optional[int] = None  # models watched, from the closing event
        self.bytes_read = 0  # for progress reports on long analyses
        self.header: Optional[Header] = None
        self.good_lines = 0  # lines after the header that were understood
        self.bad_lines = 0  # lines after the header that were not (a killed job's last one aside)
        self.first_bad_line: Optional[int] = None
        self._line = 0  # the number of the line being read
        self._cut = False  # that line is a killed job's cut-off last line
        self._layers: dict = {}
        self._sites: dict = {}
        self._modes: dict = {}
        self._contexts: dict = {0: NO_CONTEXT}
        self.facts = Facts()
        self._text_kept = 0  # characters of the definitions kept (MAX_TEXT_KEPT)
        self._states: dict = {}  # a row's state (its fields before its counts) -> their checked, resolved values
        self._state_hashes: collections.Counter = collections.Counter()  # hash -> states cached under it
        self._state_numbers: dict = {}  # a resolved state -> its Calls.state

    # Each table maps an id to a resolved record; definitions past MAX_TABLE are dropped, and
    # rows that refer to them are skipped, which keeps memory bounded for any input.
    def _define(self, table: dict, key: int, value: Any) -> None:
        size = _text_size(value)
        if (len(table) >= MAX_TABLE and key not in table) or self._text_kept + size > MAX_TEXT_KEPT:
            raise _Full
        self._text_kept += size
        table[key] = value
        self._states.clear()  # resolved rows may refer to what this redefines
        self._state_hashes.clear()

    def __iter__(self) -> Iterator[Any]:
        with open_log(self.path, self.named) as file:
            lines = self._lines(file)
            first = next(lines, _END)
            if first is _END:
                raise LogFormatError(f"{self.path}: is empty, not a modewatch log")
            self.header = self._read_header(first)
            yield self.header
            read_row = self._read_row
            for event in lines:
                # Rows inline (not through _read_event): this loop is most of an analysis.
                if type(event) is dict and event.get("event") == "calls" and type(event.get("rows")) is list:
                    rows, skipped = event["rows"], self.skipped
                    self.facts.note_steps(event.get("step"))
                    for row in rows:
                        try:
                            yield read_row(row)
                        except _Bad:
                            self.skipped += 1
                    bad = self.skipped - skipped
                    self._judge(bad > len(rows) - bad)  # a calls line is damaged when most rows are
                    continue
                try:
                    understood = self._read_event(event)
                except _Full:
                    self.skipped += 1  # well-formed, past the table's bound: not damage
                except _Bad:
                    self.skipped += 1
                    self._judge(True)
                else:
                    if understood:
                        self._judge(False)
        if self.bad_lines > self.good_lines:
            raise LogFormatError(
                f"{self.path}: mostly damaged: {self.bad_lines:,} of {self.bad_lines + self.good_lines:,} lines "
                f"after the header cannot be read (the first: line {self.first_bad_line}); not analyzed")

    def _judge(self, damaged: bool) -> None:
        """Count a line after the header, good or damaged, for the mostly-damaged rule."""
        if not damaged:
            self.good_lines += 1
        elif not self._cut:
            self.bad_lines += 1
            if self.first_bad_line is None:
                self.first_bad_line = self._line

    def feed(self, event: dict) -> list:
        """The records of one event handed over directly, not read from a file: a live analysis
        inside the watching process reads what the writer writes, with the same checks."""
        if event.get("event") == "calls":
            self.facts.note_steps(event.get("step"))
            return [self._read_row(row) for row in event["rows"]]
        self._read_event(event)
        return []

    def _lines(self, file: IO[bytes]) -> Iterator[Optional[dict]]:
        """Yield each non-blank line parsed (None where it is too long or not JSON)."""
        while True:
            try:
                raw = file.readline(MAX_LINE)
            except OSError as exc:
                raise LogFormatError(f"{self.path}: cannot be read ({exc.strerror or exc})") from None
            if not raw:
                return
            self._line += 1
            self.bytes_read += len(raw)
            if not raw.endswith(b"\n"):
                if len(raw) >= MAX_LINE:  # an overlong line: drop the rest of it unread
                    while (more := file.readline(MAX_LINE)) and not more.endswith(b"\n"):
                        self.bytes_read += len(more)
                    yield None
                    continue
                self.truncated = True  # the last line, cut off
                # A killed job's, if it begins as the writer begins every line; else junk.
                self._cut = raw.startswith(EVENT_START) or EVENT_START.startswith(raw)
            if raw.strip():
                yield _parse(raw)

    def _read_header(self, event: Optional[dict]) -> Header:
        if not isinstance(event, dict) or event.get("event") != HEADER_EVENT:
            raise LogFormatError(f"{self.path}: not a modewatch log (its first line is not a modewatch header)")
        schema = event.get("schema")
        if type(schema) is not int or schema != SCHEMA:
            raise LogFormatError(
                f"{self.path}: log schema {schema!r} is not supported by modewatch {__version__} "
                f"(it reads schema {SCHEMA})"
            )
        try:
            argv = event.get("argv") or []
            return Header(
                schema=schema,
                modewatch=_text(event.get("modewatch", "")),
                torch=_opt_text(event.get("torch")),
                python=_opt_text(event.get("python")),
                pid=_opt_int(event.get("pid")),
                argv=tuple(_text(a) for a in argv[:64]) if isinstance(argv, list) else (),
                rank=_opt_int(event.get("rank")),
                world_size=_opt_int(event.get("world_size")),
            )
        except _Bad:
            raise LogFormatError(f"{self.path}: its modewatch header is damaged") from None

    def _read_event(self, event: Optional[dict]) -> bool:
        """A definition or closing event (rows are read by __iter__); False for an event of a
        newer writer, ignored on purpose."""
        if not isinstance(event, dict):
            raise _Bad
        kind = event.get("event")
        if kind == "calls":
            raise _Bad  # one whose rows are not a list
        elif kind == "layer":
            category = event.get("category")
            if category not in CATEGORIES:
                raise _Bad
            site = event.get("site")
            layer = Layer(
                name=_text(event.get("name")), kind=_text(event.get("kind")), category=category,
                model=_int(event.get("model")), copy=event.get("copy_of") is not None,
                site=None if site is None else self._ref(self._sites, site),
                params=_bool(event.get("params", False)),
            )
            self._define(self._layers, _int(event.get("id")), layer)
            if category == "norm":
                self.facts.add_norm_layer(layer.model, layer.name, layer.kind)
        elif kind == "model":
            site, copy_of = event.get("site"), event.get("copy_of")
            model = Model(name=_text(event.get("name")), site=None if site is None else self._ref(self._sites, site),
                          copy_of=_opt_int(copy_of), parameters=_opt_int(event.get("parameters")))
            self._define(self.facts.models, _int(event.get("id")), model)
        elif kind == "optimized":
            models, layers = event.get("models"), event.get("layers")
            if not isinstance(models, list) or not isinstance(layers, list):
                raise _Bad
            facts = self.facts
            facts.optimizers += 1
            for model in models[:MAX_TABLE]:
                add_bounded(facts.optimized_models, _int(model))
                facts.add_pair(facts.held_by, _int(model), facts.optimizers)
            for ident in layers[:MAX_TABLE]:
                layer = self._ref(self._layers, ident)
                add_bounded(facts.optimized_layers, (layer.model, layer.name))
        elif kind == "feeds":
            self.facts.add_pair(self.facts.feeds, _int(event.get("model")), _int(event.get("into")))
        elif kind == "updated":
            add_bounded(self.facts.updated_models, _int(event.get("model")))
        elif kind == "site":
            self._define(self._sites, _int(event.get("id")), Site(
                file=_text(event.get("file")), line=_int(event.get("line")),
                function=_text(event.get("function")),
            ))
        elif kind == "mode":
            call, scope = event.get("call"), event.get("scope")
            if call not in ("train", "eval") or scope not in SCOPES:
                raise _Bad
            site, kept = event.get("site"), event.get("kept")
            if kept is not None:
                # The call that set the mode, never a chain: every stored mode's `kept` is already
                # such a call, so one look resolves any chain, however long (the writer, too,
                # writes the original call).
                kept = self._ref(self._modes, kept)
                kept = kept if kept.kept is None else kept.kept
            self._define(self._modes, _int(event.get("id")), ModeSet(
                site=None if site is None else self._ref(self._sites, site), call=call,
                mode=_bool(event.get("mode")), target=_opt_text(event.get("target")), scope=scope,
                initial=_bool(event.get("initial", False)), via=_opt_text(event.get("via")), kept=kept,
            ))
        elif kind == "context":
            allow = event.get("allow")
            if not isinstance(allow, list) or len(allow) > 64:
                raise _Bad
            self._define(self._contexts, _int(event.get("id")), Context(
                allow=frozenset(_text(rule) for rule in allow),
                recalibration=_bool(event.get("recalibration")),
            ))
        elif kind == "end":
            self.ended = True
            steps, models = event.get("steps"), event.get("models")
            self.steps = steps if type(steps) is int and 0 <= steps <= MAX_INT else None
            self.models = models if type(models) is int and 0 <= models <= MAX_INT else None
            self.facts.note_steps(self.steps)
        elif kind == HEADER_EVENT:
            raise _Bad  # a second header: two logs written into one file
        else:
            return False  # an event of a newer minor writer of the same schema: ignored on purpose
        return True

    @staticmethod
    def _ref(table: dict, key: Any) -> Any:
        try:
            return table[key]
        except (KeyError, TypeError):
            raise _Bad from None

    def _read_row(self, row: Any) -> Calls:
        # The hot loop of every analysis. A row's first eight fields (its state) repeat across
        # rows, so they are checked and resolved once and cached; the counts are checked inline.
        if type(row) is not list or len(row) != ROW_LENGTH:
            raise _Bad
        # One unpacking of the whole row (ROW_FIELDS), cheaper than two slices.
        layer, kind, flags, batch, param, mode, site, context, first, last, first_fwd, forwards, calls = row
        key = (layer, kind, flags, batch, param, mode, site, context)
        try:
            state = self._states[key]
        except TypeError:  # an unhashable field: not what the format says
            raise _Bad from None
        except KeyError:
            state = self._resolve_state(key)
        if (type(first) is type(last) is type(first_fwd) is type(forwards) is type(calls) is int
                and 0 <= first <= last <= MAX_INT and 0 <= first_fwd <= MAX_INT and 1 <= forwards <= MAX_INT
                and 1 <= calls <= MAX_INT):
            return _new_calls(Calls, state + (first, last, first_fwd, forwards, calls))
        raise _Bad

    def _resolve_state(self, key: tuple) -> tuple:
        """A row's state (``key``: its fields before its counts), checked, resolved and cached."""
        layer, kind, flags, batch, param, mode, site, context = key
        if kind not in FORWARD_KINDS or type(flags) is not int or not 0 <= flags <= ALL_FLAGS:
            raise _Bad
        state = (
            self._ref(self._layers, layer), kind, bool(flags & TRAINING), bool(flags & GRAD_ENABLED),
            bool(flags & INFERENCE), bool(flags & STATS_CHANGED), _opt_int(batch), _opt_float(param),
            None if mode is None else self._ref(self._modes, mode),
            None if site is None else self._ref(self._sites, site),
            self._ref(self._contexts, context), bool(flags & FROZEN), bool(flags & PARAMS_MOVED),
        )
        # The same state keeps its number when met again after the cache was cleared (a
        # redefinition); past MAX_TABLE numbers, None: the analysis then keys it by its value.
        number = self._state_numbers.get(state)
        if number is None and len(self._state_numbers) < MAX_TABLE:
            number = self._state_numbers[state] = len(self._state_numbers)
        state += (number,)
        same = hash(key)
        if len(self._states) < MAX_TABLE and self._state_hashes[same] < MAX_SAME_HASH:
            self._state_hashes[same] += 1
            self._states[key] = state
        return state


def _parse(raw: bytes) -> Optional[dict]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return value if isinstance(value, dict) else None


def open_log(path: str, named: bool = True) -> IO[bytes]:
    """The log at ``path``, opened for its one reading pass; LogFormatError naming it otherwise.

    A log is a regular file, or a pipe named on the command line (``<(zcat run.jsonl.gz)``),
    read once, to its writer's end. Anything else (/dev/zero, a socket) is refused before it is
    opened, and what was opened is checked again. Opening never blocks: a FIFO that no process
    writes to reads as empty instead of waiting forever for a writer.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise LogFormatError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL or a lone surrogate in the name
        raise LogFormatError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(mode):
        raise LogFormatError(f"{path}: is a directory, not a log")
    _check_kind(path, mode, named)
    if not named and is_system_file(path):
        raise LogFormatError(f"{path}: a system file, not a log")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise LogFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode  # what was opened: the name may point elsewhere by now
        _check_kind(path, mode, named)
        if stat.S_ISFIFO(mode):
            os.set_blocking(fd, True)  # from here on a stream, read until its writer closes it
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


SYSTEM_FOLDERS = ("/proc", "/dev", "/sys")  # whose files are never read from a folder, nor shown


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies in it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_system_file(path: str) -> bool:
    """Whether ``path`` (symlinks resolved) lies under /proc, /dev or /sys: reading one may have
    effects (/proc/kmsg consumes the kernel's messages) or never end."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return False
    return any(inside(real, folder) for folder in SYSTEM_FOLDERS)


def _check_kind(path: str, mode: int, named: bool) -> None:
    if not (stat.S_ISREG(mode) or (named and stat.S_ISFIFO(mode))):
        raise LogFormatError(f"{path}: not a regular file")


def expand_paths(paths: list) -> list:
    """``(path, named)`` for each file named (``named``: True) and each log (``*.jsonl``) directly
    inside each directory named (False), in order; a directory's logs sorted."""
    found = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            try:
                names = os.listdir(path)
            except OSError as exc:
                raise LogFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None
            logs = sorted(os.path.join(path, n) for n in names if is_log_name(n))
            if not logs:
                raise LogFormatError(f"{path}: directory holds no modewatch log (*.jsonl)")
            found.extend((log, False) for log in logs)
        else:
            found.append((path, True))
    return found
