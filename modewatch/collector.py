"""The Watcher: its life cycle, and the events of the hooks and patches routed to each stage.

model call → ``hooks`` (per layer call) → ``forwards`` (until the probes say whether it trained)
→ ``folding`` (runs of identical forwards into rows) → the log's writer. Beside them: the
``registry`` of watched models and layers, the ``catalog`` of ids, ``attribution`` of modes to
their ``.train()``/``.eval()`` calls, ``optimizers`` (steps), ``discovery`` (MODEWATCH=1) and
``live`` (on_finding). docs/how-it-works.md follows the same path.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import warnings
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from . import attribution, discovery, folding, functional, logpath, patches, sites
from .allow import allowed_rules
from .catalog import Catalog
from .compat import is_grad_enabled as _is_grad_enabled, data_ptr, version
from .errors import LogPathError, ModeFindingError
from .format import INFERENCE, MODE_FLAGS, with_flags
from .forwards import Forward, Pending, State
from .layers import check_named
from .live import ON_FINDING, Live
from .writer import LogWriter
from .optimizers import Optimizers
from .registry import Registry, has_anything_to_watch

FLUSH_SECONDS = 1.0  # a killed job loses at most about this much of its log
MAX_ROWS_PER_LINE = 2048  # rows buffered before they are written, whatever the clock says
UPDATES_SEEN = 2  # forwards that saw a model change with no optimizer before it counts as updated
CLOCK_EVERY = 16  # forwards between two reads of the clock (reading it costs more than it saves)


def _header() -> dict:
    return dict(torch=torch.__version__, python=sys.version.split()[0], pid=os.getpid(), argv=list(sys.argv),
                rank=logpath.rank(), world_size=logpath.world_size(), time=time.time())


def _open_log(template: str) -> LogWriter:
    path = logpath.substitute(template)
    try:
        file, path = logpath.claim(path)
        return LogWriter(path, file)
    except OSError as exc:
        raise LogPathError(f"cannot write the modewatch log {path!r}: {exc.strerror or exc}") from None


def _is_child_process() -> bool:
    """A multiprocessing child (a DataLoader worker, a spawned rank): not the program itself."""
    try:
        import multiprocessing

        return multiprocessing.parent_process() is not None
    except Exception:
        return False


class Watcher:
    """Records the mode of every Dropout/BatchNorm call of watched models into a JSON-lines log.

    Made by ``modewatch.watch()``. ``close()`` (idempotent, also run at interpreter exit) writes
    what is pending and removes every hook; a Watcher is also a context manager.
    """

    def __init__(self, model: Optional[nn.Module], log: Union[str, "os.PathLike[str]", None] = None, *,
                 flush_seconds: float = FLUSH_SECONDS, fold: bool = True, discover: bool = False,
                 on_finding: Optional[str] = None, layers: Optional[Mapping[type, str]] = None):
        if on_finding is not None and on_finding not in ON_FINDING:
            raise ValueError(f"on_finding must be 'warn' or 'raise', not {on_finding!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"modewatch.watch() needs a torch.nn.Module, not {type(model).__name__}")
        if isinstance(flush_seconds, bool) or not isinstance(flush_seconds, (int, float)) or not flush_seconds >= 0:
            raise ValueError("modewatch.watch(flush_seconds=...) must be a number of seconds (0 or more), "
                             f"not {flush_seconds!r}")
        if not isinstance(fold, bool):
            raise TypeError(f"modewatch.watch(fold=...) must be True or False, not {fold!r}")
        named = check_named(layers)  # custom layers named by the user
        self.off = True  # hooks do nothing until the log is open
        self.template = logpath.template(log)
        # Under MODEWATCH=1 every process that imports torch gets a watcher: its log is created
        # once there is something to write, or at exit (see close), not at start-up.
        self._writer = None if discover else _open_log(self.template)
        self.path = logpath.substitute(self.template) if discover else self._writer.path
        self.discover = discover  # MODEWATCH=1: watch models as they show up (mode calls, optimizers)
        self.always_log = False  # MODEWATCH=1's own watcher: the program's process always leaves a log
        self.on_finding = on_finding
        self.flush_seconds = flush_seconds
        self._live = Live(self.path, on_finding) if on_finding else None
        self._lock = threading.RLock()
        self.state = State()
        self.nested: set = set()  # see hooks.ModelHooks.before
        self.step = 0
        self.catalog = Catalog(self._live.feed if self._live is not None else None)
        self.registry = Registry(self, self.catalog, named, self._lock)
        self.layer_modes, self.versions, self.marks = (self.registry.layer_modes, self.registry.versions,
                                                       self.registry.marks)  # read by the hooks
        self.optimizers = Optimizers(self.registry, self.catalog)
        self.pending = Pending(self._resolve)
        self.folder = folding.Folder(fold)
        self._kept: dict = {}  # mode id of a library's call that changed nothing -> the call it kept
        self._feeds: dict = {}  # (model, model called on its output) -> times seen
        self._seq = 0  # forwards begun
        self._unstepped = False  # a forward ran, on any thread, since a step of a thread with no forwards
        self._failed = False
        self._closed = False
        self._child = False  # a forked child of the process that made this watcher
        self._last_flush = time.monotonic()
        self._since_clock = 0  # forwards since the clock was last read
        if self._writer is not None:
            self._writer.header(**_header())
        try:
            if model is not None:
                self.add_model(model, sys._getframe(1))
            self._write()  # the header reaches the disk now: a full disk is found before training
        except BaseException as exc:
            self.registry.detach()
            self._discard_log()
            if isinstance(exc, OSError):
                raise LogPathError(f"cannot write the modewatch log {self.path!r}: {exc.strerror or exc}") from None
            raise
        patches.attach(self)
        atexit.register(self.close)
        _close_in_multiprocessing_children(self)
        self.off = False

    def add_model(self, model: nn.Module, frame: Any = None) -> None:
        """Watch one more model (``frame``: where it was watched or found). A model that holds
        models already watched adopts them (see ``Registry.add_model``)."""
        if self._closed:
            raise ValueError("this modewatch Watcher is closed: it cannot watch another model")
        with self._lock:
            before = len(self.registry.models)
            if self.folder.rows or self.folder.runs:  # a model that adopts watched ones renames their
                self.pending.drain()  # layers: what was recorded under the old names is written first
                self._write(end_runs=True)
            self.registry.add_model(model, frame)
            if len(self.registry.models) > before:
                self.optimizers.forget()  # an optimizer's verdict may change with the new parameters
                if not model.training:
                    attribution.initial_eval_mode(self.registry, self.catalog, model)

    # ------------------------------------------------------------------ from the hooks (hooks.Recorder)

    def begin_forward(self, frame: Any, model: int, args: tuple = ()) -> Forward:
        pending = self.pending
        if pending.done:  # forwards whose graph died since: resolve them first, to keep the order
            pending.drain()
        if pending.outputs and args and type(args[0]) is torch.Tensor:
            self._fed_by(args[0].grad_fn, model)
        user, recalibrating = sites.user_frame(frame)
        self._seq += 1
        record = self.registry.models[model]
        if not record.stepped:
            self._check_parameters(record)
        return Forward(self._seq, self.catalog.site(user), self.catalog.context(allowed_rules(), recalibrating),
                       self.step, model, record.steps, pending.done)

    def _fed_by(self, node: Any, model: int) -> None:
        """A model called on the output of another's forward (a GAN's discriminator on the
        generator's images): the other is a generator, whose sampling in train mode is no
        evaluation (stat-update-in-sampling). Written once seen twice, for one pair."""
        source = self.pending.outputs.get(id(node)) if node is not None else None
        if source is None or source == model or not self.registry.models[model].sample:
            return  # (a model with no parameters, a loss module, is no discriminator)
        pair = (source, model)
        seen = self._feeds.get(pair, 0) + 1
        self._feeds[pair] = seen
        if seen == 2:
            self.catalog.define("feeds", model=source, into=model)

    def _check_parameters(self, record: Any) -> None:
        """An EMA / momentum target (BYOL, MoCo, DINO, mean teacher): a model that no optimizer
        steps, whose parameters change between its forwards all the same. The version counters
        and data pointers of a few of its parameters tell, reading no value. (An update through
        ``.data`` moves neither; the analysis recognises such a copy by its likeness instead.)"""
        mark = tuple((version(p), data_ptr(p)) for ref in record.sample if (p := ref()) is not None)
        if record.mark is not None and mark != record.mark:
            record.changes += 1
            if record.changes == UPDATES_SEEN:
                self.catalog.define("updated", model=record.index, step=self.step)
        record.mark = mark

    def end_forward(self, forward: Forward, output: Any) -> None:
        self.state.stepped_since = False
        self._unstepped = True  # for a thread that steps with no forward of its own
        if forward.calls:
            self.pending.watch(forward, output)
        if self.pending.done:
            self.pending.drain()
        self._since_clock += 1
        if self._since_clock >= CLOCK_EVERY:
            self._flush_if_due()

    def unusual_call(self, owner: Any, module: nn.Module, args: tuple, output: Any) -> None:
        """A layer call off the fast path: a deep copy of a layer, or a call outside any watched
        forward (``model.features(x)``), which is then a forward of its own."""
        if self.off or patches.backward_running():
            # During a backward, a layer call is activation checkpointing recomputing a forward
            # that was already recorded: recording it again would count it twice.
            return
        layer = owner.layer if id(module) == owner.module_id else self.registry.copy_layer(module, owner.layer)
        forward = self.state.forward
        if forward is not None:
            owner.add(module, args, forward, layer)
            return
        forward = self.begin_forward(sys._getframe(2), self.registry.layer_models[layer])
        owner.add(module, args, forward, layer)
        self.end_forward(forward, output)

    def copy_model(self, module: nn.Module, original: int) -> int:
        return self.registry.copy_model(module, original)

    def nested_model(self, module: nn.Module, outer: int) -> None:
        """A watched model called inside another's forward, for the first time: if it is a part of
        that model (attached after it was watched: a projector made at the first forward), the
        outer model adopts it, as it would have had it been there when watched."""
        self.nested.add(id(module))
        self.registry.adopt(module, outer)

    def copy_layer(self, module: nn.Module, original: int) -> int:
        return self.registry.copy_layer(module, original)

    def note_copy(self, copy: nn.Module, owner: Any) -> None:
        self.registry.note_copy(copy, owner)

    # ------------------------------------------------------------------ from the patches

    def on_mode_call(self, module: nn.Module, call: str, mode: bool, nested: bool) -> None:
        if self.off:
            return
        try:
            caller = sys._getframe(2)
            if self.discover and not nested and self.registry.lookup(module) is None:
                self.add_model(module, caller)
            attribution.mode_call(self.registry, self.catalog, self._kept, module, call, mode, nested, caller)
        except Exception as exc:
            self.fail(exc)

    def on_optimizer_created(self, optimizer: Any, frame: Any) -> None:
        """An optimizer was made: under MODEWATCH=1, watch the model it is made for; then write
        down the watched models it holds (see Optimizers.created)."""
        if self.off:
            return
        try:
            if self.discover:
                model, user = discovery.model_of_optimizer(optimizer, frame)
                if model is not None and self.registry.lookup(model) is None:
                    self.add_model(model, user)
            self.optimizers.created(optimizer, self.step)
        except Exception as exc:
            self.fail(exc)

    def on_model_set_up(self, module: nn.Module, frame: Any) -> None:
        """MODEWATCH=1: a module moved, loaded or frozen (``teacher.to(device)``,
        ``teacher.load_state_dict(...)``) is watched as a model, unless it is one or part of one,
        or has nothing to watch (a loss module: watched, the model it is called on would pass for
        a generator feeding it)."""
        if self.off or not self.discover or self.state.depth:
            return
        try:
            if self.registry.lookup(module) is None and has_anything_to_watch(module, self.registry.named):
                self.add_model(module, frame)
        except Exception as exc:
            self.fail(exc)

    def on_functional_call(self, kind: str, p: Optional[float], training: bool, frame: Any) -> None:
        """A functional dropout (see ``functional``), recorded as a layer call of the module whose
        forward made it. Only inside a watched forward, and never during a backward (activation
        checkpointing recomputing a forward already recorded)."""
        forward = self.state.forward
        if forward is None or self.off or patches.backward_running():
            return
        try:
            module, known = functional.enclosing_module(frame, self.registry.lookup)
            if module is None or known.layer is not None:  # a watched layer records itself
                return
            layer = None if known.functional is None else known.functional.get(kind)
            if layer is None:
                layer = self.registry.add_functional(module, known, kind, self.catalog.site(frame))
            module_training = module.training
            training, param = functional.row_values(p, training, module_training)
            mode_id, mode = known.mode or (None, None)
            forward.calls.append((layer, MODE_FLAGS[training][_is_grad_enabled()], None, param,
                                  mode_id if mode == module_training else None))
        except Exception as exc:
            self.fail(exc)

    def on_optimizer_step(self, optimizer: Any, args: Any = None, kwargs: Any = None) -> None:
        """An optimizer step post-hook (every optimizer class). A step is counted when the
        optimizer holds a watched model's parameters and a watched forward ran since this thread's
        last step: back-to-back steps of two optimizers (a GAN's) count once; threads each count
        their own. A thread that never ran a watched forward itself (DataParallel's, whose
        replicas run on threads of their own) counts a step when a forward ran on any thread
        since its last one."""
        if self.off:
            return
        try:
            state = self.state
            if not self.optimizers.step(optimizer, self.step):
                return
            stepped_since = state.stepped_since
            if stepped_since is None:  # no forward of its own, ever
                if not self._unstepped:
                    return
                self._unstepped = False
            elif stepped_since:
                return
            else:
                state.stepped_since = True
            with self._lock:
                self.step += 1
                pending = self.pending
                if pending.done:
                    pending.drain()
                if pending.waiting:
                    models = self.registry.models
                    pending.resolve_stale(lambda model: models[model].steps)
            self._since_clock += CLOCK_EVERY // 4  # a step is worth several forwards of the clock's time
            if self._since_clock >= CLOCK_EVERY:
                self._flush_if_due()
        except Exception as exc:
            self.fail(exc)

    # ------------------------------------------------------------------ resolving and writing

    def _resolve(self, forward: Forward, kind: Optional[int] = None) -> None:
        """A forward's verdict is in (``kind``, or its probes'): fold it into its run."""
        with self._lock:
            if forward.resolved:
                return
            forward.resolved = True
            self.pending.forget(forward)
            key = (forward.kind if kind is None else kind, forward.site, forward.context)
            calls = forward.calls
            if forward.inference:
                calls = [with_flags(call, INFERENCE) for call in calls]
            forward.calls = []
            self.folder.add(key, calls, forward.step, forward.seq)
            if len(self.folder.rows) >= MAX_ROWS_PER_LINE:  # a mode change every step: keep lines short
                self._write()
            if self._live is not None:  # the same rows the log gets, one forward at a time
                self._live.check(folding.forward_rows(key, calls, forward.step, forward.seq), self.step)

    def _write(self, end_runs: bool = False, always: bool = False) -> None:
        with self._lock:
            if self._writer is None:  # MODEWATCH=1 or a forked child: opened once there is something
                if not (self.folder.rows or (end_runs and self.folder.runs) or always):
                    return
                self._writer = _open_log(self.template)
                self.path = self._writer.path
                self._writer.header(**_header())
                self.catalog.start_over()
            for event, fields in self.catalog.take():
                getattr(self._writer, event)(**fields)
            if end_runs:
                self.folder.end_runs()
            rows = self.folder.take()
            if rows:
                self._writer.calls(self.step, rows)
            self._writer.flush()
            self._last_flush = time.monotonic()

    def _flush_if_due(self) -> None:
        """The clock's turn (every CLOCK_EVERY forwards' worth): flush once ``flush_seconds`` have
        passed since the last write."""
        self._since_clock = 0
        if time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write everything recorded so far, including runs still open (crash safety)."""
        if self._closed:
            return
        try:
            self.pending.drain()
            self._write(end_runs=True)
        except Exception as exc:
            self.fail(exc)

    def _discard_log(self) -> None:
        """The log could not be started (a full disk): leave no empty file behind."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except OSError:
            pass
        try:
            if os.path.isfile(writer.path):
                os.unlink(writer.path)
        except OSError:
            pass

    # ------------------------------------------------------------------ life cycle

    def before_fork(self) -> None:
        """Empty the file buffer, so that a forked child inherits nothing it could write twice."""
        try:
            if self._writer is not None:
                self._writer.flush()
        except Exception:
            pass

    def after_fork_in_child(self) -> None:
        """In a forked child (a DataLoader worker, multiprocessing): never the parent's log.

        The child writes a log of its own once it records something: at the path of ``{pid}``
        in the template, or beside the parent's (``logpath.claim``), said on stderr.
        """
        self._lock = threading.RLock()  # another thread may have held it at the fork
        self.registry.lock = self._lock
        self._child = True
        self.pending.clear()
        self.folder.clear()
        if self._writer is not None:
            self._writer.abandon()
            self._writer = None

    def close(self) -> None:
        """Stop watching: resolve what is pending, write it, remove every hook. Idempotent.

        With ``on_finding="raise"``, a finding completed here is raised after the log is written
        whole. Under MODEWATCH=1 the program's own process always leaves a log, also when it
        watched nothing, so that ``modewatch analyze`` has something to read."""
        if self._closed:
            return
        self.off = True
        found = None
        try:
            self._detach()
            if not self._failed:
                while True:  # a finding raised by one forward's verdict must not stop the others'
                    try:
                        self.pending.drain()
                        break
                    except ModeFindingError as exc:
                        found = found or exc
                for forward in list(self.pending.waiting.values()):
                    try:
                        self._resolve(forward)
                    except ModeFindingError as exc:
                        found = found or exc
                if self._live is not None:
                    try:
                        self._live.check([], self.step, final=True)
                    except ModeFindingError as exc:
                        found = found or exc
                always = self.always_log and not self._child and not _is_child_process()
                self._write(end_runs=True, always=always)
                if self._writer is not None:
                    self._writer.footer(steps=self.step, forwards=self._seq, models=len(self.registry.models))
                    if self.discover:  # MODEWATCH=1: nobody chose the path, so say where it is
                        sys.stderr.write(f"modewatch: wrote {self.path} (see: modewatch analyze {self.path})\n")
        except Exception as exc:
            self._warn(exc)
        finally:
            self._closed = True
            try:
                if self._writer is not None:
                    self._writer.close()
            except Exception:
                pass
            atexit.unregister(self.close)
        if found is not None:
            raise found

    def _detach(self) -> None:
        """Remove every hook of this watcher (from deep copies too) and, with the last watcher,
        every patch."""
        self.registry.detach()
        patches.detach(self)

    def fail(self, exc: BaseException) -> None:
        """A failure inside modewatch: one warning, stop watching, never disturb the training."""
        if isinstance(exc, ModeFindingError):  # not a failure: what on_finding="raise" asked for
            raise exc
        if self._failed:
            return
        self._failed = True
        self.off = True
        self._warn(exc)
        try:
            self._detach()
            if self._writer is not None:
                self._writer.flush()
        except Exception:
            pass

    def _warn(self, exc: BaseException) -> None:
        if isinstance(exc, LogPathError):  # not a bug: the log's place is the problem
            message = f"modewatch stopped watching: {exc.message}; training goes on unwatched"
        else:
            message = (f"modewatch stopped watching after an internal error ({type(exc).__name__}: {exc}); "
                       f"training goes on unwatched. Log so far: {self.path}")
        try:
            warnings.warn(message, RuntimeWarning, stacklevel=sites.user_stacklevel(sys._getframe()))
        except Exception:  # warnings turned into errors must not reach the user's code
            try:
                sys.stderr.write(f"warning: {message}\n")
            except Exception:
                pass

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "off" if self.off else "watching"
        return f"<modewatch.Watcher {state} {len(self.registry.layer_names)} layers -> {self.path}>"


def _close_in_multiprocessing_children(watcher: Watcher) -> None:
    """A multiprocessing child (fork) ends with ``os._exit``, which skips ``atexit``: have the
    child close the watcher through multiprocessing's own exit finalizers instead."""
    try:
        from multiprocessing import util

        util.register_after_fork(watcher, _finalize_in_child)
    except Exception:
        pass


def _finalize_in_child(watcher: Watcher) -> None:
    from multiprocessing import util

    util.Finalize(watcher, watcher.close, exitpriority=10)
